//! The packed variable-length batch layout every op uses, and its host-side validation.
//!
//! `T` tokens in `B` sequences: `cu_seqlens: [B + 1]` with `0 = cu[0] <= ... <= cu[B] = T`; sequence
//! `b` holds tokens `cu[b]..cu[b + 1]`. A padded `[B, L]` batch is `cu = 0, L, 2L, ...`. The mask
//! `[T]` gives each token's weight (0 or 1; f32 or u8/bool). Advantages are per sequence `[B, K]` or
//! per token `[T, K]`, row-major. Per-token arrays live on the backend's memory (host slices or CUDA
//! views); the small per-batch arrays (`cu_seqlens`, `membership`, `lambda`) are host slices, so
//! they are checked before any launch.

use crate::config::{GrpoConfig, Normalizers, ObjectiveKind, MAX_OBJECTIVES};
use crate::error::{Error, Result};

/// An array whose length can be checked: a host slice or a CUDA view.
pub trait Array {
    /// Number of elements.
    fn array_len(&self) -> usize;
}

impl<T> Array for &[T] {
    fn array_len(&self) -> usize {
        self.len()
    }
}

impl<T> Array for cudarc::driver::CudaView<'_, T> {
    fn array_len(&self) -> usize {
        self.len()
    }
}

impl<T> Array for cudarc::driver::CudaViewMut<'_, T> {
    fn array_len(&self) -> usize {
        self.len()
    }
}

/// Token mask `[T]`: f32 weights, or u8/bool (nonzero = 1).
#[derive(Clone, Copy, Debug)]
pub enum Mask<F, U> {
    /// f32 weights (0 or 1; other values act as weights, as in verl).
    F32(F),
    /// u8 or bool flags (nonzero = unmasked).
    U8(U),
}

impl<F: Array, U: Array> Mask<F, U> {
    pub(crate) fn array_len(&self) -> usize {
        match self {
            Mask::F32(m) => m.array_len(),
            Mask::U8(m) => m.array_len(),
        }
    }
}

/// Advantages, row-major, K per row.
#[derive(Clone, Copy, Debug)]
pub enum Advantages<F> {
    /// `[B, K]`: one row per sequence.
    PerSequence(F),
    /// `[T, K]`: one row per token.
    PerToken(F),
}

/// Host mask (`&[f32]` or `&[u8]`).
pub type HostMask<'a> = Mask<&'a [f32], &'a [u8]>;

/// Token `t`'s weight in a host mask: the f32 weight, or 1 / 0 for a u8 flag.
pub(crate) fn mask_weight(mask: &HostMask<'_>, t: usize) -> f64 {
    match mask {
        Mask::F32(m) => m[t] as f64,
        Mask::U8(m) => {
            if m[t] != 0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Inputs of the fused GRPO loss. `F` is the f32 array type, `U` the u8 array type: host slices for
/// the CPU backend ([`HostGrpoInputs`]), CUDA views for the GPU ([`crate::cuda::DeviceGrpoInputs`]).
#[derive(Clone, Copy, Debug)]
pub struct GrpoInputs<'a, F, U> {
    /// `[T]` log-probabilities of the current policy.
    pub logp: F,
    /// `[T]` log-probabilities of the policy that sampled the rollouts (read for policy tokens only).
    pub old_logp: F,
    /// `[T]` reference log-probabilities; `Some` adds the KL term (`config.kl_coef`) and its metrics.
    pub ref_logp: Option<F>,
    /// `[T]` the inference engine's log-probabilities of the sampled tokens, for the rollout
    /// importance-sampling correction (`config.rollout_correction`) and its metrics; read at policy
    /// tokens only.
    pub rollout_logp: Option<F>,
    /// `[T]` per-token weights of the policy objectives' terms (not nll, not KL; normalizers
    /// unchanged), e.g. TRL's top-entropy-quantile mask; `None`: all 1.
    pub policy_weight: Option<F>,
    /// `[B, K]` or `[T, K]` advantages (read for policy objectives only).
    pub advantages: Advantages<F>,
    /// `[T]` token mask.
    pub mask: Mask<F, U>,
    /// `[B + 1]` sequence boundaries.
    pub cu_seqlens: &'a [i32],
    /// `[K]` objective weights (RECAP's lambda; all 1 for plain GRPO).
    pub lambda: &'a [f32],
    /// `[K]` what each objective computes.
    pub objectives: &'a [ObjectiveKind],
    /// `[B]` bit k set: sequence b belongs to objective k. `None`: every sequence to every objective.
    pub membership: Option<&'a [u32]>,
    /// Global normalizers (micro-batches, data parallelism); `None`: this batch's own.
    pub normalizers: Option<&'a Normalizers>,
}

/// Host inputs of the fused GRPO loss.
pub type HostGrpoInputs<'a> = GrpoInputs<'a, &'a [f32], &'a [u8]>;

/// Inputs of the standalone per-objective weighted reduction (kernel 3).
#[derive(Clone, Copy, Debug)]
pub struct ReduceInputs<'a, F, U> {
    /// `[T, K]` per-token losses, row-major.
    pub losses: F,
    /// `[T]` token mask.
    pub mask: Mask<F, U>,
    /// `[B + 1]` sequence boundaries.
    pub cu_seqlens: &'a [i32],
    /// `[K]` objective weights.
    pub lambda: &'a [f32],
    /// `[B]` membership bits, or `None` for all.
    pub membership: Option<&'a [u32]>,
    /// Global normalizers, or `None` for this batch's own.
    pub normalizers: Option<&'a Normalizers>,
}

/// Host inputs of the weighted reduction.
pub type HostReduceInputs<'a> = ReduceInputs<'a, &'a [f32], &'a [u8]>;

/// Shape facts established by validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub t: usize,
    pub b: usize,
    pub k: usize,
}

/// Checks `cu_seqlens` against `T`; returns `B`.
pub fn validate_cu_seqlens(cu: &[i32], t: usize) -> Result<usize> {
    if cu.is_empty() {
        return Err(Error::invalid_argument(
            "cu_seqlens",
            "expected [B + 1] boundaries starting at 0, got an empty array",
        ));
    }
    if t > i32::MAX as usize {
        return Err(Error::invalid_argument(
            "logp",
            format!("T = {t} tokens exceeds the i32 range of cu_seqlens"),
        ));
    }
    if cu[0] != 0 {
        return Err(Error::invalid_argument(
            "cu_seqlens",
            format!("cu_seqlens[0] must be 0, got {}", cu[0]),
        ));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::invalid_argument(
            "cu_seqlens",
            format!(
                "must be non-decreasing, but cu_seqlens[{}] = {} > cu_seqlens[{}] = {}",
                i,
                cu[i],
                i + 1,
                cu[i + 1]
            ),
        ));
    }
    let last = *cu.last().unwrap_or(&0);
    if last as i64 != t as i64 {
        return Err(Error::invalid_argument(
            "cu_seqlens",
            format!("must end at T = {t} (the number of tokens), ends at {last}"),
        ));
    }
    Ok(cu.len() - 1)
}

/// The error for a non-finite value of `arg` at unmasked token `tok` (the per-token estimators'
/// input check, on the host and read back from a kernel's first-bad-token slots).
pub(crate) fn nonfinite_at(arg: &'static str, tok: usize) -> Error {
    Error::invalid_argument(
        arg,
        format!("expected finite values at unmasked tokens, got a non-finite one at token {tok}"),
    )
}

pub(crate) fn check_len(arg: &'static str, got: usize, expected: usize, shape: &str) -> Result<()> {
    if got != expected {
        return Err(Error::invalid_argument(
            arg,
            format!("expected {shape} = {expected} elements, got {got}"),
        ));
    }
    Ok(())
}

fn validate_k(k: usize, what: &'static str) -> Result<()> {
    if k == 0 || k > MAX_OBJECTIVES {
        return Err(Error::invalid_argument(
            what,
            format!("expected 1 <= K <= {MAX_OBJECTIVES} objectives, got K = {k}"),
        ));
    }
    Ok(())
}

fn validate_lambda(lambda: &[f32]) -> Result<()> {
    if let Some((i, v)) = lambda
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(Error::invalid_argument(
            "lambda",
            format!("objective weights must be finite and >= 0, lambda[{i}] = {v}"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_membership(membership: Option<&[u32]>, b: usize, k: usize) -> Result<()> {
    if let Some(m) = membership {
        check_len("membership", m.len(), b, "[B]")?;
        let allowed = if k >= 32 { u32::MAX } else { (1u32 << k) - 1 };
        if let Some((i, v)) = m.iter().enumerate().find(|(_, v)| **v & !allowed != 0) {
            return Err(Error::invalid_argument(
                "membership",
                format!("membership[{i}] = {v:#x} has bits at or above K = {k}"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_grpo<F: Array, U: Array>(
    inputs: &GrpoInputs<'_, F, U>,
    cfg: &GrpoConfig,
) -> Result<Shape> {
    validate_grpo_on(inputs, cfg, None)
}

/// What a call's device-resident layout fixes: `B` (from the length of its `cu_seqlens`) and
/// whether `lambda` is on the device too (then `K` is the length of `objectives`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceSide {
    pub b: usize,
    pub lambda: bool,
    pub membership: bool,
}

/// [`validate_grpo`], or with `device`: the same checks of everything on the host, where
/// `cu_seqlens`, `membership` (and `lambda`) are on the device (checked there) and so must be
/// empty / absent in `inputs`.
pub(crate) fn validate_grpo_on<F: Array, U: Array>(
    inputs: &GrpoInputs<'_, F, U>,
    cfg: &GrpoConfig,
    device: Option<DeviceSide>,
) -> Result<Shape> {
    cfg.validate()?;
    let t = inputs.logp.array_len();
    let (b, k) = match device {
        None => (
            validate_cu_seqlens(inputs.cu_seqlens, t)?,
            inputs.lambda.len(),
        ),
        Some(d) => {
            let twice = |arg: &'static str| {
                Error::invalid_argument(
                    arg,
                    "given both on the host (in the inputs) and on the device (in the layout); \
                     leave the host one empty",
                )
            };
            if !inputs.cu_seqlens.is_empty() {
                return Err(twice("cu_seqlens"));
            }
            if inputs.membership.is_some() && d.membership {
                return Err(twice("membership"));
            }
            if inputs.membership.is_some() {
                return Err(Error::invalid_argument(
                    "membership",
                    "with cu_seqlens on the device, membership must be on the device too",
                ));
            }
            if d.lambda && !inputs.lambda.is_empty() {
                return Err(twice("lambda"));
            }
            if t > i32::MAX as usize {
                return Err(Error::invalid_argument(
                    "logp",
                    format!("T = {t} tokens exceeds the i32 range of cu_seqlens"),
                ));
            }
            let k = if d.lambda {
                inputs.objectives.len()
            } else {
                inputs.lambda.len()
            };
            (d.b, k)
        }
    };
    validate_k(k, "lambda")?;
    check_len(
        "objectives",
        inputs.objectives.len(),
        k,
        "[K] (the length of lambda)",
    )?;
    check_len("old_logp", inputs.old_logp.array_len(), t, "[T]")?;
    if let Some(r) = &inputs.rollout_logp {
        check_len("rollout_logp", r.array_len(), t, "[T]")?;
    } else if cfg.rollout_correction.is_some() {
        return Err(Error::invalid_argument(
            "rollout_logp",
            "config.rollout_correction needs the [T] rollout log-probabilities",
        ));
    }
    if let Some(w) = &inputs.policy_weight {
        check_len("policy_weight", w.array_len(), t, "[T]")?;
    }
    if let Some(r) = &inputs.ref_logp {
        check_len("ref_logp", r.array_len(), t, "[T]")?;
    }
    check_len("mask", inputs.mask.array_len(), t, "[T]")?;
    match &inputs.advantages {
        Advantages::PerSequence(a) => check_len("advantages", a.array_len(), b * k, "[B, K]")?,
        Advantages::PerToken(a) => check_len("advantages", a.array_len(), t * k, "[T, K]")?,
    }
    validate_lambda(inputs.lambda)?;
    validate_membership(inputs.membership, b, k)?;
    if let Some(n) = inputs.normalizers {
        n.validate(k, b)?;
    }
    Ok(Shape { t, b, k })
}

pub(crate) fn validate_reduce<F: Array, U: Array>(
    inputs: &ReduceInputs<'_, F, U>,
    mode: crate::config::AggMode,
    norm_constant: Option<f32>,
) -> Result<Shape> {
    crate::config::validate_norm_constant(mode, norm_constant)?;
    let t = inputs.mask.array_len();
    let b = validate_cu_seqlens(inputs.cu_seqlens, t)?;
    let k = inputs.lambda.len();
    validate_k(k, "lambda")?;
    check_len("losses", inputs.losses.array_len(), t * k, "[T, K]")?;
    validate_lambda(inputs.lambda)?;
    validate_membership(inputs.membership, b, k)?;
    if let Some(n) = inputs.normalizers {
        n.validate(k, b)?;
    }
    Ok(Shape { t, b, k })
}

/// Bitmask of the policy objectives.
pub(crate) fn policy_bits(objectives: &[ObjectiveKind]) -> u32 {
    objectives
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == ObjectiveKind::Policy)
        .fold(0u32, |acc, (i, _)| acc | (1 << i))
}
