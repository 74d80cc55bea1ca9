//! Results of the ops, derived in one place from the raw sums both backends produce (the slot
//! layout of `kernels/recap_params.h`), so the two backends cannot differ in how a metric is defined.

use crate::config::GrpoConfig;
use crate::error::{Error, Result};

pub(crate) use crate::kernel_layout::{
    slots, GRPO_EXTRA_SLOTS, NORM_LOCAL_SEQS, NORM_LOCAL_TOKENS, NORM_SEQS, NORM_TOKENS,
};

/// Normalizer slots: `MAX_OBJECTIVES` objectives plus the KL slot (`RECAP_NORM_SLOTS`).
pub(crate) const NORM_SLOTS: usize = crate::config::MAX_OBJECTIVES + 1;

/// `recap_inv_norm` of `kernels/grpo_math.cuh`: the f32 reciprocal of a normalizer rounded to f32,
/// 0 where there is nothing to normalize (the device's precomputed reciprocals, written from the
/// host where the host supplies the normalizer).
pub(crate) fn inv_norm(x: f64) -> f32 {
    if x > 0.0 {
        1.0 / x as f32
    } else {
        0.0
    }
}

pub(crate) fn grpo_slots(k: usize) -> usize {
    3 * k + GRPO_EXTRA_SLOTS
}

/// Raw sums of the fused loss: `slots` (`3K + RECAP_GRPO_EXTRA_SLOTS`, layout in recap_params.h) and `norms`
/// (`4 * NORM_SLOTS`).
#[derive(Clone, Debug)]
pub(crate) struct GrpoSums {
    pub slots: Vec<f64>,
    pub norms: Vec<f64>,
}

/// Metrics of one fused-loss call, named as verl names them (see [`GrpoOutput::named`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoMetrics {
    /// `[K]` fraction of each policy objective's tokens where the clipped branch is active (0 for nll).
    pub pg_clipfrac: Vec<f64>,
    /// `[K]` fraction where the dual-clip branch is active (A < 0 and the loss capped at -c A).
    pub pg_clipfrac_lower: Vec<f64>,
    /// Masked mean of `old_logp - logp` (clamped log-ratio) over policy tokens.
    pub ppo_kl: f64,
    /// Smallest ratio over policy tokens (0 if there are none).
    pub ratio_min: f64,
    /// Masked mean ratio over policy tokens (0 if there are none).
    pub ratio_mean: f64,
    /// Largest ratio over policy tokens (0 if there are none).
    pub ratio_max: f64,
    /// Masked mean of the per-token KL estimator over all tokens (0 without `ref_logp`).
    pub kl_mean: f64,
    /// Token weight (sum of the mask) of the whole batch.
    pub num_tokens: f64,
    /// Sequences with at least one unmasked token.
    pub num_seqs: u64,
    /// `[K]` token weight of each objective's member tokens (this batch, not the global normalizer).
    pub objective_tokens: Vec<f64>,
    /// `[K]` member sequences with at least one unmasked token.
    pub objective_seqs: Vec<u64>,
    /// Token weight of the policy tokens (unmasked tokens of sequences in a policy objective).
    pub policy_tokens: f64,
    /// Non-finite input values (NaN/Inf) read at unmasked tokens.
    pub nonfinite: u64,
    /// Masked mean of the rollout IS ratio (before truncation or masking) over policy tokens (0
    /// without `rollout_logp`); verl `mismatch/rollout_is_mean`.
    pub rollout_is_mean: f64,
    /// Its minimum (0 without `rollout_logp`).
    pub rollout_is_min: f64,
    /// Its maximum (0 without `rollout_logp`).
    pub rollout_is_max: f64,
    /// Fraction of policy tokens whose weight was truncated (truncate) or masked (mask); verl
    /// `mismatch/rollout_is_masked_fraction` in mask mode.
    pub rollout_is_corrected_fraction: f64,
}

/// How a statistic is read off a [`GrpoOutput`]: one value, or one per objective.
#[derive(Clone, Copy)]
enum Getter {
    Scalar(fn(&GrpoOutput) -> f64),
    PerObjective(fn(&GrpoOutput) -> Vec<f64>),
}

/// The fused loss's statistics in their flat order (verl's names): the one definition of the
/// layout that [`GrpoOutput::stats`], [`GrpoOutput::named`], [`grpo_stat_layout`] and the bindings
/// (the C ABI's `stats` array, the Python metrics) use.
const GRPO_STATS: &[(&str, Getter)] = {
    use Getter::{PerObjective as K, Scalar as S};
    &[
        ("actor/pg_loss", K(|o| o.objective_loss.clone())),
        ("actor/pg_clipfrac", K(|o| o.metrics.pg_clipfrac.clone())),
        (
            "actor/pg_clipfrac_lower",
            K(|o| o.metrics.pg_clipfrac_lower.clone()),
        ),
        (
            "actor/objective_tokens",
            K(|o| o.metrics.objective_tokens.clone()),
        ),
        (
            "actor/objective_seqs",
            K(|o| o.metrics.objective_seqs.iter().map(|&x| x as f64).collect()),
        ),
        ("actor/kl_loss", S(|o| o.kl_loss)),
        ("actor/ppo_kl", S(|o| o.metrics.ppo_kl)),
        ("actor/ratio_min", S(|o| o.metrics.ratio_min)),
        ("actor/ratio_mean", S(|o| o.metrics.ratio_mean)),
        ("actor/ratio_max", S(|o| o.metrics.ratio_max)),
        ("actor/kl_mean", S(|o| o.metrics.kl_mean)),
        ("actor/num_tokens", S(|o| o.metrics.num_tokens)),
        ("actor/num_seqs", S(|o| o.metrics.num_seqs as f64)),
        ("actor/policy_tokens", S(|o| o.metrics.policy_tokens)),
        ("actor/nonfinite_inputs", S(|o| o.metrics.nonfinite as f64)),
        ("mismatch/rollout_is_mean", S(|o| o.metrics.rollout_is_mean)),
        ("mismatch/rollout_is_min", S(|o| o.metrics.rollout_is_min)),
        ("mismatch/rollout_is_max", S(|o| o.metrics.rollout_is_max)),
        (
            "mismatch/rollout_is_corrected_fraction",
            S(|o| o.metrics.rollout_is_corrected_fraction),
        ),
    ]
};

/// One entry of a flat statistics vector: its name, where it starts and how many values it holds
/// (1, or K for a per-objective statistic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatField {
    /// verl's name, e.g. `actor/pg_clipfrac`.
    pub name: &'static str,
    /// Index of its first value.
    pub offset: usize,
    /// 1, or K.
    pub len: usize,
    /// Whether it has one value per objective.
    pub per_objective: bool,
}

fn layout_of(table: &[(&'static str, Getter)], k: usize, offset: usize) -> Vec<StatField> {
    let mut at = offset;
    table
        .iter()
        .map(|(name, g)| {
            let per_objective = matches!(g, Getter::PerObjective(_));
            let len = if per_objective { k } else { 1 };
            let f = StatField {
                name,
                offset: at,
                len,
                per_objective,
            };
            at += len;
            f
        })
        .collect()
}

/// The layout of [`GrpoOutput::stats`] for `k` objectives.
pub fn grpo_stat_layout(k: usize) -> Vec<StatField> {
    layout_of(GRPO_STATS, k, 0)
}

/// The statistics the loss from logits adds after the fused loss's (verl's `actor/entropy` is the
/// masked mean entropy; `actor/entropy_loss` its aggregate in the loss's mode).
type EntropyGetter = fn(&LogitsLossOutput) -> f64;

const ENTROPY_STATS: &[(&str, EntropyGetter)] = &[
    ("actor/entropy_loss", |o| o.entropy_loss),
    ("actor/entropy", |o| o.entropy_mean),
];

/// The layout of [`LogitsLossOutput::stats`] for `k` objectives: the fused loss's, then the
/// entropy statistics.
pub fn logits_stat_layout(k: usize) -> Vec<StatField> {
    let mut l = grpo_stat_layout(k);
    let start = l.last().map_or(0, |f| f.offset + f.len);
    l.extend(
        ENTROPY_STATS
            .iter()
            .enumerate()
            .map(|(i, (name, _))| StatField {
                name,
                offset: start + i,
                len: 1,
                per_objective: false,
            }),
    );
    l
}

impl LogitsLossOutput {
    /// The statistics in the flat order of [`logits_stat_layout`].
    pub fn stats(&self) -> Vec<f64> {
        let mut v = self.grpo.stats();
        v.extend(ENTROPY_STATS.iter().map(|(_, f)| f(self)));
        v
    }
}

impl GrpoOutput {
    /// The statistics in the flat order of [`grpo_stat_layout`] (the loss itself is not among
    /// them).
    pub fn stats(&self) -> Vec<f64> {
        let mut v = Vec::new();
        for (_, g) in GRPO_STATS {
            match g {
                Getter::Scalar(f) => v.push(f(self)),
                Getter::PerObjective(f) => v.extend(f(self)),
            }
        }
        v
    }

    /// The statistics under verl's names (`actor/pg_clipfrac`, ...); per-objective values get the
    /// objective's name (or its index) as a suffix, e.g. `actor/pg_clipfrac/accuracy`.
    pub fn named(&self, objective_names: Option<&[&str]>) -> Vec<(String, f64)> {
        let values = self.stats();
        let mut out = Vec::new();
        for f in grpo_stat_layout(self.objective_loss.len()) {
            if f.per_objective {
                for j in 0..f.len {
                    let obj = objective_names
                        .and_then(|n| n.get(j))
                        .map_or_else(|| j.to_string(), |s| s.to_string());
                    out.push((format!("{}/{obj}", f.name), values[f.offset + j]));
                }
            } else {
                out.push((f.name.to_string(), values[f.offset]));
            }
        }
        out
    }
}

/// Result of the loss from logits (the gradient goes into the logits' gradient buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct LogitsLossOutput {
    /// `grpo.loss - entropy_coef * entropy_loss`.
    pub loss: f64,
    /// The fused GRPO loss on the computed log-probabilities (loss, per-objective terms, metrics).
    pub grpo: GrpoOutput,
    /// `agg(entropy)` over the valid tokens in the configured aggregation mode.
    pub entropy_loss: f64,
    /// Masked mean entropy over the valid tokens (verl's `actor/entropy`).
    pub entropy_mean: f64,
}

/// Result of the fused GRPO loss (the gradient goes to the caller's buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoOutput {
    /// `L = (1/K) sum_k lambda_k agg(l_k) + beta agg(kl)`.
    pub loss: f64,
    /// `[K]` each objective's aggregate `agg(l_k)` (verl `actor/pg_loss` per objective).
    pub objective_loss: Vec<f64>,
    /// `agg(kl)` (verl `actor/kl_loss`); 0 without `ref_logp`.
    pub kl_loss: f64,
    /// The metrics.
    pub metrics: GrpoMetrics,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

pub(crate) fn finish_grpo(
    sums: &GrpoSums,
    lambda: &[f32],
    cfg: &GrpoConfig,
    has_ref: bool,
    has_rollout: bool,
) -> Result<GrpoOutput> {
    let k = lambda.len();
    let s = &sums.slots;
    let n = &sums.norms;
    let e = 3 * k;
    let local_tokens = |j: usize| n[NORM_LOCAL_TOKENS * NORM_SLOTS + j];
    let local_seqs = |j: usize| n[NORM_LOCAL_SEQS * NORM_SLOTS + j];
    let objective_loss: Vec<f64> = s[..k].to_vec();
    let kl_loss = if has_ref { s[e + slots::KL_AGG] } else { 0.0 };
    let weighted: f64 = lambda
        .iter()
        .zip(&objective_loss)
        .map(|(l, a)| *l as f64 * a)
        .sum();
    let loss = weighted / k as f64
        + if has_ref {
            cfg.kl_coef as f64 * kl_loss
        } else {
            0.0
        };
    let policy_tokens = s[e + slots::POLICY_TOKENS];
    let any_policy = policy_tokens > 0.0;
    let nonfinite = s[e + slots::NONFINITE].round() as u64;
    let metrics = GrpoMetrics {
        pg_clipfrac: (0..k).map(|i| ratio(s[k + i], local_tokens(i))).collect(),
        pg_clipfrac_lower: (0..k)
            .map(|i| ratio(s[2 * k + i], local_tokens(i)))
            .collect(),
        ppo_kl: ratio(s[e + slots::NEG_LOG_RATIO_SUM], policy_tokens),
        ratio_min: if any_policy {
            s[e + slots::RATIO_MIN]
        } else {
            0.0
        },
        ratio_mean: ratio(s[e], policy_tokens),
        ratio_max: if any_policy {
            s[e + slots::RATIO_MAX]
        } else {
            0.0
        },
        kl_mean: if has_ref {
            ratio(s[e + slots::KL_SUM], local_tokens(k))
        } else {
            0.0
        },
        num_tokens: local_tokens(k),
        num_seqs: local_seqs(k).round() as u64,
        objective_tokens: (0..k).map(local_tokens).collect(),
        objective_seqs: (0..k).map(|j| local_seqs(j).round() as u64).collect(),
        policy_tokens,
        nonfinite,
        rollout_is_mean: ratio(s[e + slots::IS_SUM], policy_tokens),
        rollout_is_min: if has_rollout && any_policy {
            s[e + slots::IS_MIN]
        } else {
            0.0
        },
        rollout_is_max: if has_rollout && any_policy {
            s[e + slots::IS_MAX]
        } else {
            0.0
        },
        rollout_is_corrected_fraction: ratio(s[e + slots::IS_CORRECTED], policy_tokens),
    };
    if nonfinite > 0 && !cfg.allow_nonfinite {
        return Err(Error::NonFinite {
            count: nonfinite,
            arg: None,
        });
    }
    Ok(GrpoOutput {
        loss,
        objective_loss,
        kl_loss,
        metrics,
    })
}

/// Result of the standalone weighted reduction (the gradient goes to the caller's buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceOutput {
    /// `(1/K) sum_k lambda_k agg_k`.
    pub total: f64,
    /// `[K]` per-objective aggregates.
    pub objective_loss: Vec<f64>,
    /// `[K]` token weight of each objective's member tokens in this batch.
    pub objective_tokens: Vec<f64>,
    /// `[K]` member sequences with at least one unmasked token in this batch.
    pub objective_seqs: Vec<u64>,
}

pub(crate) fn finish_reduce(agg: Vec<f64>, norms: &[f64], lambda: &[f32]) -> ReduceOutput {
    let k = lambda.len();
    let total = lambda
        .iter()
        .zip(&agg)
        .map(|(l, a)| *l as f64 * a)
        .sum::<f64>()
        / k as f64;
    ReduceOutput {
        total,
        objective_tokens: (0..k)
            .map(|j| norms[NORM_LOCAL_TOKENS * NORM_SLOTS + j])
            .collect(),
        objective_seqs: (0..k)
            .map(|j| norms[NORM_LOCAL_SEQS * NORM_SLOTS + j].round() as u64)
            .collect(),
        objective_loss: agg,
    }
}

impl GrpoOutput {
    /// Combines the outputs of parts of one batch that were each normalized by the whole batch's
    /// `global` normalizers (so their losses add): sums, token-weighted means, min and max; sequence
    /// counts come from `global` (a sequence split across parts counts once).
    pub fn merge_parts(
        parts: &[GrpoOutput],
        global: &crate::config::Normalizers,
    ) -> Option<GrpoOutput> {
        let first = parts.first()?;
        let k = first.objective_loss.len();
        let sum = |f: &dyn Fn(&GrpoOutput) -> f64| parts.iter().map(f).sum::<f64>();
        let wmean = |f: &dyn Fn(&GrpoOutput) -> f64, w: &dyn Fn(&GrpoOutput) -> f64| {
            let den = sum(w);
            if den > 0.0 {
                parts.iter().map(|p| f(p) * w(p)).sum::<f64>() / den
            } else {
                0.0
            }
        };
        let with_policy: Vec<&GrpoOutput> = parts
            .iter()
            .filter(|p| p.metrics.policy_tokens > 0.0)
            .collect();
        let m = GrpoMetrics {
            pg_clipfrac: (0..k)
                .map(|j| {
                    wmean(&|p| p.metrics.pg_clipfrac[j], &|p| {
                        p.metrics.objective_tokens[j]
                    })
                })
                .collect(),
            pg_clipfrac_lower: (0..k)
                .map(|j| {
                    wmean(&|p| p.metrics.pg_clipfrac_lower[j], &|p| {
                        p.metrics.objective_tokens[j]
                    })
                })
                .collect(),
            ppo_kl: wmean(&|p| p.metrics.ppo_kl, &|p| p.metrics.policy_tokens),
            ratio_min: with_policy
                .iter()
                .map(|p| p.metrics.ratio_min)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))))
                .unwrap_or(0.0),
            ratio_mean: wmean(&|p| p.metrics.ratio_mean, &|p| p.metrics.policy_tokens),
            ratio_max: with_policy
                .iter()
                .map(|p| p.metrics.ratio_max)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
                .unwrap_or(0.0),
            kl_mean: wmean(&|p| p.metrics.kl_mean, &|p| p.metrics.num_tokens),
            num_tokens: sum(&|p| p.metrics.num_tokens),
            num_seqs: global.seqs.get(k).copied().unwrap_or(0.0).round() as u64,
            objective_tokens: (0..k)
                .map(|j| sum(&|p| p.metrics.objective_tokens[j]))
                .collect(),
            objective_seqs: (0..k)
                .map(|j| global.seqs.get(j).copied().unwrap_or(0.0).round() as u64)
                .collect(),
            policy_tokens: sum(&|p| p.metrics.policy_tokens),
            nonfinite: parts.iter().map(|p| p.metrics.nonfinite).sum(),
            rollout_is_mean: wmean(&|p| p.metrics.rollout_is_mean, &|p| p.metrics.policy_tokens),
            rollout_is_min: with_policy
                .iter()
                .map(|p| p.metrics.rollout_is_min)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))))
                .unwrap_or(0.0),
            rollout_is_max: with_policy
                .iter()
                .map(|p| p.metrics.rollout_is_max)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
                .unwrap_or(0.0),
            rollout_is_corrected_fraction: wmean(
                &|p| p.metrics.rollout_is_corrected_fraction,
                &|p| p.metrics.policy_tokens,
            ),
        };
        Some(GrpoOutput {
            loss: sum(&|p| p.loss),
            objective_loss: (0..k).map(|j| sum(&|p| p.objective_loss[j])).collect(),
            kl_loss: sum(&|p| p.kl_loss),
            metrics: m,
        })
    }
}
