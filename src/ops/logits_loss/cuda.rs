//! The losses from logits and from the last layer, asynchronous: every kernel of a call enqueued on
//! one stream, every intermediate in a workspace the caller provides, the results in a
//! device-resident output. A call makes no host synchronization and, once the stream's scratch has
//! grown to its size, allocates nothing; with its layout on the device it copies nothing from the
//! host either, so it can be captured in a CUDA graph. The synchronous calls
//! (`grpo_loss_from_logits`, `fused_linear_grpo_loss`) are these plus one read-back.
//!
//! The loss from logits: kernel 4 over the rows (log-probs, entropy, LSE, the valid mask, labels
//! out of range counted on the device), the fused loss on the log-probs (2 launches, into `out`),
//! the entropy term's weighted reduction (and, unless token-mean, the masked mean: 3 launches
//! each), `recap_logits_finish` (the total loss, the label check), then kernel 5 in place over
//! the logits. The fused-linear path first counts the whole batch's normalizers on the device (one
//! `recap_seq_stats`), then per chunk: the logits GEMM, kernel 4, the fused loss on the chunk's
//! tokens weighted by those normalizers (into the chunk's part of the workspace), the entropy
//! term's weights when it has a gradient, kernel 5 in place and the two backward GEMMs; then the
//! entropy statistics over the batch and `recap_logits_finish`, which merges the chunks' statistics
//! in chunk order and computes the loss from them.

use crate::config::{AggMode, GrpoConfig, IsLevel, Normalizers, PolicyLoss};
use crate::cuda::device::{
    addr, addr_mut, begin_token_pass, out_len, params::LogitsFinishParams, DeviceNorms, Gpu,
    LayoutSrc, Module, SeqExtras, BLOCK,
};
use crate::error::{Error, Result};
use crate::kernel_layout::{
    ERR_LABELS, LOGITS_BAD_LABELS, LOGITS_ENTROPY_LOSS, LOGITS_ENTROPY_MEAN, LOGITS_EXTRA,
    LOGITS_GRPO_LOSS, OUT_FLAGS, OUT_LOSS, OUT_NORMS,
};
use crate::layout::{check_len, Advantages, GrpoInputs, Mask, Shape};
use crate::logits::{LogitElem, Logits, LogitsLossOutput, LogprobConfig};
use crate::ops::fused_linear::cuda::{gemm, FusedLinearConfig, LinearHead, LossRows};
use crate::ops::grpo::cuda::{enqueue, grpo_output_len, validate_call, DeviceLayout, PendingGrpo};
use crate::ops::logits::cuda::DeviceLogitsLossInputs;
use crate::ops::logits::cuda::{backward_raw, forward_raw, valid_mask, LogprobGrads, Shard};
use crate::ops::reduce::cuda::ReducePass;
use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Length (f64s) of the output of the losses from logits and from the last layer for `k`
/// objectives: the fused loss's output ([`grpo_output_len`]`(K)`), then the entropy term, the mean
/// entropy, the fused loss alone and the count of labels out of range; `out[GRPO_OUTPUT_LOSS]` is
/// the total loss (`kernels/recap_params.h`, `RECAP_LOGITS_*`).
pub fn logits_output_len(k: usize) -> usize {
    grpo_output_len(k) + LOGITS_EXTRA
}

/// The per-token f32 arrays of a workspace, `T` each, in this order.
const LOGP: usize = 0;
const ENTROPY: usize = 1;
const LSE: usize = 2;
/// The mask times 0 at ignored labels.
const VALID: usize = 3;
const G_LOGP: usize = 4;
/// The entropy term's aggregation weights (its gradient).
const W_ENT: usize = 5;
/// Discarded gradients; the fused-linear path's chunk mask.
const SCRATCH: usize = 6;
const ARRAYS: usize = 7;

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// What a chunked call adds to the workspace: the batch's normalizer count, one fused-loss output
/// per chunk, the batch's per-sequence weights, a chunk of logits and its bf16 copy.
#[derive(Clone, Copy, Debug)]
struct Chunked {
    b: usize,
    k: usize,
    parts: usize,
    chunk_bytes: usize,
    copy_bytes: usize,
}

/// Byte offsets of a workspace's parts: `[7 f32 arrays of T | the label counter | the entropy
/// reductions' outputs | chunked: the count's output, the chunks' outputs, seq_tokens (B f64) and
/// their reciprocals (B f32), the logits chunk, its bf16 copy]`.
#[derive(Clone, Copy, Debug)]
struct WsLayout {
    t: usize,
    counter: usize,
    ent_agg: usize,
    ent_mean: usize,
    count: usize,
    parts: usize,
    part_len: usize,
    seq_tokens: usize,
    seq_inv: usize,
    chunk: usize,
    copy: usize,
    total: usize,
}

impl WsLayout {
    fn new(t: usize, chunked: Option<Chunked>) -> Self {
        let counter = align(4 * ARRAYS * t, 16);
        let ent_agg = counter + 16;
        let ent_mean = ent_agg + 8 * out_len(1);
        let count = ent_mean + 8 * out_len(1);
        let mut l = WsLayout {
            t,
            counter,
            ent_agg,
            ent_mean,
            count,
            parts: count,
            part_len: 0,
            seq_tokens: count,
            seq_inv: count,
            chunk: count,
            copy: count,
            total: count,
        };
        if let Some(c) = chunked {
            l.parts = count + 8 * out_len(1);
            l.part_len = grpo_output_len(c.k);
            l.seq_tokens = l.parts + 8 * l.part_len * c.parts;
            l.seq_inv = l.seq_tokens + 8 * c.b;
            l.chunk = align(l.seq_inv + 4 * c.b, 256);
            l.copy = align(l.chunk + c.chunk_bytes, 256);
            l.total = l.copy + c.copy_bytes;
        }
        l
    }
}

/// Bytes of the workspace [`grpo_loss_from_logits_async`] needs for `t` rows of logits: 8 f32s per
/// row and about 1 KiB.
pub fn logits_workspace_len(t: usize) -> usize {
    WsLayout::new(t, None).total
}

/// Bytes of the workspace [`fused_linear_grpo_loss_async`] needs for `t` tokens in `b` sequences,
/// `k` objectives, vocabulary `v` and these options: 7 f32s per token, one chunk of logits (and
/// its bf16 copy with `fp32_logits`), about 1 KiB per chunk and 12 bytes per sequence.
pub fn fused_linear_workspace_len(
    t: usize,
    b: usize,
    k: usize,
    v: usize,
    options: &FusedLinearConfig,
) -> usize {
    WsLayout::new(t, Some(chunked(t, b, k, v, options))).total
}

fn chunked(t: usize, b: usize, k: usize, v: usize, options: &FusedLinearConfig) -> Chunked {
    let c = options.chunk(t, v);
    let elems = c * v;
    Chunked {
        b,
        k,
        parts: if t == 0 { 1 } else { t.div_ceil(c) },
        chunk_bytes: elems * if options.fp32_logits { 4 } else { 2 },
        copy_bytes: if options.fp32_logits { 2 * elems } else { 0 },
    }
}

/// A call of a loss from logits or from the last layer enqueued by [`grpo_loss_from_logits_async`]
/// or [`fused_linear_grpo_loss_async`]: what reading its output takes.
#[derive(Clone, Debug)]
pub struct PendingLogitsLoss {
    grpo: PendingGrpo,
    vocab: usize,
    ignore_index: i32,
}

impl PendingLogitsLoss {
    /// The description of a call made elsewhere (a binding that keeps only these facts): `k`
    /// objectives, whether it had `ref_logp` and `rollout_logp`, its configs and vocabulary `vocab`.
    pub fn new(
        k: usize,
        has_ref: bool,
        has_rollout: bool,
        config: &GrpoConfig,
        logits_config: &LogprobConfig,
        vocab: usize,
    ) -> Self {
        PendingLogitsLoss {
            grpo: PendingGrpo::new(k, has_ref, has_rollout, config),
            vocab,
            ignore_index: logits_config.ignore_index,
        }
    }

    /// Objectives of the call.
    pub fn num_objectives(&self) -> usize {
        self.grpo.num_objectives()
    }

    /// Reads the call's output `out` back (one copy; this synchronizes `stream`) and decodes it as
    /// the synchronous call returns it; reports a label out of range, a failed device-side check of
    /// a [`DeviceLayout`] and, unless `config.allow_nonfinite`, non-finite inputs.
    pub fn read(
        &self,
        stream: &Arc<CudaStream>,
        out: &CudaView<'_, f64>,
    ) -> Result<LogitsLossOutput> {
        let k = self.num_objectives();
        check_len(
            "out",
            out.len(),
            logits_output_len(k),
            "logits_output_len(K)",
        )?;
        let mut host = vec![0f64; out.len()];
        stream.memcpy_dtoh(out, &mut host)?;
        stream.synchronize()?;
        self.decode(&host)
    }

    /// Decodes an output already on the host.
    pub(crate) fn decode(&self, raw: &[f64]) -> Result<LogitsLossOutput> {
        let k = self.num_objectives();
        check_len(
            "out",
            raw.len(),
            logits_output_len(k),
            "logits_output_len(K)",
        )?;
        let (main, extra) = raw.split_at(grpo_output_len(k));
        if (raw[OUT_FLAGS] as u32) & ERR_LABELS as u32 != 0 {
            return Err(Error::invalid_argument(
                "labels",
                format!(
                    "{} label(s) outside [0, V = {}) and not ignore_index = {}",
                    extra[LOGITS_BAD_LABELS], self.vocab, self.ignore_index
                ),
            ));
        }
        crate::cuda::device::check_flags(raw[OUT_FLAGS])?;
        let mut grpo = self.grpo.decode(main)?;
        grpo.loss = extra[LOGITS_GRPO_LOSS];
        Ok(LogitsLossOutput {
            loss: raw[OUT_LOSS],
            grpo,
            entropy_loss: extra[LOGITS_ENTROPY_LOSS],
            entropy_mean: extra[LOGITS_ENTROPY_MEAN],
        })
    }
}

/// The synchronous calls' top-entropy-quantile mask: from the entropies and the valid mask kernel
/// 4 wrote (read back: one sort on the host, deterministic), uploaded. The asynchronous calls refuse
/// the option.
fn entropy_mask(
    stream: &Arc<CudaStream>,
    entropy: &CudaView<'_, f32>,
    valid: &CudaView<'_, f32>,
    q: f32,
) -> Result<CudaSlice<f32>> {
    let (ent, val) = (stream.clone_dtoh(entropy)?, stream.clone_dtoh(valid)?);
    stream.synchronize()?;
    let mask = crate::logits::top_entropy_mask(&ent, &val, q);
    crate::cuda::device::upload(stream, &mask)
}

fn no_quantile(config: &GrpoConfig) -> Result<()> {
    if config.top_entropy_quantile < 1.0 {
        return Err(Error::invalid_argument(
            "config.top_entropy_quantile",
            "the top-entropy-quantile mask sorts the entropies on the host, which an asynchronous \
             call cannot: use the synchronous call, or 1.0",
        ));
    }
    Ok(())
}

/// The checks every call makes before any launch: the configs, the per-token arrays against `t`,
/// and the batch (with its layout) as the fused loss checks it.
fn validate(
    inputs: &DeviceLogitsLossInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    t: usize,
    rows: &'static str,
) -> Result<Shape> {
    config.validate()?;
    logits_config.validate()?;
    check_len("labels", inputs.labels.len(), t, rows)?;
    check_len("old_logp", inputs.old_logp.len(), t, rows)?;
    check_len("mask", inputs.mask.array_len(), t, rows)?;
    // the fused loss's checks, with old_logp standing in for the log-probs not yet computed
    validate_call(
        &grpo_inputs(inputs, inputs.old_logp.slice(..), None, None),
        layout,
        config,
    )
}

/// The fused loss's inputs on computed log-probabilities `logp` with mask `valid` (`None`: the
/// inputs' own mask).
fn grpo_inputs<'a>(
    inputs: &'a DeviceLogitsLossInputs<'_>,
    logp: CudaView<'a, f32>,
    valid: Option<CudaView<'a, f32>>,
    policy_weight: Option<CudaView<'a, f32>>,
) -> GrpoInputs<'a, CudaView<'a, f32>, CudaView<'a, u8>> {
    GrpoInputs {
        logp,
        old_logp: inputs.old_logp.slice(..),
        ref_logp: inputs.ref_logp.as_ref().map(|r| r.slice(..)),
        rollout_logp: inputs.rollout_logp.as_ref().map(|r| r.slice(..)),
        policy_weight,
        advantages: match &inputs.advantages {
            Advantages::PerSequence(a) => Advantages::PerSequence(a.slice(..)),
            Advantages::PerToken(a) => Advantages::PerToken(a.slice(..)),
        },
        mask: match valid {
            Some(v) => Mask::F32(v),
            None => match &inputs.mask {
                Mask::F32(m) => Mask::F32(m.slice(..)),
                Mask::U8(m) => Mask::U8(m.slice(..)),
            },
        },
        cu_seqlens: inputs.cu_seqlens,
        lambda: inputs.lambda,
        objectives: inputs.objectives,
        membership: inputs.membership,
        normalizers: inputs.normalizers,
    }
}

/// A call's workspace: its base address and the typed views the passes read.
struct Ws<'w> {
    base: u64,
    lay: WsLayout,
    f32s: CudaView<'w, f32>,
}

impl<'w> Ws<'w> {
    /// The workspace `view` for `lay` (checked: length, alignment).
    fn new(view: &'w CudaView<'_, u8>, stream: &CudaStream, lay: WsLayout) -> Result<Self> {
        check_len_at_least("workspace", view.len(), lay.total)?;
        let base = addr(view, stream).0;
        if base % 16 != 0 {
            return Err(Error::invalid_argument(
                "workspace",
                "expected a device buffer aligned to 16 bytes",
            ));
        }
        // SAFETY: the workspace holds at least ARRAYS * T f32s at its (aligned) start; the views
        // are only read by the kernels, which the call orders on its stream.
        let f32s = unsafe { view.transmute::<f32>((ARRAYS * lay.t).max(1)) }.ok_or_else(|| {
            Error::invalid_argument("workspace", "too short for the per-token arrays")
        })?;
        Ok(Ws { base, lay, f32s })
    }

    /// Per-token array `i`, as a view.
    fn arr(&self, i: usize) -> CudaView<'_, f32> {
        let t = self.lay.t;
        self.f32s.slice(i * t..(i + 1) * t)
    }

    /// Per-token array `i`'s device address, at row `r`.
    fn at(&self, i: usize, r: usize) -> u64 {
        self.base + (4 * (i * self.lay.t + r)) as u64
    }

    fn off(&self, bytes: usize) -> u64 {
        self.base + bytes as u64
    }
}

fn check_len_at_least(arg: &'static str, got: usize, need: usize) -> Result<()> {
    if got < need {
        return Err(Error::invalid_argument(
            arg,
            format!("expected at least {need} bytes (the *_workspace_len functions), got {got}"),
        ));
    }
    Ok(())
}

/// `bytes` zero bytes at `dst` on `stream`.
fn memset0(stream: &CudaStream, dst: u64, bytes: usize) -> Result<()> {
    if bytes > 0 {
        // SAFETY: `dst .. dst + bytes` lies inside the call's workspace (its layout), on this
        // stream's context.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }?;
    }
    Ok(())
}

/// `bytes` bytes from `src` to `dst` on `stream`.
fn copy(stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    if bytes > 0 {
        // SAFETY: both ranges lie inside device buffers of this call (the workspace, the stream's
        // scratch), ordered on this stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }?;
    }
    Ok(())
}

/// Where the call's layout is, for the passes after the fused loss (the entropy term: every
/// sequence; the batch count: with membership); the guards keep device views borrowed.
fn layout_src<'a>(
    inputs: &'a DeviceLogitsLossInputs<'_>,
    layout: Option<&'a DeviceLayout<'_, '_>>,
    b: usize,
    stream: &'a CudaStream,
    with_membership: bool,
) -> (LayoutSrc<'a>, Vec<cudarc::driver::SyncOnDrop<'a>>) {
    match layout {
        None => (
            LayoutSrc::Host {
                cu_seqlens: inputs.cu_seqlens,
                membership: if with_membership {
                    inputs.membership
                } else {
                    None
                },
            },
            Vec::new(),
        ),
        Some(l) => {
            let (cu, g) = addr(l.cu_seqlens, stream);
            let mut guards = vec![g];
            let mut membership = 0;
            if let (true, Some(m)) = (with_membership, l.membership) {
                let (a, g) = addr(m, stream);
                membership = a;
                guards.push(g);
            }
            (
                LayoutSrc::Device {
                    b,
                    cu_seqlens: cu,
                    membership,
                    lambda: 0,
                },
                guards,
            )
        }
    }
}

/// The entropy term's aggregate (writing its weights at `w_ent`) into the workspace's `ent_agg`
/// output and, unless it equals it (token-mean on the batch's own counts), the masked mean entropy
/// into `ent_mean`. Returns whether the mean was reduced.
#[allow(clippy::too_many_arguments)]
fn entropy_terms(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ws: &Ws<'_>,
    layout: &LayoutSrc<'_>,
    config: &GrpoConfig,
    host_norms: Option<&Normalizers>,
    dev_norms: Option<&DeviceNorms>,
    w_ent: u64,
) -> Result<bool> {
    let (ent, valid) = (ws.arr(ENTROPY), Mask::F32(ws.arr(VALID)));
    let agg = ReducePass {
        losses: &ent,
        mask: &valid,
        layout,
        k: 1,
        lambda: &[1.0],
        normalizers: host_norms,
        dev_norms,
    };
    drop(agg.enqueue(gpu, stream, config, w_ent, Some(ws.off(ws.lay.ent_agg)))?);
    if config.agg_mode == AggMode::TokenMean && host_norms.is_none() && dev_norms.is_none() {
        return Ok(false);
    }
    let mean_cfg = GrpoConfig {
        agg_mode: AggMode::TokenMean,
        ..config.clone()
    };
    let mean = ReducePass {
        normalizers: None,
        dev_norms: None,
        ..agg
    };
    drop(mean.enqueue(
        gpu,
        stream,
        &mean_cfg,
        ws.at(SCRATCH, 0),
        Some(ws.off(ws.lay.ent_mean)),
    )?);
    Ok(true)
}

/// Launches `recap_logits_finish`: the total loss, the entropy statistics and the label check into
/// `out` (merging `parts` chunk outputs first, when given).
#[allow(clippy::too_many_arguments)]
fn finish(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceLogitsLossInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    k: usize,
    ws: &Ws<'_>,
    out: u64,
    parts: Option<(u64, usize, u64)>,
    has_mean: bool,
) -> Result<()> {
    let (lambda_dev, _gl) = match layout.and_then(|l| l.lambda) {
        Some(l) => {
            let (a, g) = addr(l, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let mut lambda = [0f32; 16];
    if lambda_dev == 0 {
        lambda[..k].copy_from_slice(inputs.lambda);
    }
    let p = LogitsFinishParams {
        out,
        parts: parts.map_or(0, |p| p.0),
        norms: parts.map_or(0, |p| p.2),
        entropy_agg: ws.off(ws.lay.ent_agg),
        entropy_mean: if has_mean { ws.off(ws.lay.ent_mean) } else { 0 },
        bad_labels: ws.off(ws.lay.counter),
        lambda_dev,
        num_objectives: k as i32,
        num_parts: parts.map_or(0, |p| p.1 as i32),
        has_ref: inputs.ref_logp.is_some() as i32,
        beta: config.kl_coef,
        entropy_coef: config.entropy_coef,
        pad0: 0.0,
        lambda,
    };
    gpu.launch(stream, Module::Reduce, "recap_logits_finish", 1, &p)
}

fn pending(
    inputs: &DeviceLogitsLossInputs<'_>,
    k: usize,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    vocab: usize,
) -> PendingLogitsLoss {
    PendingLogitsLoss::new(
        k,
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
        config,
        logits_config,
        vocab,
    )
}

/// Kernel 4 over rows `r0 .. r0 + logits.rows` of the batch (the logits of those rows), into the
/// workspace's arrays at those rows, counting bad labels at the workspace's counter.
fn forward_rows<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &Logits<CudaView<'_, E>>,
    inputs: &DeviceLogitsLossInputs<'_>,
    r0: usize,
    config: &LogprobConfig,
    ws: &Ws<'_>,
) -> Result<()> {
    let labels = inputs.labels.slice(r0..r0 + logits.rows);
    let (mask_a, _gm, is_u8) = match &inputs.mask {
        Mask::F32(m) => {
            let (a, g) = addr(m, stream);
            (a + 4 * r0 as u64, g, false)
        }
        Mask::U8(m) => {
            let (a, g) = addr(m, stream);
            (a + r0 as u64, g, true)
        }
    };
    forward_raw(
        gpu,
        stream,
        logits,
        &labels,
        config,
        [ws.at(LOGP, r0), ws.at(ENTROPY, r0), ws.at(LSE, r0), 0],
        Some((mask_a, is_u8)),
        ws.at(VALID, r0),
        Some(ws.off(ws.lay.counter)),
        Shard::default(),
    )
}

/// Kernel 5 in place over the logits at `z` (`rows` rows from row `r0`, row stride `ld`), from the
/// gradients in the workspace.
#[allow(clippy::too_many_arguments)]
fn backward_rows<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    (z, ld, rows, vocab): (u64, usize, usize, usize),
    inputs: &DeviceLogitsLossInputs<'_>,
    r0: usize,
    config: &LogprobConfig,
    entropy_coef: f32,
    ws: &Ws<'_>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let r = r0..r0 + rows;
    let (y, lse, h, g, w) = (
        inputs.labels.slice(r.clone()),
        ws.arr(LSE).slice(r.clone()),
        ws.arr(ENTROPY).slice(r.clone()),
        ws.arr(G_LOGP).slice(r.clone()),
        ws.arr(W_ENT).slice(r),
    );
    let grads = LogprobGrads {
        labels: &y,
        lse: &lse,
        entropy: &h,
        g_logp: &g,
        g_entropy: (entropy_coef != 0.0).then_some(&w),
        sum_pi_squared: None,
    };
    backward_raw::<E>(
        gpu,
        stream,
        z,
        ld,
        z,
        ld,
        rows,
        vocab,
        &grads,
        config,
        -entropy_coef,
        Shard::default(),
    )
}

/// The GRPO loss straight from logits on `stream`, asynchronously: enqueues kernel 4, the fused
/// loss with its KL term, the entropy bonus (`config.entropy_coef`, aggregated like the loss) and
/// kernel 5 **in place over the logits** (their dtype; no `[T, V]` temporary), with every
/// intermediate in `workspace` ([`logits_workspace_len`]`(T)` bytes, 16-byte aligned) and the
/// results in `out` ([`logits_output_len`]`(K)` f64s, `out[GRPO_OUTPUT_LOSS]` the total loss), and
/// returns without synchronizing. With `layout`, `cu_seqlens`, `membership` and `lambda` come from
/// the device (checked there) and the call copies nothing from the host: it can be captured in a
/// CUDA graph after one eager call of its size. Labels out of range are counted on the device and
/// reported by [`PendingLogitsLoss::read`]. `config.top_entropy_quantile < 1` is refused (it sorts
/// on the host: the synchronous call has it).
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss_from_logits_async<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    inputs: &DeviceLogitsLossInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    workspace: &mut CudaViewMut<'_, u8>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<PendingLogitsLoss> {
    no_quantile(config)?;
    from_logits(
        gpu,
        stream,
        logits,
        inputs,
        layout,
        config,
        logits_config,
        workspace,
        out,
    )
}

/// The GRPO loss straight from logits on `stream`, with the gradient written **over the logits** in
/// their dtype (no `[T, V]` temporary): kernel 4 (log-probabilities, entropy, LSE; tokens with
/// ignored labels leave the mask), the fused GRPO loss with its KL term, the entropy bonus
/// (`config.entropy_coef`, aggregated like the loss), then kernel 5 in place. A convenience over
/// [`grpo_loss_from_logits_async`]: it allocates the workspace (7 floats per token) and reads the
/// result back, which synchronizes `stream`; it also takes `config.top_entropy_quantile < 1`.
pub fn grpo_loss_from_logits<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
) -> Result<LogitsLossOutput> {
    let mut ws = stream.alloc_zeros::<u8>(logits_workspace_len(logits.rows).max(16))?;
    let mut out = stream.alloc_zeros::<f64>(logits_output_len(inputs.lambda.len().max(1)))?;
    let pending = from_logits(
        gpu,
        stream,
        logits,
        inputs,
        None,
        config,
        logits_config,
        &mut ws.as_view_mut(),
        &mut out.slice_mut(..logits_output_len(inputs.lambda.len())),
    )?;
    pending.read(stream, &out.slice(..logits_output_len(inputs.lambda.len())))
}

#[allow(clippy::too_many_arguments)]
fn from_logits<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logits: &mut Logits<CudaViewMut<'_, E>>,
    inputs: &DeviceLogitsLossInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    workspace: &mut CudaViewMut<'_, u8>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<PendingLogitsLoss> {
    logits.check("logits", logits.data.len())?;
    let (t, v, ld) = (logits.rows, logits.vocab, logits.ld);
    let shape = validate(
        inputs,
        layout,
        config,
        logits_config,
        t,
        "[T] (the rows of logits)",
    )?;
    let k = shape.k;
    check_len(
        "out",
        out.len(),
        logits_output_len(k),
        "logits_output_len(K)",
    )?;
    gpu.check_stream(stream)?;
    let wsv = workspace.as_view();
    let ws = Ws::new(&wsv, stream, WsLayout::new(t, None))?;
    let (o, _go) = addr_mut(out, stream);

    // kernel 4 over every row, bad labels counted from 0
    memset0(stream, ws.off(ws.lay.counter), 4)?;
    {
        let zv = Logits {
            data: logits.data.as_view(),
            rows: t,
            vocab: v,
            ld,
        };
        forward_rows(gpu, stream, &zv, inputs, 0, logits_config, &ws)?;
    }
    let pw = if config.top_entropy_quantile < 1.0 {
        Some(entropy_mask(
            stream,
            &ws.arr(ENTROPY),
            &ws.arr(VALID),
            config.top_entropy_quantile,
        )?)
    } else {
        None
    };
    // the fused loss on the log-probs, into out
    {
        let x = grpo_inputs(
            inputs,
            ws.arr(LOGP),
            Some(ws.arr(VALID)),
            pw.as_ref().map(|w| w.slice(..t)),
        );
        let (_, scratch) = enqueue(
            gpu,
            stream,
            &x,
            layout,
            config,
            ws.at(G_LOGP, 0),
            Some(o),
            None,
        )?;
        drop(scratch); // the stream's scratch back to its cache for the passes below
    }
    // the entropy term and mean
    let (src, _gs) = layout_src(inputs, layout, shape.b, stream, false);
    let ent_norms = inputs.normalizers.map(crate::logits::entropy_normalizers);
    let has_mean = entropy_terms(
        gpu,
        stream,
        &ws,
        &src,
        config,
        ent_norms.as_ref(),
        None,
        ws.at(W_ENT, 0),
    )?;
    finish(
        gpu, stream, inputs, layout, config, k, &ws, o, None, has_mean,
    )?;
    // kernel 5 in place
    let (z, _gz) = addr_mut(&mut logits.data, stream);
    backward_rows::<E>(
        gpu,
        stream,
        (z, ld, t, v),
        inputs,
        0,
        logits_config,
        config.entropy_coef,
        &ws,
    )?;
    Ok(pending(inputs, k, config, logits_config, v))
}

fn data_type<E: LogitElem>() -> cudaDataType {
    if E::SUFFIX == "f32" {
        cudaDataType::CUDA_R_32F
    } else {
        cudaDataType::CUDA_R_16BF
    }
}

/// The GRPO loss from the last layer's inputs, chunked and asynchronously (see the module docs):
/// enqueues every kernel and GEMM of the call, writing `d_hidden` (`[T, H]` bf16) and `d_weight`
/// (`[V, H]` fp32, overwritten), with every intermediate in `workspace`
/// ([`fused_linear_workspace_len`] bytes, 16-byte aligned: one chunk of logits and 7 floats per
/// token) and the results in `out` ([`logits_output_len`]`(K)` f64s), and returns without
/// synchronizing. `layout` and capture as for [`grpo_loss_from_logits_async`];
/// `config.top_entropy_quantile < 1` is refused.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_grpo_loss_async(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    head: &LinearHead<'_>,
    inputs: &DeviceLogitsLossInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    workspace: &mut CudaViewMut<'_, u8>,
    d_hidden: &mut CudaViewMut<'_, half::bf16>,
    d_weight: &mut CudaViewMut<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<PendingLogitsLoss> {
    no_quantile(config)?;
    if options.batch_invariant {
        return Err(Error::invalid_argument(
            "options.batch_invariant",
            "the batch-invariant mode is the synchronous call's (fused_linear_grpo_loss): it \
             allocates a scratch of one chunk of hidden rows",
        ));
    }
    let call = Linear {
        gpu,
        stream,
        head,
        inputs,
        layout,
        config,
        logits_config,
        options,
        pad: None,
    };
    if options.fp32_logits {
        call.run::<f32>(workspace, d_hidden, d_weight, out)
    } else {
        call.run::<half::bf16>(workspace, d_hidden, d_weight, out)
    }
}

/// The GRPO loss from the last layer's inputs, chunked (see the module docs): writes `d_hidden`
/// (`[T, H]` bf16) and `d_weight` (`[V, H]` fp32, overwritten) and returns the loss and metrics. A
/// convenience over [`fused_linear_grpo_loss_async`]: it allocates the workspace and reads the
/// result back, which synchronizes `stream`; it also takes `config.top_entropy_quantile < 1`.
///
/// Only the rows that carry loss are computed: it first reads the valid mask back, and
/// when some rows have mask weight 0 (or an ignored label), gathers the others and runs the GEMMs
/// and kernels over them alone (their `d_hidden` rows scattered back, 0 at the rows left out; the
/// labels of those rows are not checked). The loss, the metrics and the kept rows' gradients are
/// those of the whole batch (to the rounding of the sums' grouping).
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_grpo_loss(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    head: &LinearHead<'_>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    d_hidden: &mut CudaViewMut<'_, half::bf16>,
    d_weight: &mut CudaViewMut<'_, f32>,
) -> Result<LogitsLossOutput> {
    let mut call = Linear {
        gpu,
        stream,
        head,
        inputs,
        layout: None,
        config,
        logits_config,
        options,
        pad: None,
    };
    let (t, h) = call.shape()?;
    validate(
        inputs,
        None,
        config,
        logits_config,
        t,
        "[T] (the rows of hidden)",
    )?;
    check_len("d_hidden", d_hidden.len(), t * h, "[T, H]")?;
    gpu.check_stream(stream)?;
    // the batch-invariant mode's scratch: one chunk of hidden rows, kept until the read-back
    let mut pad = if options.batch_invariant {
        Some(stream.alloc_zeros::<half::bf16>(options.chunk(t, head.vocab) * h)?)
    } else {
        None
    };
    let (pad_a, _gp) = match pad.as_mut() {
        Some(p) => {
            let (a, g) = crate::cuda::device::addr_slice_mut(p, stream);
            (Some(a), Some(g))
        }
        None => (None, None),
    };
    call.pad = pad_a;
    let Some(rows) = LossRows::find(gpu, stream, head, inputs, logits_config)? else {
        let run = call.enqueue_sync(d_hidden, d_weight)?;
        return run.read(stream);
    };
    let (kept_head, kept_inputs) = (rows.head(head), rows.inputs(inputs));
    let kept = Linear {
        head: &kept_head,
        inputs: &kept_inputs,
        ..call
    };
    let mut dh = rows.d_hidden_buffer(stream, h)?;
    let n = kept_inputs.labels.len();
    let run = kept.enqueue_sync(&mut dh.slice_mut(..n * h), d_weight)?;
    rows.scatter_d_hidden(gpu, stream, &dh, d_hidden, h)?;
    run.read(stream)
}

/// A synchronous call's enqueued work: what its read-back needs, and the buffers that must live
/// until it.
struct SyncRun {
    pending: PendingLogitsLoss,
    out: CudaSlice<f64>,
    _workspace: CudaSlice<u8>,
    n: usize,
}

impl SyncRun {
    fn read(self, stream: &Arc<CudaStream>) -> Result<LogitsLossOutput> {
        self.pending.read(stream, &self.out.slice(..self.n))
    }
}

/// One fused-linear call's arguments.
struct Linear<'c, 'a> {
    gpu: &'c Gpu,
    stream: &'c Arc<CudaStream>,
    head: &'c LinearHead<'a>,
    inputs: &'c DeviceLogitsLossInputs<'a>,
    layout: Option<&'c DeviceLayout<'c, 'a>>,
    config: &'c GrpoConfig,
    logits_config: &'c LogprobConfig,
    options: &'c FusedLinearConfig,
    /// The batch-invariant mode's scratch of one chunk of hidden rows (`c H` bf16): a partial
    /// chunk's rows padded with zeros for the logits GEMM, then its hidden gradient.
    pad: Option<u64>,
}

impl Linear<'_, '_> {
    /// Allocates the workspace and the output and enqueues the call (the synchronous path).
    fn enqueue_sync(
        &self,
        d_hidden: &mut CudaViewMut<'_, half::bf16>,
        d_weight: &mut CudaViewMut<'_, f32>,
    ) -> Result<SyncRun> {
        let (t, _) = self.shape()?;
        let (b, k) = (
            self.inputs.cu_seqlens.len().saturating_sub(1),
            self.inputs.lambda.len(),
        );
        let len = fused_linear_workspace_len(t, b, k, self.head.vocab, self.options);
        let mut ws = self.stream.alloc_zeros::<u8>(len.max(16))?;
        let mut out = self
            .stream
            .alloc_zeros::<f64>(logits_output_len(k.max(1)))?;
        let n = logits_output_len(k);
        let pending = if self.options.fp32_logits {
            self.run::<f32>(
                &mut ws.as_view_mut(),
                d_hidden,
                d_weight,
                &mut out.slice_mut(..n),
            )
        } else {
            self.run::<half::bf16>(
                &mut ws.as_view_mut(),
                d_hidden,
                d_weight,
                &mut out.slice_mut(..n),
            )
        }?;
        Ok(SyncRun {
            pending,
            out,
            _workspace: ws,
            n,
        })
    }

    /// `(T, H)` from the head, checked.
    fn shape(&self) -> Result<(usize, usize)> {
        let (h, v) = (self.head.hidden_size, self.head.vocab);
        if h == 0 || v == 0 {
            return Err(Error::invalid_argument(
                "head",
                format!("expected H >= 1 and V >= 1, got H = {h}, V = {v}"),
            ));
        }
        if self.head.hidden.len() % h != 0 {
            return Err(Error::invalid_argument(
                "head.hidden",
                format!(
                    "expected [T, H = {h}], got {} elements",
                    self.head.hidden.len()
                ),
            ));
        }
        let t = self.head.hidden.len() / h;
        check_len("head.weight", self.head.weight.len(), v * h, "[V, H]")?;
        Ok((t, h))
    }

    fn run<E: LogitElem>(
        &self,
        workspace: &mut CudaViewMut<'_, u8>,
        d_hidden: &mut CudaViewMut<'_, half::bf16>,
        d_weight: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, f64>,
    ) -> Result<PendingLogitsLoss> {
        use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        let (gpu, stream, inputs, config) = (self.gpu, self.stream, self.inputs, self.config);
        let (t, h) = self.shape()?;
        let v = self.head.vocab;
        let shape = validate(
            inputs,
            self.layout,
            config,
            self.logits_config,
            t,
            "[T] (the rows of hidden)",
        )?;
        let (b, k) = (shape.b, shape.k);
        check_len("d_hidden", d_hidden.len(), t * h, "[T, H]")?;
        check_len("d_weight", d_weight.len(), v * h, "[V, H]")?;
        check_len(
            "out",
            out.len(),
            logits_output_len(k),
            "logits_output_len(K)",
        )?;
        let c = self.options.chunk(t, v);
        let seq_level_is = inputs.rollout_logp.is_some()
            && config
                .rollout_correction
                .is_some_and(|r| r.level != IsLevel::Token);
        let whole_batch = matches!(config.policy_loss, PolicyLoss::Gspo | PolicyLoss::GeoMean)
            || seq_level_is
            || config.top_entropy_quantile < 1.0;
        if whole_batch && c < t {
            // GSPO's and GMPO's ratios and a sequence-level IS weight span each whole sequence: a
            // chunk's loss would need the log-probs of tokens in later chunks
            return Err(Error::invalid_argument(
                "options.chunk_tokens",
                format!(
                    "GSPO, GMPO, sequence-level rollout IS and the top-entropy-quantile mask need \
                     the whole batch in one chunk ({t} tokens, got chunks of {c}): set \
                     chunk_tokens or raise memory_budget"
                ),
            ));
        }
        gpu.check_stream(stream)?;
        let ch = chunked(t, b, k, v, self.options);
        let wsv = workspace.as_view();
        let ws = Ws::new(&wsv, stream, WsLayout::new(t, Some(ch)))?;
        let (o, _go) = addr_mut(out, stream);
        let (dh_a, _gdh) = addr_mut(d_hidden, stream);
        let (dw_a, _gdw) = addr_mut(d_weight, stream);
        let (x_a, _gx) = addr(&self.head.hidden, stream);
        let (w_a, _gw) = addr(&self.head.weight, stream);
        let lay = ws.lay;

        // the batch's valid mask (ignored labels out) and normalizers, before any logits: each
        // chunk's loss then weighs its tokens exactly as the whole batch would
        memset0(stream, ws.off(lay.counter), 4)?;
        memset0(stream, ws.at(SCRATCH, 0), 4 * t)?; // the chunk mask, 0 outside the chunk
        valid_mask(gpu, stream, inputs, self.logits_config, ws.at(VALID, 0))?;
        {
            let (src, _gs) = layout_src(inputs, self.layout, b, stream, true);
            let valid = Mask::F32(ws.arr(VALID));
            let count = begin_token_pass(
                gpu,
                stream,
                &valid,
                t,
                &src,
                1,
                k,
                inputs.normalizers,
                None,
                &SeqExtras::default(),
                Some(ws.off(lay.count)),
            )?;
            match inputs.normalizers.and_then(|n| n.seq_tokens.as_deref()) {
                Some(st) => {
                    check_len("normalizers.seq_tokens", st.len(), b, "[B]")?;
                    let inv: Vec<f32> = st.iter().map(|&x| crate::output::inv_norm(x)).collect();
                    htod(stream, ws.off(lay.seq_tokens), st)?;
                    htod(stream, ws.off(lay.seq_inv), &inv)?;
                }
                None => {
                    copy(
                        stream,
                        ws.off(lay.seq_tokens),
                        count.addrs.seq_tokens,
                        8 * b,
                    )?;
                    copy(stream, ws.off(lay.seq_inv), count.addrs.seq_inv, 4 * b)?;
                }
            }
        }
        let dn = DeviceNorms {
            norms: ws.off(lay.count + 8 * OUT_NORMS),
            slot: -1,
            seq_tokens: ws.off(lay.seq_tokens),
            seq_inv: ws.off(lay.seq_inv),
        };
        let dn_ent = DeviceNorms {
            slot: k as i32,
            ..dn
        };
        let (ent_src, _ge) = layout_src(inputs, self.layout, b, stream, false);

        if t == 0 {
            memset0(stream, dw_a, 4 * v * h)?;
        }
        let (ct, bf) = (data_type::<E>(), cudaDataType::CUDA_R_16BF);
        let chunk = ws.off(lay.chunk);
        let chunk_bytes = wsv.slice(lay.chunk..lay.chunk + ch.chunk_bytes);
        for i in 0..ch.parts {
            let t0 = i * c;
            let n = c.min(t - t0.min(t));
            // the row count of the GEMMs that produce a row's values, their input rows and their
            // hidden-gradient rows: the chunk's own, or in the batch-invariant mode for a partial
            // chunk always c, through the zeroed pad (its first n rows copied in, and the first n
            // rows of its gradient copied out below)
            let (x_chunk, dh_chunk) = (x_a + (t0 * h * 2) as u64, dh_a + (t0 * h * 2) as u64);
            let (gn, x_rows, dh_rows) = match self.pad {
                Some(pad) if n > 0 && n < c => {
                    memset0(stream, pad, 2 * c * h)?;
                    copy(stream, pad, x_chunk, 2 * n * h)?;
                    (c, pad, pad)
                }
                _ => (n, x_chunk, dh_chunk),
            };
            if n > 0 {
                // logits^T[V, gn] = W[V, H] x X_chunk^T[H, gn]
                gpu.with_blas(stream, |blas| {
                    gemm(
                        blas,
                        T,
                        N,
                        (v, gn, h),
                        (w_a, bf, h),
                        (x_rows, bf, h),
                        (chunk, ct, v),
                        0.0,
                    )
                })?;
                // SAFETY: the chunk region holds c * V elements of E at a 256-byte aligned offset.
                let cv = unsafe { chunk_bytes.transmute::<E>(n * v) }.ok_or_else(|| {
                    Error::invalid_argument("workspace", "too short for a chunk of logits")
                })?;
                let zv = Logits::dense(cv, n, v);
                forward_rows(gpu, stream, &zv, inputs, t0, self.logits_config, &ws)?;
            }
            // one chunk holds the batch here when the mask is on (checked above)
            let pw = if config.top_entropy_quantile < 1.0 {
                Some(entropy_mask(
                    stream,
                    &ws.arr(ENTROPY),
                    &ws.arr(VALID),
                    config.top_entropy_quantile,
                )?)
            } else {
                None
            };
            copy(stream, ws.at(SCRATCH, t0), ws.at(VALID, t0), 4 * n)?;
            {
                let x = GrpoInputs {
                    normalizers: None,
                    ..grpo_inputs(
                        inputs,
                        ws.arr(LOGP),
                        Some(ws.arr(SCRATCH)),
                        pw.as_ref().map(|w| w.slice(..t)),
                    )
                };
                let part = ws.off(lay.parts + 8 * lay.part_len * i);
                let (_, scratch) = enqueue(
                    gpu,
                    stream,
                    &x,
                    self.layout,
                    config,
                    ws.at(G_LOGP, 0),
                    Some(part),
                    Some(&dn),
                )?;
                drop(scratch);
            }
            if config.entropy_coef != 0.0 {
                // the entropy term's weights of the chunk's tokens (its value comes below)
                let (ent, chunk_mask) = (ws.arr(ENTROPY), Mask::F32(ws.arr(SCRATCH)));
                let pass = ReducePass {
                    losses: &ent,
                    mask: &chunk_mask,
                    layout: &ent_src,
                    k: 1,
                    lambda: &[1.0],
                    normalizers: None,
                    dev_norms: Some(&dn_ent),
                };
                drop(pass.enqueue(
                    gpu,
                    stream,
                    config,
                    ws.at(W_ENT, 0),
                    Some(ws.off(lay.ent_agg)),
                )?);
            }
            memset0(stream, ws.at(SCRATCH, t0), 4 * n)?;
            if n == 0 {
                continue;
            }
            backward_rows::<E>(
                gpu,
                stream,
                (chunk, v, n, v),
                inputs,
                t0,
                self.logits_config,
                config.entropy_coef,
                &ws,
            )?;
            // the gradient chunk as bf16 for the GEMMs
            let dl = if E::SUFFIX == "f32" {
                let copy_a = ws.off(lay.copy);
                let p = crate::cuda::device::params::LogitsParams {
                    logits: chunk,
                    dlogits: copy_a,
                    num_rows: (n * v) as i64,
                    ..Default::default()
                };
                gpu.launch(
                    stream,
                    Module::Logits,
                    "recap_f32_to_bf16",
                    (n * v).div_ceil(BLOCK as usize).min(65_535),
                    &p,
                )?;
                copy_a
            } else {
                chunk
            };
            gpu.with_blas(stream, |blas| {
                // dH rows [t0, t0 + n): (dH^T)[H, gn] = W^T[H, V] x dL^T[V, gn]
                gemm(
                    blas,
                    N,
                    N,
                    (h, gn, v),
                    (w_a, bf, h),
                    (dl, bf, v),
                    (dh_rows, bf, h),
                    0.0,
                )?;
                // dW^T[H, V] (+)= X_chunk^T[H, n] x dL[n, V]
                gemm(
                    blas,
                    N,
                    T,
                    (h, v, n),
                    (x_chunk, bf, h),
                    (dl, bf, v),
                    (dw_a, cudaDataType::CUDA_R_32F, h),
                    if i == 0 { 0.0 } else { 1.0 },
                )
            })?;
            if dh_rows != dh_chunk {
                copy(stream, dh_chunk, dh_rows, 2 * n * h)?;
            }
        }
        // the entropy term and mean over the whole batch, once
        let has_mean = entropy_terms(
            gpu,
            stream,
            &ws,
            &ent_src,
            config,
            None,
            Some(&dn_ent),
            ws.at(SCRATCH, 0),
        )?;
        finish(
            gpu,
            stream,
            inputs,
            self.layout,
            config,
            k,
            &ws,
            o,
            Some((ws.off(lay.parts), ch.parts, dn.norms)),
            has_mean,
        )?;
        Ok(pending(inputs, k, config, self.logits_config, v))
    }
}

/// Copies a host slice to device address `dst` (the caller's normalizers; not capturable).
fn htod<T: cudarc::driver::DeviceRepr>(stream: &CudaStream, dst: u64, src: &[T]) -> Result<()> {
    if !src.is_empty() {
        // SAFETY: `dst` holds src.len() elements of T inside the workspace; the host slice outlives
        // the call, and the copy from pageable memory completes before this returns.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, src, stream.cu_stream())?;
        }
    }
    Ok(())
}
