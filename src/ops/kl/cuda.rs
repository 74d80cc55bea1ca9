//! Kernel 2 on the GPU: the standalone per-token KL and the rollout rejection flags (`kernels/kl.cu`).

use crate::config::KlEstimator;
use crate::cuda::device::{
    addr, addr_mut, params::KlParams, params::RejectParams, Gpu, Module, BLOCK,
};
use crate::error::Result;
use crate::layout::Mask;
use crate::ops::grpo::cuda::MaskView;
use crate::rejection::{validate, RejectionCriterion};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Per-token KL value and gradient `d kl_t / d logp_t` on `stream` into `kl_out` and `grad`
/// (`[T]` each); masked tokens get 0. `mask = None` computes every token.
#[allow(clippy::too_many_arguments)]
pub fn kl(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    logp: &CudaView<'_, f32>,
    ref_logp: &CudaView<'_, f32>,
    mask: Option<Mask<CudaView<'_, f32>, CudaView<'_, u8>>>,
    estimator: KlEstimator,
    kl_out: &mut CudaViewMut<'_, f32>,
    grad: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let t = logp.len();
    super::validate(
        t,
        ref_logp.len(),
        mask.as_ref().map(|m| m.array_len()),
        kl_out.len(),
        grad.len(),
    )?;
    gpu.check_stream(stream)?;
    let (mask_view, suffix) = match &mask {
        Some(Mask::F32(m)) => (Some(MaskView::F32(m)), "f32"),
        Some(Mask::U8(m)) => (Some(MaskView::U8(m)), "u8"),
        None => (None, "f32"),
    };
    let (mask_a, _gm) = match &mask_view {
        Some(v) => {
            let (a, g) = v.addr(stream);
            (a, Some(g))
        }
        None => (0, None),
    };
    let (l_a, _g0) = addr(logp, stream);
    let (r_a, _g1) = addr(ref_logp, stream);
    let (k_a, _g2) = addr_mut(kl_out, stream);
    let (g_a, _g3) = addr_mut(grad, stream);
    let p = KlParams {
        logp: l_a,
        ref_logp: r_a,
        mask: mask_a,
        kl: k_a,
        grad: g_a,
        num_tokens: t as i64,
        kl_estimator: estimator.code(),
        pad0: 0,
    };
    let blocks = t
        .div_ceil(BLOCK as usize)
        .min(64 * gpu.multiprocessors() as usize);
    gpu.launch(
        stream,
        Module::Kl,
        &format!("recap_kl_{suffix}"),
        blocks,
        &p,
    )
}

/// Rollout rejection flags `[T]` on `stream` (see [`crate::rejection`]): bit i set where
/// criterion i rejects the token, 0 at masked tokens. `cu_seqlens` is uploaded here.
pub fn rollout_rejection(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    log_ratio: &CudaView<'_, f32>,
    mask: Mask<CudaView<'_, f32>, CudaView<'_, u8>>,
    cu_seqlens: &[i32],
    criteria: &[RejectionCriterion],
    flags: &mut CudaViewMut<'_, i32>,
) -> Result<()> {
    let t = log_ratio.len();
    let b = validate(t, mask.array_len(), cu_seqlens, criteria, flags.len())?;
    gpu.check_stream(stream)?;
    if t == 0 {
        return Ok(());
    }
    let (mask_view, suffix) = MaskView::of(&mask);
    let cu = crate::cuda::device::upload(stream, cu_seqlens)?;
    let (m_a, _gm) = mask_view.addr(stream);
    let (l_a, _g0) = addr(log_ratio, stream);
    let (c_a, _g1) = crate::cuda::device::addr_slice(&cu, stream);
    let (f_a, _g2) = addr_mut(flags, stream);
    let p = rejection_params([l_a, m_a, c_a, f_a], t, b, criteria);
    gpu.launch(
        stream,
        Module::Kl,
        &format!("recap_rejection_{suffix}"),
        rejection_grid(b),
        &p,
    )
}

/// The rejection kernel's parameters: the addresses `[log_ratio, mask, cu_seqlens, flags]`, T, B
/// and the criteria (the one definition, also used by the tests that run the kernel source on the
/// host).
pub fn rejection_params(
    addrs: [u64; 4],
    t: usize,
    b: usize,
    criteria: &[RejectionCriterion],
) -> RejectParams {
    let mut p = RejectParams {
        log_ratio: addrs[0],
        mask: addrs[1],
        cu_seqlens: addrs[2],
        flags: addrs[3],
        num_tokens: t as i64,
        num_seqs: b as i32,
        num_criteria: criteria.len() as i32,
        ..Default::default()
    };
    for (i, c) in criteria.iter().enumerate() {
        p.level[i] = c.level_code();
        p.statistic[i] = c.statistic_code();
        p.lower[i] = c.lower;
        p.upper[i] = c.upper;
    }
    p
}

/// Blocks of the rejection kernel for B sequences (one warp each).
pub fn rejection_grid(b: usize) -> usize {
    b.div_ceil((BLOCK / 32) as usize)
}
