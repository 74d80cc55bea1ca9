//! Vocabulary-parallel log-probabilities on the GPU: a shard's partials (kernel 4 with `sharded`),
//! their combine (`recap_tp_combine`) and the backward on a shard (kernel 5 with `sharded`); the
//! CPU references are [`crate::cpu::tp_partials`], [`crate::cpu::tp_combine`] and
//! [`crate::cpu::tp_backward`].

use crate::cuda::device::{addr, addr_mut, params::TpParams, Gpu, Module};
use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogprobConfig};
use crate::ops::logits::cuda::{backward_inplace, forward_raw, LogprobGrads, Shard};
use crate::tensor_parallel::{combine_planes, planes};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

fn offset(vocab_start: usize) -> Result<i64> {
    i64::try_from(vocab_start)
        .ok()
        .filter(|v| *v <= i32::MAX as i64)
        .ok_or_else(|| {
            Error::invalid_argument(
                "vocab_start",
                format!("{vocab_start} exceeds the i32 label range"),
            )
        })
}

/// One shard's partials of each row into `partials` (`[3, T]`: LSE, entropy, label logit or
/// -inf; `[4, T]` adds the shard's own `sum_j p_j^2`), for the vocabulary columns
/// `[vocab_start, vocab_start + V)`; labels are global.
#[allow(clippy::too_many_arguments)]
pub fn tp_partials<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &Logits<CudaView<'_, E>>,
    labels: &CudaView<'_, i32>,
    vocab_start: usize,
    config: &LogprobConfig,
    partials: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
    let planes = planes(partials.len(), t, "partials", "[planes, T]")?;
    gpu.check_stream(stream)?;
    let off = offset(vocab_start)?;
    let (p_a, _g) = addr_mut(partials, stream);
    // sharded: no label is bad here (one outside the shard is another's), so nothing is read back
    let mut counter = stream.alloc_zeros::<u32>(1)?;
    let (c_a, _gc) = crate::cuda::device::addr_slice_mut(&mut counter, stream);
    forward_raw(
        gpu,
        stream,
        logits,
        labels,
        config,
        [
            0,
            p_a + 4 * t as u64,
            p_a,
            if planes == 4 { p_a + 12 * t as u64 } else { 0 },
        ],
        None,
        0,
        Some(c_a),
        Shard {
            offset: off,
            sharded: true,
            label_logit: p_a + 8 * t as u64,
        },
    )
}

/// The combine of `shards` shards' partials (`[P, 3, T]` or `[P, 4, T]`, ascending `vocab_start`)
/// into each row's logp, entropy and LSE over the whole vocabulary, and with 4 planes its
/// `sum_pi_squared` where asked. A label in no shard is an error (the count is read back: this
/// synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn tp_combine(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    partials: &CudaView<'_, f32>,
    shards: usize,
    labels: &CudaView<'_, i32>,
    config: &LogprobConfig,
    logp: &mut CudaViewMut<'_, f32>,
    entropy: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
    sum_pi_squared: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let t = labels.len();
    if shards == 0 || shards > i32::MAX as usize {
        return Err(Error::invalid_argument(
            "partials",
            format!("expected 1 or more shards, got {shards}"),
        ));
    }
    let planes = combine_planes(
        partials.len(),
        shards,
        t,
        [logp.len(), entropy.len(), lse.len()],
        sum_pi_squared.as_deref().map(|q| q.len()),
    )?;
    gpu.check_stream(stream)?;
    if t == 0 {
        return Ok(());
    }
    let mut missing = stream.alloc_zeros::<u32>(1)?;
    {
        let (part_a, _g0) = addr(partials, stream);
        let (y_a, _g1) = addr(labels, stream);
        let (lp_a, _g2) = addr_mut(logp, stream);
        let (h_a, _g3) = addr_mut(entropy, stream);
        let (l_a, _g4) = addr_mut(lse, stream);
        let (m_a, _g5) = crate::cuda::device::addr_slice_mut(&mut missing, stream);
        let (q_a, _g6) = match sum_pi_squared {
            Some(q) => {
                let (a, g) = addr_mut(q, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let p = TpParams {
            partials: part_a,
            logp: lp_a,
            entropy: h_a,
            lse: l_a,
            labels: y_a,
            missing: m_a,
            sum_pi_squared: q_a,
            num_rows: t as i64,
            num_shards: shards as i32,
            ignore_index: config.ignore_index,
            planes: planes as i32,
            pad0: 0,
        };
        let grid = t
            .div_ceil(crate::cuda::device::BLOCK as usize)
            .clamp(1, 8 * gpu.multiprocessors() as usize);
        gpu.launch(stream, Module::Logits, "recap_tp_combine", grid, &p)?;
    }
    let n = stream.clone_dtoh(&missing)?[0];
    if n > 0 {
        return Err(Error::invalid_argument(
            "labels",
            format!(
                "{n} label(s) in no shard's vocabulary (and not ignore_index = {})",
                config.ignore_index
            ),
        ));
    }
    Ok(())
}

/// The backward on one shard, in place: the shard's slice of the whole-vocabulary gradient from the
/// combined `grads.lse` and `grads.entropy` (and `grads.sum_pi_squared`: the combined
/// `sum_pi_squared` with its gradient), with no one-hot where the label is another shard's.
pub fn tp_backward_inplace<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    grads: &LogprobGrads<'_, '_>,
    vocab_start: usize,
    config: &LogprobConfig,
) -> Result<()> {
    check_len(
        "entropy",
        grads.entropy.len(),
        logits.rows,
        "[T] (the rows of logits)",
    )?;
    let shard = Shard {
        offset: offset(vocab_start)?,
        sharded: true,
        label_logit: 0,
    };
    backward_inplace(gpu, stream, logits, grads, config, shard)
}
