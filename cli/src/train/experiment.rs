//! `recap experiment`: the paper's comparison in miniature. Every weighting (RL only, uniform,
//! RECAP, and RECAP under each scheduler setting of a sweep) under each place the weights act (the
//! losses, the rewards) for several seeds, the same task and steps, then a table of the in-task
//! rewards and the general capability (the NLL of the replay and of the held-out general
//! sequences, and how much it moved from the first step), with pass@k and the support of correct
//! answers, as mean +- std over the seeds; and each configuration compared with uniform replay on
//! the same seeds (same data, same initial policy): the mean paired difference per metric with its
//! 95 % t-interval.

use super::config::{Apply, TrainConfig, Weighting};
use super::metrics::StepMetrics;
use super::summary::{mean, Field};
use super::Event;
use recap_kernels::error::{Error, Result};
use std::time::Instant;

/// What to run.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    /// Sizes, steps, device and scheduler options of every run (its seed, weighting and apply are
    /// set per run).
    pub base: TrainConfig,
    /// Seeds (at least 2 for an interval).
    pub seeds: Vec<u64>,
    /// The weightings compared.
    pub weightings: Vec<Weighting>,
    /// Where the weights act, each compared.
    pub applies: Vec<Apply>,
    /// Steps at the end of a run averaged into its result (and at the start, for the change).
    pub window: usize,
    /// The RECAP scheduler settings compared (a sweep), each a configuration of its own; empty:
    /// one, `base.recap`, named "recap".
    pub variants: Vec<Variant>,
    /// Runs at once (threads; each run is deterministic, so the results do not depend on it).
    pub jobs: usize,
}

/// One RECAP scheduler setting of a sweep: its name in the table (e.g. `recap temperature=0.25`)
/// and its options.
#[derive(Clone, Debug)]
pub struct Variant {
    /// The configuration's name.
    pub name: String,
    /// The scheduler options.
    pub recap: recap_kernels::RecapConfig,
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
            variants: Vec::new(),
            jobs: 1,
        }
    }

    /// The configurations of one apply: `(name, weighting, scheduler options)`.
    fn configurations(&self) -> Vec<(String, Weighting, recap_kernels::RecapConfig)> {
        let mut out = Vec::new();
        for &w in &self.weightings {
            if w == Weighting::Recap && !self.variants.is_empty() {
                for v in &self.variants {
                    out.push((v.name.clone(), w, v.recap.clone()));
                }
            } else {
                out.push((name(w).to_string(), w, self.base.recap.clone()));
            }
        }
        out
    }
}

/// The variants of a sweep: the grid of every `(KEY, [values])` (each value a JSON value) over
/// `base`, each named `recap KEY=VALUE ...`; an option that does not parse is an error naming it.
/// The key `preset` takes `paper` (the paper's equations) or `authors` (its authors' code:
/// [`recap_kernels::RecapConfig::authors_code`] with alpha 1) and sets every option first, the other keys
/// on top of it.
pub fn sweep(
    base: &recap_kernels::RecapConfig,
    grid: &[(String, Vec<serde_json::Value>)],
) -> Result<Vec<Variant>> {
    let mut grid = grid.to_vec();
    grid.sort_by_key(|(k, _)| k != "preset"); // the presets first (stable: the rest keep their order)
    let mut out = vec![(
        String::from("recap"),
        serde_json::to_value(base).map_err(|e| {
            Error::invalid_argument(
                "recap",
                format!("cannot serialize the scheduler options: {e}"),
            )
        })?,
    )];
    for (key, values) in &grid {
        if values.is_empty() {
            return Err(Error::invalid_argument(
                "recap_sweep",
                format!("{key}: expected at least one value"),
            ));
        }
        let mut next = Vec::new();
        for (n, json) in &out {
            for v in values {
                let mut j = json.clone();
                if key == "preset" {
                    let preset = recap_kernels::RecapConfig::preset(v.as_str().unwrap_or_default())
                        .map_err(|_| {
                            Error::invalid_argument(
                                "recap_sweep",
                                format!("preset: expected paper or authors, got {v}"),
                            )
                        })?;
                    j = serde_json::to_value(preset).map_err(|e| {
                        Error::invalid_argument("recap_sweep", format!("preset: {e}"))
                    })?;
                } else {
                    j[key] = v.clone();
                }
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                next.push((format!("{n} {key}={shown}"), j));
            }
        }
        out = next;
    }
    out.into_iter()
        .map(|(name, json)| {
            Ok(Variant {
                name,
                recap: recap_kernels::RecapConfig::from_json(&json.to_string())?,
            })
        })
        .collect()
}

/// One run's result: the means of its last `window` steps, and of its first ones.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// The run's configuration: its weighting's name, or for a sweep's RECAP settings
    /// `recap KEY=VALUE ...`.
    pub config: String,
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
    config: &str,
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
        config: config.to_string(),
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
    let configs = cfg.configurations();
    let mut jobs = Vec::new();
    for &apply in &cfg.applies {
        for (config, weighting, recap) in &configs {
            for &seed in &cfg.seeds {
                jobs.push((config.clone(), *weighting, recap.clone(), apply, seed));
            }
        }
    }
    let total = jobs.len();
    let one = |(config, weighting, recap, apply, seed): &(
        String,
        Weighting,
        recap_kernels::RecapConfig,
        Apply,
        u64,
    )|
     -> Result<RunResult> {
        let run_cfg = TrainConfig {
            seed: *seed,
            weighting: *weighting,
            apply: *apply,
            recap: recap.clone(),
            out: cfg.base.out.as_ref().map(|d| {
                d.join(format!(
                    "{}-{}-seed{seed}",
                    config.replace([' ', '='], "_"),
                    apply_name(*apply)
                ))
            }),
            checkpoint: None,
            resume: None,
            ..cfg.base.clone()
        };
        let started = Instant::now();
        let records = super::train(&run_cfg)?;
        Ok(result(
            config,
            *weighting,
            *apply,
            *seed,
            &records,
            cfg.window,
            started.elapsed().as_secs_f64(),
        ))
    };
    // the runs are independent (each its own seed, task and policy): `jobs` workers take them in
    // turn; the results keep the runs' order, so the tables do not depend on the workers
    let workers = cfg.jobs.clamp(1, total.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<RunResult>)>();
    let mut out: Vec<Option<RunResult>> = vec![None; total];
    let mut first_err = None;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (tx, next, jobs, one) = (tx.clone(), &next, &jobs, &one);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= jobs.len() {
                    break;
                }
                let r = one(&jobs[i]);
                let failed = r.is_err();
                if tx.send((i, r)).is_err() || failed {
                    // stop handing out runs after an error
                    next.store(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            });
        }
        drop(tx);
        let mut done = 0;
        for (i, r) in rx {
            match r {
                Ok(r) => {
                    done += 1;
                    on_event(Event::Info(format!(
                        "run {done}/{total}: {} on the {}, seed {}: accuracy {:.3}, general_nll {:+.4}, {:.1} s",
                        r.config,
                        apply_name(r.apply),
                        r.seed,
                        r.values[1].2,
                        r.values[4].2 - r.values[4].1,
                        r.wall_s
                    )));
                    out[i] = Some(r);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(out.into_iter().flatten().collect())
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

/// A mean over `n` samples with its two-sided 95 % t-interval, `mean +- t(0.975, n - 1) s / sqrt(n)`
/// (`s` the sample standard deviation); no interval (NaN bounds) with fewer than 2 samples.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    /// The mean.
    pub mean: f64,
    /// The interval's lower bound.
    pub ci_low: f64,
    /// Its upper bound.
    pub ci_high: f64,
    /// The samples.
    pub n: usize,
}

impl Interval {
    /// The mean of `x` and its 95 % t-interval.
    pub fn of(x: &[f64]) -> Interval {
        let (m, sd) = mean_std(x);
        let half = if x.len() >= 2 {
            t_quantile_975(x.len() - 1) * sd / (x.len() as f64).sqrt()
        } else {
            f64::NAN
        };
        Interval {
            mean: m,
            ci_low: m - half,
            ci_high: m + half,
            n: x.len(),
        }
    }

    /// Whether the interval excludes 0 (the difference is resolved at 95 %).
    pub fn excludes_zero(&self) -> bool {
        self.ci_low > 0.0 || self.ci_high < 0.0
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (statrs).
fn t_quantile_975(df: usize) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    StudentsT::new(0.0, 1.0, df as f64).map_or(f64::NAN, |t| t.inverse_cdf(0.975))
}

/// A run's value of column `j`: its last window's mean, or for a change column (the general NLLs)
/// last minus first window.
fn column(r: &RunResult, j: usize) -> f64 {
    let (_, first, last) = &r.values[j];
    if COLUMNS[j].1 {
        last - first
    } else {
        *last
    }
}

/// One configuration of an experiment, summarized over its seeds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ConfigSummary {
    /// Where its weights acted.
    pub apply: Apply,
    /// Its name.
    pub config: String,
    /// Its weighting.
    pub weighting: Weighting,
    /// The seeds it ran.
    pub seeds: Vec<u64>,
    /// Steps per run.
    pub steps: usize,
    /// Its runs' wall time, seconds.
    pub wall_s: f64,
    /// Each column's mean over the seeds with its 95 % t-interval (the NLL changes: last minus first
    /// window).
    pub metrics: std::collections::BTreeMap<String, Interval>,
    /// Each column's difference from uniform replay on the same seeds (same data, same initial
    /// policy): the mean paired difference and its 95 % t-interval; `None` for uniform itself or
    /// without uniform runs of this apply.
    pub paired_vs_uniform: Option<std::collections::BTreeMap<String, Interval>>,
}

/// Every configuration of `runs` (in their order), summarized, with its paired comparison to
/// uniform replay on the seeds both ran.
pub fn summarize(runs: &[RunResult]) -> Vec<ConfigSummary> {
    let mut keys: Vec<(Apply, String)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.apply, r.config.clone())) {
            keys.push((r.apply, r.config.clone()));
        }
    }
    keys.into_iter()
        .map(|(apply, config)| {
            let rs: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.apply == apply && r.config == config)
                .collect();
            let uniform: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.apply == apply && r.weighting == Weighting::Uniform)
                .collect();
            let metrics = (0..COLUMNS.len())
                .map(|j| {
                    let x: Vec<f64> = rs.iter().map(|r| column(r, j)).collect();
                    (COLUMNS[j].0 .0.to_string(), Interval::of(&x))
                })
                .collect();
            let paired =
                (rs[0].weighting != Weighting::Uniform && !uniform.is_empty()).then(|| {
                    (0..COLUMNS.len())
                        .map(|j| {
                            let d: Vec<f64> = rs
                                .iter()
                                .filter_map(|r| {
                                    let u = uniform.iter().find(|u| u.seed == r.seed)?;
                                    Some(column(r, j) - column(u, j))
                                })
                                .collect();
                            (COLUMNS[j].0 .0.to_string(), Interval::of(&d))
                        })
                        .collect()
                });
            ConfigSummary {
                apply,
                weighting: rs[0].weighting,
                seeds: rs.iter().map(|r| r.seed).collect(),
                steps: rs[0].steps,
                wall_s: rs.iter().map(|r| r.wall_s).sum(),
                metrics,
                paired_vs_uniform: paired,
                config,
            }
        })
        .collect()
}

/// The results file: every run and every configuration's summary (with `paired_vs_uniform`).
pub fn results_json(runs: &[RunResult]) -> String {
    let v = serde_json::json!({
        "interval": "95 % Student t-interval over the seeds (paired: of the per-seed differences from uniform)",
        "configs": summarize(runs),
        "runs": runs,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The paper-style tables: one row per configuration and apply, each column the mean +- std over
/// the seeds of the last window's value (or, for the NLL changes, last minus first window); then
/// each configuration against uniform replay on the same seeds, the mean paired difference and
/// its 95 % t-interval (an interval that excludes 0 is marked `*`).
pub fn table(runs: &[RunResult]) -> String {
    let sums = summarize(runs);
    let mut s = String::from("| configuration | weights on |");
    for ((name, _), _) in COLUMNS {
        s += &format!(" {name} |");
    }
    s += " seeds | steps | wall time |\n|---|---|";
    s += &"---|".repeat(COLUMNS.len() + 3);
    s += "\n";
    for c in &sums {
        s += &format!("| {} | {} |", c.config, apply_name(c.apply));
        for (j, (_, change)) in COLUMNS.iter().enumerate() {
            let x: Vec<f64> = runs
                .iter()
                .filter(|r| r.apply == c.apply && r.config == c.config)
                .map(|r| column(r, j))
                .collect();
            let (m, sd) = mean_std(&x);
            s += &if *change {
                format!(" {m:+.4} ± {sd:.4} |")
            } else {
                format!(" {m:.4} ± {sd:.4} |")
            };
        }
        s += &format!(" {} | {} | {:.1} s |\n", c.seeds.len(), c.steps, c.wall_s);
    }
    if sums.iter().any(|c| c.paired_vs_uniform.is_some()) {
        s += "\nPaired against uniform replay on the same seeds: mean difference [95 % t-interval]; * the \
              interval excludes 0.\n\n| configuration | weights on |";
        for ((name, _), _) in COLUMNS {
            s += &format!(" {name} |");
        }
        s += "\n|---|---|";
        s += &"---|".repeat(COLUMNS.len());
        s += "\n";
        for c in &sums {
            let Some(p) = &c.paired_vs_uniform else {
                continue;
            };
            s += &format!("| {} | {} |", c.config, apply_name(c.apply));
            for ((name, _), _) in COLUMNS {
                let i = p[name];
                s += &format!(
                    " {:+.4} [{:+.4}, {:+.4}]{} |",
                    i.mean,
                    i.ci_low,
                    i.ci_high,
                    if i.excludes_zero() { " *" } else { "" }
                );
            }
            s += "\n";
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: &str, weighting: Weighting, seed: u64, accuracy: f64) -> RunResult {
        RunResult {
            config: config.into(),
            weighting,
            apply: Apply::Loss,
            seed,
            steps: 10,
            wall_s: 1.0,
            values: COLUMNS
                .iter()
                .map(|((name, _), _)| {
                    let v = if *name == "accuracy" { accuracy } else { 0.5 };
                    (name.to_string(), 0.0, v)
                })
                .collect(),
        }
    }

    /// By hand: uniform's accuracies 0.5, 0.6, 0.7 and RECAP's 0.6, 0.65, 0.9 on seeds 0..3 differ by
    /// 0.1, 0.05, 0.2 (mean 0.116667, sample sd 0.076376); t(0.975, 2) = 4.302653, so the interval
    /// is 0.116667 +- 4.302653 * 0.076376 / sqrt(3) = +- 0.189729. A seed uniform did not run is
    /// left out of the pairs; identical metrics differ by 0 with a zero-width interval.
    #[test]
    fn paired_differences_and_their_t_interval_by_hand() {
        let mut runs = vec![];
        for (s, (u, r)) in [(0.5, 0.6), (0.6, 0.65), (0.7, 0.9)]
            .into_iter()
            .enumerate()
        {
            runs.push(run("uniform", Weighting::Uniform, s as u64, u));
            runs.push(run("recap", Weighting::Recap, s as u64, r));
        }
        runs.push(run("recap", Weighting::Recap, 7, 0.1)); // no uniform run of seed 7
        let sums = summarize(&runs);
        assert_eq!(sums.len(), 2);
        assert!(sums[0].paired_vs_uniform.is_none());
        let p = sums[1].paired_vs_uniform.as_ref().unwrap();
        let acc = p["accuracy"];
        assert_eq!(acc.n, 3);
        approx::assert_abs_diff_eq!(acc.mean, 0.116_666_7, epsilon = 1e-6);
        approx::assert_abs_diff_eq!(acc.ci_low, 0.116_666_7 - 0.189_729, epsilon = 1e-5);
        approx::assert_abs_diff_eq!(acc.ci_high, 0.116_666_7 + 0.189_729, epsilon = 1e-5);
        assert!(!acc.excludes_zero());
        let fmt = p["format"];
        assert_eq!((fmt.mean, fmt.ci_low, fmt.ci_high), (0.0, 0.0, 0.0));
        // its own metrics: over its 4 seeds
        assert_eq!(sums[1].metrics["accuracy"].n, 4);
        approx::assert_abs_diff_eq!(t_quantile_975(2), 4.302_652_7, epsilon = 1e-6);
        approx::assert_abs_diff_eq!(t_quantile_975(19), 2.093_024_1, epsilon = 1e-6);
        let one = Interval::of(&[1.0]);
        assert!(one.ci_low.is_nan() && one.mean == 1.0);
        let table = table(&runs);
        assert!(
            table.contains("| recap | loss | ") && table.contains("+0.1167 [-0.0731, +0.3064]")
        );
    }

    #[test]
    fn a_sweep_is_the_grid_of_its_options() {
        let grid = vec![
            ("temperature".to_string(), vec![0.25.into(), 5.into()]),
            (
                "priority".to_string(),
                vec!["sum".into(), "softmax_mixture".into()],
            ),
        ];
        let v = sweep(&recap_kernels::RecapConfig::default(), &grid).unwrap();
        let names: Vec<&str> = v.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "recap temperature=0.25 priority=sum",
                "recap temperature=0.25 priority=softmax_mixture",
                "recap temperature=5 priority=sum",
                "recap temperature=5 priority=softmax_mixture"
            ]
        );
        assert_eq!(v[2].recap.temperature, 5.0);
        // the preset first, whatever the order given: the other options apply on top of it
        let grid = vec![
            ("temperature".to_string(), vec![1.into()]),
            ("preset".to_string(), vec!["paper".into(), "authors".into()]),
        ];
        let v = sweep(&recap_kernels::RecapConfig::default(), &grid).unwrap();
        assert_eq!(v[1].name, "recap preset=authors temperature=1");
        assert_eq!(
            v[1].recap,
            recap_kernels::RecapConfig {
                temperature: 1.0,
                ..recap_kernels::RecapConfig::authors_code(recap_kernels::recap::Alpha::Constant(
                    1.0
                ))
            }
        );
        assert_eq!(
            v[0].recap.priority,
            recap_kernels::RecapConfig::default().priority
        );
        let bad = vec![("windw".to_string(), vec![3.into()])];
        assert!(sweep(&recap_kernels::RecapConfig::default(), &bad)
            .unwrap_err()
            .to_string()
            .contains("windw"));
    }
}
