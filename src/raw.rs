//! Pointer-level entry points for the bindings (the C ABI crate `capi/`, the Python package):
//! the caller's arrays given as addresses and lengths, on the host (computed by the CPU reference)
//! or on a CUDA device (computed by the kernels, on the caller's stream, in the device's primary
//! context, which is the one PyTorch uses).
//!
//! The arrays are [`In`] / [`Out`] at a [`Place`]; how they are borrowed (lengths, overlaps,
//! alignment, staging) is defined once in [`crate::place`]. The bindings only translate their own
//! types into these. Ops added since the split into `ops/<op>/` have their entry point beside the
//! op (e.g. [`crate::ops::gae::gae_at`]).

use crate::advantages::{AdvantageConfig, Groups};
use crate::config::{GrpoConfig, KlEstimator, Normalizers, ObjectiveKind};
use crate::cuda::{self, FusedLinearConfig};
use crate::error::{Error, Result};
use crate::layout::{Advantages, GrpoInputs, Mask, ReduceInputs};
use crate::logits::{LogitElem, Logits, LogitsLossInputs, LogitsLossOutput, LogprobConfig};
use crate::output::{GrpoOutput, ReduceOutput};
use crate::place::{mask, opt, run, DeviceMemory, HostMemory, Memory};
pub use crate::place::{read, shared_gpu, write, Element, In, Out, Place};

fn advantages<'m, M: Memory>(
    m: &'m M,
    x: &Advantages<In<f32>>,
) -> Result<Advantages<M::Ro<'m, f32>>> {
    Ok(match x {
        Advantages::PerSequence(a) => Advantages::PerSequence(m.ro("advantages", *a)?),
        Advantages::PerToken(a) => Advantages::PerToken(m.ro("advantages", *a)?),
    })
}

/// The fused loss's inputs as views in `m`.
fn grpo_inputs<'a: 'm, 'm, M: Memory>(
    m: &'m M,
    x: &GrpoInputs<'a, In<f32>, In<u8>>,
) -> Result<GrpoInputs<'m, M::Ro<'m, f32>, M::Ro<'m, u8>>> {
    Ok(GrpoInputs {
        logp: m.ro("logp", x.logp)?,
        old_logp: m.ro("old_logp", x.old_logp)?,
        ref_logp: opt(m, "ref_logp", x.ref_logp)?,
        rollout_logp: opt(m, "rollout_logp", x.rollout_logp)?,
        policy_weight: opt(m, "policy_weight", x.policy_weight)?,
        advantages: advantages(m, &x.advantages)?,
        mask: mask(m, "mask", &x.mask)?,
        cu_seqlens: x.cu_seqlens,
        lambda: x.lambda,
        objectives: x.objectives,
        membership: x.membership,
        normalizers: x.normalizers,
    })
}

/// The loss-from-logits inputs as views in memory `M`.
type LogitsViews<'m, M> = LogitsLossInputs<
    'm,
    <M as Memory>::Ro<'m, f32>,
    <M as Memory>::Ro<'m, u8>,
    <M as Memory>::Ro<'m, i32>,
>;

/// The loss-from-logits inputs as views in `m`.
fn logits_inputs<'a: 'm, 'm, M: Memory>(
    m: &'m M,
    x: &LogitsLossInputs<'a, In<f32>, In<u8>, In<i32>>,
) -> Result<LogitsViews<'m, M>> {
    Ok(LogitsLossInputs {
        labels: m.ro("labels", x.labels)?,
        old_logp: m.ro("old_logp", x.old_logp)?,
        ref_logp: opt(m, "ref_logp", x.ref_logp)?,
        rollout_logp: opt(m, "rollout_logp", x.rollout_logp)?,
        advantages: advantages(m, &x.advantages)?,
        mask: mask(m, "mask", &x.mask)?,
        cu_seqlens: x.cu_seqlens,
        lambda: x.lambda,
        objectives: x.objectives,
        membership: x.membership,
        normalizers: x.normalizers,
    })
}

/// The fused GRPO loss: `dL/dlogp` into `grad` (`[T]`); see [`crate::cpu::grpo_loss`] and
/// [`crate::cuda::grpo_loss`] (which synchronizes the stream to read the statistics back).
pub fn grpo_loss(
    place: Place,
    inputs: &GrpoInputs<'_, In<f32>, In<u8>>,
    config: &GrpoConfig,
    grad: Out<f32>,
) -> Result<GrpoOutput> {
    if inputs.logp.len == 0 && place != Place::Host {
        // an empty batch: the defined result (loss 0, counts 0), nothing on the device to read
        return empty_grpo_loss(inputs, config);
    }
    run(
        place,
        |m| crate::cpu::grpo_loss(&grpo_inputs(m, inputs)?, config, m.rw("grad", grad)?),
        |m| {
            let x = grpo_inputs(m, inputs)?;
            let mut g = m.rw("grad", grad)?;
            cuda::grpo_loss(&m.gpu, &m.stream, &x, config, &mut g)
        },
    )
    .map_err(|e| {
        let arrays = [
            ("logp", Some(inputs.logp)),
            ("old_logp", Some(inputs.old_logp)),
            ("ref_logp", inputs.ref_logp),
            ("rollout_logp", inputs.rollout_logp),
            ("policy_weight", inputs.policy_weight),
        ];
        name_nonfinite(e, place, &inputs.mask, &arrays, &inputs.advantages, None)
    })
}

/// A non-finite error naming the first input that holds a non-finite value at an unmasked token
/// (`arrays`, per token, in order), else in `advantages`, else `fallback`. Device arrays are read
/// back: only once the call has failed.
fn name_nonfinite(
    e: Error,
    place: Place,
    mask: &Mask<In<f32>, In<u8>>,
    arrays: &[(&'static str, Option<In<f32>>)],
    advantages: &Advantages<In<f32>>,
    fallback: Option<&'static str>,
) -> Error {
    let Error::NonFinite { count, arg: None } = e else {
        return e;
    };
    let found = (|| -> Result<Option<&'static str>> {
        let m: Vec<f32> = match *mask {
            Mask::F32(a) => read::<f32>(place, "mask", a)?,
            Mask::U8(a) => read::<u8>(place, "mask", a)?
                .iter()
                .map(|x| f32::from(*x != 0))
                .collect(),
        };
        if m.iter().any(|x| !x.is_finite()) {
            return Ok(Some("mask"));
        }
        for (name, a) in arrays {
            let Some(a) = a else { continue };
            let v = read::<f32>(place, name, *a)?;
            if v.iter().zip(&m).any(|(x, w)| *w != 0.0 && !x.is_finite()) {
                return Ok(Some(name));
            }
        }
        let (Advantages::PerSequence(a) | Advantages::PerToken(a)) = *advantages;
        if read::<f32>(place, "advantages", a)?
            .iter()
            .any(|x| !x.is_finite())
        {
            return Ok(Some("advantages"));
        }
        Ok(fallback)
    })();
    Error::NonFinite {
        count,
        arg: found.ok().flatten(),
    }
}

/// The per-batch arrays of an asynchronous fused-loss call passed in the call's device memory
/// instead of on the host (see [`cuda::DeviceLayout`]: checked on the device, reported by the read;
/// with them, `inputs.cu_seqlens` is empty, `inputs.membership` `None` and, with `lambda` here,
/// `inputs.lambda` empty).
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatchArrays {
    /// `[B + 1]` sequence boundaries.
    pub cu_seqlens: In<i32>,
    /// `[B]` membership bits, or `None`.
    pub membership: Option<In<u32>>,
    /// `[K]` objective weights, or `None` (then `inputs.lambda`).
    pub lambda: Option<In<f32>>,
}

/// The fused GRPO loss without a host synchronization: enqueues its two launches on the place's
/// stream, writing `dL/dlogp` into `grad` (`[T]`) and the loss, statistics and check flags into
/// `out` (`[cuda::grpo_output_len(K)]` f64), and returns what [`read_grpo_output`] needs; see
/// [`cuda::grpo_loss_async`]. On the host the CPU reference computes at once, into the same layout.
pub fn grpo_loss_async(
    place: Place,
    inputs: &GrpoInputs<'_, In<f32>, In<u8>>,
    device: Option<&DeviceBatchArrays>,
    config: &GrpoConfig,
    grad: Out<f32>,
    out: Out<f64>,
) -> Result<cuda::PendingGrpo> {
    let k = match device.and_then(|d| d.lambda) {
        Some(_) => inputs.objectives.len(),
        None => inputs.lambda.len(),
    };
    let pending = cuda::PendingGrpo::new(
        k,
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
        config,
    );
    run(
        place,
        |m| {
            // on the host the "device" arrays are host arrays too
            let mut x = grpo_inputs(m, inputs)?;
            if let (Some(cu), mem, lam) = host_layout_arrays(m, device)? {
                if !x.cu_seqlens.is_empty() || x.membership.is_some() {
                    return Err(Error::invalid_argument(
                        "cu_seqlens",
                        "given both in the inputs and as device arrays; leave the inputs' empty",
                    ));
                }
                x.cu_seqlens = cu;
                x.membership = mem;
                if let Some(l) = lam {
                    x.lambda = l;
                }
            }
            crate::cpu::grpo_loss_out(&x, config, m.rw("grad", grad)?, m.rw("out", out)?)?;
            Ok(pending.clone())
        },
        |m| {
            let x = grpo_inputs(m, inputs)?;
            let mut g = m.rw("grad", grad)?;
            let mut o = m.rw("out", out)?;
            let (cu, mem, lam) = device_layout_arrays(m, device)?;
            let layout = device_layout(&cu, &mem, &lam);
            cuda::grpo_loss_async(
                &m.gpu,
                &m.stream,
                &x,
                layout.as_ref(),
                config,
                &mut g,
                &mut o,
            )
        },
    )
}

/// Reads an asynchronous fused-loss call's output `out` back (this synchronizes the place's
/// stream) and decodes it; reports a failed device-side check naming its argument.
pub fn read_grpo_output(
    place: Place,
    pending: &cuda::PendingGrpo,
    out: In<f64>,
) -> Result<GrpoOutput> {
    run(
        place,
        |m| pending.decode_host(m.ro("out", out)?),
        |m| pending.read(&m.stream, &m.ro("out", out)?),
    )
}

/// Zero advantages standing in for a call without tokens (whose `[B, K]` advantages, on a device,
/// are never read): the reference then computes the defined empty result on the host.
fn empty_advantages(adv: &Advantages<In<f32>>, cu_seqlens: &[i32], k: usize) -> Vec<f32> {
    match adv {
        Advantages::PerSequence(_) => vec![0f32; cu_seqlens.len().saturating_sub(1) * k],
        Advantages::PerToken(_) => Vec::new(),
    }
}

fn host_advantages<'v>(adv: &Advantages<In<f32>>, zeros: &'v [f32]) -> Advantages<&'v [f32]> {
    match adv {
        Advantages::PerSequence(_) => Advantages::PerSequence(zeros),
        Advantages::PerToken(_) => Advantages::PerToken(zeros),
    }
}

fn empty_grpo_loss(
    inputs: &GrpoInputs<'_, In<f32>, In<u8>>,
    config: &GrpoConfig,
) -> Result<GrpoOutput> {
    let adv = empty_advantages(&inputs.advantages, inputs.cu_seqlens, inputs.lambda.len());
    let empty: [f32; 0] = [];
    crate::cpu::grpo_loss(
        &GrpoInputs {
            logp: &empty[..],
            old_logp: &empty[..],
            ref_logp: inputs.ref_logp.map(|_| &empty[..]),
            rollout_logp: inputs.rollout_logp.map(|_| &empty[..]),
            policy_weight: inputs.policy_weight.map(|_| &empty[..]),
            advantages: host_advantages(&inputs.advantages, &adv),
            mask: Mask::U8(&[]),
            cu_seqlens: inputs.cu_seqlens,
            lambda: inputs.lambda,
            objectives: inputs.objectives,
            membership: inputs.membership,
            normalizers: inputs.normalizers,
        },
        config,
        &mut [],
    )
}

/// Per-token KL value and `d kl / d logp` (`[T]` each); masked tokens give 0 (`mask = None`: every
/// token counts).
pub fn kl(
    place: Place,
    logp: In<f32>,
    ref_logp: In<f32>,
    mask_in: Option<Mask<In<f32>, In<u8>>>,
    estimator: KlEstimator,
    kl_out: Out<f32>,
    grad: Out<f32>,
) -> Result<()> {
    run(
        place,
        |m| {
            let mk = mask_in.map(|x| mask(m, "mask", &x)).transpose()?;
            crate::cpu::kl(
                m.ro("logp", logp)?,
                m.ro("ref_logp", ref_logp)?,
                mk,
                estimator,
                m.rw("kl", kl_out)?,
                m.rw("grad", grad)?,
            )
        },
        |m| {
            if logp.len == 0 {
                return crate::layout::check_len("ref_logp", ref_logp.len, 0, "[T]");
            }
            let mk = mask_in.map(|x| mask(m, "mask", &x)).transpose()?;
            cuda::kl(
                &m.gpu,
                &m.stream,
                &m.ro("logp", logp)?,
                &m.ro("ref_logp", ref_logp)?,
                mk,
                estimator,
                &mut m.rw("kl", kl_out)?,
                &mut m.rw("grad", grad)?,
            )
        },
    )
}

/// Rollout rejection flags `[T]` (i32; see [`crate::rejection`]) of the log-ratios
/// `old_logp - rollout_logp`.
pub fn rollout_rejection(
    place: Place,
    log_ratio: In<f32>,
    mask_in: Mask<In<f32>, In<u8>>,
    cu_seqlens: &[i32],
    criteria: &[crate::RejectionCriterion],
    flags: Out<i32>,
) -> Result<()> {
    run(
        place,
        |m| {
            crate::cpu::rollout_rejection(
                m.ro("log_ratio", log_ratio)?,
                mask(m, "mask", &mask_in)?,
                cu_seqlens,
                criteria,
                m.rw("flags", flags)?,
            )
        },
        |m| {
            if log_ratio.len == 0 {
                // nothing on the device to read: the checks alone
                let n = mask_in.array_len();
                return crate::rejection::validate(0, n, cu_seqlens, criteria, flags.len)
                    .map(|_| ());
            }
            cuda::rollout_rejection(
                &m.gpu,
                &m.stream,
                &m.ro("log_ratio", log_ratio)?,
                mask(m, "mask", &mask_in)?,
                cu_seqlens,
                criteria,
                &mut m.rw("flags", flags)?,
            )
        },
    )
}

/// Rollout IS weights `[T]` (see [`crate::rollout_is`]) of the log-ratios
/// `old_logp - rollout_logp`, divided by the batch mean when `normalize`.
pub fn rollout_is_weights(
    place: Place,
    log_ratio: In<f32>,
    mask_in: Mask<In<f32>, In<u8>>,
    cu_seqlens: &[i32],
    correction: &crate::RolloutCorrection,
    normalize: bool,
    weights: Out<f32>,
) -> Result<crate::RolloutIsStats> {
    run(
        place,
        |m| {
            crate::cpu::rollout_is_weights(
                m.ro("log_ratio", log_ratio)?,
                mask(m, "mask", &mask_in)?,
                cu_seqlens,
                correction,
                normalize,
                m.rw("weights", weights)?,
            )
        },
        |m| {
            if log_ratio.len == 0 {
                // nothing on the device to read: the checks alone
                let n = mask_in.array_len();
                crate::rollout_is::validate(0, n, cu_seqlens, correction, weights.len)?;
                return crate::RolloutIsStats::from_slots(
                    &crate::rollout_is::empty_slots(),
                    correction.level,
                    normalize,
                );
            }
            cuda::rollout_is_weights(
                &m.gpu,
                &m.stream,
                &m.ro("log_ratio", log_ratio)?,
                mask(m, "mask", &mask_in)?,
                cu_seqlens,
                correction,
                normalize,
                &mut m.rw("weights", weights)?,
            )
        },
    )
}

fn reduce_inputs<'a: 'm, 'm, M: Memory>(
    m: &'m M,
    x: &ReduceInputs<'a, In<f32>, In<u8>>,
) -> Result<ReduceInputs<'m, M::Ro<'m, f32>, M::Ro<'m, u8>>> {
    Ok(ReduceInputs {
        losses: m.ro("losses", x.losses)?,
        mask: mask(m, "mask", &x.mask)?,
        cu_seqlens: x.cu_seqlens,
        lambda: x.lambda,
        membership: x.membership,
        normalizers: x.normalizers,
    })
}

/// The per-objective weighted reduction of `[T, K]` losses: `d total / d l` into `grad`.
pub fn weighted_reduce(
    place: Place,
    inputs: &ReduceInputs<'_, In<f32>, In<u8>>,
    config: &GrpoConfig,
    grad: Out<f32>,
) -> Result<ReduceOutput> {
    // no tokens: every array is empty, so the reference computes the defined result on the host
    let place = if inputs.mask.array_len() == 0 {
        Place::Host
    } else {
        place
    };
    run(
        place,
        |m| crate::cpu::weighted_reduce(&reduce_inputs(m, inputs)?, config, m.rw("grad", grad)?),
        |m| {
            let x = reduce_inputs(m, inputs)?;
            cuda::weighted_reduce(&m.gpu, &m.stream, &x, config, &mut m.rw("grad", grad)?)
        },
    )
}

/// This batch's normalizers (K objectives and the KL slot) and per-sequence token weights
/// (`seq_tokens`, always set), from its mask; on a device this synchronizes the stream to read them.
pub fn count_normalizers(
    place: Place,
    mask_in: &Mask<In<f32>, In<u8>>,
    cu_seqlens: &[i32],
    membership: Option<&[u32]>,
    k: usize,
) -> Result<Normalizers> {
    let host = |m: &HostMemory| {
        let mk = mask(m, "mask", mask_in)?;
        let mut n = crate::cpu::count_normalizers(mk, cu_seqlens, membership, k)?;
        n.seq_tokens = Some(crate::cpu::seq_tokens(&mk, cu_seqlens));
        Ok(n)
    };
    if mask_in.array_len() == 0 {
        return host(&HostMemory::default());
    }
    run(place, host, |m| {
        let mk = mask(m, "mask", mask_in)?;
        let t = mk.array_len();
        let b = crate::layout::validate_cu_seqlens(cu_seqlens, t)?;
        crate::layout::validate_membership(membership, b, k)?;
        if k == 0 || k > crate::config::MAX_OBJECTIVES {
            return Err(Error::invalid_argument(
                "k",
                format!(
                    "expected 1 <= K <= {} objectives, got K = {k}",
                    crate::config::MAX_OBJECTIVES
                ),
            ));
        }
        cuda::device_normalizers(&m.gpu, &m.stream, &mk, t, cu_seqlens, membership, k)
    })
}

fn logits_ro<'m, M: Memory, E: LogitElem>(
    m: &'m M,
    z: &Logits<In<E>>,
) -> Result<Logits<M::Ro<'m, E>>> {
    Ok(Logits {
        data: m.ro("logits", z.data)?,
        rows: z.rows,
        vocab: z.vocab,
        ld: z.ld,
    })
}

fn logits_rw<'m, M: Memory, E: LogitElem>(
    m: &'m M,
    z: &Logits<Out<E>>,
) -> Result<Logits<M::Rw<'m, E>>> {
    Ok(Logits {
        data: m.rw("logits", z.data)?,
        rows: z.rows,
        vocab: z.vocab,
        ld: z.ld,
    })
}

/// Log-probabilities, entropy (optional), LSE and `sum_j p_j^2` (optional; verl's
/// `sum_pi_squared`) (`[T]` each) of `logits` at the configured temperature.
#[allow(clippy::too_many_arguments)]
pub fn logprob_forward<E: LogitElem>(
    place: Place,
    logits: &Logits<In<E>>,
    labels: In<i32>,
    config: &LogprobConfig,
    logp: Out<f32>,
    entropy: Option<Out<f32>>,
    lse: Out<f32>,
    sum_pi_squared: Option<Out<f32>>,
) -> Result<()> {
    if logits.rows == 0 {
        config.validate()?;
        let q = sum_pi_squared.map_or(0, |q| q.len);
        for (arg, n) in [
            ("labels", labels.len),
            ("logp", logp.len),
            ("lse", lse.len),
            ("sum_pi_squared", q),
        ] {
            crate::layout::check_len(arg, n, 0, "[T] (the rows of logits)")?;
        }
        return Ok(());
    }
    run(
        place,
        |m| {
            let h = entropy.map(|e| m.rw("entropy", e)).transpose()?;
            let z = logits_ro(m, logits)?;
            crate::cpu::logprob_forward(
                &z,
                m.ro("labels", labels)?,
                config,
                m.rw("logp", logp)?,
                h,
                m.rw("lse", lse)?,
            )?;
            match sum_pi_squared {
                Some(q) => crate::cpu::sum_pi_squared(&z, config, m.rw("sum_pi_squared", q)?),
                None => Ok(()),
            }
        },
        |m| {
            let mut h = entropy.map(|e| m.rw("entropy", e)).transpose()?;
            let mut q = sum_pi_squared
                .map(|q| m.rw("sum_pi_squared", q))
                .transpose()?;
            cuda::logprob_forward(
                &m.gpu,
                &m.stream,
                &logits_ro(m, logits)?,
                &m.ro("labels", labels)?,
                config,
                &mut m.rw("logp", logp)?,
                h.as_mut(),
                &mut m.rw("lse", lse)?,
                q.as_mut(),
            )
        },
    )
}

/// The upstream gradients of the logits backward, `[T]` each.
#[derive(Clone, Copy, Debug)]
pub struct LogprobGrads {
    /// Labels of the forward.
    pub labels: In<i32>,
    /// LSE from the forward.
    pub lse: In<f32>,
    /// Entropy from the forward.
    pub entropy: In<f32>,
    /// Gradient of the loss with respect to logp.
    pub g_logp: In<f32>,
    /// Gradient with respect to the entropy, if any.
    pub g_entropy: Option<In<f32>>,
    /// `(sum_pi_squared from the forward, its gradient)`, if it has one.
    pub sum_pi_squared: Option<(In<f32>, In<f32>)>,
}

/// The gradient of `g_logp . logp + g_entropy . entropy (+ g_spp . sum_pi_squared)` with respect to
/// the logits, written over the logits (same dtype and layout). With `vocab_start` the logits are
/// that vocabulary shard's and `grads.lse` / `grads.entropy` / `grads.sum_pi_squared` the whole
/// vocabulary's (tensor parallelism, [`tp_combine`]): the shard's slice of the whole gradient.
pub fn logprob_backward_inplace<E: LogitElem>(
    place: Place,
    logits: &Logits<Out<E>>,
    grads: &LogprobGrads,
    config: &LogprobConfig,
    vocab_start: Option<usize>,
) -> Result<()> {
    if logits.rows == 0 {
        return config.validate();
    }
    run(
        place,
        |m| {
            let mut z = logits_rw(m, logits)?;
            let copy: Vec<E> = z.data.to_vec();
            let zin = Logits {
                data: &copy[..],
                rows: z.rows,
                vocab: z.vocab,
                ld: z.ld,
            };
            let (labels, g_logp) = (m.ro("labels", grads.labels)?, m.ro("g_logp", grads.g_logp)?);
            let g_entropy = grads.g_entropy.map(|g| m.ro("g_entropy", g)).transpose()?;
            let (lse, entropy) = (m.ro("lse", grads.lse)?, m.ro("entropy", grads.entropy)?);
            match vocab_start {
                Some(start) => {
                    // a shard: the combined sum_pi_squared (tp_combine's) with its gradient
                    let spp = match grads.sum_pi_squared {
                        Some((q, g)) => {
                            Some((m.ro("sum_pi_squared", q)?, m.ro("g_sum_pi_squared", g)?))
                        }
                        None => None,
                    };
                    crate::cpu::tp_backward(
                        &zin, labels, start, lse, entropy, g_logp, g_entropy, spp, config, &mut z,
                    )
                }
                // the reference recomputes the row statistics from the logits (lse, entropy and
                // sum_pi_squared are checked for their length only)
                None => {
                    crate::layout::check_len("lse", lse.len(), z.rows, "[T]")?;
                    crate::layout::check_len("entropy", entropy.len(), z.rows, "[T]")?;
                    let g_spp = match grads.sum_pi_squared {
                        Some((q, g)) => {
                            let q = m.ro("sum_pi_squared", q)?;
                            crate::layout::check_len("sum_pi_squared", q.len(), z.rows, "[T]")?;
                            Some(m.ro("g_sum_pi_squared", g)?)
                        }
                        None => None,
                    };
                    crate::cpu::logprob_backward(
                        &zin, labels, config, g_logp, g_entropy, g_spp, &mut z,
                    )
                }
            }
        },
        |m| {
            let (labels, lse, entropy, g_logp) = (
                m.ro("labels", grads.labels)?,
                m.ro("lse", grads.lse)?,
                m.ro("entropy", grads.entropy)?,
                m.ro("g_logp", grads.g_logp)?,
            );
            let g_entropy = grads.g_entropy.map(|g| m.ro("g_entropy", g)).transpose()?;
            let spp = match grads.sum_pi_squared {
                Some((q, g)) => Some((m.ro("sum_pi_squared", q)?, m.ro("g_sum_pi_squared", g)?)),
                None => None,
            };
            let g = cuda::LogprobGrads {
                labels: &labels,
                lse: &lse,
                entropy: &entropy,
                g_logp: &g_logp,
                g_entropy: g_entropy.as_ref(),
                sum_pi_squared: spp.as_ref().map(|(q, g)| (q, g)),
            };
            let mut z = logits_rw(m, logits)?;
            match vocab_start {
                Some(start) => {
                    cuda::tp_backward_inplace(&m.gpu, &m.stream, &mut z, &g, start, config)
                }
                None => cuda::logprob_backward_inplace(&m.gpu, &m.stream, &mut z, &g, config),
            }
        },
    )
}

/// The GRPO loss straight from logits with its entropy bonus; the gradient is written over the
/// logits (same dtype and layout).
pub fn grpo_loss_from_logits<E: LogitElem>(
    place: Place,
    logits: &Logits<Out<E>>,
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
) -> Result<LogitsLossOutput> {
    if logits.rows == 0 && place != Place::Host {
        let adv = empty_advantages(&inputs.advantages, inputs.cu_seqlens, inputs.lambda.len());
        let (e32, ei32): ([f32; 0], [i32; 0]) = ([], []);
        let empty: [E; 0] = [];
        return crate::cpu::grpo_loss_from_logits(
            &Logits {
                data: &empty[..],
                rows: 0,
                vocab: logits.vocab,
                ld: logits.ld,
            },
            &LogitsLossInputs {
                labels: &ei32[..],
                old_logp: &e32[..],
                ref_logp: inputs.ref_logp.map(|_| &e32[..]),
                rollout_logp: inputs.rollout_logp.map(|_| &e32[..]),
                advantages: host_advantages(&inputs.advantages, &adv),
                mask: Mask::U8(&[]),
                cu_seqlens: inputs.cu_seqlens,
                lambda: inputs.lambda,
                objectives: inputs.objectives,
                membership: inputs.membership,
                normalizers: inputs.normalizers,
            },
            config,
            logits_config,
            &mut Logits {
                data: &mut [],
                rows: 0,
                vocab: logits.vocab,
                ld: logits.ld,
            },
        );
    }
    run(
        place,
        |m| {
            let mut z = logits_rw(m, logits)?;
            let copy: Vec<E> = z.data.to_vec();
            let x = logits_inputs(m, inputs)?;
            let zin = Logits {
                data: &copy[..],
                rows: z.rows,
                vocab: z.vocab,
                ld: z.ld,
            };
            crate::cpu::grpo_loss_from_logits(&zin, &x, config, logits_config, &mut z)
        },
        |m| {
            let x = logits_inputs(m, inputs)?;
            let mut z = logits_rw(m, logits)?;
            cuda::grpo_loss_from_logits(&m.gpu, &m.stream, &mut z, &x, config, logits_config)
        },
    )
    .map_err(|e| logits_nonfinite(e, place, inputs, "logits"))
}

/// [`name_nonfinite`] for the losses from logits: the per-token inputs, else the logits (or the
/// hidden states) themselves.
fn logits_nonfinite(
    e: Error,
    place: Place,
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    fallback: &'static str,
) -> Error {
    let arrays = [
        ("old_logp", Some(inputs.old_logp)),
        ("ref_logp", inputs.ref_logp),
        ("rollout_logp", inputs.rollout_logp),
    ];
    name_nonfinite(
        e,
        place,
        &inputs.mask,
        &arrays,
        &inputs.advantages,
        Some(fallback),
    )
}

/// A vocabulary shard's partial statistics of each row (`partials` `[3, T]`: the shard's LSE, its
/// entropy, the label's logit or -inf; `[4, T]` adds the shard's own `sum_j p_j^2`), for the
/// columns `[vocab_start, vocab_start + V)`.
pub fn tp_partials<E: LogitElem>(
    place: Place,
    logits: &Logits<In<E>>,
    labels: In<i32>,
    vocab_start: usize,
    config: &LogprobConfig,
    partials: Out<f32>,
) -> Result<()> {
    if logits.rows == 0 {
        config.validate()?;
        crate::tensor_parallel::planes(partials.len, 0, "partials", "[planes, T]")?;
        return crate::layout::check_len("labels", labels.len, 0, "[T] (the rows of logits)");
    }
    run(
        place,
        |m| {
            crate::cpu::tp_partials(
                &logits_ro(m, logits)?,
                m.ro("labels", labels)?,
                vocab_start,
                config,
                m.rw("partials", partials)?,
            )
        },
        |m| {
            cuda::tp_partials(
                &m.gpu,
                &m.stream,
                &logits_ro(m, logits)?,
                &m.ro("labels", labels)?,
                vocab_start,
                config,
                &mut m.rw("partials", partials)?,
            )
        },
    )
}

/// The combine of `shards` shards' partials (`[P, 3, T]` or `[P, 4, T]`, ascending vocab_start)
/// into logp, entropy and LSE (`[T]` each) over the whole vocabulary, and with 4 planes
/// `sum_pi_squared` where given.
#[allow(clippy::too_many_arguments)]
pub fn tp_combine(
    place: Place,
    partials: In<f32>,
    shards: usize,
    labels: In<i32>,
    config: &LogprobConfig,
    logp: Out<f32>,
    entropy: Out<f32>,
    lse: Out<f32>,
    sum_pi_squared: Option<Out<f32>>,
) -> Result<()> {
    run(
        place,
        |m| {
            let spp = sum_pi_squared
                .map(|q| m.rw("sum_pi_squared", q))
                .transpose()?;
            crate::cpu::tp_combine(
                m.ro("partials", partials)?,
                shards,
                m.ro("labels", labels)?,
                config,
                m.rw("logp", logp)?,
                m.rw("entropy", entropy)?,
                m.rw("lse", lse)?,
                spp,
            )
        },
        |m| {
            let mut spp = sum_pi_squared
                .map(|q| m.rw("sum_pi_squared", q))
                .transpose()?;
            cuda::tp_combine(
                &m.gpu,
                &m.stream,
                &m.ro("partials", partials)?,
                shards,
                &m.ro("labels", labels)?,
                config,
                &mut m.rw("logp", logp)?,
                &mut m.rw("entropy", entropy)?,
                &mut m.rw("lse", lse)?,
                spp.as_mut(),
            )
        },
    )
}

/// The last layer of a policy: `hidden [T, H]` and the LM head `weight [V, H]`, bf16.
#[derive(Clone, Copy, Debug)]
pub struct RawHead {
    /// `[T, H]` row-major.
    pub hidden: In<half::bf16>,
    /// `[V, H]` row-major.
    pub weight: In<half::bf16>,
    /// H.
    pub hidden_size: usize,
}

#[allow(clippy::too_many_arguments)]
/// The chunked fused-linear GRPO loss: writes `d_hidden` (`[T, H]`, bf16) and `d_weight` (`[V, H]`,
/// f32, overwritten). On the host the reference materializes the logits (f64 GEMMs) and ignores
/// the chunking options.
pub fn fused_linear_grpo_loss(
    place: Place,
    head: &RawHead,
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    d_hidden: Out<half::bf16>,
    d_weight: Out<f32>,
) -> Result<LogitsLossOutput> {
    let h = check_head(head)?;
    run(
        place,
        |m| {
            let x = logits_inputs(m, inputs)?;
            let dh = m.rw("d_hidden", d_hidden)?;
            let mut dh32 = vec![0f32; dh.len()];
            let out = crate::cpu::fused_linear_grpo_loss(
                m.ro("hidden", head.hidden)?,
                m.ro("weight", head.weight)?,
                h,
                &x,
                config,
                logits_config,
                options.fp32_logits,
                &mut dh32,
                m.rw("d_weight", d_weight)?,
            )?;
            for (o, v) in dh.iter_mut().zip(&dh32) {
                *o = half::bf16::from_f32(*v);
            }
            Ok(out)
        },
        |m| {
            let x = logits_inputs(m, inputs)?;
            let lh = cuda::LinearHead {
                hidden: m.ro("hidden", head.hidden)?,
                weight: m.ro("weight", head.weight)?,
                hidden_size: h,
                vocab: head.weight.len / h,
            };
            cuda::fused_linear_grpo_loss(
                &m.gpu,
                &m.stream,
                &lh,
                &x,
                config,
                logits_config,
                options,
                &mut m.rw("d_hidden", d_hidden)?,
                &mut m.rw("d_weight", d_weight)?,
            )
        },
    )
    .map_err(|e| logits_nonfinite(e, place, inputs, "hidden"))
}

/// The device layout of an asynchronous call from raw arrays (views of the place's memory), with
/// the guards' views kept by the caller.
fn device_layout<'v, 'a>(
    cu: &'v Option<cudarc::driver::CudaView<'a, i32>>,
    mem: &'v Option<cudarc::driver::CudaView<'a, u32>>,
    lam: &'v Option<cudarc::driver::CudaView<'a, f32>>,
) -> Option<cuda::DeviceLayout<'v, 'a>> {
    cu.as_ref().map(|cu| cuda::DeviceLayout {
        cu_seqlens: cu,
        membership: mem.as_ref(),
        lambda: lam.as_ref(),
    })
}

/// The inputs of a host call with its "device" arrays (host arrays here) in place.
fn with_host_layout<'a>(
    mut x: LogitsLossInputs<'a, &'a [f32], &'a [u8], &'a [i32]>,
    cu: Option<&'a [i32]>,
    mem: Option<&'a [u32]>,
    lam: Option<&'a [f32]>,
) -> Result<LogitsLossInputs<'a, &'a [f32], &'a [u8], &'a [i32]>> {
    if let Some(cu) = cu {
        if !x.cu_seqlens.is_empty() || x.membership.is_some() {
            return Err(Error::invalid_argument(
                "cu_seqlens",
                "given both in the inputs and as device arrays; leave the inputs' empty",
            ));
        }
        x.cu_seqlens = cu;
        x.membership = mem;
        if let Some(l) = lam {
            x.lambda = l;
        }
    }
    Ok(x)
}

/// The objectives of a call whose `lambda` may be a device array.
fn objectives_of(
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    device: Option<&DeviceBatchArrays>,
) -> usize {
    match device.and_then(|d| d.lambda) {
        Some(_) => inputs.objectives.len(),
        None => inputs.lambda.len(),
    }
}

/// The GRPO loss straight from logits without a host synchronization (see
/// [`cuda::grpo_loss_from_logits_async`]): the gradient over the logits, intermediates in
/// `workspace` (`cuda::logits_workspace_len(T)` bytes), the results in `out`
/// (`cuda::logits_output_len(K)` f64), read by [`read_logits_output`]. `device`: the layout in
/// the place's memory. On the host the reference computes at once, into the same layout.
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss_from_logits_async<E: LogitElem>(
    place: Place,
    logits: &Logits<Out<E>>,
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    device: Option<&DeviceBatchArrays>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    workspace: Out<u8>,
    out: Out<f64>,
) -> Result<cuda::PendingLogitsLoss> {
    let pending = cuda::PendingLogitsLoss::new(
        objectives_of(inputs, device),
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
        config,
        logits_config,
        logits.vocab,
    );
    run(
        place,
        |m| {
            let mut z = logits_rw(m, logits)?;
            let copy: Vec<E> = z.data.to_vec();
            let (cu, mem, lam) = host_layout_arrays(m, device)?;
            let x = with_host_layout(logits_inputs(m, inputs)?, cu, mem, lam)?;
            let zin = Logits {
                data: &copy[..],
                rows: z.rows,
                vocab: z.vocab,
                ld: z.ld,
            };
            let o = m.rw("out", out)?;
            crate::cpu::grpo_loss_from_logits_out(&zin, &x, config, logits_config, &mut z, o)?;
            Ok(pending.clone())
        },
        |m| {
            let x = logits_inputs(m, inputs)?;
            let mut z = logits_rw(m, logits)?;
            let (cu, mem, lam) = device_layout_arrays(m, device)?;
            let layout = device_layout(&cu, &mem, &lam);
            cuda::grpo_loss_from_logits_async(
                &m.gpu,
                &m.stream,
                &mut z,
                &x,
                layout.as_ref(),
                config,
                logits_config,
                &mut m.rw("workspace", workspace)?,
                &mut m.rw("out", out)?,
            )
        },
    )
}

/// The chunked fused-linear GRPO loss without a host synchronization (see
/// [`cuda::fused_linear_grpo_loss_async`]): `d_hidden` and `d_weight` as
/// [`fused_linear_grpo_loss`] writes them, intermediates in `workspace`
/// (`cuda::fused_linear_workspace_len` bytes), the results in `out`
/// (`cuda::logits_output_len(K)` f64), read by [`read_logits_output`]. On the host the reference
/// computes at once, into the same layout.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_grpo_loss_async(
    place: Place,
    head: &RawHead,
    inputs: &LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>,
    device: Option<&DeviceBatchArrays>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    workspace: Out<u8>,
    d_hidden: Out<half::bf16>,
    d_weight: Out<f32>,
    out: Out<f64>,
) -> Result<cuda::PendingLogitsLoss> {
    let h = check_head(head)?;
    let pending = cuda::PendingLogitsLoss::new(
        objectives_of(inputs, device),
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
        config,
        logits_config,
        head.weight.len / h,
    );
    run(
        place,
        |m| {
            let (cu, mem, lam) = host_layout_arrays(m, device)?;
            let x = with_host_layout(logits_inputs(m, inputs)?, cu, mem, lam)?;
            let dh = m.rw("d_hidden", d_hidden)?;
            let mut dh32 = vec![0f32; dh.len()];
            crate::cpu::fused_linear_grpo_loss_out(
                m.ro("hidden", head.hidden)?,
                m.ro("weight", head.weight)?,
                h,
                &x,
                config,
                logits_config,
                options.fp32_logits,
                &mut dh32,
                m.rw("d_weight", d_weight)?,
                m.rw("out", out)?,
            )?;
            for (o, v) in dh.iter_mut().zip(&dh32) {
                *o = half::bf16::from_f32(*v);
            }
            Ok(pending.clone())
        },
        |m| {
            let x = logits_inputs(m, inputs)?;
            let lh = cuda::LinearHead {
                hidden: m.ro("hidden", head.hidden)?,
                weight: m.ro("weight", head.weight)?,
                hidden_size: h,
                vocab: head.weight.len / h,
            };
            let (cu, mem, lam) = device_layout_arrays(m, device)?;
            let layout = device_layout(&cu, &mem, &lam);
            cuda::fused_linear_grpo_loss_async(
                &m.gpu,
                &m.stream,
                &lh,
                &x,
                layout.as_ref(),
                config,
                logits_config,
                options,
                &mut m.rw("workspace", workspace)?,
                &mut m.rw("d_hidden", d_hidden)?,
                &mut m.rw("d_weight", d_weight)?,
                &mut m.rw("out", out)?,
            )
        },
    )
}

/// Reads an asynchronous loss-from-logits or fused-linear call's output `out` back (this
/// synchronizes the place's stream) and decodes it; reports labels out of range and failed
/// device-side checks naming their argument.
pub fn read_logits_output(
    place: Place,
    pending: &cuda::PendingLogitsLoss,
    out: In<f64>,
) -> Result<LogitsLossOutput> {
    run(
        place,
        |m| pending.decode(m.ro("out", out)?),
        |m| pending.read(&m.stream, &m.ro("out", out)?),
    )
}

/// `H` of a head, checked.
fn check_head(head: &RawHead) -> Result<usize> {
    let h = head.hidden_size;
    if h == 0 || head.weight.len == 0 || head.hidden.len % h != 0 || head.weight.len % h != 0 {
        return Err(Error::invalid_argument(
            "weight",
            format!(
                "expected hidden [T, H] and weight [V, H] with H = {h} >= 1 and V >= 1, got {} \
                 and {} elements",
                head.hidden.len, head.weight.len
            ),
        ));
    }
    Ok(h)
}

/// A call's layout arrays read as host arrays (a host place).
#[allow(clippy::type_complexity)]
fn host_layout_arrays<'m>(
    m: &'m HostMemory,
    device: Option<&DeviceBatchArrays>,
) -> Result<(Option<&'m [i32]>, Option<&'m [u32]>, Option<&'m [f32]>)> {
    Ok(match device {
        Some(d) => (
            Some(m.ro("cu_seqlens", d.cu_seqlens)?),
            d.membership.map(|a| m.ro("membership", a)).transpose()?,
            d.lambda.map(|a| m.ro("lambda", a)).transpose()?,
        ),
        None => (None, None, None),
    })
}

/// A call's layout arrays as views of the device's memory.
#[allow(clippy::type_complexity)]
fn device_layout_arrays<'m>(
    m: &'m DeviceMemory,
    device: Option<&DeviceBatchArrays>,
) -> Result<(
    Option<cudarc::driver::CudaView<'m, i32>>,
    Option<cudarc::driver::CudaView<'m, u32>>,
    Option<cudarc::driver::CudaView<'m, f32>>,
)> {
    Ok(match device {
        Some(d) => (
            Some(m.ro("cu_seqlens", d.cu_seqlens)?),
            d.membership.map(|a| m.ro("membership", a)).transpose()?,
            d.lambda.map(|a| m.ro("lambda", a)).transpose()?,
        ),
        None => (None, None, None),
    })
}

/// Rollout groups of a raw call.
#[derive(Clone, Copy, Debug)]
pub enum RawGroups {
    /// Groups of G consecutive rollouts.
    Consecutive(usize),
    /// `[B]` group ids: any values on the host; dense ids in `[0, num_groups)` on a device.
    Ids {
        /// The ids.
        ids: In<i32>,
        /// The number of groups (read on a device only).
        num_groups: usize,
    },
}

/// Group advantages of rewards `[B, K]` into `out` (`[B, K]`); `lengths` (`[B]`) for GRPO-LEAD's
/// length-dependent reward, opo and REINFORCE++; `baselines` (`[B, K]`, as `out`) for ReMax.
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    place: Place,
    rewards: In<f32>,
    groups: RawGroups,
    lengths: Option<In<i32>>,
    baselines: Option<In<f32>>,
    config: &AdvantageConfig,
    out: Out<f32>,
) -> Result<()> {
    run(
        place,
        |m| {
            let ids;
            let g = match groups {
                RawGroups::Consecutive(g) => Groups::Consecutive(g),
                RawGroups::Ids { ids: i, .. } => {
                    ids = m.ro("group_ids", i)?;
                    Groups::Ids(ids)
                }
            };
            let len = lengths.map(|l| m.ro("lengths", l)).transpose()?;
            let base = baselines.map(|l| m.ro("baselines", l)).transpose()?;
            crate::advantages::group_advantages(
                m.ro("rewards", rewards)?,
                g,
                len,
                base,
                config,
                m.rw("out", out)?,
            )
        },
        |m| {
            let g = match groups {
                RawGroups::Consecutive(g) => cuda::DeviceGroups::Consecutive(g),
                RawGroups::Ids { ids, num_groups } => cuda::DeviceGroups::Ids {
                    ids: m.ro("group_ids", ids)?,
                    num_groups,
                },
            };
            let len = lengths.map(|l| m.ro("lengths", l)).transpose()?;
            let base = baselines.map(|l| m.ro("baselines", l)).transpose()?;
            cuda::group_advantages(
                &m.gpu,
                &m.stream,
                &m.ro("rewards", rewards)?,
                g,
                len.as_ref(),
                base.as_ref(),
                config,
                &mut m.rw("out", out)?,
            )
        },
    )
}

/// verl's optimal token baseline (see [`crate::token_baseline`]): advantages and returns (`[T]`
/// each) of the caller's arrays; `cu_seqlens` and the groups on the host. On a device the kernel
/// synchronizes the stream once (to check the inputs were finite).
pub fn optimal_token_baseline(
    place: Place,
    x: &crate::TokenBaselineInputs<'_, In<f32>, In<u8>>,
    config: &crate::TokenBaselineConfig,
    advantages: Out<f32>,
    returns: Out<f32>,
) -> Result<()> {
    fn views<'a: 'm, 'm, M: Memory>(
        m: &'m M,
        x: &crate::TokenBaselineInputs<'a, In<f32>, In<u8>>,
    ) -> Result<crate::TokenBaselineInputs<'m, M::Ro<'m, f32>, M::Ro<'m, u8>>> {
        Ok(crate::TokenBaselineInputs {
            token_rewards: m.ro("token_rewards", x.token_rewards)?,
            old_logp: m.ro("old_logp", x.old_logp)?,
            sum_pi_squared: m.ro("sum_pi_squared", x.sum_pi_squared)?,
            rollout_is_weights: opt(m, "rollout_is_weights", x.rollout_is_weights)?,
            mask: mask(m, "mask", &x.mask)?,
            cu_seqlens: x.cu_seqlens,
            groups: x.groups,
        })
    }
    run(
        place,
        |m| {
            let (adv, ret) = (m.rw("advantages", advantages)?, m.rw("returns", returns)?);
            crate::token_baseline::optimal_token_baseline(&views(m, x)?, config, adv, ret)
        },
        |m| {
            let v = views(m, x)?;
            let (mut adv, mut ret) = (m.rw("advantages", advantages)?, m.rw("returns", returns)?);
            cuda::optimal_token_baseline(&m.gpu, &m.stream, &v, config, &mut adv, &mut ret)
        },
    )
}

/// Objective kinds from their codes (0 policy, 1 nll), as the bindings pass them.
pub fn objective_kinds(codes: &[i32]) -> Result<Vec<ObjectiveKind>> {
    codes
        .iter()
        .map(|&c| match c {
            0 => Ok(ObjectiveKind::Policy),
            1 => Ok(ObjectiveKind::Nll),
            _ => Err(Error::invalid_argument(
                "objectives",
                format!("expected 0 (policy) or 1 (nll), got {c}"),
            )),
        })
        .collect()
}
