//! The GPU engine of `recap train`: features, weights, optimizer state and the step's per-token
//! arrays stay on the device; the host gets the sampled tokens and log-probs (to score rewards)
//! and the loss statistics.
//!
//! Per step: the policy logits of every feature row by one fp32 cuBLAS GEMM (`[(P + R) L, V]`),
//! their row statistics, sampling (`recap_train_sample`), the old and reference log-probs
//! (`recap_train_gather`; the reference logits are computed once, when the policy is frozen), group
//! advantages (`kernels/advantages.cu`), then per epoch the chunked fused-linear loss
//! (`cuda::fused_linear_grpo_loss`) and AdamW (`recap_train_adamw`, which also writes the bf16
//! weights the next GEMMs read). Memory: two `[(P + R) L, V]` fp32 logits buffers (policy and
//! reference) plus the fused-linear path's chunk.

use super::task::{Part, Task};
use super::Engine;
use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use recap_kernels::config::GrpoConfig;
use recap_kernels::cuda::{
    fused_linear_grpo_loss, group_advantages, DeviceGroups, DeviceLogitsLossInputs,
    FusedLinearConfig, Gpu, LinearHead,
};
use recap_kernels::device_math::AdamW;
use recap_kernels::error::{Error, Result};
use recap_kernels::layout::{Advantages, Mask};
use recap_kernels::logits::{HostLogitsLossInputs, LogitsLossOutput, LogprobConfig};
use recap_kernels::tools::{
    addr_slice, addr_slice_mut, gemm, launch_train, upload, TrainParams, BLOCK,
};
use std::sync::Arc;

/// Grid of a grid-stride kernel over `n` items.
fn grid(gpu: &Gpu, n: usize) -> usize {
    n.div_ceil(BLOCK as usize)
        .clamp(1, 8 * gpu.multiprocessors() as usize)
}

/// Logits of every feature row under some weights, and their row statistics.
struct RowLogits {
    z: CudaSlice<f32>,
    max: CudaSlice<f32>,
    sum: CudaSlice<f64>,
    lse: CudaSlice<f64>,
}

impl RowLogits {
    fn new(stream: &Arc<CudaStream>, rows: usize, v: usize) -> Result<Self> {
        Ok(RowLogits {
            z: stream.alloc_zeros::<f32>(rows * v)?,
            max: stream.alloc_zeros::<f32>(rows)?,
            sum: stream.alloc_zeros::<f64>(rows)?,
            lse: stream.alloc_zeros::<f64>(rows)?,
        })
    }
}

/// `out.z = phi W^T` (fp32 GEMM) and its row statistics.
fn row_logits(
    gpu: &Gpu,
    s: &Arc<CudaStream>,
    task: &Task,
    phi: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    out: &mut RowLogits,
) -> Result<()> {
    use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
    let (h, v) = (task.cfg.hidden, task.cfg.vocab);
    let rows = task.phi.len() / h;
    let f32t = cudaDataType::CUDA_R_32F;
    {
        let (w_a, _gw) = addr_slice(w, s);
        let (x_a, _gx) = addr_slice(phi, s);
        let (z_a, _gz) = addr_slice_mut(&mut out.z, s);
        // z^T[V, rows] (column-major) = W[V, H] x phi^T[H, rows]
        gemm(
            gpu,
            s,
            T,
            N,
            (v, rows, h),
            (w_a, f32t, h),
            (x_a, f32t, h),
            (z_a, f32t, v),
            0.0,
        )?;
    }
    let (z_a, _g0) = addr_slice(&out.z, s);
    let (mx_a, _g1) = addr_slice_mut(&mut out.max, s);
    let (sum_a, _g2) = addr_slice_mut(&mut out.sum, s);
    let (lse_a, _g3) = addr_slice_mut(&mut out.lse, s);
    let p = TrainParams {
        logits: z_a,
        row_max: mx_a,
        row_sum: sum_a,
        row_lse: lse_a,
        num_rows: rows as i64,
        vocab: v as i64,
        ..Default::default()
    };
    let g = rows.min(16 * gpu.multiprocessors() as usize);
    launch_train(gpu, s, "recap_train_row_stats", g, &p)
}

pub(crate) struct CudaEngine<'t> {
    task: &'t Task,
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    /// `[(P + R) L, H]` fp32 features (sampling GEMM).
    phi: CudaSlice<f32>,
    /// `[T, H]` bf16 features of every token of a step (fused-linear input).
    hidden: CudaSlice<bf16>,
    feat: CudaSlice<i32>,
    tokens: CudaSlice<i32>,
    /// old then reference log-probs, `[2, T]`.
    logp: CudaSlice<f32>,
    policy: RowLogits,
    reference: RowLogits,
    w: CudaSlice<f32>,
    w_bf16: CudaSlice<bf16>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    d_weight: CudaSlice<f32>,
    d_hidden: CudaSlice<bf16>,
    adam_t: i32,
}

impl<'t> CudaEngine<'t> {
    pub fn new(task: &'t Task, gpu: Arc<Gpu>) -> Result<Self> {
        let stream = gpu.stream().clone();
        let cfg = &task.cfg;
        let (h, v, t) = (cfg.hidden, cfg.vocab, task.layout_len());
        let rows = task.phi.len() / h;
        let hidden = task.hidden_bf16();
        Ok(CudaEngine {
            task,
            phi: upload(&stream, &task.phi)?,
            hidden: upload(&stream, &hidden)?,
            feat: upload(&stream, &task.feat)?,
            tokens: upload(&stream, &task.tokens)?,
            logp: stream.alloc_zeros::<f32>(2 * t.max(1))?,
            policy: RowLogits::new(&stream, rows, v)?,
            reference: RowLogits::new(&stream, rows, v)?,
            w: stream.alloc_zeros::<f32>(v * h)?,
            w_bf16: stream.alloc_zeros::<bf16>(v * h)?,
            m: stream.alloc_zeros::<f32>(v * h)?,
            v: stream.alloc_zeros::<f32>(v * h)?,
            d_weight: stream.alloc_zeros::<f32>(v * h)?,
            d_hidden: stream.alloc_zeros::<bf16>(t.max(1) * h)?,
            adam_t: 0,
            gpu,
            stream,
        })
    }

    /// `logp[which] = z[feat, token] - lse[feat]` for every token of the layout.
    fn gather(&mut self, which: usize) -> Result<()> {
        let t = self.task.layout_len();
        let v = self.task.cfg.vocab;
        let s = &self.stream;
        let rl = if which == 0 {
            &self.policy
        } else {
            &self.reference
        };
        let (z_a, _g0) = addr_slice(&rl.z, s);
        let (lse_a, _g1) = addr_slice(&rl.lse, s);
        let (tok_a, _g2) = addr_slice(&self.tokens, s);
        let (f_a, _g3) = addr_slice(&self.feat, s);
        let (lp_a, _g4) = addr_slice_mut(&mut self.logp, s);
        let p = TrainParams {
            logits: z_a,
            row_lse: lse_a,
            tokens: tok_a,
            feat: f_a,
            logp: lp_a + (which * t.max(1) * 4) as u64,
            num_tokens: t as i64,
            vocab: v as i64,
            ..Default::default()
        };
        launch_train(&self.gpu, s, "recap_train_gather", grid(&self.gpu, t), &p)
    }
}

impl Engine for CudaEngine<'_> {
    fn rollout(
        &mut self,
        step: usize,
        tokens: &mut [i32],
        old: &mut [f32],
        reference: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.task.cfg;
        let (l, v, t) = (cfg.resp_len, cfg.vocab, self.task.layout_len());
        let n = cfg.rollouts() * l;
        row_logits(
            &self.gpu,
            &self.stream,
            self.task,
            &self.phi,
            &self.w,
            &mut self.policy,
        )?;
        {
            let s = &self.stream;
            let (z_a, _g0) = addr_slice(&self.policy.z, s);
            let (mx_a, _g1) = addr_slice(&self.policy.max, s);
            let (tok_a, _g2) = addr_slice_mut(&mut self.tokens, s);
            let p = TrainParams {
                logits: z_a,
                row_max: mx_a,
                tokens: tok_a,
                seed: cfg.seed,
                vocab: v as i64,
                counter_base: (step * n) as i64,
                group: cfg.group as i32,
                resp_len: l as i32,
                ..Default::default()
            };
            // one block per prompt row (the first P L rows)
            launch_train(&self.gpu, s, "recap_train_sample", cfg.prompts * l, &p)?;
        }
        self.gather(0)?;
        self.gather(1)?;
        let s = &self.stream;
        s.memcpy_dtoh(&self.tokens.slice(..t), tokens)?;
        s.memcpy_dtoh(&self.logp.slice(..t), old)?;
        let off = t.max(1);
        s.memcpy_dtoh(&self.logp.slice(off..off + t), reference)?;
        s.synchronize()?;
        Ok(())
    }

    fn advantages(
        &mut self,
        rewards: &[f32],
        config: &recap_kernels::advantages::AdvantageConfig,
        out: &mut [f32],
    ) -> Result<()> {
        let s = &self.stream;
        let r = upload(s, rewards)?;
        let mut o = s.alloc_zeros::<f32>(out.len().max(1))?;
        group_advantages(
            &self.gpu,
            s,
            &r.slice(..rewards.len()),
            DeviceGroups::Consecutive(self.task.cfg.group),
            None,
            None,
            config,
            &mut o.slice_mut(..out.len()),
        )?;
        s.memcpy_dtoh(&o.slice(..out.len()), out)?;
        s.synchronize()?;
        Ok(())
    }

    fn loss(
        &mut self,
        part: Part,
        inputs: &HostLogitsLossInputs<'_>,
        config: &GrpoConfig,
    ) -> Result<LogitsLossOutput> {
        let (h, v) = (self.task.cfg.hidden, self.task.cfg.vocab);
        let range = self.task.range(part);
        let n = range.len();
        let s = self.stream.clone();
        let labels = upload(&s, inputs.labels)?;
        let old = upload(&s, inputs.old_logp)?;
        let reference = match inputs.ref_logp {
            Some(r) => Some(upload(&s, r)?),
            None => None,
        };
        let adv_host = match inputs.advantages {
            Advantages::PerSequence(a) | Advantages::PerToken(a) => a,
        };
        let adv = upload(&s, adv_host)?;
        let mask_host = match inputs.mask {
            Mask::U8(m) => m.to_vec(),
            Mask::F32(m) => m.iter().map(|x| (*x != 0.0) as u8).collect(),
        };
        let mask = upload(&s, &mask_host)?;
        let adv_view = adv.slice(..adv_host.len());
        let device = DeviceLogitsLossInputs {
            labels: labels.slice(..inputs.labels.len()),
            old_logp: old.slice(..inputs.old_logp.len()),
            ref_logp: reference
                .as_ref()
                .map(|r| r.slice(..inputs.ref_logp.map_or(0, |x| x.len()))),
            rollout_logp: None,
            advantages: match inputs.advantages {
                Advantages::PerSequence(_) => Advantages::PerSequence(adv_view),
                Advantages::PerToken(_) => Advantages::PerToken(adv_view),
            },
            mask: Mask::U8(mask.slice(..mask_host.len())),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            objectives: inputs.objectives,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        };
        if n * h > self.d_hidden.len() {
            return Err(Error::invalid_argument(
                "train",
                "part larger than the step's tokens",
            ));
        }
        let head = LinearHead {
            hidden: self.hidden.slice(range.start * h..range.end * h),
            weight: self.w_bf16.slice(..v * h),
            hidden_size: h,
            vocab: v,
        };
        fused_linear_grpo_loss(
            &self.gpu,
            &s,
            &head,
            &device,
            config,
            &LogprobConfig::default(),
            &FusedLinearConfig::default(),
            &mut self.d_hidden.slice_mut(..n * h),
            &mut self.d_weight.slice_mut(..v * h),
        )
    }

    fn adamw(&mut self, opt: &AdamW) -> Result<()> {
        self.adam_t += 1;
        let (c1, c2) = opt.bias_corrections(self.adam_t);
        let n = self.w.len();
        let s = &self.stream;
        let (w_a, _g0) = addr_slice_mut(&mut self.w, s);
        let (m_a, _g1) = addr_slice_mut(&mut self.m, s);
        let (v_a, _g2) = addr_slice_mut(&mut self.v, s);
        let (g_a, _g3) = addr_slice(&self.d_weight, s);
        let (b_a, _g4) = addr_slice_mut(&mut self.w_bf16, s);
        let p = TrainParams {
            w: w_a,
            m: m_a,
            v: v_a,
            grad: g_a,
            w_bf16: b_a,
            n: n as i64,
            lr: opt.lr,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            bias1: c1,
            bias2: c2,
            ..Default::default()
        };
        launch_train(&self.gpu, s, "recap_train_adamw", grid(&self.gpu, n), &p)
    }

    fn weights(&mut self) -> Result<Vec<f32>> {
        let w = self.stream.clone_dtoh(&self.w)?;
        self.stream.synchronize()?;
        Ok(w)
    }

    fn set_weights(&mut self, w: &[f32], freeze: bool) -> Result<()> {
        let s = self.stream.clone();
        s.memcpy_htod(w, &mut self.w)?;
        let wb: Vec<bf16> = w.iter().map(|x| bf16::from_f32(*x)).collect();
        s.memcpy_htod(&wb, &mut self.w_bf16)?;
        s.memset_zeros(&mut self.m)?;
        s.memset_zeros(&mut self.v)?;
        self.adam_t = 0;
        if freeze {
            row_logits(
                &self.gpu,
                &s,
                self.task,
                &self.phi,
                &self.w,
                &mut self.reference,
            )?;
        }
        s.synchronize()?;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    fn adam_state(&mut self) -> Result<(Vec<f32>, Vec<f32>, i32)> {
        let m = self.stream.clone_dtoh(&self.m)?;
        let v = self.stream.clone_dtoh(&self.v)?;
        self.stream.synchronize()?;
        Ok((m, v, self.adam_t))
    }

    fn restore(&mut self, w: &[f32], m: &[f32], v: &[f32], t: i32) -> Result<()> {
        let s = self.stream.clone();
        s.memcpy_htod(w, &mut self.w)?;
        let wb: Vec<bf16> = w.iter().map(|x| bf16::from_f32(*x)).collect();
        s.memcpy_htod(&wb, &mut self.w_bf16)?;
        s.memcpy_htod(m, &mut self.m)?;
        s.memcpy_htod(v, &mut self.v)?;
        self.adam_t = t;
        s.synchronize()?;
        Ok(())
    }
}
