//! The fused loss's options (`RecapGrpoConfig`, its defaults and its translation into the crate's
//! `GrpoConfig` by kernel code) and its scalar results and statistics.

#[allow(unused_imports)]
use crate::prelude::*;

/// Loss options (`recap_grpo_config_default` fills verl's defaults); mirrors `GrpoConfig`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapGrpoConfig {
    /// Lower ratio clip epsilon (default 0.2).
    pub clip_low: f32,
    /// Upper ratio clip epsilon (default 0.2).
    pub clip_high: f32,
    /// Dual-clip constant (default 3.0); <= 0: off.
    pub dual_clip: f32,
    /// Clamp of `logp - old_logp` before `exp` (default 20).
    pub log_ratio_clamp: f32,
    /// `RECAP_AGG_*` (default `RECAP_AGG_TOKEN_MEAN`; the codes at the top of this header).
    pub agg_mode: i32,
    /// C of token-sum-norm (> 0 when that mode is used).
    pub norm_constant: f32,
    /// KL-to-reference coefficient (default 0: no KL term).
    pub kl_coef: f32,
    /// `RECAP_KL_*` (default `RECAP_KL_K3`, verl's low_var_kl; `RECAP_KL_K3_UNCLAMPED`: TRL's).
    pub kl_estimator: i32,
    /// Entropy bonus coefficient (default 0; the loss from logits only).
    pub entropy_coef: f32,
    /// Nonzero: return non-finite results instead of `RECAP_ERR_NONFINITE` (default 0).
    pub allow_nonfinite: i32,
    /// `RECAP_LOSS_*` (default `RECAP_LOSS_VANILLA`; `RECAP_LOSS_SAPO` takes `tau_pos` and
    /// `tau_neg`, `RECAP_LOSS_DRO` `dro_beta`; `RECAP_LOSS_GEO_MEAN` is GMPO, verl's geo_mean).
    pub policy_loss: i32,
    /// SAPO temperature for positive advantages (default 1.0).
    pub tau_pos: f32,
    /// SAPO temperature for negative advantages (default 1.05).
    pub tau_neg: f32,
    /// Two-sided clipping bound; <= 0: off (default).
    pub delta: f32,
    /// Nonzero: the KL term importance-weighted by the ratio (TRL `use_bias_correction_kl`).
    pub kl_is_correction: i32,
    /// Only the tokens of the top entropy quantile get the policy gradient (default 1.0: all; the
    /// loss from logits only).
    pub top_entropy_quantile: f32,
    /// Rollout importance sampling: `RECAP_IS_OFF` (default), `RECAP_IS_TOKEN`, `RECAP_IS_SEQUENCE`,
    /// `RECAP_IS_GEOMETRIC`.
    pub rollout_level: i32,
    /// The C ABI's own codes (not the kernels' `RECAP_IS_METRICS` ...): 0 truncate (default), 1
    /// mask, 2 metrics only.
    pub rollout_mode: i32,
    /// Upper rollout IS threshold (default 2.0).
    pub rollout_upper: f32,
    /// Lower rollout IS threshold; <= 0: 1 / upper (default).
    pub rollout_lower: f32,
    /// DRO's coefficient of the squared log-ratio (> 0 with `RECAP_LOSS_DRO`; default 0.1).
    pub dro_beta: f32,
    /// Aggregation of the objectives' terms when it differs from `agg_mode` (which the KL and
    /// entropy terms keep), codes as `agg_mode`; -1: `agg_mode` (default).
    pub policy_agg_mode: i32,
}

/// Fills `cfg` with the defaults (verl's).
///
/// # Safety
/// `cfg` must be null or point to a writable `RecapGrpoConfig`.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_config_default(cfg: *mut RecapGrpoConfig) -> i32 {
    guard(|| {
        // SAFETY: checked non-null; the caller guarantees it points to a writable struct.
        let out = unsafe { cfg.as_mut() }
            .ok_or_else(|| Error::invalid_argument("cfg", "null pointer"))?;
        let d = GrpoConfig::default();
        *out = RecapGrpoConfig {
            clip_low: d.clip_low,
            clip_high: d.clip_high,
            dual_clip: d.dual_clip.unwrap_or(0.0),
            log_ratio_clamp: d.log_ratio_clamp,
            agg_mode: d.agg_mode.code(),
            norm_constant: 0.0,
            kl_coef: d.kl_coef,
            kl_estimator: d.kl_estimator.code(),
            entropy_coef: d.entropy_coef,
            allow_nonfinite: 0,
            policy_loss: d.policy_loss.code(),
            tau_pos: 1.0,
            tau_neg: 1.05,
            delta: 0.0,
            kl_is_correction: 0,
            top_entropy_quantile: 1.0,
            rollout_level: -1,
            rollout_mode: 0,
            rollout_upper: 2.0,
            rollout_lower: 0.0,
            dro_beta: 0.1,
            policy_agg_mode: -1,
        };
        Ok(())
    })
}

/// The entry of `table` whose kernel code (`code`) is `c`.
pub(crate) fn by_code<T: Copy>(
    arg: &'static str,
    table: &[T],
    c: i32,
    code: impl Fn(T) -> i32,
) -> Result<T> {
    table
        .iter()
        .copied()
        .find(|t| code(*t) == c)
        .ok_or_else(|| {
            let codes: Vec<String> = table.iter().map(|t| code(*t).to_string()).collect();
            Error::invalid_argument(
                arg,
                format!("expected one of {}, got {c}", codes.join(", ")),
            )
        })
}

pub(crate) fn pick<T: Copy>(arg: &'static str, table: &[T], i: i32) -> Result<T> {
    usize::try_from(i)
        .ok()
        .and_then(|i| table.get(i).copied())
        .ok_or_else(|| {
            Error::invalid_argument(arg, format!("expected 0..{}, got {i}", table.len()))
        })
}

impl RecapGrpoConfig {
    pub(crate) fn to_config(self) -> Result<GrpoConfig> {
        // NaN compares false with everything: refused by name here, before "<= 0 means off" reads
        // it as off
        for (name, v) in [
            ("cfg.clip_low", self.clip_low),
            ("cfg.clip_high", self.clip_high),
            ("cfg.dual_clip", self.dual_clip),
            ("cfg.log_ratio_clamp", self.log_ratio_clamp),
            ("cfg.norm_constant", self.norm_constant),
            ("cfg.kl_coef", self.kl_coef),
            ("cfg.entropy_coef", self.entropy_coef),
            ("cfg.tau_pos", self.tau_pos),
            ("cfg.tau_neg", self.tau_neg),
            ("cfg.delta", self.delta),
            ("cfg.top_entropy_quantile", self.top_entropy_quantile),
            ("cfg.rollout_upper", self.rollout_upper),
            ("cfg.rollout_lower", self.rollout_lower),
            ("cfg.dro_beta", self.dro_beta),
        ] {
            if v.is_nan() {
                return Err(Error::invalid_argument(
                    name,
                    "NaN (a number is expected; 0 or less turns an optional feature off)",
                ));
            }
        }
        let c = GrpoConfig::default()
            .with_clip_low(self.clip_low)
            .with_clip_high(self.clip_high)
            .with_dual_clip((self.dual_clip > 0.0).then_some(self.dual_clip))
            .with_log_ratio_clamp(self.log_ratio_clamp)
            .with_agg_mode(by_code(
                "cfg.agg_mode",
                &AggMode::ALL,
                self.agg_mode,
                |m| m.code(),
            )?)
            .with_policy_agg_mode(match self.policy_agg_mode {
                -1 => None,
                m => Some(by_code("cfg.policy_agg_mode", &AggMode::ALL, m, |m| {
                    m.code()
                })?),
            })
            .with_norm_constant((self.norm_constant > 0.0).then_some(self.norm_constant))
            .with_kl_coef(self.kl_coef)
            .with_kl_estimator(by_code(
                "cfg.kl_estimator",
                &KlEstimator::ALL,
                self.kl_estimator,
                |e| e.code(),
            )?)
            .with_entropy_coef(self.entropy_coef)
            .with_allow_nonfinite(self.allow_nonfinite != 0)
            .with_policy_loss(by_code(
                "cfg.policy_loss",
                &[
                    PolicyLoss::Vanilla,
                    PolicyLoss::Cispo,
                    PolicyLoss::Sapo {
                        tau_pos: self.tau_pos,
                        tau_neg: self.tau_neg,
                    },
                    PolicyLoss::Gspo,
                    PolicyLoss::Gpg,
                    PolicyLoss::DppoTv,
                    PolicyLoss::DppoKl,
                    PolicyLoss::Dro {
                        beta: self.dro_beta,
                    },
                    PolicyLoss::GeoMean,
                ],
                self.policy_loss,
                |l| l.code(),
            )?)
            .with_delta((self.delta > 0.0).then_some(self.delta))
            .with_kl_is_correction(self.kl_is_correction != 0)
            .with_top_entropy_quantile(self.top_entropy_quantile)
            .with_rollout_correction(match self.rollout_level {
                -1 => None,
                l => Some(RolloutCorrection {
                    level: by_code(
                        "cfg.rollout_level",
                        &[IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric],
                        l,
                        |l| l.code(),
                    )?,
                    mode: pick(
                        "cfg.rollout_mode",
                        &[IsMode::Truncate, IsMode::Mask, IsMode::MetricsOnly],
                        self.rollout_mode,
                    )?,
                    upper: self.rollout_upper,
                    lower: (self.rollout_lower > 0.0).then_some(self.rollout_lower),
                }),
            });
        c.validate()?;
        Ok(c)
    }
}

/// Scalar results of the fused loss (per-objective values go to the caller's arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecapGrpoResult {
    /// The total loss (policy terms weighted by lambda, plus `kl_coef` times the KL loss).
    pub loss: f64,
    /// `actor/kl_loss`.
    pub kl_loss: f64,
    /// `actor/ppo_kl`: the mean of `old_logp - logp` over policy tokens.
    pub ppo_kl: f64,
    /// Mean ratio over policy tokens.
    pub ratio_mean: f64,
    /// Smallest ratio over policy tokens.
    pub ratio_min: f64,
    /// Largest ratio over policy tokens.
    pub ratio_max: f64,
    /// Masked mean of the per-token KL.
    pub kl_mean: f64,
    /// Token weight (the sum of the mask) of this call.
    pub num_tokens: f64,
    /// Sequences with at least one unmasked token.
    pub num_seqs: f64,
    /// Token weight of the policy objectives' tokens.
    pub policy_tokens: f64,
    /// Non-finite input values read at unmasked tokens.
    pub nonfinite: f64,
    /// Rollout IS weight: mean.
    pub rollout_is_mean: f64,
    /// Rollout IS weight: minimum.
    pub rollout_is_min: f64,
    /// Rollout IS weight: maximum.
    pub rollout_is_max: f64,
    /// Fraction of tokens whose rollout IS weight was truncated or masked.
    pub rollout_is_corrected_fraction: f64,
}

/// The result and statistics outputs of a loss call for K objectives: `result` not null, the two
/// disjoint.
pub(crate) fn result_outputs(
    result: *mut RecapGrpoResult,
    stats: *mut f64,
    k: usize,
) -> Result<()> {
    if result.is_null() {
        return Err(Error::invalid_argument("result", "null pointer"));
    }
    host_outputs_disjoint(&[
        (
            "result",
            result as usize,
            std::mem::size_of::<RecapGrpoResult>(),
        ),
        (
            "stats",
            stats as usize,
            8 * recap::output::grpo_stat_layout(k)
                .iter()
                .map(|f| f.offset + f.len)
                .max()
                .unwrap_or(0),
        ),
    ])
}

/// The options behind a C config pointer.
pub(crate) fn config(cfg: *const RecapGrpoConfig) -> Result<GrpoConfig> {
    // SAFETY: checked for null; the caller guarantees a valid struct.
    unsafe { cfg.as_ref() }
        .ok_or_else(|| Error::invalid_argument("cfg", "null pointer"))?
        .to_config()
}

pub(crate) fn write_result(
    out: &GrpoOutput,
    loss: f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) {
    let m = &out.metrics;
    // SAFETY: checked non-null by the caller; the C caller guarantees a writable struct.
    unsafe {
        *result = RecapGrpoResult {
            loss,
            kl_loss: out.kl_loss,
            ppo_kl: m.ppo_kl,
            ratio_mean: m.ratio_mean,
            ratio_min: m.ratio_min,
            ratio_max: m.ratio_max,
            kl_mean: m.kl_mean,
            num_tokens: m.num_tokens,
            num_seqs: m.num_seqs as f64,
            policy_tokens: m.policy_tokens,
            nonfinite: m.nonfinite as f64,
            rollout_is_mean: m.rollout_is_mean,
            rollout_is_min: m.rollout_is_min,
            rollout_is_max: m.rollout_is_max,
            rollout_is_corrected_fraction: m.rollout_is_corrected_fraction,
        }
    };
    write_host(stats, &out.stats());
}

/// The length of the `stats` array of the fused loss for `num_objectives` objectives (< 0 on a bad
/// count).
#[no_mangle]
pub extern "C" fn recap_grpo_stats_len(num_objectives: i32) -> i64 {
    match usize::try_from(num_objectives) {
        Ok(k) => recap::output::grpo_stat_layout(k)
            .last()
            .map_or(0, |f| (f.offset + f.len) as i64),
        Err(_) => -1,
    }
}

/// Field `index` of the `stats` array for `num_objectives` objectives: its name (verl's, static
/// storage), offset and length (1, or K for a per-objective statistic). `RECAP_ERR_ARGUMENT` past
/// the last field.
///
/// # Safety
/// `name`, `offset` and `len` must be null or writable.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_stat_field(
    num_objectives: i32,
    index: i32,
    name: *mut *const c_char,
    offset: *mut i64,
    len: *mut i64,
) -> i32 {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    guard(|| {
        let k = self::objectives_count(num_objectives)?;
        let fields = recap::output::grpo_stat_layout(k);
        let names = NAMES.get_or_init(|| {
            fields
                .iter()
                .map(|f| CString::new(f.name).unwrap_or_default())
                .collect()
        });
        let i = usize::try_from(index)
            .ok()
            .filter(|i| *i < fields.len())
            .ok_or_else(|| {
                Error::invalid_argument(
                    "index",
                    format!("expected 0 <= index < {}, got {index}", fields.len()),
                )
            })?;
        // SAFETY: each pointer is null or writable (the caller's contract).
        unsafe {
            if let Some(n) = name.as_mut() {
                *n = names[i].as_ptr();
            }
            if let Some(o) = offset.as_mut() {
                *o = fields[i].offset as i64;
            }
            if let Some(l) = len.as_mut() {
                *l = fields[i].len as i64;
            }
        }
        Ok(())
    })
}
