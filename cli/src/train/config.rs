//! The settings of a `recap train` run: presets, where it runs, how objectives are weighted and
//! where the weights act.

use recap_kernels::recap::RecapConfig;
use std::path::PathBuf;

/// An option enum named on the command line and in results: its variants with their names, `ALL`,
/// `Display`, `FromStr` (the error names the option and lists the accepted names) and serde by name,
/// all from one list.
macro_rules! named_options {
    ($(#[$meta:meta])* $vis:vis enum $t:ident as $arg:literal {
        $($(#[$vmeta:meta])* $v:ident = $name:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $t {
            $($(#[$vmeta])* $v,)+
        }
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: &'static [$t] = &[$($t::$v),+];
            /// The name on the command line and in results.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $name,)+
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $t {
            type Err = recap_kernels::error::Error;
            fn from_str(s: &str) -> recap_kernels::error::Result<Self> {
                $t::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = $t::ALL.iter().map(|v| v.as_str()).collect();
                    recap_kernels::error::Error::invalid_argument(
                        $arg,
                        format!("unknown value {s:?}; expected one of {}", names.join(", ")),
                    )
                })
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let name = String::deserialize(d)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_options! {
    /// How objective weights are set.
    pub enum Weighting as "weighting" {
        /// RECAP's dynamic weights.
        Recap = "recap",
        /// All weights 1.
        Uniform = "uniform",
        /// The RL objectives only, weight 1: the replay objective is left out of the loss (its
        /// sequences are still measured), the baseline that forgets.
        RlOnly = "rl-only",
    }
}

named_options! {
    /// Where the objective weights act.
    pub enum Apply as "apply" {
        /// On the losses: one GRPO objective per reward with its own advantages, and the replay
        /// NLL, `L = (1/K) sum_k lambda_k L_k`.
        Loss = "loss",
        /// On the rewards (the authors' code, TRL's `reward_weights`): the advantage of
        /// `sum_k lambda_k r_k` (sum, then group-normalize) for one policy objective, and the
        /// replay NLL weighted by its lambda.
        Reward = "reward",
    }
}

named_options! {
    /// Where the step runs.
    pub enum Device as "device" {
        /// CUDA device 0 when usable, else the CPU (the reason is reported).
        Auto = "auto",
        /// The CPU reference.
        Cpu = "cpu",
        /// CUDA device 0 (an error when unusable).
        Cuda = "cuda",
    }
}

named_options! {
    /// Named sizes.
    pub enum Preset as "preset" {
        /// Finishes in seconds on a 2-core CPU.
        Small = "small",
        /// Exercises an H100: V = 32,768, H = 1,024, 65,536 rollout tokens per step.
        H100 = "h100",
    }
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Where the step runs.
    pub device: Device,
    /// Training steps.
    pub steps: usize,
    /// Seed of the task, the initial policy and the sampling.
    pub seed: u64,
    /// Prompts per step.
    pub prompts: usize,
    /// Rollouts per prompt (the GRPO group).
    pub group: usize,
    /// Tokens per response.
    pub resp_len: usize,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Hidden size H of the policy's (fixed) features.
    pub hidden: usize,
    /// Replay sequences per step (learnt before RL; RL can erode them).
    pub replay_seqs: usize,
    /// Held-out general sequences: learnt before RL with the replay sequences but never replayed,
    /// measured every step (`heldout_nll`).
    pub heldout_seqs: usize,
    /// Optimizer passes over each step's rollouts.
    pub ppo_epochs: usize,
    /// AdamW learning rate.
    pub lr: f32,
    /// How the objective weights are set.
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
