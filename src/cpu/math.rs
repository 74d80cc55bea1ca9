//! Per-token formulas in f64: the reference for `kernels/grpo_math.cuh` (same rules, higher precision).

use crate::config::{
    AggMode, GrpoConfig, IsLevel, IsMode, KlEstimator, PolicyLoss, RolloutCorrection,
};

/// Clamped log-ratio and ratio.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// `d = clamp(logp - old_logp, -c0, c0)` (NaN stays NaN).
    pub log_ratio: f64,
    /// `r = exp(d)`.
    pub ratio: f64,
    /// The clamp saturated, so `dd/dlogp = 0`.
    pub saturated: bool,
}

/// `d` and `r` for one token.
pub fn ratio(logp: f32, old_logp: f32, clamp: f32) -> Ratio {
    let raw = logp as f64 - old_logp as f64;
    let c = clamp as f64;
    let log_ratio = if raw.is_nan() { raw } else { raw.clamp(-c, c) };
    Ratio {
        log_ratio,
        ratio: log_ratio.exp(),
        saturated: raw < -c || raw > c,
    }
}

/// Loss, gradient and branch flags of the clipped surrogate at one token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyToken {
    /// `l`.
    pub loss: f64,
    /// `dl/dlogp`.
    pub grad: f64,
    /// The clipped branch is active (`l2 > l1`).
    pub clipped: bool,
    /// The dual-clip branch is active.
    pub dual: bool,
}

/// One token of the policy loss of `cfg.policy_loss` (see `kernels/grpo_math.cuh`): the clipped
/// surrogate `max(-A min(r, delta), -A clip(r, 1 - el, 1 + eh))` with dual-clip `min(l, -c A)` for
/// `A < 0`, or CISPO `-sg(clip(r)) A logp`, or SAPO `-A (4/tau) sigmoid(tau (r - 1))`, GPG
/// `-A logp`, DPPO `-A sg(min(r, c)) logp` inside its trust region, DRO
/// `-(A logp - beta d^2 / 2)`, GMPO `-A R` (`q` from [`geo_mean_ratio`]); the gradient follows
/// the active branch.
pub fn policy_token(q: Ratio, adv: f32, logp: f32, old_logp: f32, cfg: &GrpoConfig) -> PolicyToken {
    let a = adv as f64;
    let r = q.ratio;
    let (lo, hi) = (1.0 - cfg.clip_low as f64, 1.0 + cfg.clip_high as f64);
    let rc = if r.is_nan() { r } else { r.clamp(lo, hi) };
    let (lp, old) = (logp as f64, old_logp as f64);
    match cfg.policy_loss {
        PolicyLoss::Gpg => {
            return PolicyToken {
                loss: -a * lp,
                grad: -a,
                clipped: false,
                dual: false,
            }
        }
        PolicyLoss::Dro { beta } => {
            let (beta, d) = (beta as f64, lp - old);
            return PolicyToken {
                loss: -(a * lp - 0.5 * beta * d * d),
                grad: -(a - beta * d),
                clipped: false,
                dual: false,
            };
        }
        PolicyLoss::DppoTv | PolicyLoss::DppoKl => {
            let (p, po) = (lp.exp(), old.exp());
            let (el, eh) = (cfg.clip_low as f64, cfg.clip_high as f64);
            let valid = if cfg.policy_loss == PolicyLoss::DppoTv {
                if a > 0.0 {
                    p - po <= eh
                } else {
                    p - po >= -el
                }
            } else {
                let bkl =
                    po * (old - lp) + (1.0 - po) * ((1.0 - po + 1e-8) / (1.0 - p + 1e-8)).ln();
                if a > 0.0 {
                    bkl <= eh || p <= po
                } else {
                    bkl <= el || p >= po
                }
            };
            let truncated = cfg.dual_clip.is_some_and(|c| r > c as f64);
            let tr = if truncated {
                cfg.dual_clip.map_or(r, |c| c as f64)
            } else {
                r
            };
            return PolicyToken {
                loss: if valid { -a * tr * lp } else { 0.0 },
                grad: if valid { -a * tr } else { 0.0 },
                clipped: !valid,
                dual: valid && truncated,
            };
        }
        PolicyLoss::Cispo => {
            return PolicyToken {
                loss: -rc * a * logp as f64,
                grad: -rc * a,
                clipped: rc != r,
                dual: false,
            }
        }
        PolicyLoss::Sapo { tau_pos, tau_neg } => {
            let tau = if a > 0.0 { tau_pos } else { tau_neg } as f64;
            let s = 1.0 / (1.0 + (-tau * (r - 1.0)).exp());
            return PolicyToken {
                loss: -a * (4.0 / tau) * s,
                grad: if q.saturated {
                    0.0
                } else {
                    -4.0 * a * s * (1.0 - s) * r
                },
                clipped: rc != r,
                dual: false,
            };
        }
        PolicyLoss::GeoMean => {
            // q: the sequence's ratio R, the token's own log-ratio d (geo_mean_ratio)
            let (d, el, eh) = (q.log_ratio, cfg.clip_low as f64, cfg.clip_high as f64);
            let outside = d > eh || d < -el;
            let live = if a > 0.0 { d <= eh } else { d >= -el };
            return PolicyToken {
                loss: -a * r,
                grad: if live && !q.saturated { -a * r } else { 0.0 },
                clipped: outside && a > 0.0,
                dual: outside && a < 0.0,
            };
        }
        PolicyLoss::Vanilla | PolicyLoss::Gspo => {}
    }
    let vanilla = cfg.policy_loss == PolicyLoss::Vanilla; // GSPO: no dual-clip, no delta
    let capped = vanilla && cfg.delta.is_some_and(|d| r > d as f64);
    let l1 = -a * cfg.delta.filter(|_| capped).map_or(r, |d| d as f64);
    let l2 = -a * rc;
    // the larger term is the loss; its gradient is -A r where its ratio is live: l1 below delta,
    // l2 inside the clip range (with delta below 1 + eh, TRL's l2 passes gradient for A < 0)
    let take2 = l2 > l1;
    let clipped = take2 && rc != r;
    let live = if take2 { rc == r } else { !capped };
    let mut out = PolicyToken {
        loss: if take2 { l2 } else { l1 },
        grad: if live && !q.saturated { -a * r } else { 0.0 },
        clipped,
        dual: false,
    };
    if let (true, Some(c)) = (vanilla, cfg.dual_clip) {
        if a < 0.0 {
            let l3 = -(c as f64) * a;
            if out.loss > l3 {
                out = PolicyToken {
                    loss: l3,
                    grad: 0.0,
                    clipped,
                    dual: true,
                };
            }
        }
    }
    out
}

/// GMPO's ratio at a token of log-ratio `d` in a sequence whose sign-clipped mean log-ratio (for the
/// token's advantage sign) is `mean`: ratio `exp(min(mean, 10))` (saturated above 10), log-ratio `d`.
pub fn geo_mean_ratio(d: f64, mean: f64) -> Ratio {
    Ratio {
        log_ratio: d,
        ratio: if mean.is_nan() { mean } else { mean.min(10.0) }.exp(),
        saturated: mean > 10.0,
    }
}

/// GSPO's ratio at a token of a sequence with mean log-ratio `lr`: `exp(min(lr, 10))`, saturated
/// (no gradient) above 10; NaN stays NaN.
pub fn gspo_ratio(lr: f64) -> Ratio {
    let log_ratio = if lr.is_nan() { lr } else { lr.min(10.0) };
    Ratio {
        log_ratio,
        ratio: log_ratio.exp(),
        saturated: lr > 10.0,
    }
}

/// A sequence's rollout IS log-weight from the masked sum `d` of its log-ratios and its mask sum
/// `n`: `d` (sequence level) or the mean `d / n` (geometric level; 0 for `n = 0`).
pub fn seq_is_log_weight(level: IsLevel, d: f64, n: f64) -> f64 {
    match level {
        IsLevel::Geometric if n != 0.0 => d / n,
        IsLevel::Geometric => 0.0,
        _ => d,
    }
}

/// Rollout IS ratio and weight at a log-weight `log_w` (see `recap_rollout_is`): the ratio
/// `exp(clamp(log_w, -20, 20))`, truncated (`min(ratio, upper)`), masked (ratio inside
/// `[lower, upper]`, else 0) or 1 (metrics only); and whether the weight was corrected.
pub fn rollout_is(log_w: f64, rc: Option<&RolloutCorrection>) -> (f64, f64, bool) {
    let lw = if log_w.is_nan() {
        log_w
    } else {
        log_w.clamp(-20.0, 20.0)
    };
    let ratio = lw.exp();
    match rc.map(|r| (r.mode, r.lower_bound() as f64, r.upper as f64)) {
        Some((IsMode::Truncate, _, up)) => {
            let c = ratio > up;
            (ratio, if c { up } else { ratio }, c)
        }
        Some((IsMode::Mask, lo, up)) => {
            let inside = ratio >= lo && ratio <= up;
            (ratio, if inside { ratio } else { 0.0 }, !inside)
        }
        _ => (ratio, 1.0, false),
    }
}

/// TRL's `use_bias_correction_kl`: `kl r`, gradient `kl' r + kl r` (the second term 0 where the
/// log-ratio clamp saturates).
pub fn kl_is_corrected(kt: KlToken, q: Ratio) -> KlToken {
    KlToken {
        value: kt.value * q.ratio,
        grad: kt.grad * q.ratio + if q.saturated { 0.0 } else { kt.value * q.ratio },
    }
}

/// Value and gradient of a KL estimator at one token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlToken {
    /// `kl_t`.
    pub value: f64,
    /// `d kl_t / d logp_t`.
    pub grad: f64,
}

/// The KL estimators of verl's `kl_penalty`, `diff = logp - ref_logp`.
pub fn kl_token(logp: f32, ref_logp: f32, est: KlEstimator) -> KlToken {
    let diff = logp as f64 - ref_logp as f64;
    match est {
        KlEstimator::K1 => KlToken {
            value: diff,
            grad: 1.0,
        },
        KlEstimator::K1Plus => KlToken {
            value: diff,
            grad: diff,
        },
        KlEstimator::Abs => KlToken {
            value: diff.abs(),
            grad: if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else if diff.is_nan() {
                diff
            } else {
                0.0
            },
        },
        KlEstimator::K2 => KlToken {
            value: 0.5 * diff * diff,
            grad: diff,
        },
        KlEstimator::K3Unclamped => {
            let x = -diff;
            let e = x.exp();
            KlToken {
                value: e - x - 1.0,
                grad: 1.0 - e,
            }
        }
        KlEstimator::K3 | KlEstimator::K3Plus => {
            let raw = -diff;
            let x = if raw.is_nan() {
                raw
            } else {
                raw.clamp(-20.0, 20.0)
            };
            let e = x.exp();
            let kld = e - x - 1.0;
            // comparisons, not ranges: NaN is not "saturated", as on the device (NaN propagates)
            #[allow(clippy::manual_range_contains)]
            let sat = raw < -20.0 || raw > 20.0 || kld > 10.0 || kld < -10.0;
            let value = if kld.is_nan() {
                kld
            } else {
                kld.clamp(-10.0, 10.0)
            };
            let grad = if est == KlEstimator::K3Plus {
                diff
            } else if sat {
                0.0
            } else {
                1.0 - e
            };
            KlToken { value, grad }
        }
    }
}

fn inv(x: f64) -> f64 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
}

/// Aggregation weight of one unmasked token (before its mask weight): token-mean `1/N_tokens`,
/// seq-mean-token-mean `1/(n_seq N_seqs)`, seq-mean-token-sum `1/N_seqs`, token-sum-norm `1/C`;
/// 0 where a normalizer is 0.
pub fn agg_weight(
    mode: AggMode,
    tokens: f64,
    seqs: f64,
    seq_tokens: f64,
    norm_constant: f64,
) -> f64 {
    match mode {
        AggMode::TokenMean => inv(tokens),
        AggMode::SeqMeanTokenMean => inv(seqs) * inv(seq_tokens),
        AggMode::SeqMeanTokenSum => inv(seqs),
        AggMode::TokenSumNorm => inv(norm_constant),
    }
}
