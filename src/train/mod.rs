//! `recap train`: RECAP training of a small synthetic policy, end to end, on the CPU reference or
//! on the GPU (the same step, one definition, over either engine).
//!
//! The policy's last layer is the fused-linear path: `logits = W phi(prompt, position)`, with fixed
//! features `phi = [one-hot(position) | random(prompt, position)]` of width H, vocabulary V,
//! responses of L tokens, G rollouts per prompt. Token 0 opens and token 1 closes a response,
//! tokens 2..18 are the 16 answer tokens, position 1 is the answer slot, positions 2..L-1 the body.
//! Objectives (K = 4):
//! - `format` (reward): 0.5 for the opening tag at position 0 plus 0.5 for the closing tag at L-1;
//! - `accuracy` (reward, 0/1): the answer slot holds the prompt's hidden answer;
//! - `overlap` (reward in [0, 1]): fraction of body positions equal to the prompt's hidden target;
//! - `replay` (nll): next-token loss on fixed "general" sequences that RL updates can erode.
//!
//! Before RL the replay sequences are learnt (a "pretrained" policy that RL can make forget), then
//! modest mass is put on the tags and the answer tokens, and that policy is frozen as the reference.
//! Each step: sample G rollouts per prompt from the current policy (counter-based draws: a seed
//! reproduces a run on either engine), score, group advantages (GRPO) per RL objective, old and
//! reference log-probs, `ppo_epochs` passes of the fused GRPO loss with lambda from the RECAP
//! scheduler (or uniform) through the fused-linear path, AdamW after each, scheduler update.

mod cpu;
mod cuda;

use crate::backend::Backend;
use crate::config::{GrpoConfig, ObjectiveKind};
use crate::device_math::{draw, AdamW};
use crate::error::{Error, Result};
use crate::layout::{Advantages, Mask};
use crate::logits::{HostLogitsLossInputs, LogitsLossOutput};
use crate::recap::{Orientation, RecapConfig, RecapScheduler};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Objective names, in order.
pub const OBJECTIVES: [&str; 4] = ["format", "accuracy", "overlap", "replay"];
const OPEN: usize = 0;
const CLOSE: usize = 1;
const ANSWERS: std::ops::Range<usize> = 2..18;
/// Adam steps on the replay sequences before RL.
const PRETRAIN_STEPS: usize = 300;

/// How objective weights are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weighting {
    /// RECAP's dynamic weights.
    Recap,
    /// All weights 1.
    Uniform,
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
    pub replay_seqs: usize,
    pub ppo_epochs: usize,
    pub lr: f32,
    pub weighting: Weighting,
    /// Directory for `metrics.jsonl`.
    pub out: Option<PathBuf>,
    /// Directory to write a checkpoint into after the last step (resume it with `resume`).
    pub checkpoint: Option<PathBuf>,
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
            ppo_epochs: 2,
            lr: 0.05,
            weighting: Weighting::Recap,
            out: None,
            checkpoint: None,
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

    /// Tokens per step (rollouts and replay sequences).
    pub fn tokens(&self) -> usize {
        (self.rollouts() + self.replay_seqs) * self.resp_len
    }
}

/// One step's record (one line of `metrics.jsonl`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub format: f64,
    pub accuracy: f64,
    pub overlap: f64,
    pub replay_nll: f64,
    pub lambda: Vec<f32>,
    pub loss: f64,
    pub pg_clipfrac: f64,
    pub ppo_kl: f64,
    pub kl: f64,
    pub entropy: f64,
    pub step_time_ms: f64,
    /// Sampling, old and reference log-probs.
    pub sample_ms: f64,
    /// Rewards and group advantages.
    pub advantages_ms: f64,
    /// The fused-linear loss and gradient (GEMMs and loss kernels), all epochs.
    pub loss_ms: f64,
    /// AdamW, all epochs.
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
}

impl StepMetrics {
    /// The record without its timing fields (the only ones two runs of one seed may differ in).
    pub fn without_timing(&self) -> StepMetrics {
        StepMetrics {
            step_time_ms: 0.0,
            sample_ms: 0.0,
            advantages_ms: 0.0,
            loss_ms: 0.0,
            optimizer_ms: 0.0,
            tokens_per_s: 0.0,
            ..self.clone()
        }
    }
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A line of information (backend chosen, phase).
    Info(String),
    /// A finished step.
    Step(&'a StepMetrics),
}

fn normal(seed: u64, counter: u64) -> f64 {
    let u1 = draw(seed, 2 * counter).max(1e-300);
    let u2 = draw(seed, 2 * counter + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The synthetic task: features, hidden answers and targets, replay sequences, the token layout of
/// a step and the initial weights. Host data, shared by both engines.
pub(crate) struct Task {
    pub cfg: TrainConfig,
    /// `[(P + R) L, H]` features: prompt rows `q L + pos`, then the replay sequences' rows.
    pub phi: Vec<f32>,
    pub answer: Vec<usize>,
    pub target: Vec<Vec<usize>>,
    /// `[T]` feature row of each token of a step (rollout `q G + g` at `pos` uses row `q L + pos`).
    pub feat: Vec<i32>,
    /// `[T]` tokens with the replay part filled in (the rollout part is sampled each step).
    pub tokens: Vec<i32>,
    /// `[V, H]` initial weights (small noise).
    pub w0: Vec<f32>,
}

/// Which tokens of the step's layout a loss pass covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// Every token (rollouts, then replay sequences).
    All,
    /// The replay sequences only (the last `R L` tokens).
    Replay,
}

impl Task {
    fn new(cfg: &TrainConfig) -> Result<Task> {
        let (p, r, l, h, v) = (
            cfg.prompts,
            cfg.replay_seqs,
            cfg.resp_len,
            cfg.hidden,
            cfg.vocab,
        );
        if l < 3 || h <= l || v < ANSWERS.end + 2 || cfg.group < 2 || p == 0 || cfg.ppo_epochs == 0
        {
            return Err(Error::arg(
                "train",
                format!(
                    "need resp_len >= 3, hidden > resp_len, vocab >= {}, group >= 2, prompts >= 1, \
                     ppo_epochs >= 1",
                    ANSWERS.end + 2
                ),
            ));
        }
        if cfg.tokens() > i32::MAX as usize || v * h > i32::MAX as usize {
            return Err(Error::arg(
                "train",
                "tokens per step and V x H must stay below 2^31",
            ));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::arg(
                "lr",
                format!("expected a finite lr > 0, got {}", cfg.lr),
            ));
        }
        let s = cfg.seed ^ 0xA5A5;
        let mut phi = vec![0f32; (p + r) * l * h];
        for q in 0..p + r {
            for pos in 0..l {
                let row = &mut phi[(q * l + pos) * h..(q * l + pos + 1) * h];
                row[pos] = 1.0;
                let scale = 1.0 / ((h - l) as f64).sqrt();
                for (j, x) in row.iter_mut().enumerate().skip(l) {
                    *x = (normal(s, ((q * l + pos) * h + j) as u64) * scale) as f32;
                }
            }
        }
        let pick = |c: u64, n: usize| (draw(s ^ 0x77, c) * n as f64) as usize % n;
        let answer = (0..p)
            .map(|q| ANSWERS.start + pick(q as u64, ANSWERS.len()))
            .collect();
        let body = ANSWERS.end..v;
        let target = (0..p)
            .map(|q| {
                (0..l)
                    .map(|pos| body.start + pick((1000 + q * l + pos) as u64, body.len()))
                    .collect()
            })
            .collect();
        let rollouts = cfg.rollouts();
        let mut feat = vec![0i32; cfg.tokens()];
        let mut tokens = vec![0i32; cfg.tokens()];
        for roll in 0..rollouts {
            for pos in 0..l {
                feat[roll * l + pos] = ((roll / cfg.group) * l + pos) as i32;
            }
        }
        for ri in 0..r {
            for pos in 0..l {
                let t = (rollouts + ri) * l + pos;
                feat[t] = ((p + ri) * l + pos) as i32;
                tokens[t] = pick((50_000 + ri * l + pos) as u64, v) as i32;
            }
        }
        let w0 = (0..v * h)
            .map(|i| (0.05 * normal(s ^ 0x99, i as u64)) as f32)
            .collect();
        Ok(Task {
            cfg: cfg.clone(),
            phi,
            answer,
            target,
            feat,
            tokens,
            w0,
        })
    }

    /// `[T, H]` features of every token of a step, rounded to bf16 (the fused-linear inputs).
    pub fn hidden_bf16(&self) -> Vec<half::bf16> {
        let h = self.cfg.hidden;
        self.feat
            .iter()
            .flat_map(|&f| {
                let f = f as usize;
                self.phi[f * h..(f + 1) * h]
                    .iter()
                    .map(|x| half::bf16::from_f32(*x))
            })
            .collect()
    }

    /// Token range of a part.
    pub fn range(&self, part: Part) -> std::ops::Range<usize> {
        let t = self.cfg.tokens();
        match part {
            Part::All => 0..t,
            Part::Replay => self.cfg.rollouts() * self.cfg.resp_len..t,
        }
    }

    /// Rewards `[rollouts, 3]` (format, accuracy, overlap) of sampled tokens.
    fn rewards(&self, tokens: &[i32]) -> Vec<f32> {
        let (g, l) = (self.cfg.group, self.cfg.resp_len);
        let mut rewards = vec![0f32; self.cfg.rollouts() * 3];
        for (roll, r) in rewards.chunks_exact_mut(3).enumerate() {
            let q = roll / g;
            let y = &tokens[roll * l..(roll + 1) * l];
            let is = |pos: usize, tok: usize| (y[pos] == tok as i32) as u8 as f32;
            r[0] = 0.5 * is(0, OPEN) + 0.5 * is(l - 1, CLOSE);
            r[1] = is(1, self.answer[q]);
            let body = 2..l - 1;
            let hits: f32 = body.clone().map(|pos| is(pos, self.target[q][pos])).sum();
            r[2] = hits / body.len().max(1) as f32;
        }
        rewards
    }
}

/// One backend's implementation of the step's heavy parts.
pub(crate) trait Engine {
    /// Samples the rollout tokens of `step` into `tokens[..rollouts L]` and writes the old
    /// (current policy) and reference log-probs of every token of the step.
    fn rollout(
        &mut self,
        step: usize,
        tokens: &mut [i32],
        old: &mut [f32],
        reference: &mut [f32],
    ) -> Result<()>;
    /// Group advantages (GRPO) of rewards `[rollouts, K]`.
    fn advantages(&mut self, rewards: &[f32], out: &mut [f32]) -> Result<()>;
    /// The fused-linear loss and gradient over `part` (inputs indexed from the part's first token).
    fn loss(
        &mut self,
        part: Part,
        inputs: &HostLogitsLossInputs<'_>,
        config: &GrpoConfig,
    ) -> Result<LogitsLossOutput>;
    /// One AdamW step with the last loss's weight gradient.
    fn adamw(&mut self, opt: &AdamW) -> Result<()>;
    /// The current weights `[V, H]`.
    fn weights(&mut self) -> Result<Vec<f32>>;
    /// Replaces the weights and resets the optimizer; with `freeze`, they also become the frozen
    /// reference policy.
    fn set_weights(&mut self, w: &[f32], freeze: bool) -> Result<()>;
    /// Waits for queued work (for phase timings).
    fn sync(&mut self) -> Result<()>;
    /// The optimizer state: AdamW's moments and step count (the weights come from `weights`).
    fn adam_state(&mut self) -> Result<(Vec<f32>, Vec<f32>, i32)>;
    /// Restores the weights and the optimizer state of a checkpoint (the reference is unchanged).
    fn restore(&mut self, w: &[f32], m: &[f32], v: &[f32], t: i32) -> Result<()>;
}

/// A run's state after a step, enough to continue it exactly: written by `checkpoint` into a
/// directory as `state.json` (the step, AdamW's step count, the scheduler, a fingerprint of the
/// config) and `tensors.bin` (the weights, both AdamW moments and the frozen reference weights, as
/// little-endian f32, bit for bit).
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    next_step: usize,
    adam_t: i32,
    scheduler: String,
    fingerprint: String,
    tensor_len: usize,
}

fn fingerprint(cfg: &TrainConfig) -> String {
    format!(
        "seed {} prompts {} group {} resp_len {} vocab {} hidden {} replay {} epochs {} lr {} weighting {:?}",
        cfg.seed,
        cfg.prompts,
        cfg.group,
        cfg.resp_len,
        cfg.vocab,
        cfg.hidden,
        cfg.replay_seqs,
        cfg.ppo_epochs,
        cfg.lr,
        cfg.weighting
    )
}

fn io_err(arg: &'static str, path: &std::path::Path, e: std::io::Error) -> Error {
    Error::arg(arg, format!("{}: {e}", path.display()))
}

fn write_checkpoint(dir: &std::path::Path, ck: &Checkpoint, tensors: [&[f32]; 4]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("checkpoint", dir, e))?;
    let json = serde_json::to_string(ck).map_err(|e| Error::arg("checkpoint", e.to_string()))?;
    let p = dir.join("state.json");
    std::fs::write(&p, json).map_err(|e| io_err("checkpoint", &p, e))?;
    let bytes: Vec<u8> = tensors
        .iter()
        .flat_map(|t| t.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    let p = dir.join("tensors.bin");
    std::fs::write(&p, bytes).map_err(|e| io_err("checkpoint", &p, e))
}

/// `(checkpoint, [weights, adam m, adam v, reference weights])`.
fn read_checkpoint(
    dir: &std::path::Path,
    cfg: &TrainConfig,
) -> Result<(Checkpoint, Vec<Vec<f32>>)> {
    let p = dir.join("state.json");
    let json = std::fs::read_to_string(&p).map_err(|e| io_err("resume", &p, e))?;
    let ck: Checkpoint = serde_json::from_str(&json)
        .map_err(|e| Error::arg("resume", format!("{}: {e}", p.display())))?;
    if ck.fingerprint != fingerprint(cfg) {
        return Err(Error::arg(
            "resume",
            format!(
                "the checkpoint is of another run ({}), this run is {}",
                ck.fingerprint,
                fingerprint(cfg)
            ),
        ));
    }
    let p = dir.join("tensors.bin");
    let bytes = std::fs::read(&p).map_err(|e| io_err("resume", &p, e))?;
    let n = cfg.vocab * cfg.hidden;
    if ck.tensor_len != n || bytes.len() != 4 * 4 * n {
        return Err(Error::arg(
            "resume",
            format!(
                "{}: expected 4 x {n} f32, got {} bytes",
                p.display(),
                bytes.len()
            ),
        ));
    }
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((ck, all.chunks_exact(n).map(|c| c.to_vec()).collect()))
}

/// The advantages of the driver's three RL objectives: GRPO, eps 1e-6 (verl's).
pub(crate) fn advantage_config() -> crate::advantages::AdvantageConfig {
    crate::advantages::AdvantageConfig {
        modes: vec![crate::advantages::AdvantageMode::Grpo; 3],
        eps: 1e-6,
        lead: None,
        reward_weights: None,
    }
}

/// The backend `cfg.device` resolves to, and a line saying why when `auto` fell back to the CPU.
fn resolve(device: Device) -> Result<(Backend, Option<String>)> {
    match device {
        Device::Cpu => Ok((Backend::Cpu, None)),
        Device::Cuda => Ok((Backend::cuda(0)?, None)),
        Device::Auto => {
            let (b, why) = Backend::auto_with_reason();
            Ok((
                b,
                why.map(|w| format!("no usable GPU ({w}): running on the CPU")),
            ))
        }
    }
}

/// Runs the training; returns one record per step (and writes `metrics.jsonl` when `cfg.out`).
pub fn train(cfg: &TrainConfig) -> Result<Vec<StepMetrics>> {
    train_with(cfg, &mut |_| {})
}

/// [`train`], reporting progress to `on_event`.
pub fn train_with(
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Vec<StepMetrics>> {
    let task = Task::new(cfg)?;
    let (backend, why) = resolve(cfg.device)?;
    if let Some(w) = why {
        on_event(Event::Info(w));
    }
    on_event(Event::Info(format!(
        "backend {}; {} prompts x {} rollouts x {} tokens + {} replay sequences = {} tokens per step, V = {}, H = {}",
        backend.name(),
        cfg.prompts,
        cfg.group,
        cfg.resp_len,
        cfg.replay_seqs,
        cfg.tokens(),
        cfg.vocab,
        cfg.hidden
    )));
    if matches!(backend, Backend::Cpu) && (cfg.tokens() * cfg.vocab * cfg.hidden) as f64 > 1e10 {
        on_event(Event::Info(
            "these sizes are meant for a GPU: on the CPU reference a step takes minutes".into(),
        ));
    }
    match backend {
        Backend::Cpu => run(&task, &mut cpu::CpuEngine::new(&task), on_event),
        Backend::Cuda(gpu) => run(&task, &mut cuda::CudaEngine::new(&task, gpu)?, on_event),
    }
}

fn optimizer(lr: f32) -> AdamW {
    AdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

/// The "pretrained" starting point: the replay sequences are learnt first (Adam on their NLL through
/// the fused-linear path), then modest mass goes on the tags at their positions and on the answer
/// tokens at the slot; that policy is frozen as the reference.
fn pretrain(task: &Task, engine: &mut dyn Engine) -> Result<()> {
    let (l, h, r) = (task.cfg.resp_len, task.cfg.hidden, task.cfg.replay_seqs);
    engine.set_weights(&task.w0, false)?;
    let range = task.range(Part::Replay);
    let labels = &task.tokens[range.clone()];
    let zeros = vec![0f32; range.len()];
    let adv = vec![0f32; r];
    let mask = vec![1u8; range.len()];
    let cu: Vec<i32> = (0..=r).map(|i| (i * l) as i32).collect();
    let inputs = HostLogitsLossInputs {
        labels,
        old_logp: &zeros,
        ref_logp: None,
        rollout_logp: None,
        advantages: Advantages::PerSequence(&adv),
        mask: Mask::U8(&mask),
        cu_seqlens: &cu,
        lambda: &[1.0],
        objectives: &[ObjectiveKind::Nll],
        membership: None,
        normalizers: None,
    };
    let opt = optimizer(0.05);
    if r > 0 {
        for _ in 0..PRETRAIN_STEPS {
            engine.loss(Part::Replay, &inputs, &GrpoConfig::default())?;
            engine.adamw(&opt)?;
        }
    }
    let mut w = engine.weights()?;
    w[OPEN * h] += 4.0;
    w[CLOSE * h + (l - 1)] += 4.0;
    for a in ANSWERS {
        w[a * h + 1] += 4.0;
    }
    engine.set_weights(&w, true)
}

fn open_metrics(out: &Option<PathBuf>, append: bool) -> Result<Option<std::fs::File>> {
    let Some(dir) = out else { return Ok(None) };
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::arg("out", format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("metrics.jsonl");
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .map(Some)
        .map_err(|e| Error::arg("out", format!("cannot write {}: {e}", path.display())))
}

fn run(
    task: &Task,
    engine: &mut dyn Engine,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Vec<StepMetrics>> {
    let cfg = &task.cfg;
    let (l, r) = (cfg.resp_len, cfg.replay_seqs);
    let kinds = [
        ObjectiveKind::Policy,
        ObjectiveKind::Policy,
        ObjectiveKind::Policy,
        ObjectiveKind::Nll,
    ];
    let orient = [
        Orientation::Reward,
        Orientation::Reward,
        Orientation::Reward,
        Orientation::Loss,
    ];
    let mut sched = RecapScheduler::new(&orient, RecapConfig::default())?;
    let mut file = open_metrics(&cfg.out, cfg.resume.is_some())?;
    let (first_step, w_ref) = match &cfg.resume {
        Some(dir) => {
            let (ck, t) = read_checkpoint(dir, cfg)?;
            engine.set_weights(&t[3], true)?;
            engine.restore(&t[0], &t[1], &t[2], ck.adam_t)?;
            sched = RecapScheduler::from_json(&ck.scheduler)?;
            on_event(Event::Info(format!(
                "resuming {} at step {}",
                dir.display(),
                ck.next_step
            )));
            (ck.next_step, t[3].clone())
        }
        None => {
            on_event(Event::Info(format!(
                "pretraining on the replay sequences ({PRETRAIN_STEPS} Adam steps)"
            )));
            pretrain(task, engine)?;
            (0, engine.weights()?)
        }
    };
    let rollouts = cfg.rollouts();
    let b = rollouts + r;
    let t = cfg.tokens();
    let cu: Vec<i32> = (0..=b).map(|i| (i * l) as i32).collect();
    let membership: Vec<u32> = (0..b)
        .map(|i| if i < rollouts { 0b0111 } else { 0b1000 })
        .collect();
    let mask = vec![1u8; t];
    let opt = optimizer(cfg.lr);
    let config = GrpoConfig::default();
    let mut records = Vec::new();
    let mut tokens = task.tokens.clone();
    let mut old = vec![0f32; t];
    let mut reference = vec![0f32; t];
    for step in first_step..cfg.steps {
        let started = Instant::now();
        engine.rollout(step, &mut tokens, &mut old, &mut reference)?;
        let sampled = Instant::now();
        let rewards = task.rewards(&tokens);
        let mut adv3 = vec![0f32; rollouts * 3];
        engine.advantages(&rewards, &mut adv3)?;
        let mut adv = vec![0f32; b * 4];
        for i in 0..rollouts {
            adv[i * 4..i * 4 + 3].copy_from_slice(&adv3[i * 3..i * 3 + 3]);
        }
        let replay_nll =
            -(rollouts * l..t).map(|i| old[i] as f64).sum::<f64>() / (r * l).max(1) as f64;
        let lambda = match cfg.weighting {
            Weighting::Recap => sched.weights(),
            Weighting::Uniform => vec![1.0; 4],
        };
        let advantaged = Instant::now();
        let inputs = HostLogitsLossInputs {
            labels: &tokens,
            old_logp: &old,
            ref_logp: Some(&reference),
            rollout_logp: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &lambda,
            objectives: &kinds,
            membership: Some(&membership),
            normalizers: None,
        };
        let (mut loss_s, mut opt_s) = (0.0, 0.0);
        let mut outs = Vec::with_capacity(cfg.ppo_epochs);
        for _ in 0..cfg.ppo_epochs {
            let t0 = Instant::now();
            let out = engine.loss(Part::All, &inputs, &config)?;
            let t1 = Instant::now();
            engine.adamw(&opt)?;
            engine.sync()?;
            loss_s += (t1 - t0).as_secs_f64();
            opt_s += t1.elapsed().as_secs_f64();
            outs.push(out);
        }
        // loss metrics averaged over the epochs' updates, as verl reports them
        let avg = |f: &dyn Fn(&LogitsLossOutput) -> f64| {
            outs.iter().map(f).sum::<f64>() / outs.len().max(1) as f64
        };
        let mean = |j: usize| {
            rewards
                .iter()
                .skip(j)
                .step_by(3)
                .map(|x| *x as f64)
                .sum::<f64>()
                / rollouts as f64
        };
        let (fmt, acc, ovl) = (mean(0), mean(1), mean(2));
        sched.observe(&[fmt.max(1e-6), acc.max(1e-6), ovl.max(1e-6), replay_nll])?;
        let secs = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step,
            format: fmt,
            accuracy: acc,
            overlap: ovl,
            replay_nll,
            lambda: lambda.clone(),
            loss: avg(&|o| o.loss),
            pg_clipfrac: avg(&|o| o.grpo.metrics.pg_clipfrac.iter().take(3).sum::<f64>() / 3.0),
            ppo_kl: avg(&|o| o.grpo.metrics.ppo_kl),
            kl: avg(&|o| o.grpo.metrics.kl_mean),
            entropy: avg(&|o| o.entropy_mean),
            step_time_ms: secs * 1e3,
            sample_ms: (sampled - started).as_secs_f64() * 1e3,
            advantages_ms: (advantaged - sampled).as_secs_f64() * 1e3,
            loss_ms: loss_s * 1e3,
            optimizer_ms: opt_s * 1e3,
            tokens_per_s: (t * cfg.ppo_epochs) as f64 / secs.max(1e-9),
        };
        if let Some(f) = file.as_mut() {
            let line = serde_json::to_string(&m).map_err(|e| Error::arg("out", e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| Error::arg("out", e.to_string()))?;
        }
        on_event(Event::Step(&m));
        records.push(m);
    }
    if let Some(dir) = &cfg.checkpoint {
        let (m, v, adam_t) = engine.adam_state()?;
        let w = engine.weights()?;
        let ck = Checkpoint {
            next_step: cfg.steps.max(first_step),
            adam_t,
            scheduler: sched.to_json()?,
            fingerprint: fingerprint(cfg),
            tensor_len: w.len(),
        };
        write_checkpoint(dir, &ck, [&w, &m, &v, &w_ref])?;
        on_event(Event::Info(format!(
            "checkpoint written to {}",
            dir.display()
        )));
    }
    Ok(records)
}

/// The summary table comparing the first and the last window of `records` (W = 10 steps), with
/// the mean phase times.
pub fn summary(records: &[StepMetrics]) -> String {
    let w = 10.min(records.len().max(1));
    let avg = |rs: &[StepMetrics], f: &dyn Fn(&StepMetrics) -> f64| {
        rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
    };
    let (first, last) = (
        &records[..w.min(records.len())],
        &records[records.len().saturating_sub(w)..],
    );
    type Field = (&'static str, fn(&StepMetrics) -> f64);
    let fields: [Field; 6] = [
        ("format", |m| m.format),
        ("accuracy", |m| m.accuracy),
        ("overlap", |m| m.overlap),
        ("replay_nll", |m| m.replay_nll),
        ("entropy", |m| m.entropy),
        ("pg_clipfrac", |m| m.pg_clipfrac),
    ];
    let mut s = format!("{:<18} {:>12} {:>12}\n", "", "first steps", "last steps");
    for (name, f) in fields {
        s += &format!(
            "{name:<18} {:>12.4} {:>12.4}\n",
            avg(first, &f),
            avg(last, &f)
        );
    }
    for (k, name) in OBJECTIVES.iter().enumerate() {
        s += &format!(
            "{:<18} {:>12.4} {:>12.4}\n",
            format!("lambda {name}"),
            avg(first, &|m| m.lambda[k] as f64),
            avg(last, &|m| m.lambda[k] as f64)
        );
    }
    let all = |f: &dyn Fn(&StepMetrics) -> f64| avg(records, f);
    s += &format!(
        "step {:.1} ms (sampling {:.1}, advantages {:.1}, loss {:.1}, optimizer {:.1}), {:.0} tokens/s",
        all(&|m| m.step_time_ms),
        all(&|m| m.sample_ms),
        all(&|m| m.advantages_ms),
        all(&|m| m.loss_ms),
        all(&|m| m.optimizer_ms),
        all(&|m| m.tokens_per_s),
    );
    s
}
