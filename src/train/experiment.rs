//! `recap experiment`: the paper's comparison in miniature. Every weighting (RL only, uniform,
//! RECAP) under each place the weights act (the losses, the rewards) for several seeds, the same
//! task and steps, then a table of the in-task rewards and the general capability (the NLL of the
//! replay and of the held-out general sequences, and how much it moved from the first step), with
//! pass@k and the support of correct answers, as mean +- std over the seeds.

use super::config::{Apply, TrainConfig, Weighting};
use super::metrics::StepMetrics;
use super::summary::{mean, Field};
use super::Event;
use crate::error::{Error, Result};
use std::time::Instant;

/// What to run.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// Sizes, steps, device and scheduler options of every run (its seed, weighting and apply are
    /// set per run).
    pub base: TrainConfig,
    /// Seeds (at least 2 for a std).
    pub seeds: Vec<u64>,
    /// The weightings compared.
    pub weightings: Vec<Weighting>,
    /// Where the weights act, each compared.
    pub applies: Vec<Apply>,
    /// Steps at the end of a run averaged into its result (and at the start, for the change).
    pub window: usize,
}

impl ExperimentConfig {
    /// Every weighting and apply over seeds 0..5 with `base`.
    pub fn new(base: TrainConfig) -> Self {
        ExperimentConfig {
            base,
            seeds: (0..5).collect(),
            weightings: vec![Weighting::RlOnly, Weighting::Uniform, Weighting::Recap],
            applies: vec![Apply::Loss, Apply::Reward],
            window: 10,
        }
    }
}

/// One run's result: the means of its last `window` steps, and of its first ones.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// The run's weighting.
    pub weighting: Weighting,
    /// Where its weights acted.
    pub apply: Apply,
    /// Its seed.
    pub seed: u64,
    /// Steps it ran.
    pub steps: usize,
    /// Its wall time, seconds.
    pub wall_s: f64,
    /// `(name, first window, last window)` of every column of the table.
    pub values: Vec<(String, f64, f64)>,
}

/// The table's columns: the field, and whether the change from the first window is what it shows
/// (the general NLLs) rather than the last window's value.
const COLUMNS: [(Field, bool); 10] = [
    (("format", |m| m.format), false),
    (("accuracy", |m| m.accuracy), false),
    (("overlap", |m| m.overlap), false),
    (
        ("general_nll", |m| m.general_nll.unwrap_or(f64::NAN)),
        false,
    ),
    (
        ("general_nll change", |m| m.general_nll.unwrap_or(f64::NAN)),
        true,
    ),
    (
        ("heldout_nll change", |m| m.heldout_nll.unwrap_or(f64::NAN)),
        true,
    ),
    (("pass@1", |m| m.pass_at_1), false),
    (("pass@G", |m| m.pass_at_g), false),
    (("support lost", |m| m.support_lost), false),
    (("answer entropy", |m| m.answer_entropy), false),
];

fn result(
    weighting: Weighting,
    apply: Apply,
    seed: u64,
    records: &[StepMetrics],
    window: usize,
    wall_s: f64,
) -> RunResult {
    let w = window.clamp(1, records.len().max(1));
    let first = &records[..w.min(records.len())];
    let last = &records[records.len().saturating_sub(w)..];
    RunResult {
        weighting,
        apply,
        seed,
        steps: records.len(),
        wall_s,
        values: COLUMNS
            .iter()
            .map(|((name, f), _)| (name.to_string(), mean(first, f), mean(last, f)))
            .collect(),
    }
}

/// Runs every weighting x apply x seed; `on_run` hears of each finished run.
pub fn run(cfg: &ExperimentConfig, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Vec<RunResult>> {
    if cfg.seeds.is_empty() || cfg.weightings.is_empty() || cfg.applies.is_empty() {
        return Err(Error::invalid_argument(
            "experiment",
            "expected at least one seed, weighting and apply",
        ));
    }
    let total = cfg.seeds.len() * cfg.weightings.len() * cfg.applies.len();
    let mut out = Vec::with_capacity(total);
    for &apply in &cfg.applies {
        for &weighting in &cfg.weightings {
            for &seed in &cfg.seeds {
                let run_cfg = TrainConfig {
                    seed,
                    weighting,
                    apply,
                    out: cfg.base.out.as_ref().map(|d| {
                        d.join(format!(
                            "{}-{}-seed{seed}",
                            name(weighting),
                            apply_name(apply)
                        ))
                    }),
                    checkpoint: None,
                    resume: None,
                    ..cfg.base.clone()
                };
                let started = Instant::now();
                let records = super::train(&run_cfg)?;
                let r = result(
                    weighting,
                    apply,
                    seed,
                    &records,
                    cfg.window,
                    started.elapsed().as_secs_f64(),
                );
                on_event(Event::Info(format!(
                    "run {}/{total}: {} on the {}, seed {seed}: accuracy {:.3}, general_nll {:+.4}, {:.1} s",
                    out.len() + 1,
                    name(weighting),
                    apply_name(apply),
                    r.values[1].2,
                    r.values[4].2 - r.values[4].1,
                    r.wall_s
                )));
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// The CLI name of a weighting.
pub fn name(w: Weighting) -> &'static str {
    match w {
        Weighting::RlOnly => "rl-only",
        Weighting::Uniform => "uniform",
        Weighting::Recap => "recap",
    }
}

fn apply_name(a: Apply) -> &'static str {
    match a {
        Apply::Loss => "loss",
        Apply::Reward => "reward",
    }
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n.max(1.0);
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// The paper-style table: one row per weighting and apply, each column the mean +- std over the
/// seeds of the last window's value (or, for the NLL changes, last minus first window).
pub fn table(runs: &[RunResult]) -> String {
    let mut s = String::from("| weighting | weights on |");
    for ((name, _), _) in COLUMNS {
        s += &format!(" {name} |");
    }
    s += " seeds | steps | wall time |\n|---|---|";
    s += &"---|".repeat(COLUMNS.len() + 3);
    s += "\n";
    let mut keys: Vec<(Apply, Weighting)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.apply, r.weighting)) {
            keys.push((r.apply, r.weighting));
        }
    }
    for (apply, weighting) in keys {
        let rs: Vec<&RunResult> = runs
            .iter()
            .filter(|r| r.apply == apply && r.weighting == weighting)
            .collect();
        s += &format!("| {} | {} |", name(weighting), apply_name(apply));
        for (j, (_, change)) in COLUMNS.iter().enumerate() {
            let x: Vec<f64> = rs
                .iter()
                .map(|r| {
                    let (_, first, last) = &r.values[j];
                    if *change {
                        last - first
                    } else {
                        *last
                    }
                })
                .collect();
            let (m, sd) = mean_std(&x);
            s += &if *change {
                format!(" {m:+.4} ± {sd:.4} |")
            } else {
                format!(" {m:.4} ± {sd:.4} |")
            };
        }
        s += &format!(
            " {} | {} | {:.1} s |\n",
            rs.len(),
            rs.first().map_or(0, |r| r.steps),
            rs.iter().map(|r| r.wall_s).sum::<f64>()
        );
    }
    s
}
