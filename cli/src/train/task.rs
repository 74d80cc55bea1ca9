//! The synthetic task of `recap train`: features, hidden answers and targets, the general
//! sequences learnt before RL, the token layout of a step, the rewards and the initial weights.
//! Host data, shared by both engines.

use super::config::TrainConfig;
use recap_kernels::device_math::draw;
use recap_kernels::error::{Error, Result};

/// Objective names, in order.
pub const OBJECTIVES: [&str; 4] = ["format", "accuracy", "overlap", "replay"];
pub(crate) const OPEN: usize = 0;
pub(crate) const CLOSE: usize = 1;
pub(crate) const ANSWERS: std::ops::Range<usize> = 2..18;

fn normal(seed: u64, counter: u64) -> f64 {
    let u1 = draw(seed, 2 * counter).max(1e-300);
    let u2 = draw(seed, 2 * counter + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The task. The general sequences (replay and held-out) follow one distribution: at each position
/// a preferred token three times in four, the position's feature shared by all of them, so what
/// RL pushes at a position (the tags, the answers, the targets) erodes it for every sequence.
/// Its token layout, one step's arrays end to end:
/// `[rollouts (sampled) | replay sequences | held-out sequences | answer probes]`: the loss covers
/// the first two parts, pretraining the replay and held-out sequences, and the probes (every
/// answer token at every prompt's answer slot) are only measured.
pub(crate) struct Task {
    pub cfg: TrainConfig,
    /// `[(P + R + Hh) L, H]` features: prompt rows `q L + pos`, then the replay and the held-out
    /// sequences' rows.
    pub phi: Vec<f32>,
    pub answer: Vec<usize>,
    pub target: Vec<Vec<usize>>,
    /// `[layout]` feature row of each token (rollout `q G + g` at `pos` uses row `q L + pos`).
    pub feat: Vec<i32>,
    /// `[layout]` tokens, with every part but the rollouts filled in (they are sampled each step).
    pub tokens: Vec<i32>,
    /// `[V, H]` initial weights (small noise).
    pub w0: Vec<f32>,
}

/// Which tokens of the layout a pass covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// The loss's tokens: rollouts, then replay sequences.
    All,
    /// The replay sequences.
    Replay,
    /// The held-out sequences.
    Heldout,
    /// Replay and held-out sequences (what pretraining learns).
    General,
    /// The answer probes: `prompts x 16` tokens.
    Probes,
}

impl Task {
    pub fn new(cfg: &TrainConfig) -> Result<Task> {
        let (p, r, hh, l, h, v) = (
            cfg.prompts,
            cfg.replay_seqs,
            cfg.heldout_seqs,
            cfg.resp_len,
            cfg.hidden,
            cfg.vocab,
        );
        if l < 3 || h <= l || v < ANSWERS.end + 2 || cfg.group < 2 || p == 0 || cfg.ppo_epochs == 0
        {
            return Err(Error::invalid_argument(
                "train",
                format!(
                    "need resp_len >= 3, hidden > resp_len, vocab >= {}, group >= 2, prompts >= 1, \
                     ppo_epochs >= 1",
                    ANSWERS.end + 2
                ),
            ));
        }
        let layout = (cfg.rollouts() + r + hh) * l + p * ANSWERS.len();
        if layout > i32::MAX as usize || v * h > i32::MAX as usize {
            return Err(Error::invalid_argument(
                "train",
                "tokens per step and V x H must stay below 2^31",
            ));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::invalid_argument(
                "lr",
                format!("expected a finite lr > 0, got {}", cfg.lr),
            ));
        }
        cfg.recap.validate()?;
        let s = cfg.seed ^ 0xA5A5;
        let rows = p + r + hh;
        let mut phi = vec![0f32; rows * l * h];
        for q in 0..rows {
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
        let mut feat = vec![0i32; layout];
        let mut tokens = vec![0i32; layout];
        for roll in 0..rollouts {
            for pos in 0..l {
                feat[roll * l + pos] = ((roll / cfg.group) * l + pos) as i32;
            }
        }
        // the general "language": at each position a preferred token (3 times in 4), else any
        // token; replay and held-out sequences are drawn from it alike (from counters 50,000 and
        // 80,000 on), so keeping the replay sequences keeps what the held-out ones need too
        let preferred: Vec<usize> = (0..l).map(|pos| pick((60_000 + pos) as u64, v)).collect();
        for ri in 0..r + hh {
            let (base, idx) = if ri < r {
                (50_000, ri)
            } else {
                (80_000, ri - r)
            };
            for (pos, &pref) in preferred.iter().enumerate() {
                let t = (rollouts + ri) * l + pos;
                let c = (base + idx * l + pos) as u64;
                feat[t] = ((p + ri) * l + pos) as i32;
                tokens[t] = if draw(s ^ 0x55, c) < 0.75 {
                    pref
                } else {
                    pick(c, v)
                } as i32;
            }
        }
        let probes = (rollouts + r + hh) * l;
        for q in 0..p {
            for (j, a) in ANSWERS.enumerate() {
                feat[probes + q * ANSWERS.len() + j] = (q * l + 1) as i32;
                tokens[probes + q * ANSWERS.len() + j] = a as i32;
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

    /// Tokens of the whole layout.
    pub fn layout_len(&self) -> usize {
        self.feat.len()
    }

    /// `[layout, H]` features of every token, rounded to bf16 (the fused-linear inputs).
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
        let c = &self.cfg;
        let l = c.resp_len;
        let roll = c.rollouts() * l;
        let replay = roll + c.replay_seqs * l;
        let general = replay + c.heldout_seqs * l;
        match part {
            Part::All => 0..replay,
            Part::Replay => roll..replay,
            Part::Heldout => replay..general,
            Part::General => roll..general,
            Part::Probes => general..self.layout_len(),
        }
    }

    /// Rewards `[rollouts, 3]` (format, accuracy, overlap) of sampled tokens.
    pub fn rewards(&self, tokens: &[i32]) -> Vec<f32> {
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
