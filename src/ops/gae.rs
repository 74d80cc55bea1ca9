//! Generalized advantage estimation (GAE, Schulman et al. 2015): verl's
//! `compute_gae_advantage_return`, PPO's default estimator (`algorithm.adv_estimator=gae`).
//!
//! The whole op is in this file: its types, the CPU reference (f64), the CUDA launch
//! (`kernels/gae.cu`) and the pointer-level entry point the bindings call ([`gae_at`]).
//!
//! Per sequence of the packed `[T]` arrays, backward over its tokens t with mask weight m, reward r
//! and value v, from `nv = lg = 0` (the next value and the running advantage):
//!
//! ```text
//! delta = r + gamma nv - v
//! lg   <- m (delta + gamma lam lg) + (1 - m) lg
//! nv   <- m v + (1 - m) nv
//! adv_t = lg        ret_t = adv_t + v_t
//! ```
//!
//! so a masked token (a tool's output between turns, padding) carries the state through and gets
//! the advantage of the next unmasked one. With `whiten` (verl always whitens) the advantages are
//! then verl's `masked_whiten` over the batch: `mean = sum m adv / (sum m + 1e-8)`, `var` the
//! unbiased masked variance, `adv <- (adv - mean) / sqrt(var + 1e-8)` at every token, masked ones
//! included. Returns are not whitened.
//!
//! Differences from verl, for 0/1 masks: a non-finite reward or value at an unmasked token is an
//! error naming the argument and the token; a masked token's reward is not read, nor its value but
//! for its own return (verl multiplies by the mask, so a NaN there spreads); a batch whose mask sums
//! to at most 1 gets whitened advantages 0 (verl raises). The kernel computes the recurrence in
//! double precision as a warp scan of affine maps, so its advantages agree with verl's f32 loop to
//! rounding, not bit for bit; it is deterministic (no float atomics).
//!
//! ```
//! use recap_kernels::ops::gae::{gae, GaeConfig, HostGaeInputs};
//! use recap_kernels::HostMask;
//! // one sequence of 3 tokens, reward 1 at the end, values 0: advantages 1, 1, 1 before whitening
//! let x = HostGaeInputs {
//!     token_rewards: &[0.0, 0.0, 1.0],
//!     values: &[0.0; 3],
//!     mask: HostMask::U8(&[1, 1, 1]),
//!     cu_seqlens: &[0, 3],
//! };
//! let config = GaeConfig { whiten: false, ..GaeConfig::default() };
//! let (mut adv, mut ret) = ([0f32; 3], [0f32; 3]);
//! gae(&x, &config, &mut adv, &mut ret).unwrap();
//! assert_eq!(adv, [1.0, 1.0, 1.0]);
//! assert_eq!(ret, [1.0, 1.0, 1.0]);
//! ```

use crate::cuda::device::{
    addr, addr_mut, addr_slice, addr_slice_mut, bad_token_slots, check_bad_tokens,
    params::GaeParams, upload, Gpu, Module,
};
use crate::error::{Error, Result};
use crate::layout::{check_len, mask_weight, nonfinite_at, validate_cu_seqlens, Array, Mask};
use crate::ops::grpo::cuda::MaskView;
use crate::place::{mask, run, In, Memory, Out, Place};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Options of GAE.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GaeConfig {
    /// Discount factor (verl's `algorithm.gamma`, default 1).
    pub gamma: f64,
    /// GAE's lambda (verl's `algorithm.lam`, default 1).
    pub lam: f64,
    /// Whiten the advantages over the batch (verl always does).
    pub whiten: bool,
}

impl Default for GaeConfig {
    /// verl's defaults: gamma 1, lam 1, whitened.
    fn default() -> Self {
        GaeConfig {
            gamma: 1.0,
            lam: 1.0,
            whiten: true,
        }
    }
}

/// Inputs of GAE: packed `[T]` per-token arrays of B sequences (a padded `[B, L]` batch is
/// `cu_seqlens = [0, L, 2L, ..]`). `F` is the f32 array type, `U` the u8 one: host slices
/// ([`HostGaeInputs`]), CUDA views or a binding's [`In`] arrays.
#[derive(Clone, Copy, Debug)]
pub struct GaeInputs<'a, F, U> {
    /// `[T]` token rewards (verl's `token_level_rewards`).
    pub token_rewards: F,
    /// `[T]` the critic's values.
    pub values: F,
    /// `[T]` mask (verl's `response_mask`).
    pub mask: Mask<F, U>,
    /// `[B + 1]` sequence offsets (host).
    pub cu_seqlens: &'a [i32],
}

/// Host inputs of [`gae`].
pub type HostGaeInputs<'a> = GaeInputs<'a, &'a [f32], &'a [u8]>;

/// The arguments whose non-finite values at unmasked tokens are errors, in the kernel's slot order.
const CHECKED: [&str; 2] = ["token_rewards", "values"];

/// Checks every length, `cu_seqlens` and the options (before any launch); returns B.
fn validate<F: Array, U: Array>(
    x: &GaeInputs<'_, F, U>,
    config: &GaeConfig,
    advantages: usize,
    returns: usize,
) -> Result<usize> {
    let t = x.token_rewards.array_len();
    let shape = "[T] (the length of token_rewards)";
    check_len("values", x.values.array_len(), t, shape)?;
    check_len("mask", x.mask.array_len(), t, shape)?;
    check_len("advantages", advantages, t, shape)?;
    check_len("returns", returns, t, shape)?;
    for (name, v) in [("gamma", config.gamma), ("lam", config.lam)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::invalid_argument(
                name,
                format!("expected a finite value >= 0, got {v}"),
            ));
        }
    }
    validate_cu_seqlens(x.cu_seqlens, t)
}

/// GAE's advantages and returns (`[T]` each) of `x` on the host (see the module): the CPU
/// reference, f64.
pub fn gae(
    x: &HostGaeInputs<'_>,
    config: &GaeConfig,
    advantages: &mut [f32],
    returns: &mut [f32],
) -> Result<()> {
    let b = validate(x, config, advantages.len(), returns.len())?;
    let (gamma, lam) = (config.gamma, config.lam);
    for s in 0..b {
        let (mut nv, mut lg) = (0f64, 0f64);
        for tok in (x.cu_seqlens[s] as usize..x.cu_seqlens[s + 1] as usize).rev() {
            let m = mask_weight(&x.mask, tok);
            if m != 0.0 {
                let (r, v) = (x.token_rewards[tok], x.values[tok]);
                for (name, value) in CHECKED.into_iter().zip([r, v]) {
                    if !value.is_finite() {
                        return Err(nonfinite_at(name, tok));
                    }
                }
                let (r, v) = (r as f64, v as f64);
                let delta = r + gamma * nv - v;
                lg = m * (delta + gamma * lam * lg) + (1.0 - m) * lg;
                nv = m * v + (1.0 - m) * nv;
            }
            advantages[tok] = lg as f32;
            returns[tok] = (lg + x.values[tok] as f64) as f32;
        }
    }
    if config.whiten {
        let (mut w, mut sum) = (0f64, 0f64);
        for (tok, &a) in advantages.iter().enumerate() {
            let m = mask_weight(&x.mask, tok);
            w += m;
            sum += m * a as f64;
        }
        let mean = sum / (w + 1e-8);
        let m2: f64 = (0..advantages.len())
            .map(|tok| mask_weight(&x.mask, tok) * (advantages[tok] as f64 - mean).powi(2))
            .sum();
        let inv = if w > 1.0 {
            let var = m2 / (w + 1e-8) * (w / (w - 1.0));
            1.0 / (var + 1e-8).sqrt()
        } else {
            0.0
        };
        for a in advantages.iter_mut() {
            *a = ((*a as f64 - mean) * inv) as f32;
        }
    }
    Ok(())
}

/// Device inputs of [`gae_cuda`].
pub type DeviceGaeInputs<'a, 'v> = GaeInputs<'a, CudaView<'v, f32>, CudaView<'v, u8>>;

/// The launches in order, `(kernel, grid)` with blocks of 256 threads: the scan (one warp per
/// sequence), and with `whiten` the batch statistics (one block) and the whitening (grid-stride).
pub fn gae_launches(suffix: &str, b: usize, t: usize, whiten: bool) -> Vec<(String, usize)> {
    let mut l = vec![(format!("recap_gae_scan_{suffix}"), b.div_ceil(8))];
    if whiten {
        l.push(("recap_gae_stats".into(), 1));
        l.push(("recap_gae_whiten".into(), t.div_ceil(256).clamp(1, 4096)));
    }
    l
}

/// GAE on `stream`, as the CPU reference [`gae`]. `cu_seqlens` is uploaded here; synchronizes the
/// stream once, to read back whether a reward or value was non-finite at an unmasked token (an
/// error naming it and the first such token).
pub fn gae_cuda(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    x: &DeviceGaeInputs<'_, '_>,
    config: &GaeConfig,
    advantages: &mut CudaViewMut<'_, f32>,
    returns: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let b = validate(x, config, advantages.len(), returns.len())?;
    gpu.check_stream(stream)?;
    let t = x.token_rewards.len();
    if t == 0 {
        return Ok(());
    }
    let cu = upload(stream, x.cu_seqlens)?;
    let mut stats = stream.alloc_zeros::<f64>(3 * b + 2)?; // the rows' statistics, then the scale
    let mut bad = bad_token_slots(stream, &CHECKED)?;
    {
        let (mask_view, suffix) = MaskView::of(&x.mask);
        let (m_a, _gm) = mask_view.addr(stream);
        let (r_a, _g0) = addr(&x.token_rewards, stream);
        let (v_a, _g1) = addr(&x.values, stream);
        let (cu_a, _g2) = addr_slice(&cu, stream);
        let (s_a, _g3) = addr_slice_mut(&mut stats, stream);
        let (bad_a, _g4) = addr_slice_mut(&mut bad, stream);
        let (adv_a, _g5) = addr_mut(advantages, stream);
        let (ret_a, _g6) = addr_mut(returns, stream);
        let p = GaeParams {
            token_rewards: r_a,
            values: v_a,
            mask: m_a,
            cu_seqlens: cu_a,
            advantages: adv_a,
            returns: ret_a,
            row_stats: s_a,
            scale: s_a + (3 * b * 8) as u64,
            bad: bad_a,
            num_tokens: t as i64,
            num_seqs: b as i32,
            whiten: config.whiten as i32,
            gamma: config.gamma,
            lam: config.lam,
        };
        for (kernel, grid) in gae_launches(suffix, b, t, config.whiten) {
            gpu.launch(stream, Module::Gae, &kernel, grid, &p)?;
        }
    }
    check_bad_tokens(stream, &bad, &CHECKED)
}

/// GAE of a binding's arrays at `place` (the host reference, or the kernels on a device).
pub fn gae_at(
    place: Place,
    x: &GaeInputs<'_, In<f32>, In<u8>>,
    config: &GaeConfig,
    advantages: Out<f32>,
    returns: Out<f32>,
) -> Result<()> {
    fn views<'a: 'm, 'm, M: Memory>(
        m: &'m M,
        x: &GaeInputs<'a, In<f32>, In<u8>>,
    ) -> Result<GaeInputs<'m, M::Ro<'m, f32>, M::Ro<'m, u8>>> {
        Ok(GaeInputs {
            token_rewards: m.ro("token_rewards", x.token_rewards)?,
            values: m.ro("values", x.values)?,
            mask: mask(m, "mask", &x.mask)?,
            cu_seqlens: x.cu_seqlens,
        })
    }
    run(
        place,
        |m| {
            let (adv, ret) = (m.rw("advantages", advantages)?, m.rw("returns", returns)?);
            gae(&views(m, x)?, config, adv, ret)
        },
        |m| {
            let v = views(m, x)?;
            let (mut adv, mut ret) = (m.rw("advantages", advantages)?, m.rw("returns", returns)?);
            gae_cuda(&m.gpu, &m.stream, &v, config, &mut adv, &mut ret)
        },
    )
}
