//! The RECAP scheduler: dynamic objective weights from short-horizon signals of convergence and
//! instability (host side, pure Rust).
//!
//! Each of K objectives reports one scalar per step, with an orientation: a loss (lower is better)
//! or a reward (higher is better). The scheduler keeps the last `2W` values of each (W = 10). While
//! fewer than `2W` exist, every weight is 1. Then, per objective:
//!
//! ```text
//! mu      = mean of the latest W values      mu_prev = mean of the W before them
//! sigma   = sample standard deviation of the 2W values
//! c       = mu_prev / mu (loss)  or  mu / mu_prev (reward)      (c > 1: improving)
//! i       = sigma / (|mu| + |mu_prev|)
//! s       = c + i                (or alpha c + (1 - alpha) i, the paper's appendix, alpha = 0.5)
//! lambda  = K softmax(s / T)     (T = 5; the weights average 1)
//! ```
//!
//! and the step loss is `(1/K) sum_k lambda_k L_k` (the `lambda` input of the fused loss).
//!
//! Guards (never a NaN weight): an observation that is not finite is rejected with an error and
//! leaves the state unchanged; `c = 1` (no evidence either way) when `mu` or `mu_prev` is 0 or the
//! two have opposite signs; `i = 0` when `|mu| + |mu_prev| = 0`; `c` and `i` are capped at
//! [`SIGNAL_CAP`]; the softmax subtracts its maximum. The state serializes (serde, JSON), so a run
//! resumes from a checkpoint with identical weights.

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
            _ => Err(Error::arg(
                "orientations",
                format!("expected \"reward\" (higher is better) or \"loss\" (lower is better), got {s:?}"),
            )),
        }
    }
}

/// Scheduler settings (the paper's defaults). Deserializes from any subset of its fields (the rest
/// default; unknown ones are an error), the form in which the bindings pass them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecapConfig {
    /// W: values per half-window (the buffer holds 2W).
    pub window: usize,
    /// T: softmax temperature.
    pub temperature: f64,
    /// `Some(alpha)`: priority `alpha c + (1 - alpha) i`; `None`: `c + i`.
    pub alpha: Option<f64>,
}

impl Default for RecapConfig {
    fn default() -> Self {
        RecapConfig {
            window: 10,
            temperature: 5.0,
            alpha: None,
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
    /// Convergence `c` (> 1: improving).
    pub convergence: f64,
    /// Instability `i`.
    pub instability: f64,
    /// Priority `s`.
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
        if orientations.is_empty() {
            return Err(Error::arg(
                "orientations",
                "expected at least one objective",
            ));
        }
        if config.window == 0 {
            return Err(Error::arg("config.window", "expected a window W >= 1"));
        }
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(Error::arg(
                "config.temperature",
                format!(
                    "expected a finite temperature > 0, got {}",
                    config.temperature
                ),
            ));
        }
        if let Some(a) = config.alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err(Error::arg(
                    "config.alpha",
                    format!("expected 0 <= alpha <= 1, got {a}"),
                ));
            }
        }
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
            return Err(Error::arg(
                "values",
                format!(
                    "expected K = {} values, got {}",
                    self.orientations.len(),
                    values.len()
                ),
            ));
        }
        if let Some((k, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::arg(
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

    /// Each objective's signals, or `None` while fewer than 2W values exist.
    pub fn signals(&self) -> Option<Vec<Signals>> {
        let w = self.config.window;
        if self.history.iter().any(|h| h.len() < 2 * w) {
            return None;
        }
        Some(
            self.history
                .iter()
                .zip(&self.orientations)
                .map(|(h, o)| {
                    let prev = h.iter().take(w).sum::<f64>() / w as f64;
                    let mu = h.iter().skip(w).sum::<f64>() / w as f64;
                    let mean = (prev + mu) / 2.0;
                    let var =
                        h.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (2 * w - 1) as f64;
                    let sigma = var.sqrt();
                    let comparable = mu != 0.0 && prev != 0.0 && (mu > 0.0) == (prev > 0.0);
                    let c = if comparable {
                        match o {
                            Orientation::Loss => prev / mu,
                            Orientation::Reward => mu / prev,
                        }
                    } else {
                        1.0
                    };
                    let den = mu.abs() + prev.abs();
                    let i = if den > 0.0 { sigma / den } else { 0.0 };
                    let (c, i) = (cap(c), cap(i));
                    let s = match self.config.alpha {
                        Some(a) => a * c + (1.0 - a) * i,
                        None => c + i,
                    };
                    Signals {
                        mu,
                        mu_prev: prev,
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
        let z: Vec<f64> = sig
            .iter()
            .map(|s| s.priority / self.config.temperature)
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| (k as f64 * x / sum) as f32).collect()
    }

    /// The state as JSON (a checkpoint).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::arg("scheduler", format!("cannot serialize: {e}")))
    }

    /// A state from [`RecapScheduler::to_json`]'s output; checked like [`RecapScheduler::new`].
    pub fn from_json(json: &str) -> Result<Self> {
        let s: RecapScheduler = serde_json::from_str(json)
            .map_err(|e| Error::arg("json", format!("not a scheduler state: {e}")))?;
        let fresh = RecapScheduler::new(&s.orientations, s.config.clone())?;
        let cap = 2 * s.config.window;
        if s.history.len() != fresh.history.len()
            || s.history
                .iter()
                .any(|h| h.len() > cap || h.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::arg("json", "inconsistent scheduler state (history)"));
        }
        Ok(s)
    }
}

fn cap(x: f64) -> f64 {
    if x.is_nan() {
        1.0
    } else {
        x.clamp(-SIGNAL_CAP, SIGNAL_CAP)
    }
}
