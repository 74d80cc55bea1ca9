//! Kernels 4 and 5 on the GPU: log-probabilities and entropy from logits, and the gradient back into
//! the logits, out of place or in place (`kernels/logits.cu`).

use crate::cuda::device::{addr, addr_mut, params::LogitsParams, Gpu, Module};
use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogprobConfig};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

fn vec_ok<E>(addr: u64, ld: usize) -> bool {
    addr % 16 == 0 && (ld * std::mem::size_of::<E>()) % 16 == 0
}

fn check_rows(arg: &'static str, got: usize, t: usize) -> Result<()> {
    check_len(arg, got, t, "[T] (the rows of logits)")
}

/// Kernel 4 on `stream`: per row, `logp = z_y/tau - LSE(z/tau)` (0 for ignored labels), optionally
/// the entropy of `softmax(z/tau)` (`None` skips writing it), the LSE (which the backward needs)
/// and optionally `sum_j p_j^2` (verl's `sum_pi_squared`, from the same read of the row), each
/// `[T]` f32. A label outside
/// `[0, V)` that is not `ignore_index` is an error (detected on the device; this synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn logprob_forward<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &Logits<CudaView<'_, E>>,
    labels: &CudaView<'_, i32>,
    config: &LogprobConfig,
    logp: &mut CudaViewMut<'_, f32>,
    entropy: Option<&mut CudaViewMut<'_, f32>>,
    lse: &mut CudaViewMut<'_, f32>,
    sum_pi_squared: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_rows("labels", labels.len(), t)?;
    check_rows("logp", logp.len(), t)?;
    if let Some(h) = &entropy {
        check_rows("entropy", h.len(), t)?;
    }
    check_rows("lse", lse.len(), t)?;
    if let Some(q) = &sum_pi_squared {
        check_rows("sum_pi_squared", q.len(), t)?;
    }
    gpu.check_stream(stream)?;
    let (lp_a, _g0) = addr_mut(logp, stream);
    let (h_a, _g1) = opt_addr_mut(entropy, stream);
    let (lse_a, _g2) = addr_mut(lse, stream);
    let (q_a, _g3) = opt_addr_mut(sum_pi_squared, stream);
    forward_raw(
        gpu,
        stream,
        logits,
        labels,
        config,
        [lp_a, h_a, lse_a, q_a],
        None,
        0,
        None,
        Shard::default(),
    )
}

/// The address of an optional output (0 for none) and its guard.
fn opt_addr_mut<'a>(
    v: Option<&'a mut CudaViewMut<'_, f32>>,
    stream: &'a CudaStream,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match v {
        Some(v) => {
            let (a, g) = addr_mut(v, stream);
            (a, Some(g))
        }
        None => (0, None),
    }
}

/// A vocabulary shard of the logits (tensor parallelism): the rows are columns `[offset, offset +
/// V)` of the whole vocabulary; `sharded` makes a label outside them another shard's (no logp, no
/// one-hot) instead of an error; `label_logit`, when not 0, receives `x_y` (-inf elsewhere).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Shard {
    pub offset: i64,
    pub sharded: bool,
    pub label_logit: u64,
}

/// The forward with optional mask in and `valid` out (mask weight, 0 at ignored labels), for
/// [`crate::cuda::grpo_loss_from_logits`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_raw<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &Logits<CudaView<'_, E>>,
    labels: &CudaView<'_, i32>,
    config: &LogprobConfig,
    [logp, entropy, lse, sum_pi_squared]: [u64; 4],
    mask: Option<(u64, bool)>,
    valid: u64,
    counter: Option<u64>,
    shard: Shard,
) -> Result<()> {
    if logits.rows == 0 {
        return Ok(());
    }
    // with the caller's counter (a device address), the caller checks it (once, after several
    // launches, or on the device)
    let mut own = None;
    if counter.is_none() {
        own = Some(stream.alloc_zeros::<u32>(1)?);
    }
    {
        let (z_a, _g0) = addr(&logits.data, stream);
        let (y_a, _g1) = addr(labels, stream);
        let (own_a, _g2) = match own.as_mut() {
            Some(c) => {
                let (a, g) = crate::cuda::device::addr_slice_mut(c, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let bad_a = counter.unwrap_or(own_a);
        let p = LogitsParams {
            logits: z_a,
            labels: y_a,
            logp,
            entropy,
            lse,
            bad_labels: bad_a,
            mask: mask.map_or(0, |m| m.0),
            mask_u8: mask.is_some_and(|m| m.1) as i32,
            valid,
            num_rows: logits.rows as i64,
            vocab: logits.vocab as i64,
            ld: logits.ld as i64,
            out_ld: logits.ld as i64,
            ignore_index: config.ignore_index,
            inv_temperature: 1.0 / config.temperature,
            label_logit: shard.label_logit,
            label_offset: shard.offset,
            sharded: shard.sharded as i32,
            sum_pi_squared,
            ..Default::default()
        };
        let v = if vec_ok::<E>(z_a, logits.ld) {
            "vec_"
        } else {
            ""
        };
        gpu.launch(
            stream,
            Module::Logits,
            &format!("recap_logprob_fwd_{v}{}", E::SUFFIX),
            logits.rows,
            &p,
        )?;
    }
    match own {
        Some(c) => check_bad_labels(stream, &c, logits.vocab, config),
        None => Ok(()),
    }
}

/// Errors if the label counter of kernel 4 is not zero (reads it back: synchronizes).
pub(crate) fn check_bad_labels(
    stream: &Arc<CudaStream>,
    counter: &CudaSlice<u32>,
    vocab: usize,
    config: &LogprobConfig,
) -> Result<()> {
    let n = stream.clone_dtoh(counter)?[0];
    if n > 0 {
        return Err(Error::invalid_argument(
            "labels",
            format!(
                "{n} label(s) outside [0, V = {vocab}) and not ignore_index = {}",
                config.ignore_index
            ),
        ));
    }
    Ok(())
}

/// Inputs of the backward besides the logits.
#[derive(Clone, Copy, Debug)]
pub struct LogprobGrads<'a, 'b> {
    /// `[T]` labels.
    pub labels: &'a CudaView<'b, i32>,
    /// `[T]` LSE from the forward.
    pub lse: &'a CudaView<'b, f32>,
    /// `[T]` entropy from the forward (read only with `g_entropy`).
    pub entropy: &'a CudaView<'b, f32>,
    /// `[T]` upstream gradient of logp.
    pub g_logp: &'a CudaView<'b, f32>,
    /// `[T]` upstream gradient of the entropy, if any.
    pub g_entropy: Option<&'a CudaView<'b, f32>>,
    /// `([T] sum_pi_squared from the forward, [T] its upstream gradient)`, if it has one.
    pub sum_pi_squared: Option<(&'a CudaView<'b, f32>, &'a CudaView<'b, f32>)>,
}

impl LogprobGrads<'_, '_> {
    fn check(&self, t: usize) -> Result<()> {
        check_rows("labels", self.labels.len(), t)?;
        check_rows("lse", self.lse.len(), t)?;
        check_rows("g_logp", self.g_logp.len(), t)?;
        if let Some(g) = self.g_entropy {
            check_rows("g_entropy", g.len(), t)?;
            check_rows("entropy", self.entropy.len(), t)?;
        }
        if let Some((q, g)) = self.sum_pi_squared {
            check_rows("sum_pi_squared", q.len(), t)?;
            check_rows("g_sum_pi_squared", g.len(), t)?;
        }
        Ok(())
    }
}

/// Kernel 5 on `stream`, out of place: `dz_j = (1/tau)(g_logp (1[j = y] - p_j) - g_ent p_j (log p_j
/// + H))` into `dlogits` (same `[T, V]`, its own row stride), in the logits' dtype.
pub fn logprob_backward<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &Logits<CudaView<'_, E>>,
    grads: &LogprobGrads<'_, '_>,
    config: &LogprobConfig,
    dlogits: &mut Logits<CudaViewMut<'_, E>>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    dlogits.check("dlogits", dlogits.data.len())?;
    if dlogits.rows != logits.rows || dlogits.vocab != logits.vocab {
        return Err(Error::invalid_argument(
            "dlogits",
            format!(
                "expected [T = {}, V = {}], got [{}, {}]",
                logits.rows, logits.vocab, dlogits.rows, dlogits.vocab
            ),
        ));
    }
    grads.check(logits.rows)?;
    gpu.check_stream(stream)?;
    let (z_a, _g0) = addr(&logits.data, stream);
    let (o_a, _g1) = addr_mut(&mut dlogits.data, stream);
    backward_raw::<E>(
        gpu,
        stream,
        z_a,
        logits.ld,
        o_a,
        dlogits.ld,
        logits.rows,
        logits.vocab,
        grads,
        config,
        1.0,
        Shard::default(),
    )
}

/// Kernel 5 on `stream`, in place: the gradient overwrites the logits, so training needs no extra
/// `[T, V]` memory. Bit for bit the same values as [`logprob_backward`].
pub fn logprob_backward_inplace<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    grads: &LogprobGrads<'_, '_>,
    config: &LogprobConfig,
) -> Result<()> {
    backward_inplace(gpu, stream, logits, grads, config, Shard::default())
}

/// Kernel 5 in place for the logits of `shard` (the whole vocabulary when unsharded).
pub(crate) fn backward_inplace<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    grads: &LogprobGrads<'_, '_>,
    config: &LogprobConfig,
    shard: Shard,
) -> Result<()> {
    config.validate()?;
    logits.check("logits", logits.data.len())?;
    grads.check(logits.rows)?;
    gpu.check_stream(stream)?;
    let (rows, vocab, ld) = (logits.rows, logits.vocab, logits.ld);
    let (z_a, _g0) = addr_mut(&mut logits.data, stream);
    backward_raw::<E>(
        gpu, stream, z_a, ld, z_a, ld, rows, vocab, grads, config, 1.0, shard,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_raw<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    z_a: u64,
    ld: usize,
    out_a: u64,
    out_ld: usize,
    rows: usize,
    vocab: usize,
    grads: &LogprobGrads<'_, '_>,
    config: &LogprobConfig,
    g_entropy_scale: f32,
    shard: Shard,
) -> Result<()> {
    let (y_a, _g0) = addr(grads.labels, stream);
    let (lse_a, _g1) = addr(grads.lse, stream);
    let (h_a, _g2) = addr(grads.entropy, stream);
    let (g_a, _g3) = addr(grads.g_logp, stream);
    let (ge_a, _g4) = match grads.g_entropy {
        Some(g) => {
            let (a, guard) = addr(g, stream);
            (a, Some(guard))
        }
        None => (0, None),
    };
    let (q_a, gq_a, _g5) = match grads.sum_pi_squared {
        Some((q, g)) => {
            let (qa, qg) = addr(q, stream);
            let (ga, gg) = addr(g, stream);
            (qa, ga, Some((qg, gg)))
        }
        None => (0, 0, None),
    };
    let p = LogitsParams {
        logits: z_a,
        labels: y_a,
        lse: lse_a,
        entropy: h_a,
        g_logp: g_a,
        g_entropy: ge_a,
        dlogits: out_a,
        num_rows: rows as i64,
        vocab: vocab as i64,
        ld: ld as i64,
        out_ld: out_ld as i64,
        ignore_index: config.ignore_index,
        inv_temperature: 1.0 / config.temperature,
        g_entropy_scale,
        label_offset: shard.offset,
        sharded: shard.sharded as i32,
        sum_pi_squared: q_a,
        g_sum_pi_squared: gq_a,
        ..Default::default()
    };
    let v = if vec_ok::<E>(z_a, ld) && vec_ok::<E>(out_a, out_ld) {
        "vec_"
    } else {
        ""
    };
    gpu.launch(
        stream,
        Module::Logits,
        &format!("recap_logprob_bwd_{v}{}", E::SUFFIX),
        rows,
        &p,
    )
}

/// Device inputs of the loss from logits (everything but the logits).
pub type DeviceLogitsLossInputs<'a> =
    crate::logits::LogitsLossInputs<'a, CudaView<'a, f32>, CudaView<'a, u8>, CudaView<'a, i32>>;

/// `valid[t] = mask[t]`, or 0 where `labels[t]` is `ignore_index` (before any logits exist).
pub(crate) fn valid_mask(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &LogprobConfig,
    valid: u64,
) -> Result<()> {
    use crate::layout::Mask;
    let t = inputs.labels.len();
    let (mask_a, _gm, is_u8) = match &inputs.mask {
        Mask::F32(m) => {
            let (a, g) = addr(m, stream);
            (a, g, false)
        }
        Mask::U8(m) => {
            let (a, g) = addr(m, stream);
            (a, g, true)
        }
    };
    let (y_a, _gy) = addr(&inputs.labels, stream);
    let p = LogitsParams {
        labels: y_a,
        mask: mask_a,
        mask_u8: is_u8 as i32,
        valid,
        num_rows: t as i64,
        ignore_index: config.ignore_index,
        ..Default::default()
    };
    let blocks = t.div_ceil(crate::cuda::device::BLOCK as usize).min(4096);
    gpu.launch(stream, Module::Logits, "recap_valid_mask", blocks, &p)
}
