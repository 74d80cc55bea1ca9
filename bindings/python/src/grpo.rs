//! The fused loss and the token ops beside it: the config, the loss (synchronous and
//! asynchronous) and its output, KL, rollout rejection and IS weights, the weighted reduction and
//! the normalizers.

#[allow(unused_imports)]
use crate::prelude::*;

/// The validated, canonical JSON form of a loss configuration given as JSON (absent fields take
/// verl's defaults; an unknown field or a value out of range is a RecapError naming it).
#[pyfunction]
pub(crate) fn grpo_config(json: &str) -> PyResult<String> {
    Ok(config(json)?.to_json())
}

/// The fields of the fused loss's statistics vector for `k` objectives: `(name, offset, length,
/// per_objective)`.
#[pyfunction]
pub(crate) fn grpo_stat_layout(k: usize) -> Vec<(&'static str, usize, usize, bool)> {
    recap_kernels::grpo_stat_layout(k)
        .into_iter()
        .map(|f| (f.name, f.offset, f.len, f.per_objective))
        .collect()
}

/// Length (float64 values) of the asynchronous fused loss's output for `k` objectives.
#[pyfunction]
pub(crate) fn grpo_output_len(k: usize) -> usize {
    recap_kernels::cuda::grpo_output_len(k)
}

/// The fused GRPO loss: `grad` [T] gets dL/dlogp, `loss` (0-dim float32) the loss, `stats`
/// [grpo_stat_layout] the statistics.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logp, old_logp, policy_weight, batch, grad, loss, stats))]
pub(crate) fn grpo_loss(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    policy_weight: Option<&Bound<'_, PyAny>>,
    batch: Batch<'_>,
    grad: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let b = batch.load(&call)?;
    let inputs = b.grpo_inputs(
        call.f32("logp", logp)?,
        call.f32("old_logp", old_logp)?,
        call.opt_f32("policy_weight", policy_weight)?,
    );
    let (g, l, s) = (
        call.out_f32("grad", grad)?,
        call.out_f32("loss", loss)?,
        call.out_f64("stats", stats)?,
    );
    let out = py
        .detach(|| raw::grpo_loss(call.place, &inputs, &b.cfg, g))
        .map_err(err)?;
    call.write("loss", l, &[out.loss as f32])?;
    call.write("stats", s, &out.stats())
}

/// The fused GRPO loss without a host synchronization: `grad` [T] gets dL/dlogp, `out`
/// [grpo_output_len(K)] (float64) the device-resident output (the loss at index 0, the check flags,
/// the normalizers, the statistics). `cu_seqlens`, `lambda_` and `membership` are CPU tensors
/// (uploaded) or all three on the call's CUDA device (int32, float32, int32 bits; checked on the
/// device, reported by `grpo_output_read`). On CPU tensors the reference fills the same layout.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logp, old_logp, policy_weight, batch, grad, out))]
pub(crate) fn grpo_loss_async(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    policy_weight: Option<&Bound<'_, PyAny>>,
    batch: Batch<'_>,
    grad: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let (l, dev) = batch.load_async(&call)?;
    let inputs = l.grpo_inputs(
        call.f32("logp", logp)?,
        call.f32("old_logp", old_logp)?,
        call.opt_f32("policy_weight", policy_weight)?,
    );
    let (g, o) = (call.out_f32("grad", grad)?, call.out_f64("out", out)?);
    py.detach(|| raw::grpo_loss_async(call.place, &inputs, dev.as_ref(), &l.cfg, g, o))
        .map_err(err)?;
    Ok(())
}

/// Reads an asynchronous fused-loss output back (synchronizing its stream on a device):
/// `(loss, stats)` with stats as `grpo_stat_layout(k)`; `has_ref` / `has_rollout`: whether the call
/// had `ref_logp` / `rollout_logp`. Raises the error of a failed device-side check.
#[pyfunction]
#[pyo3(signature = (out, k, config, has_ref, has_rollout))]
pub(crate) fn grpo_output_read(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    k: usize,
    config: &str,
    has_ref: bool,
    has_rollout: bool,
) -> PyResult<(f64, Vec<f64>)> {
    let t = Tensor::of("out", out)?;
    let call = Call::new(py, &t)?;
    t.want(&[DType::F64])?;
    let cfg = self::config(config)?;
    if !(1..=recap_kernels::MAX_OBJECTIVES).contains(&k) {
        return Err(arg_err(
            "k",
            format!("expected 1 <= K <= {}", recap_kernels::MAX_OBJECTIVES),
        ));
    }
    let pending = recap_kernels::cuda::PendingGrpo::new(k, has_ref, has_rollout, &cfg);
    let o = py
        .detach(|| raw::read_grpo_output(call.place, &pending, t.arr()))
        .map_err(err)?;
    Ok((o.loss, o.stats()))
}

/// Per-token KL value and d kl / d logp into `kl` and `grad` ([T] each).
#[pyfunction]
#[pyo3(signature = (logp, ref_logp, mask, estimator, kl, grad))]
pub(crate) fn kl(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    ref_logp: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    estimator: &str,
    kl: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let est: KlEstimator = estimator.parse().map_err(err)?;
    let (lp, rf) = (call.f32("logp", logp)?, call.f32("ref_logp", ref_logp)?);
    let m = mask.map(|m| call.mask("mask", m)).transpose()?;
    let (k, g) = (call.out_f32("kl", kl)?, call.out_f32("grad", grad)?);
    py.detach(|| raw::kl(call.place, lp, rf, m, est, k, g))
        .map_err(err)
}

/// Rollout rejection flags into `flags` ([T] int32: bit i where option i of verl's `rollout_rs`
/// rejects the token, 0 at masked tokens; the veto, when given, last) of `log_ratio` =
/// old_logp - rollout_logp ([T]).
#[pyfunction]
#[pyo3(signature = (log_ratio, mask, cu_seqlens, rollout_rs, rollout_rs_threshold, veto_threshold, flags))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rollout_rejection(
    py: Python<'_>,
    log_ratio: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    rollout_rs: &str,
    rollout_rs_threshold: &str,
    veto_threshold: Option<f64>,
    flags: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("log_ratio", log_ratio)?;
    let call = Call::new(py, &first)?;
    let criteria =
        RejectionCriterion::parse_verl_with_veto(rollout_rs, rollout_rs_threshold, veto_threshold)
            .map_err(err)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let (lr, m) = (call.f32("log_ratio", log_ratio)?, call.mask("mask", mask)?);
    let f = call.out_i32("flags", flags)?;
    py.detach(|| raw::rollout_rejection(call.place, lr, m, &cu, &criteria, f))
        .map_err(err)
}

/// Rollout IS weights into `weights` ([T] float32, 0 at masked tokens) of `log_ratio` =
/// old_logp - rollout_logp ([T]), with verl's `rollout_is` level and `rollout_is_threshold`; divided
/// by the batch mean when `batch_normalize`. `stats` ([7] float64): weight sum, units, smallest and
/// largest raw ratio, corrected units, batch mean, the factor the weights were divided by.
#[pyfunction]
#[pyo3(signature = (log_ratio, mask, cu_seqlens, rollout_is, rollout_is_threshold, batch_normalize,
                    weights, stats))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rollout_is_weights(
    py: Python<'_>,
    log_ratio: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    rollout_is: &str,
    rollout_is_threshold: &str,
    batch_normalize: bool,
    weights: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("log_ratio", log_ratio)?;
    let call = Call::new(py, &first)?;
    let correction = rollout_is::parse_verl(rollout_is, rollout_is_threshold).map_err(err)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let (lr, m) = (call.f32("log_ratio", log_ratio)?, call.mask("mask", mask)?);
    let (w, s) = (
        call.out_f32("weights", weights)?,
        call.out_f64("stats", stats)?,
    );
    let st = py
        .detach(|| raw::rollout_is_weights(call.place, lr, m, &cu, &correction, batch_normalize, w))
        .map_err(err)?;
    call.write("stats", s, &st.to_array())
}

/// `(mean, factor)` of rollout IS weights for the batch whose parts' weight sums and units add up
/// to `weight_sum` and `units`: the batch mean and what the weights are divided by (the
/// data-parallel form of `rollout_is_batch_normalize`).
#[pyfunction]
pub(crate) fn rollout_is_batch_factor(
    weight_sum: f64,
    units: f64,
    rollout_is: &str,
) -> PyResult<(f64, f64)> {
    let level = rollout_is::parse_level(rollout_is).map_err(err)?;
    Ok((
        rollout_is::batch_mean(weight_sum, units, level),
        rollout_is::batch_factor(weight_sum, units, level),
    ))
}

/// The per-objective weighted reduction of `losses` [T, K]: `grad` [T, K], `total` (0-dim
/// float32) and `stats` ([3K]: each objective's aggregate, token weight and sequence count).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (losses, mask, cu_seqlens, lambda_, membership, normalizers, seq_tokens,
                    config_json, grad, total, stats))]

pub(crate) fn weighted_reduce(
    py: Python<'_>,
    losses: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    lambda_: &Bound<'_, PyAny>,
    membership: Option<&Bound<'_, PyAny>>,
    normalizers: Option<&Bound<'_, PyAny>>,
    seq_tokens: Option<&Bound<'_, PyAny>>,
    config_json: &str,
    grad: &Bound<'_, PyAny>,
    total: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("losses", losses)?;
    let call = Call::new(py, &first)?;
    let cfg = config(config_json)?;
    let lay = Layout::read(
        &call,
        cu_seqlens,
        lambda_,
        &[],
        membership,
        normalizers,
        seq_tokens,
    )?;
    let inputs = ReduceInputs {
        losses: call.f32("losses", losses)?,
        mask: call.mask("mask", mask)?,
        cu_seqlens: &lay.cu,
        lambda: &lay.lambda,
        membership: lay.membership.as_deref(),
        normalizers: lay.normalizers.as_ref(),
    };
    let (g, t, s) = (
        call.out_f32("grad", grad)?,
        call.out_f32("total", total)?,
        call.out_f64("stats", stats)?,
    );
    let out = py
        .detach(|| raw::weighted_reduce(call.place, &inputs, &cfg, g))
        .map_err(err)?;
    call.write("total", t, &[out.total as f32])?;
    let objective_seqs: Vec<f64> = out.objective_seqs.iter().map(|&x| x as f64).collect();
    call.write(
        "stats",
        s,
        &[
            &out.objective_loss[..],
            &out.objective_tokens[..],
            &objective_seqs[..],
        ]
        .concat(),
    )
}

/// This batch's normalizers ([2, K + 1] float64: token weights, then sequence counts, the KL slot
/// last) and per-sequence token weights ([B] float64), on the mask's device.
#[pyfunction]
#[pyo3(signature = (mask, cu_seqlens, membership, k, normalizers, seq_tokens))]
pub(crate) fn count_normalizers(
    py: Python<'_>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    membership: Option<&Bound<'_, PyAny>>,
    k: usize,
    normalizers: &Bound<'_, PyAny>,
    seq_tokens: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("mask", mask)?;
    let call = Call::new(py, &first)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let membership = membership.map(|m| host_u32("membership", m)).transpose()?;
    let m = call.mask("mask", mask)?;
    let (n_out, st_out) = (
        call.out_f64("normalizers", normalizers)?,
        call.out_f64("seq_tokens", seq_tokens)?,
    );
    let n = py
        .detach(|| raw::count_normalizers(call.place, &m, &cu, membership.as_deref(), k))
        .map_err(err)?;
    call.write("normalizers", n_out, &[&n.tokens[..], &n.seqs[..]].concat())?;
    let st = n.seq_tokens.unwrap_or_default();
    call.write("seq_tokens", st_out, &st)
}

/// Registers this family's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(grpo_config, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_async, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(kl, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_rejection, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_is_weights, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_is_batch_factor, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(count_normalizers, m)?)?;
    Ok(())
}
