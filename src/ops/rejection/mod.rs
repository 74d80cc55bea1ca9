//! Rollout rejection sampling (verl's `rollout_rs`): a hard trust region between the trainer's
//! log-probs and the inference engine's, applied to the mask before anything is counted.
//!
//! With `lr = clamp(old_logp - rollout_logp, -20, 20)` per token (a NaN stays NaN):
//!
//! ```text
//! k1 = -lr        k2 = lr^2 / 2        k3 = exp(lr) - 1 - lr
//! token     the token's statistic
//! seq_sum   sum of m k over the sequence's unmasked tokens
//! seq_mean  that sum / (sum of m + 1e-8)
//! seq_max   max over them (0 for a sequence without unmasked tokens)
//! ```
//!
//! A criterion keeps a value inside `[lower, upper]` (k1) or at most `upper` (k2, k3); a NaN fails.
//! A token is rejected when any criterion rejects it (a sequence-level criterion rejects every token
//! of the sequence, and so does a NaN log-ratio anywhere in it). Each call returns per-token flags,
//! bit i set where criterion i rejects the token (0 at masked tokens, which are never read); the
//! new mask is `mask` where the flags are 0. Pass that mask to
//! [`count_normalizers`](crate::count_normalizers) and the loss: a rejected token then leaves the
//! normalizers, the KL term and the metrics, as in verl.
//!
//! verl's syntax (`rollout_rs="token_k1,seq_mean_k3"`, `rollout_rs_threshold="0.5_2.0,0.01"`) is
//! read by [`RejectionCriterion::parse_verl`]: a k1 threshold is a pair of ratio bounds
//! `lower_upper` (or one upper bound `u`, with `lower = 1/u`), compared in log space.
//!
//! The older verl API's veto (`rollout_token_veto_threshold = t`, verl 0.6-0.7: reject a sequence
//! with any unmasked token whose ratio is below `t`) is [`RejectionCriterion::token_veto`], the
//! criterion `seq_max_k1` with bounds `(-inf, -ln t]`. Unlike verl's veto, a sequence with a NaN
//! log-ratio is rejected by it too (verl's comparison with NaN is false, so verl keeps it).

pub(crate) mod cpu;

use crate::error::{Error, Result};

/// Where a criterion's statistic is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsLevel {
    /// The token's own statistic.
    Token,
    /// The sum over the sequence's unmasked tokens.
    SeqSum,
    /// The mean over them (the sum over their weight + 1e-8).
    SeqMean,
    /// The maximum over them (0 for an empty sequence).
    SeqMax,
}

/// The KL estimator of a criterion, of `lr = old_logp - rollout_logp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsStatistic {
    /// `-lr`, kept inside `[lower, upper]`.
    K1,
    /// `lr^2 / 2`, kept at most `upper`.
    K2,
    /// `exp(lr) - 1 - lr`, kept at most `upper`.
    K3,
}

/// One rejection criterion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RejectionCriterion {
    /// Token or sequence statistic.
    pub level: RsLevel,
    /// Which estimator.
    pub statistic: RsStatistic,
    /// Lower bound of the statistic (k1 only; ignored otherwise).
    pub lower: f64,
    /// Upper bound of the statistic.
    pub upper: f64,
}

/// The most criteria one call takes (`RECAP_RS_MAX_CRITERIA`; the flags are bits of an i32).
pub const MAX_CRITERIA: usize = crate::kernel_layout::RS_MAX_CRITERIA;

const NAMES: [(&str, RsLevel, RsStatistic); 11] = [
    ("token_k1", RsLevel::Token, RsStatistic::K1),
    ("token_k2", RsLevel::Token, RsStatistic::K2),
    ("token_k3", RsLevel::Token, RsStatistic::K3),
    ("seq_sum_k1", RsLevel::SeqSum, RsStatistic::K1),
    ("seq_sum_k2", RsLevel::SeqSum, RsStatistic::K2),
    ("seq_sum_k3", RsLevel::SeqSum, RsStatistic::K3),
    ("seq_mean_k1", RsLevel::SeqMean, RsStatistic::K1),
    ("seq_mean_k2", RsLevel::SeqMean, RsStatistic::K2),
    ("seq_mean_k3", RsLevel::SeqMean, RsStatistic::K3),
    ("seq_max_k2", RsLevel::SeqMax, RsStatistic::K2),
    ("seq_max_k3", RsLevel::SeqMax, RsStatistic::K3),
];

impl RejectionCriterion {
    /// verl's name of the criterion (`token_k1`, `seq_mean_k3`, ...; `seq_max_k1`, which verl does
    /// not offer, by the same pattern).
    pub fn name(&self) -> String {
        let level = match self.level {
            RsLevel::Token => "token",
            RsLevel::SeqSum => "seq_sum",
            RsLevel::SeqMean => "seq_mean",
            RsLevel::SeqMax => "seq_max",
        };
        let stat = match self.statistic {
            RsStatistic::K1 => "k1",
            RsStatistic::K2 => "k2",
            RsStatistic::K3 => "k3",
        };
        format!("{level}_{stat}")
    }

    /// verl's `rollout_rs` (comma-separated options, repeats dropped) and `rollout_rs_threshold`
    /// (one threshold for all, or one per option; for k1 options `lower_upper` ratio bounds or one
    /// upper bound `u` meaning `1/u _ u`, turned into log bounds; all positive).
    pub fn parse_verl(rollout_rs: &str, threshold: &str) -> Result<Vec<RejectionCriterion>> {
        let mut options: Vec<&str> = Vec::new();
        for o in rollout_rs
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            if !NAMES.iter().any(|(n, _, _)| *n == o) {
                let names: Vec<&str> = NAMES.iter().map(|(n, _, _)| *n).collect();
                return Err(Error::invalid_argument(
                    "rollout_rs",
                    format!("unknown option {o:?}; expected {}", names.join(", ")),
                ));
            }
            if !options.contains(&o) {
                options.push(o);
            }
        }
        if options.is_empty() {
            return Err(Error::invalid_argument(
                "rollout_rs",
                "expected at least one option (comma-separated)",
            ));
        }
        let specs: Vec<&str> = threshold
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if specs.len() != 1 && specs.len() != options.len() {
            return Err(Error::invalid_argument(
                "rollout_rs_threshold",
                format!(
                    "expected one threshold for all options or {} (one per option), got {}",
                    options.len(),
                    specs.len()
                ),
            ));
        }
        let positive = |v: &str, o: &str| -> Result<f64> {
            match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
                _ => Err(Error::invalid_argument(
                    "rollout_rs_threshold",
                    format!("{o}: expected a positive number, got {v:?}"),
                )),
            }
        };
        let mut out = Vec::with_capacity(options.len());
        for (i, o) in options.iter().enumerate() {
            let (_, level, statistic) = *NAMES.iter().find(|(n, _, _)| n == o).unwrap();
            let spec = specs[if specs.len() == 1 { 0 } else { i }];
            let (lower, upper) = if statistic == RsStatistic::K1 {
                let (lo, hi) = match spec.split_once('_') {
                    Some((lo, hi)) => (positive(lo, o)?, positive(hi, o)?),
                    None => {
                        let hi = positive(spec, o)?;
                        (1.0 / hi, hi)
                    }
                };
                (lo.ln(), hi.ln())
            } else {
                if spec.contains('_') {
                    return Err(Error::invalid_argument(
                        "rollout_rs_threshold",
                        format!("{o}: expected one upper bound, got {spec:?}"),
                    ));
                }
                (0.0, positive(spec, o)?)
            };
            out.push(RejectionCriterion {
                level,
                statistic,
                lower,
                upper,
            });
        }
        Ok(out)
    }

    /// The older verl API's `rollout_token_veto_threshold` (verl 0.6-0.7): a sequence holding an
    /// unmasked token with ratio `exp(lr) < threshold` is rejected whole. It is `seq_max_k1` with an
    /// open lower bound and `upper = -ln(threshold)` (the max of `-lr` over the sequence). The
    /// threshold must lie in `(e^-20, e^20)` (about `2.1e-9` to `4.9e8`), where the reference's ±20
    /// clamp of `lr` cannot change the verdict.
    pub fn token_veto(threshold: f64) -> Result<RejectionCriterion> {
        let ln = threshold.ln();
        if !(threshold > 0.0 && ln > -20.0 && ln < 20.0) {
            return Err(Error::invalid_argument(
                "rollout_token_veto_threshold",
                format!(
                    "expected a ratio in (e^-20, e^20), about (2.1e-9, 4.9e8), got {threshold}"
                ),
            ));
        }
        Ok(RejectionCriterion {
            level: RsLevel::SeqMax,
            statistic: RsStatistic::K1,
            lower: f64::NEG_INFINITY,
            upper: -ln,
        })
    }

    /// [`parse_verl`](Self::parse_verl)'s criteria (none when `rollout_rs` is blank), then the
    /// [`token_veto`](Self::token_veto) when `veto` is given, as the last criterion (its flag is the
    /// last bit). At least one of the two is needed.
    pub fn parse_verl_with_veto(
        rollout_rs: &str,
        threshold: &str,
        veto: Option<f64>,
    ) -> Result<Vec<RejectionCriterion>> {
        let mut out = match (rollout_rs.trim().is_empty(), veto) {
            (true, Some(_)) => Vec::new(),
            (true, None) => return Err(Error::invalid_argument(
                "rollout_rs",
                "expected at least one option (comma-separated) or rollout_token_veto_threshold",
            )),
            (false, _) => Self::parse_verl(rollout_rs, threshold)?,
        };
        if let Some(v) = veto {
            out.push(Self::token_veto(v)?);
        }
        Ok(out)
    }

    pub(crate) fn level_code(&self) -> i32 {
        use crate::kernel_layout as k;
        (match self.level {
            RsLevel::Token => k::RS_TOKEN,
            RsLevel::SeqSum => k::RS_SEQ_SUM,
            RsLevel::SeqMean => k::RS_SEQ_MEAN,
            RsLevel::SeqMax => k::RS_SEQ_MAX,
        }) as i32
    }

    pub(crate) fn statistic_code(&self) -> i32 {
        use crate::kernel_layout as k;
        (match self.statistic {
            RsStatistic::K1 => k::RS_K1,
            RsStatistic::K2 => k::RS_K2,
            RsStatistic::K3 => k::RS_K3,
        }) as i32
    }
}

/// Checks the criteria (1 to [`MAX_CRITERIA`], bounds not NaN, `lower <= upper` for k1).
pub(crate) fn validate_criteria(criteria: &[RejectionCriterion]) -> Result<()> {
    if criteria.is_empty() || criteria.len() > MAX_CRITERIA {
        return Err(Error::invalid_argument(
            "criteria",
            format!(
                "expected 1 to {MAX_CRITERIA} criteria, got {}",
                criteria.len()
            ),
        ));
    }
    for (i, c) in criteria.iter().enumerate() {
        let k1 = c.statistic == RsStatistic::K1;
        if c.upper.is_nan() || (k1 && (c.lower.is_nan() || c.lower > c.upper)) {
            return Err(Error::invalid_argument(
                "criteria",
                format!(
                    "criteria[{i}] ({}): expected bounds with lower <= upper, got [{}, {}]",
                    c.name(),
                    c.lower,
                    c.upper
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the shapes (`log_ratio`, `mask` and `flags` of length T, `cu_seqlens` ending at T) and
/// the criteria; returns B.
pub(crate) fn validate(
    t: usize,
    mask_len: usize,
    cu_seqlens: &[i32],
    criteria: &[RejectionCriterion],
    flags_len: usize,
) -> Result<usize> {
    use crate::layout::check_len;
    check_len("mask", mask_len, t, "[T] (the length of log_ratio)")?;
    check_len("flags", flags_len, t, "[T] (the length of log_ratio)")?;
    let b = crate::layout::validate_cu_seqlens(cu_seqlens, t)?;
    validate_criteria(criteria)?;
    Ok(b)
}
