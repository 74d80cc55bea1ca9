//! verl's optimal token baseline on the GPU (`kernels/token_baseline.cu`); the CPU reference is
//! [`crate::token_baseline::optimal_token_baseline`].

use crate::advantages::Groups;
use crate::cuda::device::{
    addr, addr_mut, addr_slice, addr_slice_mut, bad_token_slots, check_bad_tokens,
    params::OtbParams, upload, Gpu, Module,
};
use crate::error::Result;
use crate::ops::grpo::cuda::MaskView;
use crate::token_baseline::{validate, TokenBaselineConfig, TokenBaselineInputs};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Device inputs of [`optimal_token_baseline`] (`cu_seqlens` and the groups stay on the host).
pub type DeviceTokenBaselineInputs<'a, 'v> =
    TokenBaselineInputs<'a, CudaView<'v, f32>, CudaView<'v, u8>>;

/// The arguments whose non-finite values (at unmasked tokens) the kernel reports, in its slot order.
const CHECKED: [&str; 4] = [
    "old_logp",
    "sum_pi_squared",
    "rollout_is_weights",
    "token_rewards",
];

/// Advantages and returns (`[T]` each) on `stream`, as the CPU reference. The group table and
/// `cu_seqlens` are uploaded here; synchronizes the stream once, to read back whether any input
/// was non-finite at an unmasked token (an error naming the argument and the first such token).
pub fn optimal_token_baseline(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    x: &DeviceTokenBaselineInputs<'_, '_>,
    config: &TokenBaselineConfig,
    advantages: &mut CudaViewMut<'_, f32>,
    returns: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (b, groups) = validate(x, config, advantages.len(), returns.len())?;
    gpu.check_stream(stream)?;
    let t = x.token_rewards.len();
    if t == 0 {
        return Ok(());
    }
    let (offsets, members) = table(&groups);
    let num_groups = offsets.len() - 1;
    let cu = upload(stream, x.cu_seqlens)?;
    let off = upload(stream, &offsets)?;
    let mem = upload(stream, &members)?;
    let mut sums = stream.alloc_zeros::<f64>(2 * t)?; // W, then G
    let mut ints = stream.alloc_zeros::<i32>(t + b)?; // the aligned tokens, then the live counts
    let mut bad = bad_token_slots(stream, &CHECKED)?;
    {
        let (mask_view, suffix) = MaskView::of(&x.mask);
        let (m_a, _gm) = mask_view.addr(stream);
        let (r_a, _g0) = addr(&x.token_rewards, stream);
        let (o_a, _g1) = addr(&x.old_logp, stream);
        let (q_a, _g2) = addr(&x.sum_pi_squared, stream);
        let (h_a, _g3) = match &x.rollout_is_weights {
            Some(v) => {
                let (a, g) = addr(v, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let (cu_a, _g4) = addr_slice(&cu, stream);
        let (off_a, _g5) = addr_slice(&off, stream);
        let (mem_a, _g6) = addr_slice(&mem, stream);
        let (s_a, _g7) = addr_slice_mut(&mut sums, stream);
        let (i_a, _g8) = addr_slice_mut(&mut ints, stream);
        let (bad_a, _g9) = addr_slice_mut(&mut bad, stream);
        let (adv_a, _g10) = addr_mut(advantages, stream);
        let (ret_a, _g11) = addr_mut(returns, stream);
        let arrays = OtbParams {
            token_rewards: r_a,
            old_logp: o_a,
            sum_pi_squared: q_a,
            rollout_is_weights: h_a,
            mask: m_a,
            cu_seqlens: cu_a,
            group_offsets: off_a,
            group_members: mem_a,
            bad: bad_a,
            advantages: adv_a,
            returns: ret_a,
            ..Default::default()
        };
        let p = otb_params(arrays, s_a, i_a, (t, b, num_groups), config);
        for (kernel, grid) in otb_launches(suffix, b, num_groups) {
            gpu.launch(stream, Module::TokenBaseline, &kernel, grid, &p)?;
        }
    }
    check_bad_tokens(stream, &bad, &CHECKED)
}

/// The group table the kernels read for B sequences: `(offsets [groups + 1], members [B])`, group
/// by group in the reference's order (members ascending).
pub fn group_table(groups: Groups<'_>, b: usize) -> Result<(Vec<i32>, Vec<i32>)> {
    Ok(table(&crate::advantages::group_members(groups, b)?))
}

/// [`group_table`] of the groups' members.
fn table(groups: &[Vec<usize>]) -> (Vec<i32>, Vec<i32>) {
    let b = groups.iter().map(Vec::len).sum();
    let mut offsets = Vec::with_capacity(groups.len() + 1);
    let mut members = Vec::with_capacity(b);
    offsets.push(0i32);
    for g in groups {
        members.extend(g.iter().map(|&s| s as i32));
        offsets.push(members.len() as i32);
    }
    (offsets, members)
}

/// The kernels' parameter struct (the one definition, also used by the tests that run the kernel
/// source on the host): `arrays` holds the caller's addresses (inputs, `cu_seqlens`, the
/// [`group_table`], `bad` (`int32_t[4]`, each `i32::MAX` before the call) and the outputs); `sums`
/// is `double[2 T]` scratch (W, then G), `ints` `int32_t[T + B]` (the aligned tokens, then the
/// live counts).
pub fn otb_params(
    arrays: OtbParams,
    sums: u64,
    ints: u64,
    (t, b, num_groups): (usize, usize, usize),
    config: &TokenBaselineConfig,
) -> OtbParams {
    OtbParams {
        cum_w: sums,
        to_go: sums + (t * 8) as u64,
        aligned: ints,
        live: ints + (t * 4) as u64,
        num_tokens: t as i64,
        num_seqs: b as i32,
        num_groups: num_groups as i32,
        multi_turn: config.multi_turn as i32,
        zero_tail: config.handle_zero_tail as i32,
        eps: config.eps,
        ..arrays
    }
}

/// The launches in order, `(kernel, grid)` with blocks of 256 threads, for the mask's suffix
/// (`f32` or `u8`).
pub fn otb_launches(suffix: &str, b: usize, num_groups: usize) -> [(String, usize); 2] {
    [
        (format!("recap_otb_scan_{suffix}"), b),
        (format!("recap_otb_apply_{suffix}"), num_groups),
    ]
}
