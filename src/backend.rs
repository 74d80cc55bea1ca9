//! Runtime choice of backend: CUDA when a driver and a GPU are present and the kernels were
//! compiled, else the CPU reference. The methods here take host data on either backend (the CUDA
//! path uploads, computes and downloads); for device-resident data call [`crate::cuda`] directly.

use crate::config::{GrpoConfig, KlEstimator, RolloutCorrection};
use crate::cpu;
use crate::cuda::{self, Gpu};
use crate::error::{Error, Result};
use crate::layout::{
    check_len, validate_grpo, validate_reduce, Advantages, GrpoInputs, HostGrpoInputs, HostMask,
    HostReduceInputs, Mask, ReduceInputs,
};
use crate::logits::{LogitElem, Logits, LogprobConfig};
use crate::output::{GrpoOutput, ReduceOutput};
use crate::rejection::RejectionCriterion;
use crate::rollout_is::RolloutIsStats;
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use std::sync::Arc;

/// Where the ops run.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU reference (f64).
    Cpu,
    /// A CUDA GPU.
    Cuda(Arc<Gpu>),
}

impl Backend {
    /// CUDA device 0 if usable, else the CPU. `RECAP_BACKEND=cpu` forces the CPU,
    /// `RECAP_BACKEND=cuda` makes [`Backend::auto_with_reason`] report why CUDA is unusable.
    pub fn auto() -> Backend {
        Self::auto_with_reason().0
    }

    /// Like [`Backend::auto`], with the reason the CPU was chosen (if it was).
    pub fn auto_with_reason() -> (Backend, Option<String>) {
        if std::env::var("RECAP_BACKEND").is_ok_and(|v| v == "cpu") {
            return (Backend::Cpu, Some("RECAP_BACKEND=cpu".into()));
        }
        match Gpu::new(0) {
            Ok(gpu) => (Backend::Cuda(gpu), None),
            Err(e) => (Backend::Cpu, Some(e.to_string())),
        }
    }

    /// CUDA device `ordinal`, or the reason it cannot be used.
    pub fn cuda(ordinal: usize) -> Result<Backend> {
        Ok(Backend::Cuda(Gpu::new(ordinal)?))
    }

    /// `"cpu"` or `"cuda:<device name>"`.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Cuda(g) => format!("cuda:{}", g.name()),
        }
    }

    /// The fused GRPO loss on host data: `dL/dlogp` into `grad` (`[T]`).
    pub fn grpo_loss(
        &self,
        inputs: &HostGrpoInputs<'_>,
        config: &GrpoConfig,
        grad: &mut [f32],
    ) -> Result<GrpoOutput> {
        let gpu = match self {
            Backend::Cpu => return cpu::grpo_loss(inputs, config, grad),
            Backend::Cuda(g) => g,
        };
        let shape = validate_grpo(inputs, config)?;
        check_len("grad", grad.len(), shape.t, "[T]")?;
        let s = gpu.stream();
        let logp = cuda::upload(s, inputs.logp)?;
        let old = cuda::upload(s, inputs.old_logp)?;
        let refp = inputs.ref_logp.map(|r| cuda::upload(s, r)).transpose()?;
        let rollp = inputs
            .rollout_logp
            .map(|r| cuda::upload(s, r))
            .transpose()?;
        let pw = inputs
            .policy_weight
            .map(|r| cuda::upload(s, r))
            .transpose()?;
        let (adv_h, per_token) = match inputs.advantages {
            Advantages::PerSequence(a) => (a, false),
            Advantages::PerToken(a) => (a, true),
        };
        let adv = cuda::upload(s, adv_h)?;
        let mask = DeviceMask::upload(s, &inputs.mask)?;
        let mut g = s.alloc_zeros::<f32>(shape.t.max(1))?;
        let adv_v = adv.slice(..adv_h.len());
        let dev = GrpoInputs {
            logp: logp.slice(..shape.t),
            old_logp: old.slice(..shape.t),
            ref_logp: refp.as_ref().map(|r| r.slice(..shape.t)),
            rollout_logp: rollp.as_ref().map(|r| r.slice(..shape.t)),
            policy_weight: pw.as_ref().map(|r| r.slice(..shape.t)),
            advantages: if per_token {
                Advantages::PerToken(adv_v)
            } else {
                Advantages::PerSequence(adv_v)
            },
            mask: mask.view(shape.t),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            objectives: inputs.objectives,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        };
        let out = cuda::grpo_loss(gpu, s, &dev, config, &mut g.slice_mut(..shape.t));
        download(s, &g, grad)?;
        out
    }

    /// Per-token KL value and gradient on host data.
    pub fn kl(
        &self,
        logp: &[f32],
        ref_logp: &[f32],
        mask: Option<HostMask<'_>>,
        estimator: KlEstimator,
        kl_out: &mut [f32],
        grad: &mut [f32],
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => return cpu::kl(logp, ref_logp, mask, estimator, kl_out, grad),
            Backend::Cuda(g) => g,
        };
        let t = logp.len();
        check_len("kl_out", kl_out.len(), t, "[T]")?;
        check_len("grad", grad.len(), t, "[T]")?;
        let s = gpu.stream();
        let l = cuda::upload(s, logp)?;
        let r = cuda::upload(s, ref_logp)?;
        let m = mask
            .as_ref()
            .map(|m| DeviceMask::upload(s, m))
            .transpose()?;
        let mut kd = s.alloc_zeros::<f32>(t.max(1))?;
        let mut gd = s.alloc_zeros::<f32>(t.max(1))?;
        cuda::kl(
            gpu,
            s,
            &l.slice(..t),
            &r.slice(..ref_logp.len()),
            m.as_ref().map(|m| m.view(m.len)),
            estimator,
            &mut kd.slice_mut(..t),
            &mut gd.slice_mut(..t),
        )?;
        download(s, &kd, kl_out)?;
        download(s, &gd, grad)
    }

    /// Rollout rejection flags on host data (see [`crate::rejection`]).
    pub fn rollout_rejection(
        &self,
        log_ratio: &[f32],
        mask: HostMask<'_>,
        cu_seqlens: &[i32],
        criteria: &[RejectionCriterion],
        flags: &mut [i32],
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => {
                return cpu::rollout_rejection(log_ratio, mask, cu_seqlens, criteria, flags)
            }
            Backend::Cuda(g) => g,
        };
        let t = log_ratio.len();
        check_len("flags", flags.len(), t, "[T] (the length of log_ratio)")?;
        let s = gpu.stream();
        let l = cuda::upload(s, log_ratio)?;
        let m = DeviceMask::upload(s, &mask)?;
        let mut fd = s.alloc_zeros::<i32>(t.max(1))?;
        cuda::rollout_rejection(
            gpu,
            s,
            &l.slice(..t),
            m.view(m.len),
            cu_seqlens,
            criteria,
            &mut fd.slice_mut(..t),
        )?;
        download(s, &fd, flags)
    }

    /// Rollout IS weights on host data (see [`crate::rollout_is`]): `weights` `[T]` of the
    /// log-ratios `old_logp - rollout_logp`, divided by the batch mean when `normalize`.
    pub fn rollout_is_weights(
        &self,
        log_ratio: &[f32],
        mask: HostMask<'_>,
        cu_seqlens: &[i32],
        correction: &RolloutCorrection,
        normalize: bool,
        weights: &mut [f32],
    ) -> Result<RolloutIsStats> {
        let gpu = match self {
            Backend::Cpu => {
                return cpu::rollout_is_weights(
                    log_ratio, mask, cu_seqlens, correction, normalize, weights,
                )
            }
            Backend::Cuda(g) => g,
        };
        let t = log_ratio.len();
        check_len("weights", weights.len(), t, "[T] (the length of log_ratio)")?;
        let s = gpu.stream();
        let l = cuda::upload(s, log_ratio)?;
        let m = DeviceMask::upload(s, &mask)?;
        let mut wd = s.alloc_zeros::<f32>(t.max(1))?;
        let stats = cuda::rollout_is_weights(
            gpu,
            s,
            &l.slice(..t),
            m.view(m.len),
            cu_seqlens,
            correction,
            normalize,
            &mut wd.slice_mut(..t),
        )?;
        download(s, &wd, weights)?;
        Ok(stats)
    }

    /// The weighted reduction on host data: `d total / d l_tk` into `grad` (`[T, K]`).
    pub fn weighted_reduce(
        &self,
        inputs: &HostReduceInputs<'_>,
        config: &GrpoConfig,
        grad: &mut [f32],
    ) -> Result<ReduceOutput> {
        let gpu = match self {
            Backend::Cpu => return cpu::weighted_reduce(inputs, config, grad),
            Backend::Cuda(g) => g,
        };
        let shape = validate_reduce(inputs, config.agg_mode, config.norm_constant)?;
        check_len("grad", grad.len(), shape.t * shape.k, "[T, K]")?;
        let s = gpu.stream();
        let losses = cuda::upload(s, inputs.losses)?;
        let mask = DeviceMask::upload(s, &inputs.mask)?;
        let n = shape.t * shape.k;
        let mut g = s.alloc_zeros::<f32>(n.max(1))?;
        let dev = ReduceInputs {
            losses: losses.slice(..n),
            mask: mask.view(shape.t),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        };
        let out = cuda::weighted_reduce(gpu, s, &dev, config, &mut g.slice_mut(..n));
        download(s, &g, grad)?;
        out
    }
}

impl Backend {
    /// Group advantages `[B, K]` of host rewards `[B, K]` into `out` (see
    /// [`crate::advantages::group_advantages`]; the CUDA path maps the group ids to dense ids on
    /// the host, then runs `kernels/advantages.cu`).
    pub fn group_advantages(
        &self,
        rewards: &[f32],
        groups: crate::advantages::Groups<'_>,
        lengths: Option<&[i32]>,
        baselines: Option<&[f32]>,
        config: &crate::advantages::AdvantageConfig,
        out: &mut [f32],
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => {
                return crate::advantages::group_advantages(
                    rewards, groups, lengths, baselines, config, out,
                )
            }
            Backend::Cuda(g) => g,
        };
        let (b, _) = crate::advantages::validate(
            rewards.len(),
            lengths.map(|l| l.len()),
            baselines.map(|l| l.len()),
            config,
            out.len(),
        )?;
        let (ids, num_groups) = crate::advantages::dense_group_ids(groups, b)?;
        let s = gpu.stream();
        let r = cuda::upload(s, rewards)?;
        let i = cuda::upload(s, &ids)?;
        let l = match lengths {
            Some(l) => Some(cuda::upload(s, l)?),
            None => None,
        };
        let base = match baselines {
            Some(x) => Some(cuda::upload(s, x)?),
            None => None,
        };
        let mut o = s.alloc_zeros::<f32>(out.len().max(1))?;
        cuda::group_advantages(
            gpu,
            s,
            &r.slice(..rewards.len()),
            cuda::DeviceGroups::Ids {
                ids: i.slice(..b),
                num_groups,
            },
            l.as_ref().map(|l| l.slice(..b)).as_ref(),
            base.as_ref()
                .zip(baselines)
                .map(|(d, h)| d.slice(..h.len()))
                .as_ref(),
            config,
            &mut o.slice_mut(..out.len()),
        )?;
        s.memcpy_dtoh(&o.slice(..out.len()), out)?;
        s.synchronize()?;
        Ok(())
    }

    /// verl's optimal token baseline on host data (see [`crate::token_baseline`]): advantages and
    /// returns, `[T]` each.
    pub fn optimal_token_baseline(
        &self,
        x: &crate::HostTokenBaselineInputs<'_>,
        config: &crate::TokenBaselineConfig,
        advantages: &mut [f32],
        returns: &mut [f32],
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => {
                return crate::token_baseline::optimal_token_baseline(
                    x, config, advantages, returns,
                )
            }
            Backend::Cuda(g) => g,
        };
        let t = x.token_rewards.len();
        crate::token_baseline::validate(x, config, advantages.len(), returns.len())?;
        let s = gpu.stream();
        let up = |v: &[f32]| cuda::upload(s, v);
        let (r, o, q) = (up(x.token_rewards)?, up(x.old_logp)?, up(x.sum_pi_squared)?);
        let h = x.rollout_is_weights.map(up).transpose()?;
        let m = DeviceMask::upload(s, &x.mask)?;
        let (mut a, mut g) = (
            s.alloc_zeros::<f32>(t.max(1))?,
            s.alloc_zeros::<f32>(t.max(1))?,
        );
        let dx = crate::TokenBaselineInputs {
            token_rewards: r.slice(..t),
            old_logp: o.slice(..t),
            sum_pi_squared: q.slice(..t),
            rollout_is_weights: h.as_ref().map(|h| h.slice(..t)),
            mask: m.view(t),
            cu_seqlens: x.cu_seqlens,
            groups: x.groups,
        };
        cuda::optimal_token_baseline(
            gpu,
            s,
            &dx,
            config,
            &mut a.slice_mut(..t),
            &mut g.slice_mut(..t),
        )?;
        download(s, &a, advantages)?;
        download(s, &g, returns)
    }

    /// Kernel 4 on host data: logp, entropy and LSE (`[T]` each) of each row of `logits / tau`.
    pub fn logprob_forward<E: LogitElem>(
        &self,
        logits: &Logits<&[E]>,
        labels: &[i32],
        config: &LogprobConfig,
        logp: &mut [f32],
        entropy: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => {
                return cpu::logprob_forward(logits, labels, config, logp, Some(entropy), lse)
            }
            Backend::Cuda(g) => g,
        };
        config.validate()?;
        logits.validate("logits")?;
        let t = logits.rows;
        for (arg, n) in [
            ("labels", labels.len()),
            ("logp", logp.len()),
            ("entropy", entropy.len()),
            ("lse", lse.len()),
        ] {
            check_len(arg, n, t, "[T] (the rows of logits)")?;
        }
        let s = gpu.stream();
        let z = cuda::upload(s, logits.data)?;
        let y = cuda::upload(s, labels)?;
        let mut out = s.alloc_zeros::<f32>(3 * t.max(1))?;
        {
            let (mut a, mut rest) = out.split_at_mut(t.max(1));
            let (mut b, mut c) = rest.split_at_mut(t.max(1));
            cuda::logprob_forward(
                gpu,
                s,
                &Logits {
                    data: z.slice(..logits.data.len()),
                    rows: logits.rows,
                    vocab: logits.vocab,
                    ld: logits.ld,
                },
                &y.slice(..t),
                config,
                &mut a.slice_mut(..t),
                Some(&mut b.slice_mut(..t)),
                &mut c.slice_mut(..t),
                None,
            )?;
        }
        let host = s.clone_dtoh(&out)?;
        let n = t.max(1);
        logp.copy_from_slice(&host[..t]);
        entropy.copy_from_slice(&host[n..n + t]);
        lse.copy_from_slice(&host[2 * n..2 * n + t]);
        Ok(())
    }

    /// Kernel 5 on host data (the CUDA path runs kernel 4 first for the row statistics), out of place.
    pub fn logprob_backward<E: LogitElem>(
        &self,
        logits: &Logits<&[E]>,
        labels: &[i32],
        config: &LogprobConfig,
        g_logp: &[f32],
        g_entropy: Option<&[f32]>,
        dlogits: &mut Logits<&mut [E]>,
    ) -> Result<()> {
        let gpu = match self {
            Backend::Cpu => {
                return cpu::logprob_backward(
                    logits, labels, config, g_logp, g_entropy, None, dlogits,
                )
            }
            Backend::Cuda(g) => g,
        };
        config.validate()?;
        logits.validate("logits")?;
        dlogits.check("dlogits", dlogits.data.len())?;
        let t = logits.rows;
        check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
        check_len("g_logp", g_logp.len(), t, "[T]")?;
        if let Some(g) = g_entropy {
            check_len("g_entropy", g.len(), t, "[T]")?;
        }
        let s = gpu.stream();
        let z = cuda::upload(s, logits.data)?;
        let y = cuda::upload(s, labels)?;
        let g = cuda::upload(s, g_logp)?;
        let ge = g_entropy.map(|x| cuda::upload(s, x)).transpose()?;
        let mut stats = s.alloc_zeros::<f32>(3 * t.max(1))?;
        let mut dz = cuda::upload(s, dlogits.data)?;
        let n = t.max(1);
        let zv = Logits {
            data: z.slice(..logits.data.len()),
            rows: logits.rows,
            vocab: logits.vocab,
            ld: logits.ld,
        };
        let yv = y.slice(..t);
        {
            let (mut a, mut rest) = stats.split_at_mut(n);
            let (mut b, mut c) = rest.split_at_mut(n);
            cuda::logprob_forward(
                gpu,
                s,
                &zv,
                &yv,
                config,
                &mut a.slice_mut(..t),
                Some(&mut b.slice_mut(..t)),
                &mut c.slice_mut(..t),
                None,
            )?;
        }
        {
            let h = stats.slice(n..n + t);
            let l = stats.slice(2 * n..2 * n + t);
            let gv = g.slice(..t);
            let gev = ge.as_ref().map(|x| x.slice(..t));
            let grads = cuda::LogprobGrads {
                labels: &yv,
                lse: &l,
                entropy: &h,
                g_logp: &gv,
                g_entropy: gev.as_ref(),
                sum_pi_squared: None,
            };
            let len = dlogits.data.len();
            let mut out = Logits {
                data: dz.slice_mut(..len),
                rows: dlogits.rows,
                vocab: dlogits.vocab,
                ld: dlogits.ld,
            };
            cuda::logprob_backward(gpu, s, &zv, &grads, config, &mut out)?;
        }
        if !dlogits.data.is_empty() {
            s.memcpy_dtoh(&dz.slice(..dlogits.data.len()), dlogits.data)?;
        }
        s.synchronize()?;
        Ok(())
    }
}

/// A device copy of a host mask.
enum DeviceMaskBuf {
    F32(CudaSlice<f32>),
    U8(CudaSlice<u8>),
}

struct DeviceMask {
    buf: DeviceMaskBuf,
    len: usize,
}

impl DeviceMask {
    fn upload(s: &Arc<CudaStream>, m: &HostMask<'_>) -> Result<Self> {
        Ok(match m {
            Mask::F32(x) => DeviceMask {
                buf: DeviceMaskBuf::F32(cuda::upload(s, x)?),
                len: x.len(),
            },
            Mask::U8(x) => DeviceMask {
                buf: DeviceMaskBuf::U8(cuda::upload(s, x)?),
                len: x.len(),
            },
        })
    }

    fn view(&self, n: usize) -> Mask<CudaView<'_, f32>, CudaView<'_, u8>> {
        let n = n.min(self.len);
        match &self.buf {
            DeviceMaskBuf::F32(b) => Mask::F32(b.slice(..n)),
            DeviceMaskBuf::U8(b) => Mask::U8(b.slice(..n)),
        }
    }
}

fn download<T: cudarc::driver::DeviceRepr>(
    s: &Arc<CudaStream>,
    d: &CudaSlice<T>,
    out: &mut [T],
) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    if d.len() < out.len() {
        return Err(Error::invalid_argument(
            "grad",
            "device buffer shorter than the host output",
        ));
    }
    s.memcpy_dtoh(&d.slice(..out.len()), out)?;
    s.synchronize()?;
    Ok(())
}
