//! Reference of the rollout IS weights (`kernels/rollout_is.cu`), in f64.

use crate::config::{IsLevel, RolloutCorrection};
use crate::cpu::math::{rollout_is, seq_is_log_weight};
use crate::cpu::norms::{mask_weight, masked_sum};
use crate::error::Result;
use crate::kernel_layout as k;
use crate::layout::HostMask;
use crate::rollout_is::{empty_slots, validate, RolloutIsStats};

/// Rollout IS weights `[T]` of the log-ratios `old_logp - rollout_logp` (`[T]`) into `weights` (0 at
/// masked tokens), divided by the batch mean when `normalize` (see [`crate::rollout_is`]).
pub fn rollout_is_weights(
    log_ratio: &[f32],
    mask: HostMask<'_>,
    cu_seqlens: &[i32],
    correction: &RolloutCorrection,
    normalize: bool,
    weights: &mut [f32],
) -> Result<RolloutIsStats> {
    let b = validate(
        log_ratio.len(),
        mask.array_len(),
        cu_seqlens,
        correction,
        weights.len(),
    )?;
    let mut s = empty_slots();
    let mut unit = |lw: f64, m: f64, contribution: f64| {
        let (ratio, w, corrected) = rollout_is(lw, Some(correction));
        s[k::ISW_SUM] += contribution * w;
        s[k::ISW_UNITS] += m;
        if lw.is_nan() {
            s[k::ISW_NAN] += 1.0;
        } else {
            s[k::ISW_RATIO_MIN] = s[k::ISW_RATIO_MIN].min(ratio);
            s[k::ISW_RATIO_MAX] = s[k::ISW_RATIO_MAX].max(ratio);
        }
        s[k::ISW_CORRECTED] += if corrected { m } else { 0.0 };
        w as f32
    };
    for q in 0..b {
        let toks = cu_seqlens[q] as usize..cu_seqlens[q + 1] as usize;
        if correction.level == IsLevel::Token {
            for t in toks {
                let m = mask_weight(&mask, t);
                weights[t] = if m == 0.0 {
                    0.0
                } else {
                    unit(log_ratio[t] as f64, m, m)
                };
            }
            continue;
        }
        let (d, n) = masked_sum(&mask, toks.clone(), |t| log_ratio[t] as f64);
        // the device takes the sequence's log-weight in f32, as the fused loss does
        let lw = seq_is_log_weight(correction.level, d, n) as f32 as f64;
        let w = if n > 0.0 {
            unit(lw, 1.0, n / (n + 1e-8))
        } else {
            rollout_is(lw, Some(correction)).1 as f32
        };
        for t in toks {
            weights[t] = if mask_weight(&mask, t) != 0.0 { w } else { 0.0 };
        }
    }
    let stats = RolloutIsStats::from_slots(&s, correction.level, normalize)?;
    let f = stats.factor as f32;
    if f != 1.0 {
        weights.iter_mut().for_each(|w| *w /= f);
    }
    Ok(stats)
}
