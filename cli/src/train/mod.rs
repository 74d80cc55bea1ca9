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
//! Before RL the general sequences (the replay ones and held-out ones, which are never replayed)
//! are learnt: a "pretrained" policy that RL can make forget; then modest mass is put on the tags
//! and the answer tokens, and that policy is frozen as the reference. Each step: sample G rollouts
//! per prompt from the current policy (counter-based draws: a seed reproduces a run on either
//! engine), score, group advantages (GRPO), old and reference log-probs, `ppo_epochs` passes of the
//! fused GRPO loss with lambda from the RECAP scheduler (or uniform, or the RL objectives only)
//! through the fused-linear path, AdamW after each, scheduler update. The weights act on the
//! losses (one GRPO objective per reward) or on the rewards before their group normalization
//! ([`Apply`]). Every step measures what RL erodes: the NLL of the replay and of the held-out
//! sequences, pass@k and the support of correct answers relative to the initial policy.
//!
//! Files: [`config`] (settings, presets), `task` (the synthetic task and its rewards), `checkpoint`
//! (the atomic safetensors checkpoints), [`metrics`] (a step's record and the diagnostics),
//! `summary`, [`experiment`] (`recap experiment`), this file (the loop), and the two engines.

mod checkpoint;
pub mod config;
mod cpu;
mod cuda;
pub mod experiment;
pub mod metrics;
pub mod plots;
mod summary;
mod task;

pub use config::{Apply, Device, Preset, TrainConfig, Weighting};
pub use metrics::StepMetrics;
pub use summary::summary;
pub use task::OBJECTIVES;

use recap_kernels::advantages::{AdvantageConfig, AdvantageMode};
use recap_kernels::backend::Backend;
use recap_kernels::config::{GrpoConfig, ObjectiveKind};
use recap_kernels::device_math::AdamW;
use recap_kernels::error::{Error, Result};
use recap_kernels::layout::{Advantages, Mask};
use recap_kernels::logits::{HostLogitsLossInputs, LogitsLossOutput};
use recap_kernels::recap::{Orientation, RecapScheduler};
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use task::{Part, Task, ANSWERS, CLOSE, OPEN};

/// Adam steps on the general sequences before RL.
const PRETRAIN_STEPS: usize = 300;

/// What a run reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A line of information (backend chosen, phase).
    Info(String),
    /// A finished step.
    Step(&'a StepMetrics),
}

/// One backend's implementation of the step's heavy parts.
pub(crate) trait Engine {
    /// Samples the rollout tokens of `step` into `tokens[..rollouts L]` and writes the old
    /// (current policy) and reference log-probs of every token of the layout.
    fn rollout(
        &mut self,
        step: usize,
        tokens: &mut [i32],
        old: &mut [f32],
        reference: &mut [f32],
    ) -> Result<()>;
    /// Group advantages of rewards `[rollouts, K]` (G consecutive rollouts per group).
    fn advantages(
        &mut self,
        rewards: &[f32],
        config: &AdvantageConfig,
        out: &mut [f32],
    ) -> Result<()>;
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

/// The advantages of `rewards_k` RL objectives: GRPO per objective (eps 1e-6, verl's), or with
/// `weights` GRPO of their weighted sum.
pub(crate) fn advantage_config(rewards_k: usize, weights: Option<Vec<f64>>) -> AdvantageConfig {
    AdvantageConfig {
        modes: vec![AdvantageMode::Grpo; if weights.is_some() { 1 } else { rewards_k }],
        eps: 1e-6,
        lead: None,
        reward_weights: weights,
        singletons: recap_kernels::Singletons::Zero,
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
        "backend {}; {} prompts x {} rollouts x {} tokens + {} replay sequences = {} tokens per step, \
         {} held-out sequences, V = {}, H = {}; weighting {:?}, weights on the {:?}",
        backend.name(),
        cfg.prompts,
        cfg.group,
        cfg.resp_len,
        cfg.replay_seqs,
        cfg.tokens(),
        cfg.heldout_seqs,
        cfg.vocab,
        cfg.hidden,
        cfg.weighting,
        cfg.apply
    )));
    if matches!(backend, Backend::Cpu) && (cfg.tokens() * cfg.vocab * cfg.hidden) as f64 > 1e10 {
        on_event(Event::Info(
            "these sizes are meant for a GPU: on the CPU reference a step takes minutes".into(),
        ));
    }
    let records = match backend {
        Backend::Cpu => run(&task, &mut cpu::CpuEngine::new(&task), on_event),
        Backend::Cuda(gpu) => run(&task, &mut cuda::CudaEngine::new(&task, gpu)?, on_event),
    }?;
    if let Some(dir) = &cfg.out {
        // the picture of the whole run: metrics.jsonl holds the steps before a resume too
        let all = read_metrics(&metrics_path(dir)).unwrap_or_else(|_| records.clone());
        write_atomic(&dir.join("curves.svg"), plots::curves_svg(&all)?.as_bytes())?;
        on_event(Event::Info(format!(
            "wrote {}",
            dir.join("curves.svg").display()
        )));
    }
    Ok(records)
}

/// The records of a `metrics.jsonl` (a line that does not parse, e.g. one a killed run cut short,
/// ends them).
fn read_metrics(path: &Path) -> std::io::Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map_while(|l| serde_json::from_str::<StepMetrics>(l).ok())
        .collect())
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

/// The "pretrained" starting point: the general sequences (replay and held-out) are learnt first
/// (Adam on their NLL through the fused-linear path), then modest mass goes on the tags at their
/// positions and on the answer tokens at the slot; that policy is frozen as the reference.
fn pretrain(task: &Task, engine: &mut dyn Engine) -> Result<()> {
    let (l, h) = (task.cfg.resp_len, task.cfg.hidden);
    let seqs = task.cfg.replay_seqs + task.cfg.heldout_seqs;
    engine.set_weights(&task.w0, false)?;
    let range = task.range(Part::General);
    let labels = &task.tokens[range.clone()];
    let zeros = vec![0f32; range.len()];
    let adv = vec![0f32; seqs];
    let mask = vec![1u8; range.len()];
    let cu: Vec<i32> = (0..=seqs).map(|i| (i * l) as i32).collect();
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
    if seqs > 0 {
        for _ in 0..PRETRAIN_STEPS {
            engine.loss(Part::General, &inputs, &GrpoConfig::default())?;
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

fn metrics_path(dir: &Path) -> std::path::PathBuf {
    dir.join("metrics.jsonl")
}

/// `metrics.jsonl` for writing: new, or (resuming at `keep` steps) its records of the steps before
/// `keep` only, rewritten atomically first, so the steps a killed run logged after its last
/// checkpoint (and a half-written last line) are not kept twice.
fn open_metrics(
    out: &Option<std::path::PathBuf>,
    keep: Option<usize>,
) -> Result<Option<std::fs::File>> {
    let Some(dir) = out else { return Ok(None) };
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::invalid_argument("out", format!("cannot create {}: {e}", dir.display()))
    })?;
    let path = metrics_path(dir);
    let err = |e: std::io::Error| {
        Error::invalid_argument("out", format!("cannot write {}: {e}", path.display()))
    };
    if let Some(keep) = keep {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String = old
            .lines()
            .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step < keep))
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(keep.is_some())
        .truncate(keep.is_none())
        .open(&path)
        .map(Some)
        .map_err(err)
}

/// How a step's batch is laid out for the loss under `cfg.apply`: objective kinds, membership,
/// the loss's weights from the scheduler's and the advantages from the rewards.
struct Objectives {
    kinds: Vec<ObjectiveKind>,
    membership: Vec<u32>,
}

impl Objectives {
    fn new(cfg: &TrainConfig) -> Objectives {
        let (rollouts, b) = (cfg.rollouts(), cfg.rollouts() + cfg.replay_seqs);
        let (kinds, rl_bits, replay_bit) = match cfg.apply {
            // one GRPO objective per reward, then the replay NLL
            Apply::Loss => (
                vec![
                    ObjectiveKind::Policy,
                    ObjectiveKind::Policy,
                    ObjectiveKind::Policy,
                    ObjectiveKind::Nll,
                ],
                0b0111,
                0b1000,
            ),
            // one GRPO objective for the weighted sum of the rewards, then the replay NLL
            Apply::Reward => (vec![ObjectiveKind::Policy, ObjectiveKind::Nll], 0b01, 0b10),
        };
        Objectives {
            kinds,
            membership: (0..b)
                .map(|i| if i < rollouts { rl_bits } else { replay_bit })
                .collect(),
        }
    }

    /// The loss's lambda for the scheduler's weights (format, accuracy, overlap, replay).
    fn lambda(&self, apply: Apply, w: &[f32]) -> Vec<f32> {
        match apply {
            Apply::Loss => w.to_vec(),
            Apply::Reward => vec![1.0, w[3]],
        }
    }

    /// Per-sequence advantages `[B, K]` of the step from its rewards `[rollouts, 3]`.
    fn advantages(
        &self,
        cfg: &TrainConfig,
        engine: &mut dyn Engine,
        rewards: &[f32],
        w: &[f32],
    ) -> Result<Vec<f32>> {
        let (rollouts, b, k) = (
            cfg.rollouts(),
            cfg.rollouts() + cfg.replay_seqs,
            self.kinds.len(),
        );
        let weights =
            (cfg.apply == Apply::Reward).then(|| w[..3].iter().map(|x| *x as f64).collect());
        let ac = advantage_config(3, weights);
        let per = ac.num_outputs();
        let mut rl = vec![0f32; rollouts * per];
        engine.advantages(rewards, &ac, &mut rl)?;
        let mut adv = vec![0f32; b * k];
        for i in 0..rollouts {
            adv[i * k..i * k + per].copy_from_slice(&rl[i * per..(i + 1) * per]);
        }
        Ok(adv)
    }
}

/// The scheduler's weights this step: RECAP's, all 1, or the RL objectives' only.
fn scheduler_weights(cfg: &TrainConfig, sched: &RecapScheduler) -> Vec<f32> {
    match cfg.weighting {
        Weighting::Recap => sched.weights(),
        Weighting::Uniform => vec![1.0; 4],
        Weighting::RlOnly => vec![1.0, 1.0, 1.0, 0.0],
    }
}

/// Mean `-logp` over a part of the layout, `None` when it is empty.
fn nll(old: &[f32], range: std::ops::Range<usize>) -> Option<f64> {
    (!range.is_empty())
        .then(|| -old[range.clone()].iter().map(|x| *x as f64).sum::<f64>() / range.len() as f64)
}

fn run(
    task: &Task,
    engine: &mut dyn Engine,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Vec<StepMetrics>> {
    let cfg = &task.cfg;
    let (l, g) = (cfg.resp_len, cfg.group);
    let orient = [
        Orientation::Reward,
        Orientation::Reward,
        Orientation::Reward,
        Orientation::Loss,
    ];
    let mut sched = RecapScheduler::new(&orient, cfg.recap.clone())?;
    let (first_step, w_ref) = match &cfg.resume {
        Some(dir) => {
            let (state, t) = checkpoint::read(dir, cfg)?;
            engine.set_weights(&t[3], true)?;
            engine.restore(&t[0], &t[1], &t[2], state.adam_t)?;
            sched = RecapScheduler::from_json(&state.scheduler)?;
            on_event(Event::Info(format!(
                "resuming {} at step {}",
                dir.display(),
                state.next_step
            )));
            let [_, _, _, reference] = t;
            (state.next_step, reference)
        }
        None => {
            on_event(Event::Info(format!(
                "pretraining on the general sequences ({PRETRAIN_STEPS} Adam steps)"
            )));
            pretrain(task, engine)?;
            (0, engine.weights()?)
        }
    };
    let mut file = open_metrics(&cfg.out, cfg.resume.as_ref().map(|_| first_step))?;
    let objectives = Objectives::new(cfg);
    let rollouts = cfg.rollouts();
    let b = rollouts + cfg.replay_seqs;
    let t = cfg.tokens();
    let cu: Vec<i32> = (0..=b).map(|i| (i * l) as i32).collect();
    let mask = vec![1u8; t];
    let opt = optimizer(cfg.lr);
    let config = GrpoConfig::default();
    let mut records = Vec::new();
    let mut tokens = task.tokens.clone();
    let n = task.layout_len();
    let mut old = vec![0f32; n];
    let mut reference = vec![0f32; n];
    let probes = task.range(Part::Probes);
    for step in first_step..cfg.steps {
        let started = Instant::now();
        engine.rollout(step, &mut tokens, &mut old, &mut reference)?;
        let sampled = Instant::now();
        let rewards = task.rewards(&tokens);
        let w = scheduler_weights(cfg, &sched);
        let adv = objectives.advantages(cfg, engine, &rewards, &w)?;
        let lambda = objectives.lambda(cfg.apply, &w);
        let general_nll = nll(&old, task.range(Part::Replay));
        let heldout_nll = nll(&old, task.range(Part::Heldout));
        let advantaged = Instant::now();
        let inputs = HostLogitsLossInputs {
            labels: &tokens[..t],
            old_logp: &old[..t],
            ref_logp: Some(&reference[..t]),
            rollout_logp: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &lambda,
            objectives: &objectives.kinds,
            membership: Some(&objectives.membership),
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
        // the replay objective monitors the replay NLL (the held-out NLL without replay sequences)
        let monitored = general_nll.or(heldout_nll).unwrap_or(0.0);
        sched.observe(&[fmt.max(1e-6), acc.max(1e-6), ovl.max(1e-6), monitored])?;
        let correct: Vec<usize> = (0..cfg.prompts)
            .map(|q| {
                (0..g)
                    .filter(|j| rewards[(q * g + j) * 3 + 1] > 0.0)
                    .count()
            })
            .collect();
        let (kept, lost, new, answer_entropy) = metrics::support(
            &old[probes.clone()],
            &reference[probes.clone()],
            &task.answer,
        );
        let secs = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step,
            format: fmt,
            accuracy: acc,
            overlap: ovl,
            general_nll,
            heldout_nll,
            pass_at_1: metrics::mean_pass_at_k(&correct, g, 1),
            pass_at_half: metrics::mean_pass_at_k(&correct, g, (g / 2).max(1)),
            pass_at_g: metrics::mean_pass_at_k(&correct, g, g),
            support_kept: kept,
            support_lost: lost,
            support_new: new,
            answer_entropy,
            lambda: w.clone(),
            loss: avg(&|o| o.loss),
            pg_clipfrac: avg(&|o| {
                let k = objectives.kinds.len() - 1;
                o.grpo.metrics.pg_clipfrac.iter().take(k).sum::<f64>() / k as f64
            }),
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
            let line = serde_json::to_string(&m)
                .map_err(|e| Error::invalid_argument("out", e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| Error::invalid_argument("out", e.to_string()))?;
        }
        on_event(Event::Step(&m));
        records.push(m);
        let done = step + 1;
        let periodic = cfg.checkpoint_every.is_some_and(|k| k > 0 && done % k == 0);
        if let Some(dir) = cfg
            .checkpoint
            .as_ref()
            .filter(|_| periodic || done == cfg.steps)
        {
            if let Some(f) = file.as_mut() {
                // the log reaches the disk before the checkpoint that covers it
                f.sync_data()
                    .map_err(|e| Error::invalid_argument("out", e.to_string()))?;
            }
            save(dir, task, engine, &sched, done, &w_ref)?;
            if done == cfg.steps {
                on_event(Event::Info(format!(
                    "checkpoint written to {}",
                    dir.display()
                )));
            }
        }
    }
    Ok(records)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsynced, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| {
        Error::invalid_argument("out", format!("cannot write {}: {e}", path.display()))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the checkpoint of the state after `next_step` steps.
fn save(
    dir: &Path,
    task: &Task,
    engine: &mut dyn Engine,
    sched: &RecapScheduler,
    next_step: usize,
    w_ref: &[f32],
) -> Result<()> {
    let (m, v, adam_t) = engine.adam_state()?;
    let w = engine.weights()?;
    let state = checkpoint::State {
        next_step,
        adam_t,
        scheduler: sched.to_json()?,
        fingerprint: task.cfg.fingerprint(),
    };
    checkpoint::write(
        dir,
        &state,
        [&w, &m, &v, w_ref],
        task.cfg.vocab,
        task.cfg.hidden,
    )?;
    Ok(())
}
