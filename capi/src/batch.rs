//! The batch of the fused losses as one C struct (`RecapGrpoBatch`), the last layer of the
//! fused-linear loss (`RecapLinearHead`) and its options (`RecapFusedLinearOptions`), with the
//! checks that turn them into the crate's inputs. Every fused-loss entry point takes these instead
//! of positional arrays, so the batch is described once for the C caller and checked once here.

#[allow(unused_imports)]
use crate::prelude::*;

/// The batch of a fused loss call (`recap_grpo_loss`, `recap_fused_linear_grpo_loss` and their
/// asynchronous forms): zero-initialize it, then set what the call takes. Per-token arrays are in
/// the call's place (device memory for `device >= 0`, host memory for `device < 0`); the layout
/// arrays (`cu_seqlens`, `lambda`, `objectives`, `membership`, `normalizers`, `seq_tokens`) are on
/// the host, except that with `layout_on_device` an asynchronous call takes `cu_seqlens`, `lambda`
/// and `membership` as device pointers (checked on the device).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapGrpoBatch {
    /// T: tokens in the batch (packed sequences).
    pub num_tokens: i64,
    /// B: sequences.
    pub num_seqs: i64,
    /// K: objectives, 1 to 16.
    pub num_objectives: i32,
    /// Nonzero: `advantages` is `[T, K]`; zero: `[B, K]`.
    pub adv_per_token: i32,
    /// Nonzero: `mask` is `uint8_t [T]` flags; zero: `float [T]` weights.
    pub mask_is_u8: i32,
    /// Nonzero (asynchronous calls only): `cu_seqlens`, `lambda` and `membership` are device
    /// pointers, checked on the device; nothing is copied from the host (CUDA-graph capture).
    pub layout_on_device: i32,
    /// `[T]` log-probabilities of the sampling policy.
    pub old_logp: *const f32,
    /// `[T]` reference log-probabilities, or null (no KL term).
    pub ref_logp: *const f32,
    /// `[T]` the inference engine's log-probabilities, or null (no rollout IS correction).
    pub rollout_logp: *const f32,
    /// `[T]` weights of the policy terms (e.g. TRL's entropy mask), or null (`recap_grpo_loss`
    /// only; the fused-linear loss takes null).
    pub policy_weight: *const f32,
    /// `[B, K]`, or `[T, K]` with `adv_per_token`.
    pub advantages: *const f32,
    /// `[T]` mask: `uint8_t` with `mask_is_u8`, else `float`.
    pub mask: *const c_void,
    /// `[B + 1]` sequence boundaries, `cu_seqlens[B] == T`.
    pub cu_seqlens: *const i32,
    /// `[K]` objective weights (finite, >= 0).
    pub lambda: *const f32,
    /// `[K]` objective kinds: 0 policy, 1 nll (always on the host).
    pub objectives: *const i32,
    /// `[B]` membership bits (bit k: the sequence belongs to objective k), or null: every
    /// sequence in every objective.
    pub membership: *const u32,
    /// `[2, K + 1]` the whole batch's token weights then sequence counts (from
    /// `recap_count_normalizers` summed over the parts), or null: this batch's own.
    pub normalizers: *const f64,
    /// `[B]` the whole batch's token weight of each sequence, or null (with `normalizers` only).
    pub seq_tokens: *const f64,
}

/// The last layer of the fused-linear loss and the labels it scores.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapLinearHead {
    /// H: the hidden size.
    pub hidden_size: i64,
    /// V: the vocabulary.
    pub vocab: i64,
    /// `[T, H]` bf16 hidden states (the batch's place).
    pub hidden: *const c_void,
    /// `[V, H]` bf16 LM-head weight (the batch's place).
    pub weight: *const c_void,
    /// `[T]` token ids (the batch's place); `ignore_index` excludes a token.
    pub labels: *const i32,
}

/// Options of the fused-linear loss (`recap_fused_linear_options_default` fills the defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapFusedLinearOptions {
    /// Temperature tau > 0: the log-probabilities of `logits / tau` (default 1).
    pub temperature: f32,
    /// The label that excludes a token (default -100).
    pub ignore_index: i32,
    /// Tokens per chunk; <= 0: sized from `memory_budget` (default 0).
    pub chunk_tokens: i64,
    /// Bytes for one chunk of logits when `chunk_tokens` <= 0; <= 0: 512 MiB (default 0).
    pub memory_budget: i64,
    /// Nonzero: keep the logits in f32 (default 0: bf16).
    pub fp32_logits: i32,
    /// Nonzero (`recap_fused_linear_grpo_loss` only): every GEMM runs on whole chunks, so a row's
    /// results do not depend on the rows around it (default 0).
    pub batch_invariant: i32,
}

/// Fills `opts` with the defaults.
///
/// # Safety
/// `opts` must be null or point to a writable `RecapFusedLinearOptions`.
#[no_mangle]
pub unsafe extern "C" fn recap_fused_linear_options_default(
    opts: *mut RecapFusedLinearOptions,
) -> i32 {
    guard(|| {
        // SAFETY: checked non-null; the caller guarantees it points to a writable struct.
        let out = unsafe { opts.as_mut() }
            .ok_or_else(|| Error::invalid_argument("opts", "null pointer"))?;
        *out = RecapFusedLinearOptions::default();
        Ok(())
    })
}

impl Default for RecapFusedLinearOptions {
    /// The log-probs' defaults; chunking, f32 logits and batch invariance off (0: the library's).
    fn default() -> Self {
        let lc = LogprobConfig::default();
        RecapFusedLinearOptions {
            temperature: lc.temperature,
            ignore_index: lc.ignore_index,
            chunk_tokens: 0,
            memory_budget: 0,
            fp32_logits: 0,
            batch_invariant: 0,
        }
    }
}

/// The struct behind `batch` and its sizes T, B and K, checked.
///
/// # Safety
/// `batch` null or a valid struct.
unsafe fn sized<'a>(
    batch: *const RecapGrpoBatch,
) -> Result<(&'a RecapGrpoBatch, usize, usize, usize)> {
    // SAFETY: checked for null; the caller guarantees a valid struct.
    let c = unsafe { batch.as_ref() }
        .ok_or_else(|| Error::invalid_argument("batch", "null pointer"))?;
    Ok((
        c,
        len("batch.num_tokens", c.num_tokens)?,
        len("batch.num_seqs", c.num_seqs)?,
        objectives_count(c.num_objectives)?,
    ))
}

/// A `RecapGrpoBatch` after its checks: the sizes, the objective kinds and normalizers read from the
/// host, and the layout arrays (host slices, or device pointers with `layout_on_device`).
pub(crate) struct Batch<'a> {
    pub(crate) t: usize,
    pub(crate) b: usize,
    pub(crate) k: usize,
    c: &'a RecapGrpoBatch,
    kinds: Vec<ObjectiveKind>,
    norms: Option<Normalizers>,
    cu: &'a [i32],
    lambda: &'a [f32],
    membership: Option<&'a [u32]>,
}

impl<'a> Batch<'a> {
    /// Checks `batch`; `asynchronous`: the call may take the layout on the device.
    ///
    /// # Safety
    /// `batch` null or a valid struct whose host arrays hold the elements its sizes state.
    pub(crate) unsafe fn new(batch: *const RecapGrpoBatch, asynchronous: bool) -> Result<Self> {
        // SAFETY: the caller's contract.
        let (c, t, b, k) = unsafe { sized(batch) }?;
        let kinds = host_objectives(c.objectives, k)?;
        let norms = host_normalizers(c.normalizers, c.seq_tokens, k, b)?;
        let (cu, lambda, membership) = if c.layout_on_device == 0 {
            host_layout(c.cu_seqlens, b, c.lambda, k, c.membership)?
        } else if !asynchronous {
            return Err(Error::invalid_argument(
                "batch.layout_on_device",
                "only the asynchronous calls take the layout on the device (expected 0)",
            ));
        } else if c.cu_seqlens.is_null() || c.lambda.is_null() {
            return Err(Error::invalid_argument(
                if c.cu_seqlens.is_null() {
                    "batch.cu_seqlens"
                } else {
                    "batch.lambda"
                },
                "null pointer (with layout_on_device, a device pointer)",
            ));
        } else {
            (&[][..], &[][..], None)
        };
        Ok(Batch {
            t,
            b,
            k,
            c,
            kinds,
            norms,
            cu,
            lambda,
            membership,
        })
    }

    /// The fused loss's inputs for the log-probabilities `logp` `[T]`.
    pub(crate) fn grpo_inputs(&self, logp: *const f32) -> GrpoInputs<'_, In<f32>, In<u8>> {
        let (c, t) = (self.c, self.t);
        GrpoInputs {
            logp: arr(logp, t),
            old_logp: arr(c.old_logp, t),
            ref_logp: opt_arr(c.ref_logp, t),
            rollout_logp: opt_arr(c.rollout_logp, t),
            policy_weight: opt_arr(c.policy_weight, t),
            advantages: adv_arr(c.advantages, c.adv_per_token, t, self.b, self.k),
            mask: mask_arr(c.mask, c.mask_is_u8, t),
            cu_seqlens: self.cu,
            lambda: self.lambda,
            objectives: &self.kinds,
            membership: self.membership,
            normalizers: self.norms.as_ref(),
        }
    }

    /// The loss from logits' inputs for the labels `labels` `[T]` (no per-token policy weight).
    pub(crate) fn logits_inputs(
        &self,
        labels: *const i32,
    ) -> Result<LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>>> {
        let (c, t) = (self.c, self.t);
        if !c.policy_weight.is_null() {
            return Err(Error::invalid_argument(
                "batch.policy_weight",
                "not taken by the fused-linear loss (expected null)",
            ));
        }
        Ok(LogitsLossInputs {
            labels: arr(labels, t),
            old_logp: arr(c.old_logp, t),
            ref_logp: opt_arr(c.ref_logp, t),
            rollout_logp: opt_arr(c.rollout_logp, t),
            advantages: adv_arr(c.advantages, c.adv_per_token, t, self.b, self.k),
            mask: mask_arr(c.mask, c.mask_is_u8, t),
            cu_seqlens: self.cu,
            lambda: self.lambda,
            objectives: &self.kinds,
            membership: self.membership,
            normalizers: self.norms.as_ref(),
        })
    }

    /// The layout's device arrays, with `layout_on_device`.
    pub(crate) fn device_layout(&self) -> Option<raw::DeviceBatchArrays> {
        let c = self.c;
        (c.layout_on_device != 0).then(|| raw::DeviceBatchArrays {
            cu_seqlens: arr(c.cu_seqlens, self.b + 1),
            membership: opt_arr(c.membership, self.b),
            lambda: Some(arr(c.lambda, self.k)),
        })
    }
}

/// The batch's sizes (T, B, K) and the struct itself, for the calls that read only part of it (the
/// normalizers, the weighted reduction); its layout must be on the host.
///
/// # Safety
/// `batch` null or a valid struct.
pub(crate) unsafe fn batch_sizes<'a>(
    batch: *const RecapGrpoBatch,
) -> Result<(&'a RecapGrpoBatch, usize, usize, usize)> {
    // SAFETY: the caller's contract.
    let sizes = unsafe { sized(batch) }?;
    if sizes.0.layout_on_device != 0 {
        return Err(Error::invalid_argument(
            "batch.layout_on_device",
            "this call takes its layout from the host (expected 0)",
        ));
    }
    Ok(sizes)
}

/// What reading an asynchronous call's output needs of its batch, read without its arrays: K and
/// whether it had a KL term and a rollout correction.
///
/// # Safety
/// `batch` null or a valid struct.
pub(crate) unsafe fn batch_outline(batch: *const RecapGrpoBatch) -> Result<(usize, bool, bool)> {
    // SAFETY: the caller's contract.
    let (c, _, _, k) = unsafe { sized(batch) }?;
    Ok((k, !c.ref_logp.is_null(), !c.rollout_logp.is_null()))
}

/// A checked `RecapLinearHead` with its options, for a batch of `t` tokens.
pub(crate) struct Head {
    pub(crate) h: usize,
    pub(crate) v: usize,
    pub(crate) raw: raw::RawHead,
    pub(crate) labels: *const i32,
    pub(crate) lc: LogprobConfig,
    pub(crate) opts: recap::cuda::FusedLinearConfig,
}

/// The crate's fused-linear options from the C ones (null: the defaults).
///
/// # Safety
/// `opts` null or a valid struct.
pub(crate) unsafe fn linear_options(
    opts: *const RecapFusedLinearOptions,
) -> Result<(LogprobConfig, recap::cuda::FusedLinearConfig)> {
    // SAFETY: checked for null; the caller guarantees a valid struct.
    let o = unsafe { opts.as_ref() }.copied().unwrap_or_default();
    let defaults = recap::cuda::FusedLinearConfig::default();
    let lc = LogprobConfig {
        temperature: o.temperature,
        ignore_index: o.ignore_index,
    };
    lc.validate()?;
    let fc = recap::cuda::FusedLinearConfig {
        chunk_tokens: usize::try_from(o.chunk_tokens).ok().filter(|&c| c > 0),
        memory_budget: usize::try_from(o.memory_budget)
            .ok()
            .filter(|&m| m > 0)
            .unwrap_or(defaults.memory_budget),
        fp32_logits: o.fp32_logits != 0,
        batch_invariant: o.batch_invariant != 0,
    };
    Ok((lc, fc))
}

impl Head {
    /// Checks `head` and `opts` (null: the defaults) for a batch of `t` tokens.
    ///
    /// # Safety
    /// `head` null or a valid struct; `opts` null or a valid struct.
    pub(crate) unsafe fn new(
        head: *const RecapLinearHead,
        opts: *const RecapFusedLinearOptions,
        t: usize,
    ) -> Result<Self> {
        // SAFETY: checked for null; the caller guarantees a valid struct.
        let c = unsafe { head.as_ref() }
            .ok_or_else(|| Error::invalid_argument("head", "null pointer"))?;
        let h = len("head.hidden_size", c.hidden_size)?;
        let v = len("head.vocab", c.vocab)?;
        for (name, n) in [
            ("batch.num_tokens", t),
            ("head.hidden_size", h),
            ("head.vocab", v),
        ] {
            if n == 0 {
                return Err(Error::invalid_argument(
                    name,
                    format!("expected T, H, V >= 1, got {t}, {h}, {v}"),
                ));
            }
        }
        // SAFETY: the caller's contract for `opts`.
        let (lc, opts) = unsafe { linear_options(opts) }?;
        Ok(Head {
            h,
            v,
            raw: raw::RawHead {
                hidden: arr(c.hidden as *const half::bf16, t * h),
                weight: arr(c.weight as *const half::bf16, v * h),
                hidden_size: h,
            },
            labels: c.labels,
            lc,
            opts,
        })
    }
}
