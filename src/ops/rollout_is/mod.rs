//! Rollout importance-sampling weights as their own op (verl's `compute_rollout_correction_weights`),
//! with verl's normalization of the weights to mean 1 over the batch (`rollout_is_batch_normalize`).
//!
//! With `lr = old_logp - rollout_logp` per token and the mask weight `m`:
//!
//! ```text
//! log-weight   token: lr_t      sequence: sum_b m lr      geometric: that / n_b   (n_b = sum_b m)
//! ratio        exp(clamp(log-weight, -20, 20))
//! weight       truncate: min(ratio, upper)   mask: ratio inside [lower, upper], else 0   metrics: 1
//! ```
//!
//! (the fused loss's formula, `recap_rollout_is`). The weights are 0 at masked tokens. The batch mean
//! counts *units*: at token level every unmasked token with its mask weight (`sum m w / (sum m +
//! 1e-8)`, verl's `masked_mean`), at the sequence levels every sequence with `n_b > 0` once, each
//! contributing `w_b n_b / (n_b + 1e-8)` (verl's per-sequence masked mean of its weights), divided
//! by `max(count, 1e-8)`. With normalization the weights are divided by the mean where it is
//! `> 1e-8` (verl's guard), else left as they are.
//!
//! Over data-parallel ranks or micro-batches (verl's `distributed_masked_mean`): run each part
//! without normalization, add the parts' [`RolloutIsStats::weight_sum`] and
//! [`RolloutIsStats::units`], and divide each part's weights by [`batch_factor`] of the totals.
//! Pass the weights to the loss as `policy_weight` (without `rollout_logp`), as verl passes
//! `rollout_is_weights`.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::config::{IsLevel, IsMode, RolloutCorrection};
use crate::error::{Error, Result};
use crate::kernel_layout as k;

/// The number of reduced statistics the kernels write (`RECAP_ISW_SLOTS`).
pub const STAT_SLOTS: usize = k::ISW_SLOTS;

/// What [`crate::Backend::rollout_is_weights`] reports besides the weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RolloutIsStats {
    /// Sum of the units' applied weights (before normalization).
    pub weight_sum: f64,
    /// The units' weight: the mask sum (token level) or the count of sequences with an unmasked
    /// token (sequence levels).
    pub units: f64,
    /// Smallest raw ratio `exp(clamp(log-weight, ±20))` over the units (`+inf` if none).
    pub ratio_min: f64,
    /// Largest raw ratio (`-inf` if none).
    pub ratio_max: f64,
    /// Weight of the units whose weight was truncated (or, in mask mode, set to 0).
    pub corrected: f64,
    /// The batch mean of the applied weights, `weight_sum` over `units` (see the module docs).
    pub mean: f64,
    /// What the weights were divided by: [`batch_factor`] with normalization, else 1 (verl's
    /// `rollout_is_batch_norm_factor`).
    pub factor: f64,
}

impl RolloutIsStats {
    /// The stats from the reduced `RECAP_ISW_*` slots (`kernels/recap_params.h`), as the kernels
    /// write them; a NaN log-weight at a unit is an error naming `log_ratio`.
    pub fn from_slots(
        s: &[f64; STAT_SLOTS],
        level: IsLevel,
        normalize: bool,
    ) -> Result<RolloutIsStats> {
        if s[k::ISW_NAN] > 0.0 {
            return Err(Error::invalid_argument(
                "log_ratio",
                format!(
                    "{} {} with a NaN log-weight (old_logp - rollout_logp is NaN at an unmasked token)",
                    s[k::ISW_NAN],
                    if level == IsLevel::Token { "tokens" } else { "sequences" }
                ),
            ));
        }
        let mean = batch_mean(s[k::ISW_SUM], s[k::ISW_UNITS], level);
        Ok(RolloutIsStats {
            weight_sum: s[k::ISW_SUM],
            units: s[k::ISW_UNITS],
            ratio_min: s[k::ISW_RATIO_MIN],
            ratio_max: s[k::ISW_RATIO_MAX],
            corrected: s[k::ISW_CORRECTED],
            mean,
            factor: if normalize {
                crate::device_math::is_batch_factor(mean)
            } else {
                1.0
            },
        })
    }

    /// The number of values [`RolloutIsStats::to_array`] gives.
    pub const LEN: usize = 7;

    /// The stats in the order the bindings report them (C `stats[7]`, Python `[7]`): weight sum,
    /// units, smallest and largest raw ratio, corrected units, batch mean, factor.
    pub fn to_array(&self) -> [f64; Self::LEN] {
        [
            self.weight_sum,
            self.units,
            self.ratio_min,
            self.ratio_max,
            self.corrected,
            self.mean,
            self.factor,
        ]
    }
}

/// The divisor of the weights for the batch whose parts' [`RolloutIsStats::weight_sum`] and
/// [`RolloutIsStats::units`] add up to `weight_sum` and `units`: their mean where it is `> 1e-8`,
/// else 1. Divide the weights (in `f32`) by it.
pub fn batch_factor(weight_sum: f64, units: f64, level: IsLevel) -> f64 {
    crate::device_math::is_batch_factor(batch_mean(weight_sum, units, level))
}

/// The batch mean of the weights whose parts' [`RolloutIsStats::weight_sum`] and
/// [`RolloutIsStats::units`] add up to `weight_sum` and `units` (see the module docs).
pub fn batch_mean(weight_sum: f64, units: f64, level: IsLevel) -> f64 {
    crate::device_math::is_batch_mean(weight_sum, units, level)
}

/// verl's `rollout_is` (`"token"` or `"sequence"`; `"geometric"`, the geometric mean of the token
/// ratios, is ours) and `rollout_is_threshold` (a number: truncated IS with that cap; `"lower_upper"`:
/// IcePop, weights outside `[lower, upper]` set to 0) as a [`RolloutCorrection`].
pub fn parse_verl(rollout_is: &str, threshold: &str) -> Result<RolloutCorrection> {
    let level = parse_level(rollout_is)?;
    let number = |v: &str| -> Result<f32> {
        match v.trim().parse::<f32>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(Error::invalid_argument(
                "rollout_is_threshold",
                format!("expected a number or \"lower_upper\", got {threshold:?}"),
            )),
        }
    };
    let rc = match threshold.split_once('_') {
        Some((lo, hi)) => RolloutCorrection {
            level,
            mode: IsMode::Mask,
            upper: number(hi)?,
            lower: Some(number(lo)?),
        },
        None => RolloutCorrection {
            level,
            mode: IsMode::Truncate,
            upper: number(threshold)?,
            lower: None,
        },
    };
    rc.validate("rollout_is_threshold", "rollout_is_threshold")?;
    Ok(rc)
}

/// verl's `rollout_is` (`"token"`, `"sequence"`; `"geometric"` is ours) as an [`IsLevel`].
pub fn parse_level(rollout_is: &str) -> Result<IsLevel> {
    match rollout_is.trim() {
        "token" => Ok(IsLevel::Token),
        "sequence" => Ok(IsLevel::Sequence),
        "geometric" => Ok(IsLevel::Geometric),
        other => Err(Error::invalid_argument(
            "rollout_is",
            format!("unknown level {other:?}; expected token, sequence or geometric"),
        )),
    }
}

/// Checks the shapes (`mask` and `weights` of length T, `cu_seqlens` ending at T) and the bounds;
/// returns B.
pub(crate) fn validate(
    t: usize,
    mask_len: usize,
    cu_seqlens: &[i32],
    correction: &RolloutCorrection,
    weights_len: usize,
) -> Result<usize> {
    use crate::layout::check_len;
    check_len("mask", mask_len, t, "[T] (the length of log_ratio)")?;
    check_len("weights", weights_len, t, "[T] (the length of log_ratio)")?;
    let b = crate::layout::validate_cu_seqlens(cu_seqlens, t)?;
    correction.validate("correction.upper", "correction.lower")?;
    Ok(b)
}

/// The stats of an empty batch (no units).
pub(crate) fn empty_slots() -> [f64; k::ISW_SLOTS] {
    let mut s = [0.0; k::ISW_SLOTS];
    s[k::ISW_RATIO_MIN] = f64::INFINITY;
    s[k::ISW_RATIO_MAX] = f64::NEG_INFINITY;
    s
}
