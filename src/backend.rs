//! Runtime choice of backend: CUDA when a driver and a GPU are present and the kernels were
//! compiled, else the CPU reference. The methods here take host data on either backend and are
//! [`crate::raw`]'s calls on that data, at [`Place::Host`] or [`Place::CudaStaged`] (which copies
//! the arrays to the device, computes there and copies the outputs back): one dispatcher. For
//! device-resident data call [`crate::cuda`] (or `raw` with [`Place::Cuda`]) directly.

use crate::config::{GrpoConfig, KlEstimator, RolloutCorrection};
use crate::cpu;
use crate::cuda::Gpu;
use crate::error::Result;
use crate::layout::{
    Advantages, GrpoInputs, HostGrpoInputs, HostMask, HostReduceInputs, Mask, ReduceInputs,
};
use crate::logits::{LogitElem, Logits, LogprobConfig};
use crate::output::{GrpoOutput, ReduceOutput};
use crate::raw::{self, In, Out, Place};
use crate::rejection::RejectionCriterion;
use crate::rollout_is::RolloutIsStats;
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

    /// Where this backend's calls run, for the pointer-level entry points ([`crate::raw`], and an
    /// op's own `*_at`, e.g. [`crate::ops::gae::gae_at`]) on host arrays: [`Place::Host`], or
    /// [`Place::CudaStaged`] on this backend's device.
    pub fn place(&self) -> Place {
        match self {
            Backend::Cpu => Place::Host,
            Backend::Cuda(g) => Place::CudaStaged {
                device: g.context().ordinal(),
            },
        }
    }

    /// The fused GRPO loss on host data: `dL/dlogp` into `grad` (`[T]`).
    pub fn grpo_loss(
        &self,
        inputs: &HostGrpoInputs<'_>,
        config: &GrpoConfig,
        grad: &mut [f32],
    ) -> Result<GrpoOutput> {
        let x = GrpoInputs {
            logp: arr(inputs.logp),
            old_logp: arr(inputs.old_logp),
            ref_logp: inputs.ref_logp.map(arr),
            rollout_logp: inputs.rollout_logp.map(arr),
            policy_weight: inputs.policy_weight.map(arr),
            advantages: advantages(&inputs.advantages),
            mask: mask(&inputs.mask),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            objectives: inputs.objectives,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        };
        raw::grpo_loss(self.place(), &x, config, arr_mut(grad))
    }

    /// Per-token KL value and gradient on host data.
    pub fn kl(
        &self,
        logp: &[f32],
        ref_logp: &[f32],
        mask_in: Option<HostMask<'_>>,
        estimator: KlEstimator,
        kl_out: &mut [f32],
        grad: &mut [f32],
    ) -> Result<()> {
        raw::kl(
            self.place(),
            arr(logp),
            arr(ref_logp),
            mask_in.as_ref().map(mask),
            estimator,
            arr_mut(kl_out),
            arr_mut(grad),
        )
    }

    /// Rollout rejection flags on host data (see [`crate::rejection`]).
    pub fn rollout_rejection(
        &self,
        log_ratio: &[f32],
        mask_in: HostMask<'_>,
        cu_seqlens: &[i32],
        criteria: &[RejectionCriterion],
        flags: &mut [i32],
    ) -> Result<()> {
        raw::rollout_rejection(
            self.place(),
            arr(log_ratio),
            mask(&mask_in),
            cu_seqlens,
            criteria,
            arr_mut(flags),
        )
    }

    /// Rollout IS weights on host data (see [`crate::rollout_is`]): `weights` `[T]` of the
    /// log-ratios `old_logp - rollout_logp`, divided by the batch mean when `normalize`.
    pub fn rollout_is_weights(
        &self,
        log_ratio: &[f32],
        mask_in: HostMask<'_>,
        cu_seqlens: &[i32],
        correction: &RolloutCorrection,
        normalize: bool,
        weights: &mut [f32],
    ) -> Result<RolloutIsStats> {
        raw::rollout_is_weights(
            self.place(),
            arr(log_ratio),
            mask(&mask_in),
            cu_seqlens,
            correction,
            normalize,
            arr_mut(weights),
        )
    }

    /// The weighted reduction on host data: `d total / d l_tk` into `grad` (`[T, K]`).
    pub fn weighted_reduce(
        &self,
        inputs: &HostReduceInputs<'_>,
        config: &GrpoConfig,
        grad: &mut [f32],
    ) -> Result<ReduceOutput> {
        let x = ReduceInputs {
            losses: arr(inputs.losses),
            mask: mask(&inputs.mask),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        };
        raw::weighted_reduce(self.place(), &x, config, arr_mut(grad))
    }

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
        let place = self.place();
        let dense;
        let groups = match groups {
            crate::advantages::Groups::Consecutive(g) => raw::RawGroups::Consecutive(g),
            crate::advantages::Groups::Ids(ids) if place == Place::Host => raw::RawGroups::Ids {
                ids: arr(ids),
                num_groups: 0,
            },
            crate::advantages::Groups::Ids(ids) => {
                let (d, num_groups) = crate::advantages::dense_group_ids(
                    crate::advantages::Groups::Ids(ids),
                    ids.len(),
                )?;
                dense = d;
                raw::RawGroups::Ids {
                    ids: arr(&dense),
                    num_groups,
                }
            }
        };
        raw::group_advantages(
            place,
            arr(rewards),
            groups,
            lengths.map(arr),
            baselines.map(arr),
            config,
            arr_mut(out),
        )
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
        let r = crate::TokenBaselineInputs {
            token_rewards: arr(x.token_rewards),
            old_logp: arr(x.old_logp),
            sum_pi_squared: arr(x.sum_pi_squared),
            rollout_is_weights: x.rollout_is_weights.map(arr),
            mask: mask(&x.mask),
            cu_seqlens: x.cu_seqlens,
            groups: x.groups,
        };
        raw::optimal_token_baseline(
            self.place(),
            &r,
            config,
            arr_mut(advantages),
            arr_mut(returns),
        )
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
        raw::logprob_forward(
            self.place(),
            &host_logits(logits),
            arr(labels),
            config,
            arr_mut(logp),
            Some(arr_mut(entropy)),
            arr_mut(lse),
            None,
        )
    }

    /// Kernel 5 on host data, out of place: the gradient of `g_logp . logp + g_entropy . entropy`
    /// with respect to the logits into `dlogits` (the CUDA path runs kernel 4 first for the row
    /// statistics, then kernel 5 on a copy of the logits in `dlogits`' layout).
    pub fn logprob_backward<E: LogitElem>(
        &self,
        logits: &Logits<&[E]>,
        labels: &[i32],
        config: &LogprobConfig,
        g_logp: &[f32],
        g_entropy: Option<&[f32]>,
        dlogits: &mut Logits<&mut [E]>,
    ) -> Result<()> {
        if let Backend::Cpu = self {
            return cpu::logprob_backward(logits, labels, config, g_logp, g_entropy, None, dlogits);
        }
        logits.validate("logits")?;
        dlogits.check("dlogits", dlogits.data.len())?;
        let t = logits.rows;
        if (dlogits.rows, dlogits.vocab) != (t, logits.vocab) {
            return Err(crate::error::Error::invalid_argument(
                "dlogits",
                format!(
                    "expected the shape of logits [{t}, {}], got [{}, {}]",
                    logits.vocab, dlogits.rows, dlogits.vocab
                ),
            ));
        }
        let (mut logp, mut entropy, mut lse) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
        self.logprob_forward(logits, labels, config, &mut logp, &mut entropy, &mut lse)?;
        let v = logits.vocab;
        for r in 0..t {
            dlogits.data[r * dlogits.ld..r * dlogits.ld + v]
                .copy_from_slice(&logits.data[r * logits.ld..r * logits.ld + v]);
        }
        let grads = raw::LogprobGrads {
            labels: arr(labels),
            lse: arr(&lse),
            entropy: arr(&entropy),
            g_logp: arr(g_logp),
            g_entropy: g_entropy.map(arr),
            sum_pi_squared: None,
        };
        let out = Logits {
            data: arr_mut(dlogits.data),
            rows: dlogits.rows,
            vocab: dlogits.vocab,
            ld: dlogits.ld,
        };
        raw::logprob_backward_inplace(self.place(), &out, &grads, config, None)
    }
}

/// A host slice as a `raw` array. Every array made here is passed to one `raw` call made while the
/// slice is borrowed (the methods above), which is `In::new`'s contract.
fn arr<T>(x: &[T]) -> In<T> {
    // SAFETY: `x.len()` initialized values at `x`'s address, alive and unwritten for the borrow, in
    // host memory, which is what `Place::Host` and `Place::CudaStaged` read.
    unsafe { In::new(x.as_ptr() as usize, x.len()) }
}

/// A writable host slice as a `raw` array, under the same rule as [`arr`].
fn arr_mut<T>(x: &mut [T]) -> Out<T> {
    // SAFETY: as `arr`, for values used by nobody else during the borrow.
    unsafe { Out::new(x.as_mut_ptr() as usize, x.len()) }
}

fn mask(m: &HostMask<'_>) -> Mask<In<f32>, In<u8>> {
    match m {
        Mask::F32(x) => Mask::F32(arr(x)),
        Mask::U8(x) => Mask::U8(arr(x)),
    }
}

fn advantages(a: &Advantages<&[f32]>) -> Advantages<In<f32>> {
    match a {
        Advantages::PerSequence(x) => Advantages::PerSequence(arr(x)),
        Advantages::PerToken(x) => Advantages::PerToken(arr(x)),
    }
}

fn host_logits<E>(z: &Logits<&[E]>) -> Logits<In<E>> {
    Logits {
        data: arr(z.data),
        rows: z.rows,
        vocab: z.vocab,
        ld: z.ld,
    }
}
