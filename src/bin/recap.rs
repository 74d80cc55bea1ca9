//! `recap`: the command-line driver. `recap train` runs RECAP training of a small synthetic policy.

use clap::{Args, Parser, Subcommand};
use recap_kernels::train::{summary, train, TrainConfig, Weighting};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "recap", about = "RECAP kernels: training driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// RECAP training of a small synthetic policy through the fused-linear GRPO loss.
    Train(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Where to run (the CUDA path of the driver is not implemented yet: cpu).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value_t = Weighting::Recap)]
    weighting: Weighting,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for metrics.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Prompts per step.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Rollouts per prompt (G).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Response length (L).
    #[arg(long, default_value_t = 8)]
    resp_len: usize,
    /// Vocabulary (V).
    #[arg(long, default_value_t = 64)]
    vocab: usize,
    /// Feature width (H).
    #[arg(long, default_value_t = 32)]
    hidden: usize,
    /// Passes of the loss per step.
    #[arg(long, default_value_t = 2)]
    ppo_epochs: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
}

impl From<TrainArgs> for TrainConfig {
    fn from(a: TrainArgs) -> Self {
        TrainConfig {
            steps: a.steps,
            seed: a.seed,
            weighting: a.weighting,
            out: a.out,
            prompts: a.prompts,
            group: a.group,
            resp_len: a.resp_len,
            vocab: a.vocab,
            hidden: a.hidden,
            ppo_epochs: a.ppo_epochs,
            lr: a.lr,
            progress: true,
            ..TrainConfig::default()
        }
    }
}

fn main() -> ExitCode {
    let Command::Train(args) = Cli::parse().command;
    if args.device != "cpu" && args.device != "auto" {
        eprintln!(
            "recap train: --device {}: only the CPU path exists so far (use cpu or auto)",
            args.device
        );
        return ExitCode::FAILURE;
    }
    match train(&args.into()) {
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
