//! `recap_kernels._native`: the Python extension of recap-kernels.
//!
//! Each function takes PyTorch tensors (read through their `data_ptr`, `shape`, `stride`, `dtype`
//! and `device`, without linking libtorch), checks them (dtype, device, contiguity; the error names
//! the argument) and calls the crate's pointer-level layer [`recap_kernels::raw`]: CPU tensors run
//! the f64 CPU reference, CUDA tensors the kernels on PyTorch's current stream of their device.
//! Outputs are tensors the caller allocated (the Python package's `torch.library` custom ops do,
//! with the same shapes as their fake implementations); loss and statistics are written into them
//! on the tensors' device. Options arrive as the JSON form of [`GrpoConfig`]: one definition, in
//! Rust. The GIL is released while an op runs.
//!
//! This file only registers the module; each op family lives in its own file.

mod advantages;
mod convert;
mod grpo;
mod logits;
mod logits_loss;
mod prelude;
mod recap;
mod tensor_parallel;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KERNELS_COMPILED", recap_kernels::cuda::KERNELS_COMPILED)?;
    m.add("CUDA_ARCHS", recap_kernels::cuda::CUDA_ARCHS)?;
    m.add("NVCC_VERSION", recap_kernels::cuda::NVCC_VERSION)?;
    m.add("RecapError", m.py().get_type::<convert::RecapError>())?;
    m.add("ROLLOUT_IS_STATS", recap_kernels::RolloutIsStats::LEN)?;
    m.add_class::<recap::PyRecapScheduler>()?;
    grpo::register(m)?;
    logits::register(m)?;
    logits_loss::register(m)?;
    advantages::register(m)?;
    tensor_parallel::register(m)?;
    Ok(())
}
