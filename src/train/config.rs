//! The settings of a `recap train` run: presets, where it runs, how objectives are weighted and
//! where the weights act.

use crate::recap::RecapConfig;
use std::path::PathBuf;

/// How objective weights are set.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Weighting {
    /// RECAP's dynamic weights.
    Recap,
    /// All weights 1.
    Uniform,
    /// The RL objectives only, weight 1: the replay objective is left out of the loss (its
    /// sequences are still measured), the baseline that forgets.
    RlOnly,
}

/// Where the objective weights act.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Apply {
    /// On the losses: one GRPO objective per reward with its own advantages, and the replay NLL,
    /// `L = (1/K) sum_k lambda_k L_k`.
    Loss,
    /// On the rewards (the authors' code, TRL's `reward_weights`): the advantage of
    /// `sum_k lambda_k r_k` (sum, then group-normalize) for one policy objective, and the replay
    /// NLL weighted by its lambda.
    Reward,
}

/// Where the step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA device 0 when usable, else the CPU (the reason is reported).
    Auto,
    /// The CPU reference.
    Cpu,
    /// CUDA device 0 (an error when unusable).
    Cuda,
}

/// Named sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Finishes in seconds on a 2-core CPU.
    Small,
    /// Exercises an H100: V = 32,768, H = 1,024, 65,536 rollout tokens per step.
    H100,
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub device: Device,
    pub steps: usize,
    pub seed: u64,
    pub prompts: usize,
    pub group: usize,
    pub resp_len: usize,
    pub vocab: usize,
    pub hidden: usize,
    /// Replay sequences per step (learnt before RL; RL can erode them).
    pub replay_seqs: usize,
    /// Held-out general sequences: learnt before RL with the replay sequences but never replayed,
    /// measured every step (`heldout_nll`).
    pub heldout_seqs: usize,
    pub ppo_epochs: usize,
    pub lr: f32,
    pub weighting: Weighting,
    /// Where the weights act.
    pub apply: Apply,
    /// The scheduler's options (for `Weighting::Recap`).
    pub recap: RecapConfig,
    /// Directory for `metrics.jsonl`.
    pub out: Option<PathBuf>,
    /// Directory to write checkpoints into: after the last step, and every `checkpoint_every`
    /// steps when set (resume it with `resume`).
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint every N steps (with `checkpoint`).
    pub checkpoint_every: Option<usize>,
    /// A checkpoint directory to continue from (its next step up to `steps`); `metrics.jsonl` is
    /// then appended to.
    pub resume: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::preset(Preset::Small)
    }
}

impl TrainConfig {
    /// The sizes of a preset (CPU backend unless `device` is changed).
    pub fn preset(p: Preset) -> TrainConfig {
        let small = TrainConfig {
            device: Device::Cpu,
            steps: 60,
            seed: 0,
            prompts: 8,
            group: 8,
            resp_len: 8,
            vocab: 64,
            hidden: 32,
            replay_seqs: 8,
            heldout_seqs: 8,
            ppo_epochs: 2,
            lr: 0.05,
            weighting: Weighting::Recap,
            apply: Apply::Loss,
            recap: RecapConfig::default(),
            out: None,
            checkpoint: None,
            checkpoint_every: None,
            resume: None,
        };
        match p {
            Preset::Small => small,
            Preset::H100 => TrainConfig {
                device: Device::Auto,
                steps: 40,
                prompts: 64,
                group: 16,
                resp_len: 64,
                vocab: 32_768,
                hidden: 1024,
                replay_seqs: 16,
                heldout_seqs: 16,
                // per-element Adam steps move a logit by about lr * sum|phi| ~ lr sqrt(H): scaled
                // so a step moves the logits about as much as in the small preset
                lr: 0.01,
                ..small
            },
        }
    }

    /// Rollouts per step (prompts x group).
    pub fn rollouts(&self) -> usize {
        self.prompts * self.group
    }

    /// Tokens per step of the loss (rollouts and replay sequences).
    pub fn tokens(&self) -> usize {
        (self.rollouts() + self.replay_seqs) * self.resp_len
    }

    /// What identifies a run for its checkpoints: everything that changes its trajectory.
    pub(crate) fn fingerprint(&self) -> String {
        format!(
            "seed {} prompts {} group {} resp_len {} vocab {} hidden {} replay {} heldout {} epochs {} lr {} \
             weighting {:?} apply {:?} recap {}",
            self.seed,
            self.prompts,
            self.group,
            self.resp_len,
            self.vocab,
            self.hidden,
            self.replay_seqs,
            self.heldout_seqs,
            self.ppo_epochs,
            self.lr,
            self.weighting,
            self.apply,
            serde_json::to_string(&self.recap).unwrap_or_default()
        )
    }
}
