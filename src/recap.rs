//! The RECAP scheduler: dynamic objective weights from short-horizon signals of convergence and
//! instability (host side, pure Rust).
//!
//! Each of K objectives reports one scalar per step, with an orientation: a loss (lower is better)
//! or a reward (higher is better). The scheduler keeps the last `2W` values of each (W = 10). By
//! default (the paper's equations, arXiv 2510.21978 v2), while fewer than `2W` exist every weight
//! is 1; then, per objective:
//!
//! ```text
//! mu      = mean of the latest W values      mu_prev = mean of the W before them
//! sigma   = sqrt(sum over the 2W values of (x - mu)^2 / (2W - 1))
//! c       = mu_prev / mu (loss)  or  mu / mu_prev (reward)      (c > 1: improving)
//! i       = sigma / (|mu| + |mu_prev|)
//! s       = c + i
//! lambda  = K softmax(s / T)     (T = 5; the weights average 1)
//! ```
//!
//! and the step loss is `(1/K) sum_k lambda_k L_k` (the `lambda` input of the fused loss). Each
//! place where the paper's equations, its pseudocode, its appendix and its authors' code differ is
//! an option of [`RecapConfig`], named after what it is ([`Sigma`], [`Denominator`],
//! [`Priority`] with [`Alpha`], `warmup`, [`Convergence`]); [`RecapConfig::authors_code`] selects
//! all of the authors' choices at once.
//!
//! Guards (never a NaN weight): an observation that is not finite is rejected with an error and
//! leaves the state unchanged; `c = 1` (no evidence either way) when `mu` or `mu_prev` is 0, missing
//! or of the other sign; `i = 0` when its denominator is 0; `c` and `i` are capped at
//! [`SIGNAL_CAP`]; the softmax subtracts its maximum. The state serializes (serde, JSON) with its
//! options, so a run resumes from a checkpoint with identical weights.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Largest value `c` or `i` can take (a finite cap keeps the softmax finite).
pub const SIGNAL_CAP: f64 = 1e6;

/// Whether lower (a loss) or higher (a reward) is better for an objective's monitored scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Orientation {
    /// Lower is better.
    Loss,
    /// Higher is better.
    Reward,
}

impl std::str::FromStr for Orientation {
    type Err = Error;
    /// `"loss"` (lower is better) or `"reward"` (higher is better).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "loss" => Ok(Orientation::Loss),
            "reward" => Ok(Orientation::Reward),
            _ => Err(Error::invalid_argument(
                "orientations",
                format!("expected \"reward\" (higher is better) or \"loss\" (lower is better), got {s:?}"),
            )),
        }
    }
}

/// Where the instability's standard deviation is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sigma {
    /// The paper's equation: deviations of the 2W values about the current window's mean `mu`,
    /// divided by `2W - 1`.
    #[default]
    Equation,
    /// The paper's pseudocode: the unbiased standard deviation of the 2W values (about their mean).
    Pseudocode,
    /// The authors' code: the population standard deviation of the 2W values (divided by `2W`).
    Population,
}

/// The denominator of the instability `i = sigma / d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denominator {
    /// `|mu| + |mu_prev|` (this crate's guard: positive whatever the signs).
    #[default]
    AbsSum,
    /// `mu + mu_prev` (the paper's equation).
    Sum,
    /// The mean of the 2W values (the authors' code).
    Mean,
}

/// How the signals become weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// `s = c + i`, `lambda = K softmax(s / T)` (the paper's equation).
    #[default]
    Sum,
    /// `s = alpha c + (1 - alpha) i`, `lambda = K softmax(s / T)` (the paper's appendix).
    AlphaMix,
    /// `lambda = K [alpha softmax(c / T) + (1 - alpha) softmax(i / T)]` (the authors' code).
    SoftmaxMixture,
}

/// The `alpha` of [`Priority::AlphaMix`] and [`Priority::SoftmaxMixture`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Alpha {
    /// A constant in [0, 1] (0.5 in the paper's configs, 1.0 the authors' code's default).
    Constant(f64),
    /// `1 - step / max_steps` (the authors' code's `alpha = -1`); needs `max_steps`.
    Annealed(AlphaSchedule),
}

/// The name of the annealed schedule (`"annealed"` in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaSchedule {
    /// `1 - step / max_steps`.
    Annealed,
}

impl Default for Alpha {
    fn default() -> Self {
        Alpha::Constant(0.5)
    }
}

/// Which way the convergence ratio `c` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Convergence {
    /// `c > 1` means improving: `mu_prev / mu` for a loss (the paper's equation), `mu / mu_prev` for
    /// a reward (this crate's orientation for rewards).
    #[default]
    Improving,
    /// `c > 1` means getting worse, for losses (`mu / mu_prev`) and rewards (`mu_prev / mu`) alike
    /// (the authors' code).
    Worsening,
}

/// The largest window W a scheduler takes (it keeps 2W values per objective).
pub const MAX_WINDOW: usize = 1 << 20;

/// The most objectives a scheduler takes.
pub const MAX_SCHEDULER_OBJECTIVES: usize = 4096;

/// Scheduler settings: the paper's equations with this crate's guards by default. Deserializes
/// from any subset of its fields (the rest default; unknown ones are an error), the form in which
/// the bindings pass them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecapConfig {
    /// W: values per half-window (the buffer holds 2W).
    pub window: usize,
    /// T: softmax temperature.
    pub temperature: f64,
    /// How the signals become weights.
    pub priority: Priority,
    /// `alpha` of the mixed priorities.
    pub alpha: Alpha,
    /// The run's length, for [`Alpha::Annealed`].
    pub max_steps: Option<u64>,
    /// The instability's standard deviation.
    pub sigma: Sigma,
    /// The instability's denominator.
    pub denominator: Denominator,
    /// `true` (the paper): weights 1 until 2W values exist; `false` (the authors' code): the
    /// signals of whatever history exists (the latest min(n, W) values are the current window, the
    /// ones before the previous; `c = 1` without previous values).
    pub warmup: bool,
    /// Which way `c` points.
    pub convergence: Convergence,
}

impl Default for RecapConfig {
    fn default() -> Self {
        RecapConfig {
            window: 10,
            temperature: 5.0,
            priority: Priority::Sum,
            alpha: Alpha::default(),
            max_steps: None,
            sigma: Sigma::Equation,
            denominator: Denominator::AbsSum,
            warmup: true,
            convergence: Convergence::Improving,
        }
    }
}

impl RecapConfig {
    /// The authors' code: the mixture of softmaxes with `alpha` (1.0 by default there, 0.5 in the
    /// paper's configs), the population std over the mean of the 2W values, no warm-up, `c > 1`
    /// when getting worse.
    pub fn authors_code(alpha: Alpha) -> RecapConfig {
        RecapConfig {
            priority: Priority::SoftmaxMixture,
            alpha,
            sigma: Sigma::Population,
            denominator: Denominator::Mean,
            warmup: false,
            convergence: Convergence::Worsening,
            ..RecapConfig::default()
        }
    }

    /// A named preset: "paper" (its equations, [`RecapConfig::default`]) or "authors" (the authors'
    /// code, [`RecapConfig::authors_code`] with alpha 1.0, the default of their code); the CLI's
    /// `--recap-preset`, the sweep's `preset=` and Python's `RecapWeights(preset=)`.
    pub fn preset(name: &str) -> Result<RecapConfig> {
        match name {
            "paper" => Ok(RecapConfig::default()),
            "authors" => Ok(RecapConfig::authors_code(Alpha::Constant(1.0))),
            _ => Err(Error::invalid_argument(
                "preset",
                format!("expected paper or authors, got {name:?}"),
            )),
        }
    }

    /// The preset `name` with the fields of `json` (a JSON object, any subset of the fields) over
    /// it, validated; an error names the field that does not parse.
    pub fn preset_with_json(name: &str, json: &str) -> Result<RecapConfig> {
        let mut base = serde_json::to_value(RecapConfig::preset(name)?)
            .map_err(|e| Error::invalid_argument("preset", e.to_string()))?;
        let over: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| crate::error::json_options_error::<RecapConfig>(json, e))?;
        match (base.as_object_mut(), over) {
            (Some(b), serde_json::Value::Object(o)) => b.extend(o),
            _ => {
                return Err(Error::invalid_argument(
                    "config",
                    format!("expected a JSON object of scheduler options, got {json}"),
                ))
            }
        }
        RecapConfig::from_json(&base.to_string())
    }

    /// A validated configuration from its JSON form (any subset of the fields); an error names the
    /// field that does not parse.
    pub fn from_json(json: &str) -> Result<RecapConfig> {
        let c: RecapConfig = serde_json::from_str(json)
            .map_err(|e| crate::error::json_options_error::<RecapConfig>(json, e))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_WINDOW).contains(&self.window) {
            return Err(Error::invalid_argument(
                "config.window",
                format!(
                    "expected a window 1 <= W <= {MAX_WINDOW}, got {}",
                    self.window
                ),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid_argument(
                "config.temperature",
                format!(
                    "expected a finite temperature > 0, got {}",
                    self.temperature
                ),
            ));
        }
        match self.alpha {
            Alpha::Constant(a) if !(0.0..=1.0).contains(&a) => Err(Error::invalid_argument(
                "config.alpha",
                format!("expected 0 <= alpha <= 1, got {a}"),
            )),
            Alpha::Annealed(_) if self.max_steps.unwrap_or(0) == 0 => Err(Error::invalid_argument(
                "config.max_steps",
                "an annealed alpha (1 - step / max_steps) needs max_steps >= 1",
            )),
            _ => Ok(()),
        }
    }

    /// `alpha` after `steps` observed steps.
    pub fn alpha_at(&self, steps: u64) -> f64 {
        match self.alpha {
            Alpha::Constant(a) => a,
            Alpha::Annealed(_) => {
                let m = self.max_steps.unwrap_or(1).max(1) as f64;
                (1.0 - steps as f64 / m).clamp(0.0, 1.0)
            }
        }
    }
}

/// One objective's signals at the current step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Mean of the latest W values.
    pub mu: f64,
    /// Mean of the W values before them.
    pub mu_prev: f64,
    /// Convergence `c` (> 1: improving, or getting worse with [`Convergence::Worsening`]).
    pub convergence: f64,
    /// Instability `i`.
    pub instability: f64,
    /// Priority `s` (for [`Priority::SoftmaxMixture`], `alpha c + (1 - alpha) i`, for display).
    pub priority: f64,
}

/// The scheduler's state: configuration, orientations and the last 2W values of each objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecapScheduler {
    config: RecapConfig,
    orientations: Vec<Orientation>,
    history: Vec<VecDeque<f64>>,
    steps: u64,
}

impl RecapScheduler {
    /// A scheduler for objectives with these orientations.
    pub fn new(orientations: &[Orientation], config: RecapConfig) -> Result<Self> {
        if !(1..=MAX_SCHEDULER_OBJECTIVES).contains(&orientations.len()) {
            return Err(Error::invalid_argument(
                "orientations",
                format!(
                    "expected 1 to {MAX_SCHEDULER_OBJECTIVES} objectives, got {}",
                    orientations.len()
                ),
            ));
        }
        config.validate()?;
        let cap = 2 * config.window;
        Ok(RecapScheduler {
            history: vec![VecDeque::with_capacity(cap); orientations.len()],
            orientations: orientations.to_vec(),
            config,
            steps: 0,
        })
    }

    /// Number of objectives K.
    pub fn num_objectives(&self) -> usize {
        self.orientations.len()
    }

    /// Steps observed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Records this step's monitored value of every objective (`[K]`, finite). A non-finite value
    /// is an error naming its objective, and nothing is recorded.
    pub fn observe(&mut self, values: &[f64]) -> Result<()> {
        if values.len() != self.orientations.len() {
            return Err(Error::invalid_argument(
                "values",
                format!(
                    "expected K = {} values, got {}",
                    self.orientations.len(),
                    values.len()
                ),
            ));
        }
        if let Some((k, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid_argument(
                "values",
                format!("values[{k}] = {v} is not finite; nothing was recorded"),
            ));
        }
        let cap = 2 * self.config.window;
        for (h, v) in self.history.iter_mut().zip(values) {
            if h.len() == cap {
                h.pop_front();
            }
            h.push_back(*v);
        }
        self.steps += 1;
        Ok(())
    }

    /// The options.
    pub fn config(&self) -> &RecapConfig {
        &self.config
    }

    /// Each objective's signals, or `None` while warming up (fewer than 2W values; with
    /// `warmup = false`, until one value exists).
    pub fn signals(&self) -> Option<Vec<Signals>> {
        let cfg = &self.config;
        let w = cfg.window;
        let n = self.history.first().map_or(0, |h| h.len());
        if n == 0 || (cfg.warmup && n < 2 * w) {
            return None;
        }
        let alpha = cfg.alpha_at(self.steps);
        Some(
            self.history
                .iter()
                .zip(&self.orientations)
                .map(|(h, o)| {
                    let values: Vec<f64> = h.iter().copied().collect();
                    let split = values.len().saturating_sub(w);
                    let (prev_v, cur_v) = values.split_at(split);
                    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
                    let mu = mean(cur_v);
                    let prev = if prev_v.is_empty() {
                        None
                    } else {
                        Some(mean(prev_v))
                    };
                    let m = values.len() as f64;
                    let all = mean(&values);
                    let ss = |about: f64| values.iter().map(|x| (x - about).powi(2)).sum::<f64>();
                    let sigma = match cfg.sigma {
                        Sigma::Equation if m >= 2.0 => (ss(mu) / (m - 1.0)).sqrt(),
                        Sigma::Pseudocode if m >= 2.0 => (ss(all) / (m - 1.0)).sqrt(),
                        Sigma::Population => (ss(all) / m).sqrt(),
                        _ => 0.0,
                    };
                    let p = prev.unwrap_or(0.0);
                    let comparable =
                        prev.is_some() && mu != 0.0 && p != 0.0 && (mu > 0.0) == (p > 0.0);
                    let improving_ratio = match o {
                        Orientation::Loss => p / mu,
                        Orientation::Reward => mu / p,
                    };
                    let c = match (comparable, cfg.convergence) {
                        (false, _) => 1.0,
                        (true, Convergence::Improving) => improving_ratio,
                        (true, Convergence::Worsening) => 1.0 / improving_ratio,
                    };
                    let den = match cfg.denominator {
                        Denominator::AbsSum => mu.abs() + p.abs(),
                        Denominator::Sum => mu + p,
                        Denominator::Mean => all,
                    };
                    let i = if den != 0.0 { sigma / den } else { 0.0 };
                    let (c, i) = (cap(c), cap(i));
                    let s = match cfg.priority {
                        Priority::Sum => c + i,
                        Priority::AlphaMix | Priority::SoftmaxMixture => {
                            alpha * c + (1.0 - alpha) * i
                        }
                    };
                    Signals {
                        mu,
                        mu_prev: p,
                        convergence: c,
                        instability: i,
                        priority: s,
                    }
                })
                .collect(),
        )
    }

    /// The objective weights `lambda` (`[K]`, positive, averaging 1): all 1 while warming up.
    pub fn weights(&self) -> Vec<f32> {
        let k = self.orientations.len();
        let Some(sig) = self.signals() else {
            return vec![1.0; k];
        };
        let t = self.config.temperature;
        let lambda: Vec<f64> = match self.config.priority {
            Priority::Sum | Priority::AlphaMix => softmax(sig.iter().map(|s| s.priority / t), k),
            Priority::SoftmaxMixture => {
                let a = self.config.alpha_at(self.steps);
                let sc = softmax(sig.iter().map(|s| s.convergence / t), k);
                let si = softmax(sig.iter().map(|s| s.instability / t), k);
                sc.iter()
                    .zip(&si)
                    .map(|(c, i)| a * c + (1.0 - a) * i)
                    .collect()
            }
        };
        lambda.iter().map(|x| *x as f32).collect()
    }

    /// The state as JSON (a checkpoint).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::invalid_argument("scheduler", format!("cannot serialize: {e}")))
    }

    /// A state from [`RecapScheduler::to_json`]'s output; checked like [`RecapScheduler::new`].
    pub fn from_json(json: &str) -> Result<Self> {
        let s: RecapScheduler = serde_json::from_str(json)
            .map_err(|e| Error::invalid_argument("json", format!("not a scheduler state: {e}")))?;
        let fresh = RecapScheduler::new(&s.orientations, s.config.clone())?;
        let cap = 2 * s.config.window;
        if s.history.len() != fresh.history.len()
            || s.history
                .iter()
                .any(|h| h.len() > cap || h.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::invalid_argument(
                "json",
                "inconsistent scheduler state (history)",
            ));
        }
        Ok(s)
    }
}

/// `K softmax(z)`, its maximum subtracted.
fn softmax(z: impl Iterator<Item = f64>, k: usize) -> Vec<f64> {
    let z: Vec<f64> = z.collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| k as f64 * x / sum).collect()
}

fn cap(x: f64) -> f64 {
    if x.is_nan() {
        1.0
    } else {
        x.clamp(-SIGNAL_CAP, SIGNAL_CAP)
    }
}
