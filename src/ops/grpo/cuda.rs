//! Kernel 1 on the GPU: the fused GRPO loss (`kernels/grpo_loss.cu`).

use crate::config::{GrpoConfig, IsLevel, IsMode, PolicyLoss, RolloutCorrection};
use crate::cuda::device::{
    addr, addr_mut, begin_token_pass, maxk, out_len, params::GrpoParams, read_out, split_out, Gpu,
    LayoutSrc, Module, SeqExtras, Workspace,
};
use crate::error::Result;
use crate::kernel_layout::OUT_LOSS;
use crate::layout::{
    check_len, policy_bits, validate_grpo_on, Advantages, DeviceSide, GrpoInputs, Mask,
};
use crate::output::{finish_grpo, grpo_slots, GrpoOutput, GrpoSums};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Device inputs of the fused GRPO loss: per-token arrays as CUDA views, the small per-batch arrays
/// (`cu_seqlens`, `lambda`, `objectives`, `membership`) on the host (or, for
/// [`grpo_loss_async`], optionally on the device in a [`DeviceLayout`]).
pub type DeviceGrpoInputs<'a> = GrpoInputs<'a, CudaView<'a, f32>, CudaView<'a, u8>>;

/// The per-batch arrays of a fused-loss call passed on the device instead of the host, so the call
/// copies nothing from the host (as CUDA-graph capture requires, and as a trainer whose layout is
/// a device tensor wants). They are checked on the device: `cu_seqlens` non-decreasing from 0 to
/// T, `membership` without bits at or above K, `lambda` finite and >= 0; a failed check makes the
/// device loss NaN and [`PendingGrpo::read`] report the argument. With a layout, the host fields
/// `inputs.cu_seqlens` must be empty and `inputs.membership` `None`; with `lambda` here,
/// `inputs.lambda` must be empty (K is then the length of `inputs.objectives`).
#[derive(Clone, Copy, Debug)]
pub struct DeviceLayout<'v, 'a> {
    /// `[B + 1]` sequence boundaries.
    pub cu_seqlens: &'v CudaView<'a, i32>,
    /// `[B]` membership bits, or `None`: every sequence in every objective.
    pub membership: Option<&'v CudaView<'a, u32>>,
    /// `[K]` objective weights, or `None`: `inputs.lambda` (passed by value with the launch).
    pub lambda: Option<&'v CudaView<'a, f32>>,
}

/// Length of a fused-loss output buffer for `k` objectives (`f64`s: the loss, the device-side
/// check flags, the normalizers and the statistics; layout `RECAP_OUT_*` in
/// `kernels/recap_params.h`).
pub fn grpo_output_len(k: usize) -> usize {
    out_len(grpo_slots(k))
}

/// Index of the loss in a fused-loss output buffer (`RECAP_OUT_LOSS`): a device scalar a trainer
/// can use without reading anything back.
pub const GRPO_OUTPUT_LOSS: usize = OUT_LOSS;

/// A fused-loss call enqueued by [`grpo_loss_async`]: what reading its output takes.
#[derive(Clone, Debug)]
pub struct PendingGrpo {
    k: usize,
    has_ref: bool,
    has_rollout: bool,
    config: GrpoConfig,
}

impl PendingGrpo {
    /// The description of a call made elsewhere (a binding that keeps only these facts): `k`
    /// objectives, whether it had `ref_logp` and `rollout_logp`, and its config.
    pub fn new(k: usize, has_ref: bool, has_rollout: bool, config: &GrpoConfig) -> Self {
        PendingGrpo {
            k,
            has_ref,
            has_rollout,
            config: config.clone(),
        }
    }

    /// Objectives of the call.
    pub fn num_objectives(&self) -> usize {
        self.k
    }

    /// Reads the call's output `out` back (one copy; this synchronizes `stream`) and decodes it
    /// into the loss, aggregates and metrics, as [`grpo_loss`] returns them; reports a failed
    /// device-side check of a [`DeviceLayout`] and, unless `config.allow_nonfinite`, non-finite
    /// inputs ([`crate::Error::NonFinite`]).
    pub fn read(&self, stream: &Arc<CudaStream>, out: &CudaView<'_, f64>) -> Result<GrpoOutput> {
        check_len(
            "out",
            out.len(),
            grpo_output_len(self.k),
            "grpo_output_len(K)",
        )?;
        self.decode(&read_out(stream, out, 0)?)
    }

    /// Decodes an output already on the host (after checking its flags).
    pub(crate) fn decode_host(&self, raw: &[f64]) -> Result<GrpoOutput> {
        check_len(
            "out",
            raw.len(),
            grpo_output_len(self.k),
            "grpo_output_len(K)",
        )?;
        crate::cuda::device::check_flags(raw[crate::kernel_layout::OUT_FLAGS])?;
        self.decode(raw)
    }

    pub(crate) fn decode(&self, raw: &[f64]) -> Result<GrpoOutput> {
        let (norms, slots) = split_out(raw);
        // the loss as the device computed it (the same formula and rounding as finish_grpo's)
        let mut o = finish_grpo(
            &GrpoSums { slots, norms },
            &vec![1.0; self.k],
            &self.config,
            self.has_ref,
            self.has_rollout,
        )?;
        o.loss = raw[OUT_LOSS];
        Ok(o)
    }
}

/// The fused GRPO loss on the GPU, on `stream`: writes `dL/dlogp` into `grad` (`[T]`) and returns
/// the loss, per-objective aggregates and metrics. A convenience over [`grpo_loss_async`]: it
/// reads the output back, which synchronizes `stream`. Every argument is validated on the host
/// before any launch.
pub fn grpo_loss(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceGrpoInputs<'_>,
    config: &GrpoConfig,
    grad: &mut CudaViewMut<'_, f32>,
) -> Result<GrpoOutput> {
    let shape = crate::layout::validate_grpo_on(inputs, config, None)?;
    check_len("grad", grad.len(), shape.t, "[T]")?;
    let (g, _gg) = addr_mut(grad, stream);
    let (pending, ws) = enqueue(gpu, stream, inputs, None, config, g, None, None)?;
    pending.decode(&ws.read_raw(stream)?)
}

/// The fused GRPO loss on the GPU, asynchronously: enqueues two launches on `stream`
/// (`recap_seq_stats_*`, then `recap_grpo_loss_*`, whose last block reduces the statistics and
/// computes the loss) that write `dL/dlogp` into `grad` (`[T]`) and the loss, statistics and
/// check flags into `out` (`[grpo_output_len(K)]`, `f64`; `out[GRPO_OUTPUT_LOSS]` is the loss), and
/// returns without synchronizing. Nothing is allocated once the stream's workspace has grown to
/// the call's size (the first call of a size allocates it). With `layout`, nothing is copied from
/// the host either, so the call can be captured in a CUDA graph (after one eager call of the same
/// or a larger size); without one, `cu_seqlens` and `membership` are uploaded (one copy).
/// [`PendingGrpo::read`] reads the output back (and reports checks that failed on the device).
pub fn grpo_loss_async(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceGrpoInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    grad: &mut CudaViewMut<'_, f32>,
    out: &mut CudaViewMut<'_, f64>,
) -> Result<PendingGrpo> {
    let k = if layout.is_some_and(|l| l.lambda.is_some()) {
        inputs.objectives.len()
    } else {
        inputs.lambda.len()
    };
    check_len("out", out.len(), grpo_output_len(k), "grpo_output_len(K)")?;
    let t = inputs.logp.len();
    check_len("grad", grad.len(), t, "[T]")?;
    let (o, _g) = addr_mut(out, stream);
    let (g, _gg) = addr_mut(grad, stream);
    let (pending, _ws) = enqueue(gpu, stream, inputs, layout, config, g, Some(o), None)?;
    Ok(pending)
}

/// Validates a fused-loss call's inputs with its layout on the host or on the device.
pub(crate) fn validate_call<F: crate::layout::Array, U: crate::layout::Array>(
    inputs: &GrpoInputs<'_, F, U>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
) -> Result<crate::layout::Shape> {
    let device = layout.map(|l| DeviceSide {
        b: l.cu_seqlens.len().saturating_sub(1),
        lambda: l.lambda.is_some(),
        membership: l.membership.is_some(),
    });
    if let Some(l) = layout {
        if l.cu_seqlens.is_empty() {
            return Err(crate::error::Error::invalid_argument(
                "cu_seqlens",
                "expected [B + 1] boundaries starting at 0, got an empty array",
            ));
        }
    }
    let shape = validate_grpo_on(inputs, config, device)?;
    if let Some(l) = layout {
        if let Some(m) = l.membership {
            check_len("membership", m.len(), shape.b, "[B]")?;
        }
        if let Some(lam) = l.lambda {
            check_len(
                "lambda",
                lam.len(),
                shape.k,
                "[K] (the length of objectives)",
            )?;
        }
    }
    Ok(shape)
}

/// Validates and enqueues one call writing `dL/dlogp` at `grad` (a device address of `[T]` f32s
/// the caller checked); the output goes to `out` or, when `None`, to the returned workspace. With
/// `dev_norms` the pass weighs its tokens by normalizers already on the device.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue<'g>(
    gpu: &'g Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceGrpoInputs<'_>,
    layout: Option<&DeviceLayout<'_, '_>>,
    config: &GrpoConfig,
    grad: u64,
    out: Option<u64>,
    dev_norms: Option<&crate::cuda::device::DeviceNorms>,
) -> Result<(PendingGrpo, Workspace<'g>)> {
    let shape = validate_call(inputs, layout, config)?;
    let (t, b, k) = (shape.t, shape.b, shape.k);
    gpu.check_stream(stream)?;

    let slots = grpo_slots(k);
    let (lay_cu, _gc) = match layout {
        Some(l) => {
            let (a, g) = addr(l.cu_seqlens, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let (lay_mem, _gm) = match layout.and_then(|l| l.membership) {
        Some(m) => {
            let (a, g) = addr(m, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let (lay_lam, _gl) = match layout.and_then(|l| l.lambda) {
        Some(m) => {
            let (a, g) = addr(m, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let src = match layout {
        Some(_) => LayoutSrc::Device {
            b,
            cu_seqlens: lay_cu,
            membership: lay_mem,
            lambda: lay_lam,
        },
        None => LayoutSrc::Host {
            cu_seqlens: inputs.cu_seqlens,
            membership: inputs.membership,
        },
    };
    // GSPO and sequence-level rollout IS: recap_seq_stats also takes each sequence's mean
    // log-ratio / IS log-weight (the guards keep the views borrowed until the launches are enqueued)
    let (lp_addr, _gl) = addr(&inputs.logp, stream);
    let (old_addr, _go) = addr(&inputs.old_logp, stream);
    let (roll_addr, _gr) = match &inputs.rollout_logp {
        Some(r) => {
            let (a, g) = addr(r, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let rc = config.rollout_correction.unwrap_or(RolloutCorrection {
        mode: IsMode::MetricsOnly,
        ..RolloutCorrection::default()
    });
    let has_rollout = inputs.rollout_logp.is_some();
    let (pw_addr, _gp) = match &inputs.policy_weight {
        Some(w) => {
            let (a, g) = addr(w, stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let extras = SeqExtras {
        gspo: config.policy_loss == PolicyLoss::Gspo,
        geo_mean: (config.policy_loss == PolicyLoss::GeoMean)
            .then_some((config.clip_low, config.clip_high)),
        logp: lp_addr,
        old_logp: old_addr,
        seq_rollout: if has_rollout && rc.level != IsLevel::Token {
            roll_addr
        } else {
            0
        },
        is_geometric: rc.level == IsLevel::Geometric,
    };
    let pass = begin_token_pass(
        gpu,
        stream,
        &inputs.mask,
        t,
        &src,
        slots,
        k,
        inputs.normalizers,
        dev_norms,
        &extras,
        out,
    )?;
    let (items, suffix, w) = (pass.items, pass.suffix, pass.addrs);
    {
        let (ref_a, _g2) = match &inputs.ref_logp {
            Some(r) => {
                let (a, g) = addr(r, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let (adv_view, per_token) = match &inputs.advantages {
            Advantages::PerSequence(a) => (a, 0),
            Advantages::PerToken(a) => (a, 1),
        };
        let (adv_a, _g3) = addr(adv_view, stream);
        let grad_a = grad;
        let mut lambda = [0f32; 16];
        if lay_lam == 0 {
            lambda[..k].copy_from_slice(inputs.lambda);
        }
        let p = GrpoParams {
            logp: lp_addr,
            old_logp: old_addr,
            ref_logp: ref_a,
            advantages: adv_a,
            mask: pass.mask_addr,
            cu_seqlens: w.cu_seqlens,
            membership: w.membership,
            seq_tokens: w.seq_tokens,
            norms: w.norms,
            grad: grad_a,
            partials: w.partials,
            tile_seq: w.tile_seq,
            num_tokens: t as i64,
            num_seqs: b as i32,
            num_objectives: k as i32,
            items_per_thread: items as i32,
            adv_per_token: per_token,
            agg_mode: config.agg_mode.code(),
            kl_estimator: config.kl_estimator.code(),
            dual_clip: config.dual_clip.is_some() as i32,
            policy_bits: policy_bits(inputs.objectives),
            clip_low: config.clip_low,
            clip_high: config.clip_high,
            clip_c: config.dual_clip.unwrap_or(0.0),
            loss_type: config.policy_loss.code(),
            kl_is_correction: config.kl_is_correction as i32,
            delta: config.delta.unwrap_or(0.0),
            tau_pos: config.policy_loss.taus().0,
            tau_neg: config.policy_loss.taus().1,
            dro_beta: config.policy_loss.dro_beta(),
            seq_log_ratio: w.seq_log_ratio,
            rollout_logp: roll_addr,
            seq_is_log: w.seq_is_log,
            is_level: if has_rollout {
                rc.level_code()
            } else {
                crate::kernel_layout::codes::IS_OFF
            },
            is_mode: rc.mode_code(),
            is_lower: rc.lower_bound(),
            is_upper: rc.upper,
            policy_weight: pw_addr,
            policy_agg_mode: config.objective_agg_mode().code(),
            pad1: 0,
            log_ratio_clamp: config.log_ratio_clamp,
            beta: config.kl_coef,
            inv_norm_const: config
                .norm_constant
                .filter(|c| *c > 0.0)
                .map_or(0.0, |c| 1.0 / c),
            lambda,
            out: w.out,
            ticket: w.tickets + 4,
            lambda_dev: lay_lam,
            inv_norms: w.inv_norms,
            seq_inv: w.seq_inv,
        };
        let ext = if config.extended(has_rollout, pw_addr != 0) {
            "ext_"
        } else {
            ""
        };
        let name = format!("recap_grpo_loss_{ext}k{}_{suffix}", maxk(k));
        gpu.launch(stream, Module::GrpoLoss, &name, pass.ws.blocks, &p)?;
    }
    Ok((
        PendingGrpo {
            k,
            has_ref: inputs.ref_logp.is_some(),
            has_rollout,
            config: config.clone(),
        },
        pass.ws,
    ))
}

/// A mask view of either dtype.
pub(crate) enum MaskView<'v, 'a> {
    F32(&'v CudaView<'a, f32>),
    U8(&'v CudaView<'a, u8>),
}

impl<'v, 'a> MaskView<'v, 'a> {
    /// The view of a mask and the dtype suffix of the kernels that read it (`f32` or `u8`).
    pub(crate) fn of(m: &'v Mask<CudaView<'a, f32>, CudaView<'a, u8>>) -> (Self, &'static str) {
        match m {
            Mask::F32(m) => (MaskView::F32(m), "f32"),
            Mask::U8(m) => (MaskView::U8(m), "u8"),
        }
    }

    pub(crate) fn addr(&self, stream: &'v CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'v>) {
        match self {
            MaskView::F32(m) => addr(m, stream),
            MaskView::U8(m) => addr(m, stream),
        }
    }
}
