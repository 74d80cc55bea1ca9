//! Configuration shared by both backends: loss variants, aggregation modes, KL estimators.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Serializes an option enum as its name (`Display`) and parses it with `FromStr`, so the names
/// (and the error listing the accepted ones) are defined once.
macro_rules! serde_by_name {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let name = String::deserialize(d)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Most objectives one launch handles (`1 <= K <= MAX_OBJECTIVES`).
pub const MAX_OBJECTIVES: usize = crate::kernel_layout::MAX_OBJECTIVES;

/// How per-token losses are aggregated (verl's `loss_agg_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AggMode {
    /// `sum(M*l) / N_tokens` (verl's default).
    #[default]
    TokenMean,
    /// Mean over sequences with at least one token of each sequence's token mean.
    SeqMeanTokenMean,
    /// Mean over sequences with at least one token of each sequence's token sum.
    SeqMeanTokenSum,
    /// `sum(M*l) / C` for the constant `GrpoConfig::norm_constant` (Dr. GRPO).
    TokenSumNorm,
}

impl AggMode {
    /// Every mode, in code order.
    pub const ALL: [AggMode; 4] = [
        AggMode::TokenMean,
        AggMode::SeqMeanTokenMean,
        AggMode::SeqMeanTokenSum,
        AggMode::TokenSumNorm,
    ];

    /// The name verl uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AggMode::TokenMean => "token-mean",
            AggMode::SeqMeanTokenMean => "seq-mean-token-mean",
            AggMode::SeqMeanTokenSum => "seq-mean-token-sum",
            AggMode::TokenSumNorm => "token-sum-norm",
        }
    }

    /// The code the kernels use (`RECAP_AGG_*` in `kernels/recap_params.h`, their one definition).
    pub fn code(self) -> i32 {
        use crate::kernel_layout::codes::*;
        match self {
            AggMode::TokenMean => AGG_TOKEN_MEAN,
            AggMode::SeqMeanTokenMean => AGG_SEQ_MEAN_TOKEN_MEAN,
            AggMode::SeqMeanTokenSum => AGG_SEQ_MEAN_TOKEN_SUM,
            AggMode::TokenSumNorm => AGG_TOKEN_SUM_NORM,
        }
    }

    /// The mode of a kernel code ([`AggMode::code`]), if any.
    pub fn from_code(code: i32) -> Option<AggMode> {
        AggMode::ALL.into_iter().find(|m| m.code() == code)
    }
}

serde_by_name!(AggMode);

impl fmt::Display for AggMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AggMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "token-mean" => AggMode::TokenMean,
            "seq-mean-token-mean" => AggMode::SeqMeanTokenMean,
            "seq-mean-token-sum" => AggMode::SeqMeanTokenSum,
            "token-sum-norm" | "seq-mean-token-sum-norm" => AggMode::TokenSumNorm,
            _ => {
                return Err(Error::invalid_argument(
                    "agg_mode",
                    format!(
                        "unknown aggregation mode {s:?}; expected token-mean, seq-mean-token-mean, \
                         seq-mean-token-sum or token-sum-norm"
                    ),
                ))
            }
        })
    }
}

/// KL estimator (verl's `kl_loss_type`), with `diff = logp - ref_logp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KlEstimator {
    /// `diff` (verl `kl`/`k1`).
    K1,
    /// `|diff|` (verl `abs`).
    Abs,
    /// `diff^2 / 2` (verl `mse`/`k2`).
    K2,
    /// `clamp(exp(x) - x - 1, -10, 10)`, `x = clamp(-diff, -20, 20)` (verl `low_var_kl`/`k3`, its default).
    #[default]
    K3,
    /// Value of k1, gradient of k2 (verl `k1+`).
    K1Plus,
    /// Value of k3, gradient of k2 (verl `k3+`/`low_var_kl+`).
    K3Plus,
    /// `exp(x) - x - 1`, `x = -diff`, without k3's clamps: TRL's `per_token_kl` (it overflows where
    /// TRL's does).
    K3Unclamped,
}

impl KlEstimator {
    /// Every estimator, in code order.
    pub const ALL: [KlEstimator; 7] = [
        KlEstimator::K1,
        KlEstimator::Abs,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::K1Plus,
        KlEstimator::K3Plus,
        KlEstimator::K3Unclamped,
    ];

    /// The name verl uses.
    pub fn as_str(self) -> &'static str {
        match self {
            KlEstimator::K1 => "k1",
            KlEstimator::Abs => "abs",
            KlEstimator::K2 => "k2",
            KlEstimator::K3 => "low_var_kl",
            KlEstimator::K1Plus => "k1+",
            KlEstimator::K3Plus => "k3+",
            KlEstimator::K3Unclamped => "k3-unclamped",
        }
    }

    /// The code the kernels use (`RECAP_KL_*` in `kernels/recap_params.h`, their one definition).
    pub fn code(self) -> i32 {
        use crate::kernel_layout::codes::*;
        match self {
            KlEstimator::K1 => KL_K1,
            KlEstimator::Abs => KL_ABS,
            KlEstimator::K2 => KL_K2,
            KlEstimator::K3 => KL_K3,
            KlEstimator::K1Plus => KL_K1_PLUS,
            KlEstimator::K3Plus => KL_K3_PLUS,
            KlEstimator::K3Unclamped => KL_K3_UNCLAMPED,
        }
    }

    /// The estimator of a kernel code ([`KlEstimator::code`]), if any.
    pub fn from_code(code: i32) -> Option<KlEstimator> {
        KlEstimator::ALL.into_iter().find(|m| m.code() == code)
    }
}

serde_by_name!(KlEstimator);

impl fmt::Display for KlEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KlEstimator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "kl" | "k1" => KlEstimator::K1,
            "abs" => KlEstimator::Abs,
            "mse" | "k2" => KlEstimator::K2,
            "low_var_kl" | "k3" => KlEstimator::K3,
            "k3-unclamped" => KlEstimator::K3Unclamped,
            "k1+" | "kl+" => KlEstimator::K1Plus,
            "k3+" | "low_var_kl+" => KlEstimator::K3Plus,
            _ => {
                return Err(Error::invalid_argument(
                    "kl_estimator",
                    format!("unknown KL estimator {s:?}; expected k1, abs, k2 (mse), k3 (low_var_kl), k1+, k3+ or k3-unclamped"),
                ))
            }
        })
    }
}

/// The policy-loss variant of objectives of kind policy (verl `policy_loss.loss_mode`, TRL
/// `loss_type`); formulas in `kernels/grpo_math.cuh`.
///
/// Serialized as its name (`"vanilla"`, `"cispo"`, `"gspo"`, `"gpg"`, `"dppo_tv"`, `"dppo_kl"`,
/// `"geo_mean"`)
/// or, for SAPO, `{"sapo": {"tau_pos": 1.0, "tau_neg": 1.05}}` (the name `"sapo"` alone gives the
/// default temperatures) and, for DRO, `{"dro": {"beta": 0.1}}`.
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "PolicyLossRepr")]
pub enum PolicyLoss {
    /// PPO/GRPO clipped surrogate `max(-A r, -A clip(r, 1 - el, 1 + eh))`, with dual-clip and
    /// two-sided clipping (`GrpoConfig::delta`) as configured (verl "vanilla", TRL "grpo"/"dapo").
    #[default]
    Vanilla,
    /// CISPO (MiniMax-M1): `-sg(clip(r, 1 - el, 1 + eh)) A logp`; every token keeps a gradient.
    Cispo,
    /// SAPO: `-A (4 / tau) sigmoid(tau (r - 1))`, `tau = tau_pos` for `A > 0`, else `tau_neg`.
    Sapo {
        /// Temperature for positive advantages (1.0).
        tau_pos: f32,
        /// Temperature for negative advantages (1.05).
        tau_neg: f32,
    },
    /// GSPO: the clipped surrogate (no dual-clip, no `delta`) on the sequence ratio
    /// `s_i = exp(min(sum_t m (logp - old) / sum_t m, 10))` in its GSPO-token form
    /// `log s_it = sg(log s_i) + logp - sg(logp)` (verl "gspo", TRL importance_sampling_level
    /// "sequence_token"); with per-sequence advantages it has the value and gradient of
    /// sequence-level GSPO (TRL "sequence") in every aggregation mode. See [`GrpoConfig::gspo`].
    Gspo,
    /// GPG: `-A logp`, no ratio and no clipping (verl "gpg").
    Gpg,
    /// DPPO with the total-variation trust region (verl "dppo_tv"): with `p = exp(logp)` and
    /// `po = exp(old_logp)`, a token is valid when `p - po <= clip_high` (`A > 0`) or
    /// `p - po >= -clip_low` (`A <= 0`; the clip values are the divergence thresholds here); valid
    /// tokens get `-A sg(min(r, c)) logp` with `c` the dual-clip constant (no truncation when
    /// `dual_clip` is `None`), the others nothing. `pg_clipfrac` counts the invalid tokens,
    /// `pg_clipfrac_lower` the truncated valid ones.
    DppoTv,
    /// DPPO with the binary-KL trust region (verl "dppo_kl"): as [`PolicyLoss::DppoTv`] with
    /// `bkl = po (old - logp) + (1 - po) log((1 - po + 1e-8) / (1 - p + 1e-8))`, valid when
    /// `bkl <= clip_high` or `p <= po` (`A > 0`), `bkl <= clip_low` or `p >= po` (`A <= 0`).
    DppoKl,
    /// DRO (verl "dro"): `-(A logp - beta (logp - old_logp)^2 / 2)`.
    Dro {
        /// The coefficient of the squared log-ratio (verl `policy_loss.dro_beta`, > 0).
        beta: f32,
    },
    /// GMPO (verl "geo_mean"): the sequence's geometric-mean ratio with a sign-aware clip,
    /// `R = exp(min(M, 10))`, `M = sum_t m c_t / sum_t m` with `c_t = min(d_t, clip_high)` for
    /// `A > 0` and `max(d_t, -clip_low)` for `A < 0` (`d_t = logp - old`), and the token loss
    /// `-A R` with gradient `-A R` where the token's clip is inactive. With
    /// `seq-mean-token-mean` (as [`GrpoConfig::geo_mean`] sets) and per-sequence advantages this
    /// is sequence-level GMPO, value and gradient (its GMPO-token form, as GSPO's). `pg_clipfrac`
    /// counts tokens with `d` outside `[-clip_low, clip_high]` and `A > 0`, `pg_clipfrac_lower`
    /// those with `A < 0`, as verl.
    GeoMean,
}

/// The accepted serialized forms of [`PolicyLoss`]: a name, or the tagged SAPO or DRO form.
#[derive(Deserialize)]
#[serde(untagged)]
enum PolicyLossRepr {
    Name(String),
    Tagged(PolicyLossTagged),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum PolicyLossTagged {
    Sapo {
        /// Temperature for positive advantages (1.0).
        tau_pos: f32,
        /// Temperature for negative advantages (1.05).
        tau_neg: f32,
    },
    Dro {
        /// The coefficient of the squared log-ratio.
        beta: f32,
    },
}

impl TryFrom<PolicyLossRepr> for PolicyLoss {
    type Error = Error;
    fn try_from(r: PolicyLossRepr) -> Result<Self> {
        match r {
            PolicyLossRepr::Name(n) => n.parse(),
            PolicyLossRepr::Tagged(PolicyLossTagged::Sapo { tau_pos, tau_neg }) => {
                Ok(PolicyLoss::Sapo { tau_pos, tau_neg })
            }
            PolicyLossRepr::Tagged(PolicyLossTagged::Dro { beta }) => Ok(PolicyLoss::Dro { beta }),
        }
    }
}

impl FromStr for PolicyLoss {
    type Err = Error;
    /// verl's `loss_mode` names (`vanilla`, `cispo`, `sapo` with its default temperatures, `gspo`,
    /// `gpg`, `dppo_tv`, `dppo_kl`, `geo_mean`; `dro` takes its beta in the tagged form
    /// `{"dro": {"beta": 0.1}}`); TRL's `grpo` is an alias of `vanilla`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "vanilla" | "grpo" => PolicyLoss::Vanilla,
            "cispo" => PolicyLoss::Cispo,
            "sapo" => PolicyLoss::sapo(),
            "gspo" => PolicyLoss::Gspo,
            "gpg" => PolicyLoss::Gpg,
            "dppo_tv" => PolicyLoss::DppoTv,
            "dppo_kl" => PolicyLoss::DppoKl,
            "geo_mean" => PolicyLoss::GeoMean,
            "dro" => {
                return Err(Error::invalid_argument(
                    "policy_loss",
                    "dro needs its beta: {\"dro\": {\"beta\": ...}} (verl policy_loss.dro_beta)",
                ))
            }
            _ => {
                return Err(Error::invalid_argument(
                    "policy_loss",
                    format!(
                        "unknown policy loss {s:?}; expected vanilla, cispo, sapo, gspo, gpg, \
                         dppo_tv, dppo_kl, geo_mean or dro"
                    ),
                ))
            }
        })
    }
}

impl PolicyLoss {
    /// SAPO with the paper's (and TRL's) temperatures, 1.0 and 1.05.
    pub fn sapo() -> PolicyLoss {
        PolicyLoss::Sapo {
            tau_pos: 1.0,
            tau_neg: 1.05,
        }
    }

    /// `RECAP_LOSS_*` of kernels/recap_params.h (their one definition).
    pub fn code(self) -> i32 {
        use crate::kernel_layout::codes::*;
        match self {
            PolicyLoss::Vanilla => LOSS_VANILLA,
            PolicyLoss::Cispo => LOSS_CISPO,
            PolicyLoss::Sapo { .. } => LOSS_SAPO,
            PolicyLoss::Gspo => LOSS_GSPO,
            PolicyLoss::Gpg => LOSS_GPG,
            PolicyLoss::DppoTv => LOSS_DPPO_TV,
            PolicyLoss::DppoKl => LOSS_DPPO_KL,
            PolicyLoss::Dro { .. } => LOSS_DRO,
            PolicyLoss::GeoMean => LOSS_GEO_MEAN,
        }
    }

    /// DRO's beta, or 0 outside DRO.
    pub(crate) fn dro_beta(self) -> f32 {
        match self {
            PolicyLoss::Dro { beta } => beta,
            _ => 0.0,
        }
    }

    /// `(tau_pos, tau_neg)`, or zeros outside SAPO.
    pub(crate) fn taus(self) -> (f32, f32) {
        match self {
            PolicyLoss::Sapo { tau_pos, tau_neg } => (tau_pos, tau_neg),
            _ => (0.0, 0.0),
        }
    }
}

/// Where the rollout importance-sampling weight is taken (verl `rollout_is_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsLevel {
    /// `w_t = exp(old_t - rollout_t)`.
    #[default]
    Token,
    /// `w = exp(sum over the sequence of m (old - rollout))`: the product of its token ratios.
    Sequence,
    /// `w = exp(mean over the sequence of old - rollout)`: their geometric mean.
    Geometric,
}

impl IsLevel {
    /// The kernels' `RECAP_IS_TOKEN` / `_SEQUENCE` / `_GEOMETRIC`.
    pub fn code(self) -> i32 {
        use crate::kernel_layout::codes::*;
        match self {
            IsLevel::Token => IS_TOKEN,
            IsLevel::Sequence => IS_SEQUENCE,
            IsLevel::Geometric => IS_GEOMETRIC,
        }
    }
}

/// What the rollout importance-sampling weight does (verl `rollout_is_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsMode {
    /// Truncated IS (TIS): the policy terms are multiplied by `min(w, upper)`.
    #[default]
    Truncate,
    /// Masked IS (MIS): multiplied by `w` inside `[lower, upper]`, by 0 outside (the token stays in
    /// the normalizers, unlike verl's mask mode, which also drops it from the loss denominator).
    Mask,
    /// Weights 1: the ratios are only reported in the metrics.
    MetricsOnly,
}

/// Correction of the mismatch between the trainer's log-probs (`old_logp`) and the inference
/// engine's (`rollout_logp`), applied to the policy objectives' terms (not nll, not KL).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutCorrection {
    /// Token, sequence or geometric weights.
    pub level: IsLevel,
    /// Truncate, mask, or metrics only.
    pub mode: IsMode,
    /// Truncation cap, or the upper bound of the mask band (verl `rollout_is_threshold`, 2.0).
    pub upper: f32,
    /// Lower bound of the mask band; `None`: `1 / upper` (verl's default).
    pub lower: Option<f32>,
}

impl Default for RolloutCorrection {
    fn default() -> Self {
        RolloutCorrection {
            level: IsLevel::Token,
            mode: IsMode::Truncate,
            upper: 2.0,
            lower: None,
        }
    }
}

impl RolloutCorrection {
    /// The lower bound of the mask band.
    pub fn lower_bound(&self) -> f32 {
        self.lower.unwrap_or(1.0 / self.upper)
    }

    /// Checks the bounds (`upper` finite and > 0, `0 <= lower <= upper`); errors name the argument
    /// `upper_arg` or `lower_arg`.
    pub(crate) fn validate(&self, upper_arg: &'static str, lower_arg: &'static str) -> Result<()> {
        if !(self.upper.is_finite() && self.upper > 0.0) {
            return Err(Error::invalid_argument(
                upper_arg,
                format!("expected a finite bound > 0, got {}", self.upper),
            ));
        }
        let lo = self.lower_bound();
        if !(lo.is_finite() && lo >= 0.0 && lo <= self.upper) {
            return Err(Error::invalid_argument(
                lower_arg,
                format!("expected 0 <= lower <= upper = {}, got {lo}", self.upper),
            ));
        }
        Ok(())
    }

    pub(crate) fn level_code(&self) -> i32 {
        self.level.code()
    }

    pub(crate) fn mode_code(&self) -> i32 {
        use crate::kernel_layout::codes::*;
        match self.mode {
            IsMode::MetricsOnly => IS_METRICS,
            IsMode::Truncate => IS_TRUNCATE,
            IsMode::Mask => IS_MASK,
        }
    }
}

/// What an objective computes per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// The clipped GRPO/PPO surrogate with this objective's advantage.
    #[default]
    Policy,
    /// Supervised replay: `l = -logp` (RECAP's next-token objective); advantages are not read.
    Nll,
}

impl FromStr for ObjectiveKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "policy" => Ok(ObjectiveKind::Policy),
            "nll" => Ok(ObjectiveKind::Nll),
            _ => Err(Error::invalid_argument(
                "objectives",
                format!("unknown objective kind {s:?}; expected policy or nll"),
            )),
        }
    }
}

/// The loss configuration, one type for both backends. `Default` gives verl's defaults.
///
/// It (de)serializes with serde under the field names below (absent fields take their defaults,
/// unknown ones are an error): the form in which the bindings pass options.
///
/// New options may come in a minor release, so outside this crate it is built from
/// [`GrpoConfig::default`] (or a preset such as [`GrpoConfig::gspo`]) with the `with_*` setters,
/// or by assigning its public fields:
///
/// ```
/// use recap_kernels::{AggMode, GrpoConfig};
/// let cfg = GrpoConfig::default()
///     .with_clip_high(0.28)
///     .with_agg_mode(AggMode::SeqMeanTokenMean)
///     .with_kl_coef(0.01);
/// assert_eq!(cfg.clip_high, 0.28);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GrpoConfig {
    /// Lower clip `eps_low`: the ratio is clipped below at `1 - clip_low` (verl `clip_ratio_low`, 0.2);
    /// at most 1 (1: no lower clip, the ratio is positive).
    pub clip_low: f32,
    /// Upper clip `eps_high`: clipped above at `1 + clip_high` (verl `clip_ratio_high`, 0.2; DAPO 0.28).
    pub clip_high: f32,
    /// Dual-clip constant `c > 1` for negative advantages (verl `clip_ratio_c`, 3.0); `None` disables it.
    /// Applies to [`PolicyLoss::Vanilla`] only.
    pub dual_clip: Option<f32>,
    /// The policy-loss variant (default the clipped surrogate).
    pub policy_loss: PolicyLoss,
    /// Two-sided clipping (INTELLECT-2, TRL `delta`): `r -> min(r, delta)` in the unclipped term of
    /// [`PolicyLoss::Vanilla`], bounding the loss of negative-advantage tokens; `None`: off. As TRL:
    /// the loss is `max(-A min(r, delta), -A clip(r, 1 - el, 1 + eh))`, so with `delta < 1 + eh`
    /// a negative-advantage token with `delta < r < 1 + eh` keeps the gradient of the clipped term.
    pub delta: Option<f32>,
    /// Multiply the KL term by the ratio `r` at policy tokens (TRL `use_bias_correction_kl`,
    /// DeepSeek-V3.2), gradient through both factors.
    pub kl_is_correction: bool,
    /// TRL's `top_entropy_quantile`: in the loss from logits, only the tokens whose entropy is at
    /// or above the `1 - q` quantile of the batch's valid tokens' entropies (linear interpolation,
    /// as `torch.quantile`) keep their policy terms; 1.0 (default) keeps all. The normalizers, nll
    /// and KL terms are unchanged.
    pub top_entropy_quantile: f32,
    /// Rollout importance-sampling correction; needs `rollout_logp` in the inputs. With
    /// `rollout_logp` and `None` here, the ratios are reported in the metrics only.
    pub rollout_correction: Option<RolloutCorrection>,
    /// Clamp of the log-ratio `logp - old_logp` before `exp` (verl: 20).
    pub log_ratio_clamp: f32,
    /// Aggregation of per-token losses (verl `loss_agg_mode`, default token-mean).
    pub agg_mode: AggMode,
    /// Aggregation of the objectives' terms (policy and nll) in the fused loss when it differs from
    /// [`agg_mode`](GrpoConfig::agg_mode), which the KL and entropy terms keep: verl before 0.9
    /// aggregates GSPO's and SAPO's policy term with seq-mean-token-mean whatever its
    /// `loss_agg_mode`. `None` (default): `agg_mode` for every term.
    /// [`Backend::weighted_reduce`](crate::Backend::weighted_reduce) aggregates with `agg_mode`.
    pub policy_agg_mode: Option<AggMode>,
    /// The constant `C` of `token-sum-norm` (required for that mode, ignored otherwise).
    pub norm_constant: Option<f32>,
    /// KL coefficient `beta` (verl `kl_loss_coef`); 0 by default, as in RECAP.
    pub kl_coef: f32,
    /// KL estimator (verl `kl_loss_type`, default `low_var_kl`).
    pub kl_estimator: KlEstimator,
    /// Entropy bonus coefficient of the loss from logits (verl `entropy_coeff`): the loss becomes
    /// `L - entropy_coef * agg(entropy)`. 0 by default; the other ops ignore it.
    pub entropy_coef: f32,
    /// Return results even when unmasked tokens hold NaN/Inf inputs (they are counted either way).
    pub allow_nonfinite: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            policy_loss: PolicyLoss::Vanilla,
            delta: None,
            kl_is_correction: false,
            rollout_correction: None,
            top_entropy_quantile: 1.0,
            log_ratio_clamp: 20.0,
            agg_mode: AggMode::TokenMean,
            policy_agg_mode: None,
            norm_constant: None,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            allow_nonfinite: false,
        }
    }
}

/// `with_<field>(value)` setters, one per field of [`GrpoConfig`].
macro_rules! with_setters {
    ($($with:ident => $field:ident: $t:ty),* $(,)?) => {
        impl GrpoConfig {
            $(
                #[doc = concat!("This configuration with [`", stringify!($field), "`](GrpoConfig::", stringify!($field), ") set.")]
                #[must_use]
                pub fn $with(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

with_setters! {
    with_clip_low => clip_low: f32,
    with_clip_high => clip_high: f32,
    with_dual_clip => dual_clip: Option<f32>,
    with_policy_loss => policy_loss: PolicyLoss,
    with_delta => delta: Option<f32>,
    with_kl_is_correction => kl_is_correction: bool,
    with_top_entropy_quantile => top_entropy_quantile: f32,
    with_rollout_correction => rollout_correction: Option<RolloutCorrection>,
    with_log_ratio_clamp => log_ratio_clamp: f32,
    with_agg_mode => agg_mode: AggMode,
    with_policy_agg_mode => policy_agg_mode: Option<AggMode>,
    with_norm_constant => norm_constant: Option<f32>,
    with_kl_coef => kl_coef: f32,
    with_kl_estimator => kl_estimator: KlEstimator,
    with_entropy_coef => entropy_coef: f32,
    with_allow_nonfinite => allow_nonfinite: bool,
}

impl GrpoConfig {
    /// Whether the loss needs the kernels' variant path (anything beyond the plain clipped surrogate).
    /// `has_rollout`: rollout log-probs given; `has_policy_weight`: per-token policy weights given.
    pub(crate) fn extended(&self, has_rollout: bool, has_policy_weight: bool) -> bool {
        self.policy_loss != PolicyLoss::Vanilla
            || self.delta.is_some()
            || self.kl_is_correction
            || self.objective_agg_mode() != self.agg_mode
            || has_rollout
            || has_policy_weight
    }

    /// The aggregation of the objectives' terms: [`policy_agg_mode`](GrpoConfig::policy_agg_mode),
    /// else [`agg_mode`](GrpoConfig::agg_mode).
    pub fn objective_agg_mode(&self) -> AggMode {
        self.policy_agg_mode.unwrap_or(self.agg_mode)
    }

    /// GSPO's settings: [`PolicyLoss::Gspo`], clip range 3e-4 / 4e-4 (the paper's), seq-mean-token-mean
    /// aggregation (verl forces it for GSPO), no dual-clip.
    pub fn gspo() -> GrpoConfig {
        GrpoConfig {
            policy_loss: PolicyLoss::Gspo,
            clip_low: 3e-4,
            clip_high: 4e-4,
            agg_mode: AggMode::SeqMeanTokenMean,
            dual_clip: None,
            ..GrpoConfig::default()
        }
    }

    /// GMPO's settings: [`PolicyLoss::GeoMean`], clip range 0.4 / 0.4 on the log-ratio (the
    /// paper's), seq-mean-token-mean aggregation, no dual-clip.
    pub fn geo_mean() -> GrpoConfig {
        GrpoConfig {
            policy_loss: PolicyLoss::GeoMean,
            clip_low: 0.4,
            clip_high: 0.4,
            agg_mode: AggMode::SeqMeanTokenMean,
            dual_clip: None,
            ..GrpoConfig::default()
        }
    }

    /// A validated configuration from its JSON form (the bindings' way of passing options):
    /// absent fields take verl's defaults; an unknown field, a wrong type or a value out of range
    /// is an error naming it.
    pub fn from_json(json: &str) -> Result<GrpoConfig> {
        let c: GrpoConfig = serde_json::from_str(json)
            .map_err(|e| crate::error::json_options_error::<GrpoConfig>(json, e))?;
        c.validate()?;
        Ok(c)
    }

    /// The JSON form read by [`GrpoConfig::from_json`].
    pub fn to_json(&self) -> String {
        // a struct of numbers, strings and options: serializing it cannot fail
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks every field; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid_argument(
                    name,
                    format!("must be finite, got {v}"),
                ))
            }
        };
        finite("config.clip_low", self.clip_low)?;
        finite("config.clip_high", self.clip_high)?;
        if !(0.0..=1.0).contains(&self.clip_low) {
            return Err(Error::invalid_argument(
                "config.clip_low",
                format!("expected 0 <= clip_low <= 1, got {}", self.clip_low),
            ));
        }
        if self.clip_high < 0.0 {
            return Err(Error::invalid_argument(
                "config.clip_high",
                format!("expected clip_high >= 0, got {}", self.clip_high),
            ));
        }
        if let Some(c) = self.dual_clip {
            if !(c.is_finite() && c > 1.0) {
                return Err(Error::invalid_argument(
                    "config.dual_clip",
                    format!("the dual-clip constant must be finite and > 1, got {c}"),
                ));
            }
        }
        if let Some(d) = self.delta {
            if !(d.is_finite() && d > 1.0) {
                return Err(Error::invalid_argument(
                    "config.delta",
                    format!("the two-sided clipping bound must be finite and > 1, got {d}"),
                ));
            }
            if self.policy_loss != PolicyLoss::Vanilla {
                return Err(Error::invalid_argument(
                    "config.delta",
                    format!(
                        "two-sided clipping applies to the vanilla loss only, not {:?}",
                        self.policy_loss
                    ),
                ));
            }
        }
        if let PolicyLoss::Sapo { tau_pos, tau_neg } = self.policy_loss {
            if !(tau_pos.is_finite() && tau_pos > 0.0 && tau_neg.is_finite() && tau_neg > 0.0) {
                return Err(Error::invalid_argument(
                    "config.policy_loss",
                    format!(
                        "SAPO temperatures must be finite and > 0, got tau_pos {tau_pos}, tau_neg {tau_neg}"
                    ),
                ));
            }
        }
        if let PolicyLoss::Dro { beta } = self.policy_loss {
            if !(beta.is_finite() && beta > 0.0) {
                return Err(Error::invalid_argument(
                    "config.policy_loss",
                    format!("DRO's beta must be finite and > 0, got {beta}"),
                ));
            }
        }
        if !(self.top_entropy_quantile > 0.0 && self.top_entropy_quantile <= 1.0) {
            return Err(Error::invalid_argument(
                "config.top_entropy_quantile",
                format!(
                    "expected 0 < q <= 1 (1 keeps every token), got {}",
                    self.top_entropy_quantile
                ),
            ));
        }
        if let Some(rc) = &self.rollout_correction {
            rc.validate(
                "config.rollout_correction.upper",
                "config.rollout_correction.lower",
            )?;
        }
        if !(self.log_ratio_clamp.is_finite() && self.log_ratio_clamp > 0.0) {
            return Err(Error::invalid_argument(
                "config.log_ratio_clamp",
                format!("expected a finite value > 0, got {}", self.log_ratio_clamp),
            ));
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0) {
            return Err(Error::invalid_argument(
                "config.kl_coef",
                format!("expected a finite value >= 0, got {}", self.kl_coef),
            ));
        }
        if !self.entropy_coef.is_finite() {
            return Err(Error::invalid_argument(
                "config.entropy_coef",
                format!("expected a finite value, got {}", self.entropy_coef),
            ));
        }
        validate_norm_constant(self.agg_mode, self.norm_constant)?;
        validate_norm_constant(self.objective_agg_mode(), self.norm_constant)
    }
}

pub(crate) fn validate_norm_constant(mode: AggMode, c: Option<f32>) -> Result<()> {
    if mode == AggMode::TokenSumNorm {
        match c {
            Some(c) if c.is_finite() && c > 0.0 => {}
            Some(c) => {
                return Err(Error::invalid_argument(
                    "config.norm_constant",
                    format!("token-sum-norm needs a finite constant C > 0, got {c}"),
                ))
            }
            None => {
                return Err(Error::invalid_argument(
                    "config.norm_constant",
                    "token-sum-norm needs the constant C (e.g. the maximum response length)",
                ))
            }
        }
    }
    Ok(())
}

/// Global normalizers for micro-batches and data-parallel ranks: per objective (and one more slot,
/// index `K`, for the KL term over every sequence) the token weight and the sequence count of the
/// *whole* batch. With them, the gradients of micro-batches sum to the gradient of the whole batch.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Normalizers {
    /// `[K + 1]` token weights (sum of the mask over member tokens).
    pub tokens: Vec<f64>,
    /// `[K + 1]` counts of member sequences with at least one unmasked token.
    pub seqs: Vec<f64>,
    /// `[B]` token weight of each sequence of *this* part in the whole batch, for parts that split a
    /// sequence (only `seq-mean-token-mean` reads it); `None`: each sequence is whole in the part.
    pub seq_tokens: Option<Vec<f64>>,
}

impl Normalizers {
    /// Adds another micro-batch's counts (e.g. from [`crate::count_normalizers`]).
    pub fn add(&mut self, other: &Normalizers) -> Result<()> {
        if self.tokens.is_empty() && self.seqs.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        if self.tokens.len() != other.tokens.len() || self.seqs.len() != other.seqs.len() {
            return Err(Error::invalid_argument(
                "normalizers",
                format!(
                    "cannot add normalizers of {} slots to normalizers of {} slots",
                    other.tokens.len(),
                    self.tokens.len()
                ),
            ));
        }
        for (a, b) in self.tokens.iter_mut().zip(&other.tokens) {
            *a += b;
        }
        for (a, b) in self.seqs.iter_mut().zip(&other.seqs) {
            *a += b;
        }
        self.seq_tokens = None; // per-part sequence weights do not add up
        Ok(())
    }

    pub(crate) fn validate(&self, k: usize, b: usize) -> Result<()> {
        if let Some(st) = &self.seq_tokens {
            if st.len() != b {
                return Err(Error::invalid_argument(
                    "normalizers",
                    format!("seq_tokens must have B = {b} entries (one per sequence of this part), got {}", st.len()),
                ));
            }
            if let Some(v) = st.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(Error::invalid_argument(
                    "normalizers",
                    format!("seq_tokens must be finite and >= 0, got {v}"),
                ));
            }
        }
        if self.tokens.len() != k + 1 || self.seqs.len() != k + 1 {
            return Err(Error::invalid_argument(
                "normalizers",
                format!(
                    "expected tokens and seqs of length K + 1 = {} (K objectives and the KL slot), got {} and {}",
                    k + 1,
                    self.tokens.len(),
                    self.seqs.len()
                ),
            ));
        }
        if let Some(v) = self
            .tokens
            .iter()
            .chain(&self.seqs)
            .find(|v| !(v.is_finite() && **v >= 0.0))
        {
            return Err(Error::invalid_argument(
                "normalizers",
                format!("every normalizer must be finite and >= 0, got {v}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes come from kernels/recap_params.h: each variant has its own, and `from_code` finds
    /// it again (a duplicated or missing define would break either).
    #[test]
    fn each_variant_has_its_own_kernel_code() {
        for m in AggMode::ALL {
            assert_eq!(AggMode::from_code(m.code()), Some(m));
        }
        for e in KlEstimator::ALL {
            assert_eq!(KlEstimator::from_code(e.code()), Some(e));
        }
        assert_eq!(AggMode::from_code(99), None);
        let losses = [
            PolicyLoss::Vanilla,
            PolicyLoss::Cispo,
            PolicyLoss::sapo(),
            PolicyLoss::Gspo,
            PolicyLoss::Gpg,
            PolicyLoss::DppoTv,
            PolicyLoss::DppoKl,
            PolicyLoss::Dro { beta: 0.1 },
            PolicyLoss::GeoMean,
        ];
        let mut codes: Vec<i32> = losses.iter().map(|l| l.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), losses.len());
        let levels = [IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric];
        let mut codes: Vec<i32> = levels.iter().map(|l| l.code()).collect();
        codes.push(crate::kernel_layout::codes::IS_OFF);
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), 4);
    }
}
