//! Group advantages for GRPO-style training (CPU reference; host, f64).
//!
//! Rewards `[B, K]` of B rollouts, grouped by prompt (G consecutive rollouts, or an explicit group id
//! per rollout). Per objective k, with the group's rewards r_1..r_n and their mean m:
//!
//! ```text
//! grpo      (r - m) / (std + eps)       unbiased std; a group of one rollout gives 0
//! dr_grpo   r - m                       (Dr. GRPO: no std scaling)
//! rloo      r - (sum - r) / (n - 1)     leave-one-out baseline; a group of one gives 0
//! batch     (r - m) / (std_batch + eps) TRL's scale_rewards="batch": unbiased std of all B rewards
//! grpo_passk    the group's unique best gets (r_max - r_2nd) / (std + eps), the others 0 (a tie for
//!               the best gives 0 to all); Pass@k training, verl's grpo_passk
//! dr_grpo_passk the same without the std (verl's norm_adv_by_std_in_grpo = False)
//! opo       r - sum(len r) / sum(len)   length-weighted baseline (the plain mean when sum(len) = 0)
//! gpg       (B / max(1, nnz)) (r - m)   nnz: the batch's non-zero rewards (verl's gpg, f_norm 1)
//! reinforce_plus_plus           r, whitened over the batch's tokens (gamma 1)
//! reinforce_plus_plus_baseline  r - m, whitened over the batch's tokens
//! gdpo      x = sum_k w_k grpo_k(r_k) (grpo of each reward column), then (x - mean_B) / (std_B + eps)
//!           (TRL's multi_objective_aggregation="normalize_then_sum"; without weights, one column)
//! remax     r - b, b the rollout's baseline reward (ReMax: the greedy response's; needs baselines)
//! ```
//!
//! REINFORCE++'s whitening is verl's `masked_whiten` of a value constant over each rollout's
//! tokens: with `len` the response lengths and N = sum(len) over the batch, the token mean
//! `mu = sum(len x) / (N + 1e-8)`, the unbiased token variance
//! `var = sum(len (x - mu)^2) / (N + 1e-8) * N / (N - 1)`, then `(x - mu) / sqrt(var + 1e-8)`
//! (0 when N < 2, where verl raises). opo and both REINFORCE++ modes need `lengths`.
//!
//! A group of one rollout gives 0 in the group-relative modes (nothing to compare it with; its own
//! mean is its baseline, so REINFORCE++'s baseline form whitens a 0), or with [`Singletons::Verl`]
//! verl's convention: mean 0 and std 1 (GRPO `r / (1 + eps)`, Dr. GRPO, RLOO and OPO `r`, batch
//! `r / (std_batch + eps)`, GPG `alpha r`, REINFORCE++'s baseline form `r` before the whitening).
//! Pass@k gives a group of one 0 either way (verl raises).
//!
//! GRPO-LEAD options on a designated correctness objective c (rewards 0/1):
//! - length-dependent accuracy reward: a correct response (r > 0) gets `exp(-alpha z)`, z its length
//!   standardized over the group's correct responses (0 when fewer than two or no spread), an
//!   incorrect one gets -1; applied to objective c's rewards before the advantages;
//! - difficulty-aware reweighting of every objective's advantage by the group's accuracy rho on c:
//!   `w(rho) = A + (B - A) / (1 + exp(k (rho - rho0)))`, adv * w(rho) where adv > 0 and
//!   adv * w(1 - rho) where adv <= 0 (A = 0.4, B = 1.5, rho0 = 0.75, k = 10).

pub(crate) mod cuda;

use crate::error::{Error, Result};
use crate::layout::check_len;

/// How an objective's rewards become advantages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdvantageMode {
    /// `(r - mean_g) / (std_g + eps)`.
    #[default]
    Grpo,
    /// `r - mean_g`.
    DrGrpo,
    /// `r - mean of the others`.
    Rloo,
    /// `(r - mean_g) / (std of the batch + eps)`.
    BatchStd,
    /// Pass@k: the group's unique best `(r_max - r_2nd) / (std_g + eps)`, the others 0.
    PassK,
    /// Pass@k without the std: `r_max - r_2nd`.
    PassKDr,
    /// OPO: `r - sum_g(len r) / sum_g(len)` (needs lengths).
    Opo,
    /// GPG: `(B / max(1, non-zero rewards)) (r - mean_g)`.
    Gpg,
    /// REINFORCE++ (gamma 1): `r` whitened over the batch's tokens (needs lengths).
    ReinforcePlusPlus,
    /// REINFORCE++ baseline: `r - mean_g` whitened over the batch's tokens (needs lengths).
    ReinforcePlusPlusBaseline,
    /// GDPO (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward column's GRPO
    /// value, their weighted sum (with `reward_weights`), normalized over the batch.
    Gdpo,
    /// ReMax: `r - b`, `b` the rollout's baseline reward (the greedy response's; needs baselines).
    Remax,
}

impl AdvantageMode {
    /// Every mode, in the order of their codes.
    pub const ALL: [AdvantageMode; 12] = [
        AdvantageMode::Grpo,
        AdvantageMode::DrGrpo,
        AdvantageMode::Rloo,
        AdvantageMode::BatchStd,
        AdvantageMode::PassK,
        AdvantageMode::PassKDr,
        AdvantageMode::Opo,
        AdvantageMode::Gpg,
        AdvantageMode::ReinforcePlusPlus,
        AdvantageMode::ReinforcePlusPlusBaseline,
        AdvantageMode::Gdpo,
        AdvantageMode::Remax,
    ];

    /// The mode's name (`FromStr` reads it back).
    pub fn name(self) -> &'static str {
        match self {
            AdvantageMode::Grpo => "grpo",
            AdvantageMode::DrGrpo => "dr_grpo",
            AdvantageMode::Rloo => "rloo",
            AdvantageMode::BatchStd => "batch",
            AdvantageMode::PassK => "grpo_passk",
            AdvantageMode::PassKDr => "dr_grpo_passk",
            AdvantageMode::Opo => "opo",
            AdvantageMode::Gpg => "gpg",
            AdvantageMode::ReinforcePlusPlus => "reinforce_plus_plus",
            AdvantageMode::ReinforcePlusPlusBaseline => "reinforce_plus_plus_baseline",
            AdvantageMode::Gdpo => "gdpo",
            AdvantageMode::Remax => "remax",
        }
    }

    /// Whether the mode reads the response lengths.
    pub fn needs_lengths(self) -> bool {
        matches!(
            self,
            AdvantageMode::Opo
                | AdvantageMode::ReinforcePlusPlus
                | AdvantageMode::ReinforcePlusPlusBaseline
        )
    }

    /// Whether the mode reads the baselines (ReMax).
    pub fn needs_baselines(self) -> bool {
        self == AdvantageMode::Remax
    }

    /// Whether the mode takes a second, batch-wide step after the group one (REINFORCE++'s
    /// whitening over the tokens, GDPO's normalization over the rollouts).
    pub fn whitened(self) -> bool {
        matches!(
            self,
            AdvantageMode::ReinforcePlusPlus
                | AdvantageMode::ReinforcePlusPlusBaseline
                | AdvantageMode::Gdpo
        )
    }
}

impl std::str::FromStr for AdvantageMode {
    type Err = Error;
    /// `grpo`, `dr_grpo`, `rloo`, `batch` (TRL's `scale_rewards="batch"`), `grpo_passk`,
    /// `dr_grpo_passk`, `opo`, `gpg`, `reinforce_plus_plus`, `reinforce_plus_plus_baseline`,
    /// `gdpo` or `remax`.
    fn from_str(s: &str) -> Result<Self> {
        AdvantageMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = AdvantageMode::ALL.iter().map(|m| m.name()).collect();
                Error::invalid_argument(
                    "modes",
                    format!(
                        "unknown advantage mode {s:?}; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// What a group of one rollout gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Singletons {
    /// 0 in every mode: one rollout has no baseline to compare with (its signal would be its raw
    /// reward).
    #[default]
    Zero,
    /// verl's convention: the group's mean is 0 and its std 1, so GRPO gives `r / (1 + eps)`,
    /// Dr. GRPO and RLOO `r`, batch std `r / (std_batch + eps)`.
    Verl,
}

impl std::str::FromStr for Singletons {
    type Err = Error;
    /// `zero` or `verl`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zero" => Ok(Singletons::Zero),
            "verl" => Ok(Singletons::Verl),
            _ => Err(Error::invalid_argument(
                "singletons",
                format!("unknown convention {s:?} for groups of one; expected zero or verl"),
            )),
        }
    }
}

/// Rollout groups.
#[derive(Clone, Copy, Debug)]
pub enum Groups<'a> {
    /// Groups of G consecutive rollouts (B must be a multiple of G).
    Consecutive(usize),
    /// `[B]` group id of each rollout (any order).
    Ids(&'a [i32]),
}

/// GRPO-LEAD's difficulty-aware weights `w(rho) = a + (b - a) / (1 + exp(k (rho - rho0)))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DifficultyWeights {
    /// Weight of the easiest prompts (`rho` well above `rho0`).
    pub a: f64,
    /// Weight of the hardest prompts (`rho` well below `rho0`).
    pub b: f64,
    /// Accuracy at the midpoint of the sigmoid.
    pub rho0: f64,
    /// Steepness of the sigmoid.
    pub k: f64,
}

impl Default for DifficultyWeights {
    fn default() -> Self {
        DifficultyWeights {
            a: 0.4,
            b: 1.5,
            rho0: 0.75,
            k: 10.0,
        }
    }
}

impl DifficultyWeights {
    /// `w(rho)`.
    pub fn weight(&self, rho: f64) -> f64 {
        self.a + (self.b - self.a) / (1.0 + (self.k * (rho - self.rho0)).exp())
    }
}

/// GRPO-LEAD options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeadOptions {
    /// The correctness objective (rewards 0/1; > 0 counts as correct).
    pub correctness: usize,
    /// Difficulty-aware reweighting of every objective's advantage.
    pub difficulty: Option<DifficultyWeights>,
    /// Length-dependent accuracy reward `exp(-alpha z)` (alpha, default 0.05); needs `lengths`.
    pub length_alpha: Option<f64>,
}

/// Advantage settings: one mode per objective.
#[derive(Clone, Debug, PartialEq)]
pub struct AdvantageConfig {
    /// `[K]` mode of each objective (one mode, of the combined column, with `reward_weights`).
    pub modes: Vec<AdvantageMode>,
    /// Added to the std (1e-6, as verl).
    pub eps: f64,
    /// GRPO-LEAD options.
    pub lead: Option<LeadOptions>,
    /// `[K]` weights of the reward columns: the advantage is then that of `sum_k w_k r_k` (TRL's
    /// `reward_weights` with `multi_objective_aggregation = "sum_then_normalize"`, RECAP's weights
    /// applied to the rewards), one output column; `None`: one advantage per column.
    pub reward_weights: Option<Vec<f64>>,
    /// What a group of one rollout gets (0 by default; verl's convention as an option).
    pub singletons: Singletons,
}

impl Default for AdvantageConfig {
    /// GRPO for one objective, eps 1e-6.
    fn default() -> Self {
        AdvantageConfig {
            modes: vec![AdvantageMode::Grpo],
            eps: 1e-6,
            lead: None,
            reward_weights: None,
            singletons: Singletons::Zero,
        }
    }
}

impl AdvantageConfig {
    /// Reward columns K of the input.
    pub fn num_inputs(&self) -> usize {
        self.reward_weights
            .as_ref()
            .map_or(self.modes.len(), |w| w.len())
    }

    /// Advantage columns of the output (1 with reward weights).
    pub fn num_outputs(&self) -> usize {
        self.modes.len()
    }
}

/// Group ids and members, from either form.
pub(crate) fn group_members(groups: Groups<'_>, b: usize) -> Result<Vec<Vec<usize>>> {
    match groups {
        Groups::Consecutive(g) => {
            if g == 0 || b % g != 0 {
                return Err(Error::invalid_argument(
                    "groups",
                    format!(
                        "B = {b} rollouts do not split into groups of G = {g} consecutive rollouts"
                    ),
                ));
            }
            Ok((0..b / g).map(|i| (i * g..(i + 1) * g).collect()).collect())
        }
        Groups::Ids(ids) => {
            check_len("groups", ids.len(), b, "[B] group ids")?;
            let mut order: Vec<i32> = ids.to_vec();
            order.sort_unstable();
            order.dedup();
            let mut members = vec![Vec::new(); order.len()];
            for (i, id) in ids.iter().enumerate() {
                let g = order
                    .binary_search(id)
                    .map_err(|_| Error::invalid_argument("groups", "group id lookup"))?;
                members[g].push(i);
            }
            Ok(members)
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

fn unbiased_std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

impl AdvantageMode {
    /// `RECAP_ADV_*` of kernels/recap_params.h.
    pub fn code(self) -> u32 {
        use crate::kernel_layout as h;
        (match self {
            AdvantageMode::Grpo => h::ADV_GRPO,
            AdvantageMode::DrGrpo => h::ADV_DR_GRPO,
            AdvantageMode::Rloo => h::ADV_RLOO,
            AdvantageMode::BatchStd => h::ADV_BATCH_STD,
            AdvantageMode::PassK => h::ADV_PASSK,
            AdvantageMode::PassKDr => h::ADV_PASSK_DR,
            AdvantageMode::Opo => h::ADV_OPO,
            AdvantageMode::Gpg => h::ADV_GPG,
            AdvantageMode::ReinforcePlusPlus => h::ADV_RFPP,
            AdvantageMode::ReinforcePlusPlusBaseline => h::ADV_RFPP_BASELINE,
            AdvantageMode::Gdpo => h::ADV_GDPO,
            AdvantageMode::Remax => h::ADV_REMAX,
        }) as u32
    }
}

/// Objectives one call handles at most (4 bits of mode each in the kernels' parameters).
pub const MAX_ADV_OBJECTIVES: usize = 16;

/// Checks the shapes and options of a call on `n_rewards` rewards; returns `(B, K)`.
pub(crate) fn validate(
    n_rewards: usize,
    lengths: Option<usize>,
    baselines: Option<usize>,
    config: &AdvantageConfig,
    n_out: usize,
) -> Result<(usize, usize)> {
    let k = config.num_inputs();
    if let Some(w) = &config.reward_weights {
        if config.modes.len() != 1 {
            return Err(Error::invalid_argument(
                "config.modes",
                format!(
                    "with reward weights the advantage is of one combined column: expected one mode, got {}",
                    config.modes.len()
                ),
            ));
        }
        if let Some((j, v)) = w.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid_argument(
                "config.reward_weights",
                format!("reward_weights[{j}] = {v} is not finite"),
            ));
        }
    }
    if k == 0 || k > MAX_ADV_OBJECTIVES {
        return Err(Error::invalid_argument(
            if config.reward_weights.is_some() {
                "config.reward_weights"
            } else {
                "config.modes"
            },
            format!("expected one entry per objective, 1 to {MAX_ADV_OBJECTIVES}, got {k}"),
        ));
    }
    if n_rewards % k != 0 {
        return Err(Error::invalid_argument(
            "rewards",
            format!("expected [B, K = {k}], got {n_rewards} values"),
        ));
    }
    let b = n_rewards / k;
    if b > i32::MAX as usize {
        return Err(Error::invalid_argument(
            "rewards",
            format!("B = {b} rollouts exceed 2^31 - 1"),
        ));
    }
    let k_out = config.num_outputs();
    check_len(
        "out",
        n_out,
        b * k_out,
        if k_out == k { "[B, K]" } else { "[B, 1]" },
    )?;
    if !(config.eps.is_finite() && config.eps >= 0.0) {
        return Err(Error::invalid_argument(
            "config.eps",
            format!("expected a finite eps >= 0, got {}", config.eps),
        ));
    }
    if let Some(n) = baselines {
        check_len(
            "baselines",
            n,
            b * k_out,
            if k_out == 1 { "[B]" } else { "[B, K]" },
        )?;
    } else if config.modes.iter().any(|m| m.needs_baselines()) {
        return Err(Error::invalid_argument(
            "baselines",
            "advantage mode remax needs the baseline rewards (the greedy responses'), one per rollout and objective",
        ));
    }
    if let Some(len) = lengths {
        check_len("lengths", len, b, "[B]")?;
    } else if let Some(m) = config.modes.iter().find(|m| m.needs_lengths()) {
        return Err(Error::invalid_argument(
            "lengths",
            format!("advantage mode {} needs the [B] response lengths", m.name()),
        ));
    }
    if let Some(lead) = &config.lead {
        if let (Some(_), Some(m)) = (lead.difficulty, config.modes.iter().find(|m| m.whitened())) {
            return Err(Error::invalid_argument(
                "config.lead.difficulty",
                format!(
                    "GRPO-LEAD's difficulty weights do not combine with {} (a batch-wide second step)",
                    m.name()
                ),
            ));
        }
        if lead.correctness >= k {
            return Err(Error::invalid_argument(
                "config.lead",
                format!("correctness objective {} >= K = {k}", lead.correctness),
            ));
        }
        if let Some(alpha) = lead.length_alpha {
            if !alpha.is_finite() {
                return Err(Error::invalid_argument(
                    "config.lead.length_alpha",
                    format!("expected a finite alpha, got {alpha}"),
                ));
            }
            let len = lengths.ok_or_else(|| {
                Error::invalid_argument("lengths", "the length-dependent reward needs [B] lengths")
            })?;
            check_len("lengths", len, b, "[B]")?;
        }
        if let Some(d) = &lead.difficulty {
            if ![d.a, d.b, d.rho0, d.k].iter().all(|x| x.is_finite()) {
                return Err(Error::invalid_argument(
                    "config.lead.difficulty",
                    format!("expected finite A, B, rho0, k, got {d:?}"),
                ));
            }
        }
    }
    Ok((b, k))
}

/// Dense group ids `[B]` in `[0, groups)` (groups in ascending order of their ids) and the number
/// of groups.
pub(crate) fn dense_group_ids(groups: Groups<'_>, b: usize) -> Result<(Vec<i32>, usize)> {
    let members = group_members(groups, b)?;
    let mut ids = vec![0i32; b];
    for (g, m) in members.iter().enumerate() {
        for &i in m {
            ids[i] = g as i32;
        }
    }
    Ok((ids, members.len()))
}

/// Advantages `[B, K]` of rewards `[B, K]` (row-major) into `out`. `lengths` (`[B]` response
/// lengths) is needed by the length-dependent accuracy reward; `baselines` (`[B, K]`, as the
/// output) by ReMax.
pub fn group_advantages(
    rewards: &[f32],
    groups: Groups<'_>,
    lengths: Option<&[i32]>,
    baselines: Option<&[f32]>,
    config: &AdvantageConfig,
    out: &mut [f32],
) -> Result<()> {
    let (b, k) = validate(
        rewards.len(),
        lengths.map(|l| l.len()),
        baselines.map(|l| l.len()),
        config,
        out.len(),
    )?;
    for (name, values) in [("rewards", Some(rewards)), ("baselines", baselines)] {
        if let Some((i, v)) = values
            .into_iter()
            .flatten()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(Error::invalid_argument(
                name,
                format!("{name}[{i}] = {v} is not finite"),
            ));
        }
    }
    if let Some((i, l)) = lengths
        .into_iter()
        .flatten()
        .enumerate()
        .find(|(_, l)| **l < 0)
    {
        return Err(Error::invalid_argument(
            "lengths",
            format!("lengths[{i}] = {l} is negative"),
        ));
    }
    let members = group_members(groups, b)?;
    let mut r: Vec<f64> = rewards.iter().map(|x| *x as f64).collect();
    if let Some(lead) = &config.lead {
        if let Some(alpha) = lead.length_alpha {
            let len = lengths.ok_or_else(|| {
                Error::invalid_argument("lengths", "the length-dependent reward needs [B] lengths")
            })?;
            let c = lead.correctness;
            for m in &members {
                let correct: Vec<f64> = m
                    .iter()
                    .filter(|&&i| r[i * k + c] > 0.0)
                    .map(|&i| len[i] as f64)
                    .collect();
                let (mu, sd) = (mean(&correct), unbiased_std(&correct));
                for &i in m {
                    r[i * k + c] = if r[i * k + c] > 0.0 {
                        let z = if sd > 0.0 {
                            (len[i] as f64 - mu) / sd
                        } else {
                            0.0
                        };
                        (-alpha * z).exp()
                    } else {
                        -1.0
                    };
                }
            }
        }
    }
    // the value of each output column: a reward column, or the weighted sum of all of them
    let k_out = config.num_outputs();
    let value = |i: usize, j: usize| match &config.reward_weights {
        None => r[i * k + j],
        Some(w) => w.iter().enumerate().map(|(c, wc)| wc * r[i * k + c]).sum(),
    };
    let len = |i: usize| lengths.map_or(0.0, |l| l[i] as f64);
    // GRPO's value in a group of n with mean mu and std sd (GDPO applies it to each reward column)
    let grpo = |v: f64, mu: f64, sd: f64, n: usize| {
        if n == 1 && config.singletons == Singletons::Verl {
            v / (1.0 + config.eps)
        } else if n < 2 {
            0.0
        } else {
            (v - mu) / (sd + config.eps)
        }
    };
    for j in 0..k_out {
        let col: Vec<f64> = (0..b).map(|i| value(i, j)).collect();
        let batch_std = unbiased_std(&col);
        let mode = config.modes[j];
        // GPG's scale: B over the batch's non-zero values
        let alpha = if mode == AdvantageMode::Gpg {
            b as f64 / col.iter().filter(|v| **v != 0.0).count().max(1) as f64
        } else {
            1.0
        };
        let mut adv = vec![0.0f64; b];
        for m in &members {
            let x: Vec<f64> = m.iter().map(|&i| col[i]).collect();
            let (mu, sd, sum, n) = (mean(&x), unbiased_std(&x), x.iter().sum::<f64>(), x.len());
            let verl_one = n == 1 && config.singletons == Singletons::Verl;
            // Pass@k: the best value, whether one member alone holds it, and the runner-up
            let (best, holders, second) =
                if matches!(mode, AdvantageMode::PassK | AdvantageMode::PassKDr) {
                    let best = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let holders = x.iter().filter(|v| **v == best).count();
                    let second = if holders >= 2 {
                        best
                    } else {
                        x.iter()
                            .cloned()
                            .filter(|v| *v < best)
                            .fold(f64::NEG_INFINITY, f64::max)
                    };
                    (best, holders, second)
                } else {
                    (0.0, 0, 0.0)
                };
            // OPO: the length-weighted mean (the plain mean when the lengths sum to 0)
            let sum_len: f64 = if mode == AdvantageMode::Opo {
                m.iter().map(|&i| len(i)).sum()
            } else {
                0.0
            };
            let len_mean = if sum_len > 0.0 {
                m.iter().map(|&i| len(i) * col[i]).sum::<f64>() / sum_len
            } else {
                mu
            };
            // GDPO: each reward column's GRPO value in the group, weighted and summed
            let col_stats: Vec<(f64, f64)> = match (&config.reward_weights, mode) {
                (Some(_), AdvantageMode::Gdpo) => (0..k)
                    .map(|c| {
                        let xc: Vec<f64> = m.iter().map(|&q| r[q * k + c]).collect();
                        (mean(&xc), unbiased_std(&xc))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let gdpo = |i: usize, v: f64| match &config.reward_weights {
                None => grpo(v, mu, sd, n),
                Some(w) => (0..k)
                    .map(|c| w[c] * grpo(r[i * k + c], col_stats[c].0, col_stats[c].1, n))
                    .sum(),
            };
            for (&i, &v) in m.iter().zip(&x) {
                adv[i] = match mode {
                    AdvantageMode::Gdpo => gdpo(i, v),
                    AdvantageMode::ReinforcePlusPlus => v,
                    AdvantageMode::Remax => v - baselines.map_or(0.0, |x| x[i * k_out + j] as f64),
                    AdvantageMode::PassK | AdvantageMode::PassKDr if n < 2 => 0.0,
                    // verl's groups of one: mean 0, std 1
                    AdvantageMode::Grpo if verl_one => v / (1.0 + config.eps),
                    AdvantageMode::BatchStd if verl_one => v / (batch_std + config.eps),
                    AdvantageMode::Gpg if verl_one => alpha * v,
                    AdvantageMode::DrGrpo
                    | AdvantageMode::Rloo
                    | AdvantageMode::Opo
                    | AdvantageMode::ReinforcePlusPlusBaseline
                        if verl_one =>
                    {
                        v
                    }
                    AdvantageMode::Grpo if n < 2 => 0.0,
                    AdvantageMode::Grpo => (v - mu) / (sd + config.eps),
                    AdvantageMode::DrGrpo | AdvantageMode::ReinforcePlusPlusBaseline => v - mu,
                    AdvantageMode::Rloo if n < 2 => 0.0,
                    AdvantageMode::Rloo => v - (sum - v) / (n - 1) as f64,
                    AdvantageMode::BatchStd => (v - mu) / (batch_std + config.eps),
                    AdvantageMode::PassK | AdvantageMode::PassKDr => {
                        if holders == 1 && v == best {
                            let gap = best - second;
                            if mode == AdvantageMode::PassK {
                                gap / (sd + config.eps)
                            } else {
                                gap
                            }
                        } else {
                            0.0
                        }
                    }
                    AdvantageMode::Opo => v - len_mean,
                    AdvantageMode::Gpg => alpha * (v - mu),
                };
            }
        }
        if mode == AdvantageMode::Gdpo {
            // TRL's normalize_then_sum: the combined values normalized over the batch
            let (mu, sd) = (mean(&adv), unbiased_std(&adv));
            for a in adv.iter_mut() {
                *a = (*a - mu) / (sd + config.eps);
            }
        } else if mode.whitened() {
            // verl's masked_whiten over the tokens: rollout i's value repeated len_i times
            let n_tok: f64 = (0..b).map(len).sum();
            let mu = (0..b).map(|i| len(i) * adv[i]).sum::<f64>() / (n_tok + 1e-8);
            let ss: f64 = (0..b).map(|i| len(i) * (adv[i] - mu).powi(2)).sum();
            for a in adv.iter_mut() {
                *a = if n_tok < 2.0 {
                    0.0
                } else {
                    let var = ss / (n_tok + 1e-8) * n_tok / (n_tok - 1.0);
                    (*a - mu) / (var + 1e-8).sqrt()
                };
            }
        }
        for (i, a) in adv.into_iter().enumerate() {
            out[i * k_out + j] = a as f32;
        }
    }
    if let Some(lead) = &config.lead {
        if let Some(dw) = &lead.difficulty {
            let c = lead.correctness;
            for m in &members {
                let rho = mean(
                    &m.iter()
                        .map(|&i| (rewards[i * k + c] > 0.0) as u8 as f64)
                        .collect::<Vec<_>>(),
                );
                for &i in m {
                    for j in 0..k_out {
                        let a = out[i * k_out + j] as f64;
                        let w = if a > 0.0 {
                            dw.weight(rho)
                        } else {
                            dw.weight(1.0 - rho)
                        };
                        out[i * k_out + j] = (a * w) as f32;
                    }
                }
            }
        }
    }
    Ok(())
}
