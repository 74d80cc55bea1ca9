//! `recap train`: RECAP training of a small synthetic policy, end to end, on the CPU reference.
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
//! Each step: sample G rollouts per prompt (counter-based RNG: a seed reproduces a run), score,
//! group advantages (GRPO) per RL objective, `ppo_epochs` passes of the fused GRPO loss with lambda
//! from the RECAP scheduler (or uniform) through the fused-linear path, AdamW, scheduler update.

use crate::advantages::{group_advantages, AdvantageConfig, AdvantageMode, Groups};
use crate::config::{GrpoConfig, ObjectiveKind};
use crate::error::{Error, Result};
use crate::layout::{Advantages, Mask};
use crate::logits::{LogitsLossInputs, LogprobConfig};
use crate::recap::{Orientation, RecapConfig, RecapScheduler};
use half::bf16;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Objective names, in order.
pub const OBJECTIVES: [&str; 4] = ["format", "accuracy", "overlap", "replay"];
const OPEN: usize = 0;
const CLOSE: usize = 1;
const ANSWERS: std::ops::Range<usize> = 2..18;

/// How objective weights are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weighting {
    /// RECAP's dynamic weights.
    Recap,
    /// All weights 1.
    Uniform,
}

/// Settings of a run (the defaults finish in seconds on a 2-core CPU).
#[derive(Clone, Debug)]
pub struct TrainConfig {
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
    pub out: Option<PathBuf>,
    /// Print a progress line per step.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
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
            progress: false,
        }
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
    pub entropy: f64,
    pub step_time_ms: f64,
    pub tokens_per_s: f64,
}

/// Counter-based RNG (SplitMix64 of seed and counter): the same (seed, counter) gives the same draw.
fn draw(seed: u64, counter: u64) -> f64 {
    let mut z =
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ counter.wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn normal(seed: u64, counter: u64) -> f64 {
    let u1 = draw(seed, 2 * counter).max(1e-300);
    let u2 = draw(seed, 2 * counter + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The synthetic task and policy state.
struct Task {
    cfg: TrainConfig,
    /// `[P + R, L, H]` features: prompts then replay sequences.
    phi: Vec<f32>,
    answer: Vec<usize>,
    target: Vec<Vec<usize>>,
    replay: Vec<Vec<usize>>,
    w: Vec<f32>,
    w_ref: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    adam_t: i32,
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
        if l < 3 || h <= l || v < ANSWERS.end + 2 || cfg.group < 2 || p == 0 {
            return Err(Error::arg(
                "train",
                format!(
                    "need resp_len >= 3, hidden > resp_len, vocab >= {}, group >= 2, prompts >= 1",
                    ANSWERS.end + 2
                ),
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
        let replay = (0..r)
            .map(|q| {
                (0..l)
                    .map(|pos| pick((50_000 + q * l + pos) as u64, v))
                    .collect()
            })
            .collect();
        // initial W: small noise, modest mass on the tags and on the answer tokens at the slot
        let w: Vec<f32> = (0..v * h)
            .map(|i| (0.05 * normal(s ^ 0x99, i as u64)) as f32)
            .collect();
        let mut task = Task {
            cfg: cfg.clone(),
            phi,
            answer,
            target,
            replay,
            w_ref: Vec::new(),
            adam_m: vec![0.0; w.len()],
            adam_v: vec![0.0; w.len()],
            w,
            adam_t: 0,
        };
        task.pretrain_replay(300, 0.05);
        // then modest mass on the tags at their positions and on the answer tokens at the slot
        task.w[OPEN * h] += 4.0;
        task.w[CLOSE * h + (l - 1)] += 4.0;
        for a in ANSWERS {
            task.w[a * h + 1] += 4.0;
        }
        task.w_ref = task.w.clone();
        Ok(task)
    }

    /// The "pretrained" starting point: the replay sequences are learnt first (Adam on their NLL),
    /// so RL starts from a policy that knows them and can erode them.
    fn pretrain_replay(&mut self, steps: usize, lr: f32) {
        let (p, l, h, v) = (
            self.cfg.prompts,
            self.cfg.resp_len,
            self.cfg.hidden,
            self.cfg.vocab,
        );
        let n = (self.replay.len() * l).max(1) as f64;
        for _ in 0..steps {
            let mut grad = vec![0f32; v * h];
            for (ri, seq) in self.replay.iter().enumerate() {
                for (pos, &y) in seq.iter().enumerate() {
                    let f = (p + ri) * l + pos;
                    let z = self.logits(&self.w, f);
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let x = &self.phi[f * h..(f + 1) * h];
                    for (tok, ez) in e.iter().enumerate() {
                        let d = (ez / sum - (tok == y) as u8 as f64) / n;
                        for (gj, xj) in grad[tok * h..(tok + 1) * h].iter_mut().zip(x) {
                            *gj += (d * *xj as f64) as f32;
                        }
                    }
                }
            }
            adamw(self, &grad, lr);
        }
        self.adam_m.iter_mut().for_each(|x| *x = 0.0);
        self.adam_v.iter_mut().for_each(|x| *x = 0.0);
        self.adam_t = 0;
    }

    /// Logits of feature row `f` under weights `w`.
    fn logits(&self, w: &[f32], f: usize) -> Vec<f64> {
        let h = self.cfg.hidden;
        let x = &self.phi[f * h..(f + 1) * h];
        (0..self.cfg.vocab)
            .map(|t| {
                w[t * h..(t + 1) * h]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            })
            .collect()
    }

    /// The softmax of every feature row under weights `w`, computed once per use of `w` (all
    /// rollouts of a prompt share its rows).
    fn softmax_rows(&self, w: &[f32]) -> Vec<SoftmaxRow> {
        (0..self.phi.len() / self.cfg.hidden)
            .map(|f| {
                let z = self.logits(w, f);
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                SoftmaxRow {
                    lse: m + sum.ln(),
                    z,
                    e,
                    sum,
                }
            })
            .collect()
    }
}

/// One feature row's logits `z`, `e = exp(z - max)`, their sum and the log-sum-exp.
struct SoftmaxRow {
    z: Vec<f64>,
    e: Vec<f64>,
    sum: f64,
    lse: f64,
}

impl SoftmaxRow {
    fn logp(&self, tok: usize) -> f64 {
        self.z[tok] - self.lse
    }
}

/// Runs the training; returns one record per step (and writes `metrics.jsonl` when `cfg.out`).
pub fn train(cfg: &TrainConfig) -> Result<Vec<StepMetrics>> {
    let mut task = Task::new(cfg)?;
    let (p, g, l, h, v, r) = (
        cfg.prompts,
        cfg.group,
        cfg.resp_len,
        cfg.hidden,
        cfg.vocab,
        cfg.replay_seqs,
    );
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
    let mut file = match &cfg.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::arg("out", format!("cannot create {}: {e}", dir.display())))?;
            let path = dir.join("metrics.jsonl");
            Some(
                std::fs::File::create(&path).map_err(|e| {
                    Error::arg("out", format!("cannot write {}: {e}", path.display()))
                })?,
            )
        }
        None => None,
    };
    let rollouts = p * g;
    let b = rollouts + r;
    let t = b * l;
    let cu: Vec<i32> = (0..=b).map(|i| (i * l) as i32).collect();
    let membership: Vec<u32> = (0..b)
        .map(|i| if i < rollouts { 0b0111 } else { 0b1000 })
        .collect();
    let mut records = Vec::new();
    let reference_rows = task.softmax_rows(&task.w_ref); // the reference policy is frozen
    for step in 0..cfg.steps {
        let started = Instant::now();
        let rows = task.softmax_rows(&task.w);
        // sample
        let mut tokens = vec![0usize; t];
        let mut feat = vec![0usize; t];
        for q in 0..p {
            for gi in 0..g {
                let roll = q * g + gi;
                for pos in 0..l {
                    let f = q * l + pos;
                    let row = &rows[f];
                    let u = draw(cfg.seed, ((step * rollouts + roll) * l + pos) as u64) * row.sum;
                    let mut acc = 0.0;
                    let mut tok = v - 1;
                    for (j, x) in row.e.iter().enumerate() {
                        acc += x;
                        if u < acc {
                            tok = j;
                            break;
                        }
                    }
                    tokens[roll * l + pos] = tok;
                    feat[roll * l + pos] = f;
                }
            }
        }
        for (ri, seq) in task.replay.iter().enumerate() {
            for pos in 0..l {
                tokens[(rollouts + ri) * l + pos] = seq[pos];
                feat[(rollouts + ri) * l + pos] = (p + ri) * l + pos;
            }
        }
        // rewards [rollouts, 3]
        let mut rewards = vec![0f32; rollouts * 3];
        for q in 0..p {
            for gi in 0..g {
                let roll = q * g + gi;
                let y = &tokens[roll * l..(roll + 1) * l];
                rewards[roll * 3] =
                    0.5 * (y[0] == OPEN) as u8 as f32 + 0.5 * (y[l - 1] == CLOSE) as u8 as f32;
                rewards[roll * 3 + 1] = (y[1] == task.answer[q]) as u8 as f32;
                let body = 2..l - 1;
                let hits = body
                    .clone()
                    .filter(|&pos| y[pos] == task.target[q][pos])
                    .count();
                rewards[roll * 3 + 2] = hits as f32 / body.len().max(1) as f32;
            }
        }
        let mut adv3 = vec![0f32; rollouts * 3];
        group_advantages(
            &rewards,
            Groups::Consecutive(g),
            None,
            &AdvantageConfig {
                modes: vec![AdvantageMode::Grpo; 3],
                eps: 1e-6,
                lead: None,
            },
            &mut adv3,
        )?;
        let mut adv = vec![0f32; b * 4];
        for i in 0..rollouts {
            adv[i * 4..i * 4 + 3].copy_from_slice(&adv3[i * 3..i * 3 + 3]);
        }
        let old: Vec<f32> = (0..t)
            .map(|i| rows[feat[i]].logp(tokens[i]) as f32)
            .collect();
        let reference: Vec<f32> = (0..t)
            .map(|i| reference_rows[feat[i]].logp(tokens[i]) as f32)
            .collect();
        let replay_nll =
            -(rollouts * l..t).map(|i| old[i] as f64).sum::<f64>() / (r * l).max(1) as f64;
        let lambda = match cfg.weighting {
            Weighting::Recap => sched.weights(),
            Weighting::Uniform => vec![1.0; 4],
        };
        let labels: Vec<i32> = tokens.iter().map(|x| *x as i32).collect();
        let mask = vec![1u8; t];
        let hidden: Vec<bf16> = feat
            .iter()
            .flat_map(|&f| {
                task.phi[f * h..(f + 1) * h]
                    .iter()
                    .map(|x| bf16::from_f32(*x))
            })
            .collect();
        let config = GrpoConfig::default();
        let mut last = None;
        for _ in 0..cfg.ppo_epochs {
            let weight: Vec<bf16> = task.w.iter().map(|x| bf16::from_f32(*x)).collect();
            let inputs = LogitsLossInputs {
                labels: &labels[..],
                old_logp: &old[..],
                ref_logp: Some(&reference[..]),
                advantages: Advantages::PerSequence(&adv[..]),
                mask: Mask::U8(&mask[..]),
                cu_seqlens: &cu,
                lambda: &lambda,
                objectives: &kinds,
                membership: Some(&membership),
                normalizers: None,
            };
            let mut dh = vec![0f32; t * h];
            let mut dw = vec![0f32; v * h];
            let out = crate::cpu::fused_linear_grpo_loss(
                &hidden,
                &weight,
                h,
                &inputs,
                &config,
                &LogprobConfig::default(),
                false,
                &mut dh,
                &mut dw,
            )?;
            adamw(&mut task, &dw, cfg.lr);
            last = Some(out);
        }
        let out = last.ok_or_else(|| Error::arg("ppo_epochs", "expected at least one epoch"))?;
        let mean = |j: usize| {
            (0..rollouts)
                .map(|i| rewards[i * 3 + j] as f64)
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
            loss: out.loss,
            pg_clipfrac: out.grpo.metrics.pg_clipfrac.iter().take(3).sum::<f64>() / 3.0,
            ppo_kl: out.grpo.metrics.ppo_kl,
            entropy: out.entropy_mean,
            step_time_ms: secs * 1e3,
            tokens_per_s: (t * cfg.ppo_epochs) as f64 / secs.max(1e-9),
        };
        if let Some(f) = file.as_mut() {
            let line = serde_json::to_string(&m).map_err(|e| Error::arg("out", e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| Error::arg("out", e.to_string()))?;
        }
        if cfg.progress {
            eprintln!(
                "step {:>4}/{}  format {:.3}  accuracy {:.3}  overlap {:.3}  replay_nll {:.3}  lambda {:?}  {:.0} ms",
                step + 1,
                cfg.steps,
                fmt,
                acc,
                ovl,
                replay_nll,
                lambda.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>(),
                secs * 1e3
            );
        }
        records.push(m);
    }
    Ok(records)
}

/// AdamW on the policy weights (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01).
fn adamw(task: &mut Task, grad: &[f32], lr: f32) {
    task.adam_t += 1;
    let (b1, b2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32);
    let (c1, c2) = (1.0 - b1.powi(task.adam_t), 1.0 - b2.powi(task.adam_t));
    for (((w, m), v), g) in task
        .w
        .iter_mut()
        .zip(task.adam_m.iter_mut())
        .zip(task.adam_v.iter_mut())
        .zip(grad)
    {
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let update = (*m / c1) / ((*v / c2).sqrt() + eps);
        *w -= lr * (update + wd * *w);
    }
}

/// The summary table comparing the first and the last window of `records` (W = 10 steps).
pub fn summary(records: &[StepMetrics]) -> String {
    let w = 10.min(records.len().max(1));
    let avg = |rs: &[StepMetrics], f: &dyn Fn(&StepMetrics) -> f64| {
        rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
    };
    let (first, last) = (
        &records[..w.min(records.len())],
        &records[records.len().saturating_sub(w)..],
    );
    let mut s = format!("{:<12} {:>12} {:>12}\n", "", "first steps", "last steps");
    for (name, f) in [
        (
            "format",
            &(|m: &StepMetrics| m.format) as &dyn Fn(&StepMetrics) -> f64,
        ),
        ("accuracy", &|m: &StepMetrics| m.accuracy),
        ("overlap", &|m: &StepMetrics| m.overlap),
        ("replay_nll", &|m: &StepMetrics| m.replay_nll),
    ] {
        s += &format!(
            "{name:<12} {:>12.4} {:>12.4}\n",
            avg(first, f),
            avg(last, f)
        );
    }
    for (k, name) in OBJECTIVES.iter().enumerate() {
        s += &format!(
            "{:<12} {:>12.4} {:>12.4}\n",
            format!("lambda {name}"),
            avg(first, &|m| m.lambda[k] as f64),
            avg(last, &|m| m.lambda[k] as f64)
        );
    }
    s
}
