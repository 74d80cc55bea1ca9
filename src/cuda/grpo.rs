//! Kernel 1 on the GPU: the fused GRPO loss (`kernels/grpo_loss.cu`).

use super::{
    addr, addr_mut, begin_token_pass, finalize, maxk, params::GrpoParams, Gpu, Module, SeqExtras,
};
use crate::config::{GrpoConfig, IsLevel, IsMode, PolicyLoss, RolloutCorrection};
use crate::error::Result;
use crate::layout::{check_len, policy_bits, validate_grpo, Advantages, GrpoInputs, Mask};
use crate::output::{finish_grpo, grpo_slots, slots, GrpoOutput, GrpoSums};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Device inputs of the fused GRPO loss: per-token arrays as CUDA views, the small per-batch arrays
/// (`cu_seqlens`, `lambda`, `objectives`, `membership`) on the host.
pub type DeviceGrpoInputs<'a> = GrpoInputs<'a, CudaView<'a, f32>, CudaView<'a, u8>>;

/// The fused GRPO loss on the GPU, on `stream`: writes `dL/dlogp` into `grad` (`[T]`) and returns
/// the loss, per-objective aggregates and metrics (this synchronizes `stream` to read them).
/// Every argument is validated on the host before any launch.
pub fn grpo_loss(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceGrpoInputs<'_>,
    config: &GrpoConfig,
    grad: &mut CudaViewMut<'_, f32>,
) -> Result<GrpoOutput> {
    let shape = validate_grpo(inputs, config)?;
    check_len("grad", grad.len(), shape.t, "[T]")?;
    gpu.check_stream(stream)?;
    let (t, b, k) = (shape.t, shape.b, shape.k);

    let slots = grpo_slots(k);
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
        inputs.cu_seqlens,
        inputs.membership,
        slots,
        k,
        inputs.normalizers,
        &extras,
    )?;
    let (ws, items, suffix) = (&pass.ws, pass.items, pass.suffix);
    {
        let (w, _gw) = ws.addrs(stream);
        let (logp_a, _g0) = addr(&inputs.logp, stream);
        let (old_a, _g1) = addr(&inputs.old_logp, stream);
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
        let (grad_a, _g4) = addr_mut(grad, stream);
        let mut lambda = [0f32; 16];
        lambda[..k].copy_from_slice(inputs.lambda);
        let p = GrpoParams {
            logp: logp_a,
            old_logp: old_a,
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
            is_level: if has_rollout { rc.level_code() } else { -1 },
            is_mode: rc.mode_code(),
            is_lower: rc.lower_bound(),
            is_upper: rc.upper,
            policy_weight: pw_addr,
            policy_agg_mode: config.objective_agg_mode().code(),
            pad1: 0,
            log_ratio_clamp: config.log_ratio_clamp,
            beta: config.kl_coef,
            sum_norm_const: config.norm_constant.unwrap_or(0.0),
            lambda,
        };
        let ext = if config.extended(has_rollout, pw_addr != 0) {
            "ext_"
        } else {
            ""
        };
        let name = format!("recap_grpo_loss_{ext}k{}_{suffix}", maxk(k));
        gpu.launch(stream, Module::GrpoLoss, &name, ws.blocks, &p)?;
        let e = 3 * k;
        let bit = |j: usize| 1u64 << j;
        finalize(
            gpu,
            stream,
            ws,
            &w,
            bit(e + slots::RATIO_MIN) | bit(e + slots::IS_MIN),
            bit(e + slots::RATIO_MAX) | bit(e + slots::IS_MAX),
        )?;
    }
    let (norms, slots) = ws.read_back(stream)?;
    finish_grpo(
        &GrpoSums { slots, norms },
        inputs.lambda,
        config,
        inputs.ref_logp.is_some(),
        has_rollout,
    )
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
