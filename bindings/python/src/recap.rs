//! RECAP's scheduler as a Python class.

#[allow(unused_imports)]
use crate::prelude::*;

/// RECAP's dynamic objective weights (the crate's `RecapScheduler`): `observe` one monitored value
/// per objective and step, `weights` gives the K objective weights.
#[pyclass(name = "RecapScheduler", module = "recap_kernels._native")]
pub(crate) struct PyRecapScheduler(RecapScheduler);

#[pymethods]
impl PyRecapScheduler {
    /// `orientations`: "reward" (higher is better) or "loss" per objective; `config_json`: the
    /// scheduler options as JSON over the preset's ("paper": its equations, "authors": its
    /// authors' code; `RecapConfig::preset`).
    #[new]
    #[pyo3(signature = (orientations, config_json="{}", preset="paper"))]
    fn new(orientations: Vec<String>, config_json: &str, preset: &str) -> PyResult<Self> {
        let o = orientations
            .iter()
            .map(|x| x.parse::<Orientation>())
            .collect::<recap_kernels::Result<Vec<_>>>()
            .map_err(err)?;
        let cfg = RecapConfig::preset_with_json(preset, config_json).map_err(err)?;
        Ok(PyRecapScheduler(RecapScheduler::new(&o, cfg).map_err(err)?))
    }

    /// Records one step's monitored values (K floats).
    fn observe(&mut self, values: Vec<f64>) -> PyResult<()> {
        self.0.observe(&values).map_err(err)
    }

    /// The current K weights.
    fn weights(&self) -> Vec<f32> {
        self.0.weights()
    }

    /// The number of objectives.
    #[getter]
    fn num_objectives(&self) -> usize {
        self.0.num_objectives()
    }

    /// The number of observed steps.
    #[getter]
    fn steps(&self) -> u64 {
        self.0.steps()
    }

    /// The whole state as JSON (a checkpoint).
    fn to_json(&self) -> PyResult<String> {
        self.0.to_json().map_err(err)
    }

    /// A scheduler restored from `to_json`'s output.
    #[staticmethod]
    fn from_json(json: &str) -> PyResult<Self> {
        Ok(PyRecapScheduler(
            RecapScheduler::from_json(json).map_err(err)?,
        ))
    }
}
