//! The CPU engine of `recap train`: the reference ops on host data (f64 softmax rows, the
//! fused-linear reference, the host-compiled AdamW and draw of `kernels/train_math.cuh`).

use super::task::{Part, Task};
use super::Engine;
use half::bf16;
use recap_kernels::advantages::Groups;
use recap_kernels::config::GrpoConfig;
use recap_kernels::device_math::{adamw, draw, AdamW};
use recap_kernels::error::Result;
use recap_kernels::logits::{HostLogitsLossInputs, LogitsLossOutput, LogprobConfig};

/// One feature row's logits `z`, `e = exp(z - max)`, their sum and the log-sum-exp.
struct SoftmaxRow {
    z: Vec<f64>,
    e: Vec<f64>,
    sum: f64,
    lse: f64,
}

impl SoftmaxRow {
    fn logp(&self, tok: i32) -> f32 {
        (self.z[tok as usize] - self.lse) as f32
    }

    /// Inverse-CDF draw: the first token whose running sum of `e` exceeds `u * sum` (the last
    /// token if rounding leaves none), as `recap_train_sample`.
    fn sample(&self, u: f64) -> i32 {
        let target = u * self.sum;
        let mut acc = 0.0;
        for (j, x) in self.e.iter().enumerate() {
            acc += x;
            if target < acc {
                return j as i32;
            }
        }
        self.e.len() as i32 - 1
    }
}

pub(crate) struct CpuEngine<'t> {
    task: &'t Task,
    /// `[T, H]` features of every token of a step, in bf16 (the fused-linear inputs).
    hidden: Vec<bf16>,
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    adam_t: i32,
    grad: Vec<f32>,
    reference: Vec<SoftmaxRow>,
}

impl<'t> CpuEngine<'t> {
    pub fn new(task: &'t Task) -> Self {
        let hidden = task.hidden_bf16();
        let n = task.w0.len();
        CpuEngine {
            task,
            hidden,
            w: task.w0.clone(),
            m: vec![0.0; n],
            v: vec![0.0; n],
            adam_t: 0,
            grad: vec![0.0; n],
            reference: Vec::new(),
        }
    }

    /// The softmax of every feature row under weights `w` (f64 dot products of the f32 values).
    fn softmax_rows(&self, w: &[f32]) -> Vec<SoftmaxRow> {
        let (h, v) = (self.task.cfg.hidden, self.task.cfg.vocab);
        self.task
            .phi
            .chunks_exact(h)
            .map(|x| {
                let z: Vec<f64> = (0..v)
                    .map(|t| {
                        w[t * h..(t + 1) * h]
                            .iter()
                            .zip(x)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum()
                    })
                    .collect();
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

impl Engine for CpuEngine<'_> {
    fn rollout(
        &mut self,
        step: usize,
        tokens: &mut [i32],
        old: &mut [f32],
        reference: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.task.cfg;
        let rows = self.softmax_rows(&self.w);
        let n = cfg.rollouts() * cfg.resp_len;
        let base = (step * n) as u64;
        for (t, tok) in tokens[..n].iter_mut().enumerate() {
            *tok = rows[self.task.feat[t] as usize].sample(draw(cfg.seed, base + t as u64));
        }
        for (t, &f) in self.task.feat.iter().enumerate() {
            old[t] = rows[f as usize].logp(tokens[t]);
            reference[t] = self.reference[f as usize].logp(tokens[t]);
        }
        Ok(())
    }

    fn advantages(
        &mut self,
        rewards: &[f32],
        config: &recap_kernels::advantages::AdvantageConfig,
        out: &mut [f32],
    ) -> Result<()> {
        recap_kernels::advantages::group_advantages(
            rewards,
            Groups::Consecutive(self.task.cfg.group),
            None,
            None,
            config,
            out,
        )
    }

    fn loss(
        &mut self,
        part: Part,
        inputs: &HostLogitsLossInputs<'_>,
        config: &GrpoConfig,
    ) -> Result<LogitsLossOutput> {
        let h = self.task.cfg.hidden;
        let range = self.task.range(part);
        let weight: Vec<bf16> = self.w.iter().map(|x| bf16::from_f32(*x)).collect();
        let mut dh = vec![0f32; range.len() * h];
        recap_kernels::cpu::fused_linear_grpo_loss(
            &self.hidden[range.start * h..range.end * h],
            &weight,
            h,
            inputs,
            config,
            &LogprobConfig::default(),
            false,
            &mut dh,
            &mut self.grad,
        )
    }

    fn adamw(&mut self, opt: &AdamW) -> Result<()> {
        self.adam_t += 1;
        adamw(
            opt,
            self.adam_t,
            &mut self.w,
            &mut self.m,
            &mut self.v,
            &self.grad,
        )
    }

    fn weights(&mut self) -> Result<Vec<f32>> {
        Ok(self.w.clone())
    }

    fn set_weights(&mut self, w: &[f32], freeze: bool) -> Result<()> {
        self.w.copy_from_slice(w);
        self.m.iter_mut().for_each(|x| *x = 0.0);
        self.v.iter_mut().for_each(|x| *x = 0.0);
        self.adam_t = 0;
        if freeze {
            self.reference = self.softmax_rows(w);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn adam_state(&mut self) -> Result<(Vec<f32>, Vec<f32>, i32)> {
        Ok((self.m.clone(), self.v.clone(), self.adam_t))
    }

    fn restore(&mut self, w: &[f32], m: &[f32], v: &[f32], t: i32) -> Result<()> {
        self.w.copy_from_slice(w);
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        self.adam_t = t;
        Ok(())
    }
}
