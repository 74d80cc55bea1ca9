//! `recap`: the command-line driver. `recap train` runs RECAP training of a small synthetic policy
//! on the CPU or the GPU; `recap bench` measures every op and a training step.

use clap::{Args, Parser, Subcommand};
use recap_kernels::train::{
    summary, train_with, Device, Event, Preset, StepMetrics, TrainConfig, Weighting,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

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
}

#[derive(Args)]
struct BenchArgs {
    /// auto (CUDA when usable, else the CPU reference), cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
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

/// Sizes left out take the preset's value.
#[derive(Args)]
struct TrainArgs {
    /// Sizes and defaults: small (seconds on a CPU) or h100 (V = 32,768, H = 1,024, 65,536 rollout
    /// tokens per step).
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// Where to run: auto (CUDA when usable, else CPU), cpu or cuda. Default: auto.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// How the objectives are weighted.
    #[arg(long, value_enum, default_value_t = Weighting::Recap)]
    weighting: Weighting,
    /// Training steps (the preset's: 60 small, 40 h100).
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the task, the initial weights and the sampling (a seed reproduces a run).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for metrics.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Passes of the loss per step.
    #[arg(long)]
    ppo_epochs: Option<usize>,
    /// AdamW learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Write a checkpoint into this directory after the last step.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from a checkpoint directory up to --steps (metrics.jsonl is appended to).
    #[arg(long)]
    resume: Option<PathBuf>,
}

impl From<TrainArgs> for TrainConfig {
    fn from(a: TrainArgs) -> Self {
        let p = TrainConfig::preset(a.preset);
        TrainConfig {
            device: a.device,
            weighting: a.weighting,
            seed: a.seed,
            out: a.out,
            steps: a.steps.unwrap_or(p.steps),
            prompts: a.prompts.unwrap_or(p.prompts),
            group: a.group.unwrap_or(p.group),
            resp_len: a.resp_len.unwrap_or(p.resp_len),
            vocab: a.vocab.unwrap_or(p.vocab),
            hidden: a.hidden.unwrap_or(p.hidden),
            replay_seqs: a.replay_seqs.unwrap_or(p.replay_seqs),
            ppo_epochs: a.ppo_epochs.unwrap_or(p.ppo_epochs),
            lr: a.lr.unwrap_or(p.lr),
            checkpoint: a.checkpoint,
            resume: a.resume,
        }
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
        "format {:.3} accuracy {:.3} overlap {:.3} replay_nll {:.3} lambda [{}] {:.0} ms {:.0} tok/s",
        m.format,
        m.accuracy,
        m.overlap,
        m.replay_nll,
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
    let cfg = recap_kernels::bench::BenchConfig {
        device: Some(args.device),
        filter: args.filter,
        quick: args.quick,
    };
    let report = match recap_kernels::bench::run(&cfg, &mut |line| eprintln!("recap bench: {line}"))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("recap bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", recap_kernels::bench::table(&report));
    if let Some(path) = args.json {
        if let Err(e) = recap_kernels::bench::write_json(&report, &path) {
            eprintln!("recap bench: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("recap bench: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Train(a) => a,
        Command::Bench(a) => return bench(a),
    };
    let cfg: TrainConfig = args.into();
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
