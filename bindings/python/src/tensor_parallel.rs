//! The tensor-parallel log-probs: a shard's partials, their combine and the shard's backward.

#[allow(unused_imports)]
use crate::prelude::*;

/// Tensor parallelism, step 1: a vocabulary shard's partials `[3, T]` (LSE, entropy, label logit
/// or -inf; `[4, T]` adds the shard's own sum_j p_j^2) of `logits` [T, V_r] holding the columns
/// from `vocab_start` on.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, vocab_start, temperature, ignore_index, partials))]
pub(crate) fn tp_partials(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    vocab_start: usize,
    temperature: f32,
    ignore_index: i32,
    partials: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let y = call.i32("labels", labels)?;
    let out = call.out_f32("partials", partials)?;
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_in::<$e>(&t, rows, vocab, ld);
            py.detach(|| raw::tp_partials::<$e>(call.place, &z, y, vocab_start, &lc, out))
        }};
    }
    by_dtype!(t, go).map_err(err)
}

/// Tensor parallelism, step 2: the combine of the shards' partials `[P, 3, T]` or `[P, 4, T]`
/// (ascending vocab_start) into `logp`, `entropy` and `lse` [T], and with 4 planes
/// `sum_pi_squared` [T] where given.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (partials, labels, ignore_index, logp, entropy, lse, sum_pi_squared=None))]
pub(crate) fn tp_combine(
    py: Python<'_>,
    partials: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    ignore_index: i32,
    logp: &Bound<'_, PyAny>,
    entropy: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    sum_pi_squared: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let first = Tensor::of("partials", partials)?;
    let call = Call::new(py, &first)?;
    if first.shape.len() != 3 || !(3..=4).contains(&first.shape[1]) {
        return Err(arg_err(
            "partials",
            format!("expected [P, 3 or 4, T], got shape {}", first.shape_str()),
        ));
    }
    let shards = first.shape[0];
    let part = call.f32("partials", partials)?;
    let y = call.i32("labels", labels)?;
    let (lp, h, l) = (
        call.out_f32("logp", logp)?,
        call.out_f32("entropy", entropy)?,
        call.out_f32("lse", lse)?,
    );
    let lc = LogprobConfig {
        ignore_index,
        ..LogprobConfig::default()
    };
    let q = sum_pi_squared
        .map(|q| call.out_f32("sum_pi_squared", q))
        .transpose()?;
    py.detach(|| raw::tp_combine(call.place, part, shards, y, &lc, lp, h, l, q))
        .map_err(err)
}

/// Tensor parallelism, step 3: the shard's slice of the whole-vocabulary gradient, written over
/// the shard's `logits`, from the combined `lse` and `entropy` (and the combined `sum_pi_squared`
/// with its gradient, both or neither).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, vocab_start, lse, entropy, g_logp, g_entropy, temperature, ignore_index,
                    sum_pi_squared=None, g_sum_pi_squared=None))]

pub(crate) fn tp_backward_(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    vocab_start: usize,
    lse: &Bound<'_, PyAny>,
    entropy: &Bound<'_, PyAny>,
    g_logp: &Bound<'_, PyAny>,
    g_entropy: Option<&Bound<'_, PyAny>>,
    temperature: f32,
    ignore_index: i32,
    sum_pi_squared: Option<&Bound<'_, PyAny>>,
    g_sum_pi_squared: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    backward(
        py,
        logits,
        [labels, lse, entropy, g_logp],
        (g_entropy, spp_pair(sum_pi_squared, g_sum_pi_squared)?),
        Some(vocab_start),
        (temperature, ignore_index),
    )
}

/// Registers this family's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tp_partials, m)?)?;
    m.add_function(wrap_pyfunction!(tp_combine, m)?)?;
    m.add_function(wrap_pyfunction!(tp_backward_, m)?)?;
    Ok(())
}
