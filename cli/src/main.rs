//! `recap`: the command-line driver. `recap train` runs RECAP training of a small synthetic policy
//! on the CPU or the GPU; `recap experiment` compares the weightings over seeds; `recap bench`
//! measures every op and a training step.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use recap_cli::train::experiment::{self, ExperimentConfig};
use recap_cli::train::{
    summary, train_with, Apply, Device, Event, Preset, StepMetrics, TrainConfig, Weighting,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// A parser for one of the library's named options: its names are the possible values (listed in
/// `--help` and in the error for any other), parsed by the option's own `FromStr`.
fn one_of<T>(all: &'static [T]) -> impl TypedValueParser<Value = T>
where
    T: Copy + std::fmt::Display + std::str::FromStr + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    PossibleValuesParser::new(all.iter().map(|v| v.to_string())).try_map(|s| s.parse::<T>())
}

#[derive(Parser)]
#[command(
    name = "recap",
    version,
    about = "RECAP kernels: training driver and benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// RECAP training of a small synthetic policy through the fused-linear GRPO loss.
    Train(TrainArgs),
    /// Times every op and a training step beside the copy bandwidth measured in the same run.
    Bench(BenchArgs),
    /// The paper's comparison in miniature: every weighting (rl-only, uniform, recap) x where the
    /// weights act (loss, reward) x seeds, then a table of in-task rewards and general capability.
    Experiment(ExperimentArgs),
}

#[derive(Args)]
struct ExperimentArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Seeds 0..N (20: the paired intervals on the small preset come out narrower than the effects
    /// they separate, docs/train.md; 200 runs of the default sweep in minutes on a CPU).
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Weightings to compare (comma-separated).
    #[arg(long, value_parser = one_of(Weighting::ALL), value_delimiter = ',', default_values_t = [Weighting::RlOnly, Weighting::Uniform, Weighting::Recap])]
    weightings: Vec<Weighting>,
    /// Where the weights act (comma-separated).
    #[arg(long = "apply", value_parser = one_of(Apply::ALL), value_delimiter = ',', default_values_t = [Apply::Loss, Apply::Reward])]
    applies: Vec<Apply>,
    /// A sweep of a RECAP scheduler option, KEY=V1,V2,... (repeatable: the grid of every given
    /// option), each setting a configuration of its own beside rl-only and uniform, e.g.
    /// --recap-sweep temperature=0.25,1,5 --recap-sweep priority=sum,softmax_mixture.
    #[arg(long = "recap-sweep", value_name = "KEY=V1,V2,...")]
    recap_sweep: Vec<String>,
    /// Runs at once (default: the CPU's cores on the CPU backend, 1 on a GPU); the results do not
    /// depend on it.
    #[arg(long)]
    jobs: Option<usize>,
    /// Directory for every run's metrics.jsonl, the tables (table.md), the results with the paired
    /// intervals (results.json) and the picture (frontier.svg).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The grid of `--recap-sweep KEY=V1,V2,...` arguments (numbers and booleans as such, anything
/// else as a string).
fn sweep_grid(args: &[String]) -> Result<Vec<(String, Vec<serde_json::Value>)>, String> {
    args.iter()
        .map(|kv| {
            let (k, vs) = kv
                .split_once('=')
                .ok_or_else(|| format!("--recap-sweep {kv}: expected KEY=V1,V2,..."))?;
            let values = vs
                .split(',')
                .filter(|v| !v.is_empty())
                .map(|v| {
                    serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()))
                })
                .collect::<Vec<_>>();
            if values.is_empty() {
                return Err(format!("--recap-sweep {kv}: no values"));
            }
            Ok((k.to_string(), values))
        })
        .collect()
}

#[derive(Args)]
struct BenchArgs {
    /// auto (CUDA when usable, else the CPU reference), cpu or cuda.
    #[arg(long, value_parser = one_of(Device::ALL), default_value_t = Device::Auto)]
    device: Device,
    /// Only the cases whose name contains this text (e.g. "T=262144", "V=151936", "train_step").
    #[arg(long)]
    filter: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fewer sizes and runs: a smoke test, not for timing.
    #[arg(long)]
    quick: bool,
}

/// The settings `recap train` and `recap experiment` share; sizes left out take the preset's value.
#[derive(Args)]
struct RunArgs {
    /// Sizes and defaults: small (seconds on a CPU) or h100 (V = 32,768, H = 1,024, 65,536 rollout
    /// tokens per step).
    #[arg(long, value_parser = one_of(Preset::ALL), default_value_t = Preset::Small)]
    preset: Preset,
    /// Where to run: auto (CUDA when usable, else CPU), cpu or cuda. Default: auto.
    #[arg(long, value_parser = one_of(Device::ALL), default_value_t = Device::Auto)]
    device: Device,
    /// Training steps (the preset's: 60 small, 40 h100).
    #[arg(long)]
    steps: Option<usize>,
    /// Prompts per step.
    #[arg(long)]
    prompts: Option<usize>,
    /// Rollouts per prompt (G).
    #[arg(long)]
    group: Option<usize>,
    /// Response length (L).
    #[arg(long)]
    resp_len: Option<usize>,
    /// Vocabulary (V).
    #[arg(long)]
    vocab: Option<usize>,
    /// Feature width (H).
    #[arg(long)]
    hidden: Option<usize>,
    /// Replay sequences per step.
    #[arg(long)]
    replay_seqs: Option<usize>,
    /// Held-out general sequences (learnt before RL, never replayed, measured every step).
    #[arg(long)]
    heldout_seqs: Option<usize>,
    /// Passes of the loss per step.
    #[arg(long)]
    ppo_epochs: Option<usize>,
    /// AdamW learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// The RECAP scheduler's options: `paper` (its equations, the default) or `authors` (its
    /// authors' code: mixture of softmaxes, population std over the mean, no warm-up, c > 1 when
    /// worse), then any `--recap KEY=VALUE` (window, temperature, priority, alpha, max_steps, sigma,
    /// denominator, warmup, convergence; docs/recap.md).
    #[arg(long, default_value = "paper", value_parser = ["paper", "authors"])]
    recap_preset: String,
    /// A scheduler option, KEY=VALUE (repeatable), e.g. --recap sigma=population --recap alpha=annealed.
    #[arg(long = "recap", value_name = "KEY=VALUE")]
    recap: Vec<String>,
}

impl RunArgs {
    fn config(&self) -> Result<TrainConfig, String> {
        let p = TrainConfig::preset(self.preset);
        let base =
            recap_kernels::RecapConfig::preset(&self.recap_preset).map_err(|e| e.to_string())?;
        let mut json = serde_json::to_value(&base).map_err(|e| e.to_string())?;
        for kv in &self.recap {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--recap {kv}: expected KEY=VALUE"))?;
            // numbers and booleans as such, anything else as a string
            let value =
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
            json[k] = value;
        }
        let recap =
            recap_kernels::RecapConfig::from_json(&json.to_string()).map_err(|e| e.to_string())?;
        Ok(TrainConfig {
            device: self.device,
            steps: self.steps.unwrap_or(p.steps),
            prompts: self.prompts.unwrap_or(p.prompts),
            group: self.group.unwrap_or(p.group),
            resp_len: self.resp_len.unwrap_or(p.resp_len),
            vocab: self.vocab.unwrap_or(p.vocab),
            hidden: self.hidden.unwrap_or(p.hidden),
            replay_seqs: self.replay_seqs.unwrap_or(p.replay_seqs),
            heldout_seqs: self.heldout_seqs.unwrap_or(p.heldout_seqs),
            ppo_epochs: self.ppo_epochs.unwrap_or(p.ppo_epochs),
            lr: self.lr.unwrap_or(p.lr),
            recap,
            ..p
        })
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// How the objectives are weighted.
    #[arg(long, value_parser = one_of(Weighting::ALL), default_value_t = Weighting::Recap)]
    weighting: Weighting,
    /// Where the weights act: on the per-objective losses, or on the rewards before their group
    /// normalization (the authors' code, TRL's reward_weights).
    #[arg(long, value_parser = one_of(Apply::ALL), default_value_t = Apply::Loss)]
    apply: Apply,
    /// Seed of the task, the initial weights and the sampling (a seed reproduces a run).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for metrics.jsonl (a line per step) and curves.svg (rewards, weights, NLLs and
    /// pass@k over the steps).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write checkpoints into this directory (checkpoint.safetensors, atomically): after the last
    /// step, and every --checkpoint-every steps.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: a checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from a checkpoint directory up to --steps (metrics.jsonl keeps the steps before
    /// it and is appended to).
    #[arg(long)]
    resume: Option<PathBuf>,
}

impl TrainArgs {
    fn config(self) -> Result<TrainConfig, String> {
        Ok(TrainConfig {
            weighting: self.weighting,
            apply: self.apply,
            seed: self.seed,
            out: self.out,
            checkpoint: self.checkpoint,
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            ..self.run.config()?
        })
    }
}

/// A progress bar on a terminal; one log line per 5 % of the steps otherwise.
struct Progress {
    steps: usize,
    tty: bool,
}

impl Progress {
    fn event(&self, e: Event<'_>) {
        let mut err = std::io::stderr().lock();
        match e {
            Event::Info(line) => {
                let _ = writeln!(err, "recap train: {line}");
            }
            Event::Step(m) => {
                let done = m.step + 1;
                let line = status(m);
                if self.tty {
                    let width = 24;
                    let fill = done * width / self.steps.max(1);
                    let _ = write!(
                        err,
                        "\r[{}{}] {done}/{} {line}\x1b[K",
                        "#".repeat(fill),
                        ".".repeat(width - fill),
                        self.steps
                    );
                    if done == self.steps {
                        let _ = writeln!(err);
                    }
                } else if done % (self.steps / 20).max(1) == 0 || done == self.steps {
                    let _ = writeln!(err, "step {done}/{} {line}", self.steps);
                }
            }
        }
    }
}

fn status(m: &StepMetrics) -> String {
    format!(
        "format {:.3} accuracy {:.3} overlap {:.3} general_nll {:.3} lambda [{}] {:.0} ms {:.0} tok/s",
        m.format,
        m.accuracy,
        m.overlap,
        m.general_nll.or(m.heldout_nll).unwrap_or(f64::NAN),
        m.lambda
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        m.step_time_ms,
        m.tokens_per_s
    )
}

fn bench(args: BenchArgs) -> ExitCode {
    let cfg = recap_cli::bench::BenchConfig {
        device: Some(args.device),
        filter: args.filter,
        quick: args.quick,
    };
    let report = match recap_cli::bench::run(&cfg, &mut |line| eprintln!("recap bench: {line}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("recap bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", recap_cli::bench::table(&report));
    if let Some(path) = args.json {
        if let Err(e) = recap_cli::bench::write_json(&report, &path) {
            eprintln!("recap bench: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("recap bench: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

fn experiment(args: ExperimentArgs) -> ExitCode {
    let base = match args.run.config() {
        Ok(c) => TrainConfig {
            out: args.out.clone(),
            ..c
        },
        Err(e) => {
            eprintln!("recap experiment: {e}");
            return ExitCode::FAILURE;
        }
    };
    let variants = match sweep_grid(&args.recap_sweep)
        .and_then(|g| experiment::sweep(&base.recap, &g).map_err(|e| e.to_string()))
    {
        Ok(v) if args.recap_sweep.is_empty() => {
            let _ = v;
            Vec::new()
        }
        Ok(v) => v,
        Err(e) => {
            eprintln!("recap experiment: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = ExperimentConfig {
        seeds: (0..args.seeds).collect(),
        weightings: args.weightings,
        applies: args.applies,
        variants,
        // runs in parallel on the CPU backend (auto without a CUDA driver is the CPU); one at a time
        // on a GPU
        jobs: args.jobs.unwrap_or(
            if base.device == Device::Cpu
                || (base.device == Device::Auto && !recap_kernels::cuda::driver_present())
            {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                1
            },
        ),
        ..ExperimentConfig::new(base)
    };
    let runs = match experiment::run(&cfg, &mut |e| {
        if let Event::Info(line) = e {
            eprintln!("recap experiment: {line}");
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("recap experiment: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table = experiment::table(&runs);
    print!("{table}");
    if let Some(dir) = &args.out {
        let json = experiment::results_json(&runs);
        let svg = match recap_cli::train::plots::frontier_svg(&experiment::summarize(&runs)) {
            Ok(svg) => svg,
            Err(e) => {
                eprintln!("recap experiment: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (name, text) in [
            ("table.md", table.as_str()),
            ("results.json", json.as_str()),
            ("frontier.svg", svg.as_str()),
        ] {
            if let Err(e) = recap_cli::train::write_atomic(&dir.join(name), text.as_bytes()) {
                eprintln!("recap experiment: {e}");
                return ExitCode::FAILURE;
            }
        }
        eprintln!(
            "recap experiment: wrote table.md, results.json and frontier.svg in {}",
            dir.display()
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Train(a) => a,
        Command::Bench(a) => return bench(a),
        Command::Experiment(a) => return experiment(a),
    };
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("recap train: {e}");
            return ExitCode::FAILURE;
        }
    };
    let progress = Progress {
        steps: cfg.steps,
        tty: std::io::stderr().is_terminal(),
    };
    match train_with(&cfg, &mut |e| progress.event(e)) {
        Ok(records) => {
            println!("{}", summary(&records));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("recap train: {e}");
            ExitCode::FAILURE
        }
    }
}
