//! The rollout IS weights on the GPU (`kernels/rollout_is.cu`; see [`crate::rollout_is`]).

use crate::config::RolloutCorrection;
use crate::cuda::device::params::{FinalizeParams, IsParams};
use crate::cuda::device::{addr, addr_mut, addr_slice, addr_slice_mut, upload, Gpu, Module, BLOCK};
use crate::error::Result;
use crate::kernel_layout as k;
use crate::layout::Mask;
use crate::ops::grpo::cuda::MaskView;
use crate::rollout_is::{empty_slots, validate, RolloutIsStats};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Rollout IS weights `[T]` of `log_ratio = old_logp - rollout_logp` on `stream` into `weights`
/// (0 at masked tokens), divided by the batch mean when `normalize`; returns the stats (this
/// synchronizes `stream` to read them). `cu_seqlens` is uploaded here.
#[allow(clippy::too_many_arguments)]
pub fn rollout_is_weights(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    log_ratio: &CudaView<'_, f32>,
    mask: Mask<CudaView<'_, f32>, CudaView<'_, u8>>,
    cu_seqlens: &[i32],
    correction: &RolloutCorrection,
    normalize: bool,
    weights: &mut CudaViewMut<'_, f32>,
) -> Result<RolloutIsStats> {
    let t = log_ratio.len();
    let b = validate(t, mask.array_len(), cu_seqlens, correction, weights.len())?;
    gpu.check_stream(stream)?;
    if t == 0 {
        return RolloutIsStats::from_slots(&empty_slots(), correction.level, normalize);
    }
    let (mask_view, suffix) = MaskView::of(&mask);
    let cu = upload(stream, cu_seqlens)?;
    let mut partials = stream.alloc_zeros::<f64>(k::ISW_SLOTS * b)?;
    let mut stats = stream.alloc_zeros::<f64>(k::ISW_SLOTS)?;
    let plan = is_plan(t, b, normalize, 64 * gpu.multiprocessors() as usize);
    {
        let (m_a, _gm) = mask_view.addr(stream);
        let (l_a, _g0) = addr(log_ratio, stream);
        let (c_a, _g1) = addr_slice(&cu, stream);
        let (w_a, _g2) = addr_mut(weights, stream);
        let (p_a, _g3) = addr_slice_mut(&mut partials, stream);
        let (s_a, _g4) = addr_slice_mut(&mut stats, stream);
        let p = is_params([l_a, m_a, c_a, w_a, p_a, s_a], t, b, correction);
        let name = format!("recap_rollout_is_{suffix}");
        gpu.launch(stream, Module::RolloutIs, &name, plan.seq_grid, &p)?;
        let f = is_finalize_params(p_a, s_a, b);
        gpu.launch(
            stream,
            Module::Reduce,
            "recap_partials_finalize",
            k::ISW_SLOTS,
            &f,
        )?;
        if let Some(grid) = plan.scale_grid {
            gpu.launch(
                stream,
                Module::RolloutIs,
                "recap_rollout_is_scale",
                grid,
                &p,
            )?;
        }
    }
    let mut host = [0f64; k::ISW_SLOTS];
    stream.memcpy_dtoh(&stats, &mut host)?;
    stream.synchronize()?;
    RolloutIsStats::from_slots(&host, correction.level, normalize)
}

/// The launches of one call: `recap_rollout_is_*` over `seq_grid` blocks (a warp per sequence),
/// `recap_partials_finalize` over the `RECAP_ISW_SLOTS` rows, then, with normalization,
/// `recap_rollout_is_scale` over `scale_grid` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsPlan {
    /// Blocks of the weight kernel.
    pub seq_grid: usize,
    /// Blocks of the scale kernel, or `None` without normalization.
    pub scale_grid: Option<usize>,
}

/// The launch plan for T tokens and B sequences (`max_blocks` caps the elementwise grid); the one
/// definition, also used by the tests that run the kernel source on the host.
pub fn is_plan(t: usize, b: usize, normalize: bool, max_blocks: usize) -> IsPlan {
    IsPlan {
        seq_grid: b.div_ceil((BLOCK / 32) as usize),
        scale_grid: normalize.then(|| t.div_ceil(BLOCK as usize).clamp(1, max_blocks.max(1))),
    }
}

/// The weight and scale kernels' parameters: the addresses `[log_ratio, mask, cu_seqlens, weights,
/// partials, stats]`, T, B and the correction.
pub fn is_params(addrs: [u64; 6], t: usize, b: usize, correction: &RolloutCorrection) -> IsParams {
    IsParams {
        log_ratio: addrs[0],
        mask: addrs[1],
        cu_seqlens: addrs[2],
        weights: addrs[3],
        partials: addrs[4],
        stats: addrs[5],
        num_tokens: t as i64,
        num_seqs: b as i32,
        level: correction.level_code(),
        mode: correction.mode_code(),
        pad0: 0,
        lower: correction.lower_bound(),
        upper: correction.upper,
    }
}

/// `recap_partials_finalize`'s parameters for the B columns of the statistics (min and max rows
/// for the ratio's extremes).
pub fn is_finalize_params(partials: u64, stats: u64, b: usize) -> FinalizeParams {
    FinalizeParams {
        partials,
        out: stats,
        num_blocks: b as i32,
        num_slots: k::ISW_SLOTS as i32,
        min_bits: 1 << k::ISW_RATIO_MIN,
        max_bits: 1 << k::ISW_RATIO_MAX,
    }
}
