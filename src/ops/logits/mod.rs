//! Types of the logits ops (kernels 4 and 5): element dtypes, a strided `[T, V]` logits view and the
//! configuration.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::error::{Error, Result};
use crate::layout::Array;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// A logits element type: f32, f16 or bf16 (`half`). Arithmetic is f32 whatever the storage.
pub trait LogitElem:
    Copy + Default + DeviceRepr + ValidAsZeroBits + Send + Sync + std::fmt::Debug + 'static
{
    /// The dtype suffix of the kernel names (`recap_logprob_fwd_bf16`, ...).
    const SUFFIX: &'static str;
    /// To f32 (exact).
    fn to_f32(self) -> f32;
    /// From f32, rounding to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl LogitElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl LogitElem for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

impl LogitElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// A `[rows, vocab]` logits matrix whose rows start `ld` elements apart (`ld >= vocab`), so views of
/// a padded buffer work. `L` is a host slice or a CUDA view.
#[derive(Clone, Copy, Debug)]
pub struct Logits<L> {
    /// The elements; row t is `data[t * ld .. t * ld + vocab]`.
    pub data: L,
    /// T.
    pub rows: usize,
    /// V.
    pub vocab: usize,
    /// Row stride in elements.
    pub ld: usize,
}

impl<L> Logits<L> {
    /// A dense `[rows, vocab]` matrix (`ld = vocab`).
    pub fn dense(data: L, rows: usize, vocab: usize) -> Self {
        Logits {
            data,
            rows,
            vocab,
            ld: vocab,
        }
    }

    /// Elements the layout needs: `(rows - 1) * ld + vocab`, or 0 without rows.
    pub fn span(&self) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * self.ld + self.vocab
        }
    }

    pub(crate) fn check(&self, arg: &'static str, len: usize) -> Result<()> {
        if self.vocab == 0 {
            return Err(Error::invalid_argument(
                arg,
                "expected a vocabulary V >= 1, got V = 0",
            ));
        }
        if self.ld < self.vocab {
            return Err(Error::invalid_argument(
                arg,
                format!(
                    "row stride ld = {} is smaller than V = {}",
                    self.ld, self.vocab
                ),
            ));
        }
        if self.vocab > i32::MAX as usize {
            return Err(Error::invalid_argument(
                arg,
                format!("V = {} exceeds the i32 label range", self.vocab),
            ));
        }
        let need = self
            .rows
            .checked_sub(1)
            .map_or(Some(0), |r| {
                r.checked_mul(self.ld)
                    .and_then(|x| x.checked_add(self.vocab))
            })
            .ok_or_else(|| Error::invalid_argument(arg, "rows * ld overflows"))?;
        if len < need {
            return Err(Error::invalid_argument(
                arg,
                format!(
                    "[T = {}, V = {}] with row stride {} needs {need} elements, the buffer has {len}",
                    self.rows, self.vocab, self.ld
                ),
            ));
        }
        Ok(())
    }
}

impl<L: Array> Logits<L> {
    pub(crate) fn validate(&self, arg: &'static str) -> Result<()> {
        self.check(arg, self.data.array_len())
    }
}

/// Inputs of the loss from logits besides the logits themselves: the fused GRPO loss's inputs with
/// `labels` in place of `logp` (computed from the logits). `I` is the i32 array type.
#[derive(Clone, Copy, Debug)]
pub struct LogitsLossInputs<'a, F, U, I> {
    /// `[T]` sampled token ids (`ignore_index` excludes a token).
    pub labels: I,
    /// `[T]` log-probabilities of the sampling policy.
    pub old_logp: F,
    /// `[T]` reference log-probabilities (KL term), if any.
    pub ref_logp: Option<F>,
    /// `[T]` the inference engine's log-probabilities (rollout IS correction), if any.
    pub rollout_logp: Option<F>,
    /// `[B, K]` or `[T, K]` advantages.
    pub advantages: crate::layout::Advantages<F>,
    /// `[T]` token mask (tokens with ignored labels are excluded on top of it).
    pub mask: crate::layout::Mask<F, U>,
    /// `[B + 1]` sequence boundaries.
    pub cu_seqlens: &'a [i32],
    /// `[K]` objective weights.
    pub lambda: &'a [f32],
    /// `[K]` objective kinds.
    pub objectives: &'a [crate::config::ObjectiveKind],
    /// `[B]` membership bits, or `None` for all.
    pub membership: Option<&'a [u32]>,
    /// Global normalizers, or `None` for this batch's own.
    pub normalizers: Option<&'a crate::config::Normalizers>,
}

/// Host inputs of the loss from logits.
pub type HostLogitsLossInputs<'a> = LogitsLossInputs<'a, &'a [f32], &'a [u8], &'a [i32]>;

/// The loss from logits' result, defined with the other results in [`crate::output`] (kept here
/// under its earlier path).
pub use crate::output::LogitsLossOutput;

/// Normalizers of the entropy term (one objective over every sequence): the KL slot of the loss's.
pub(crate) fn entropy_normalizers(n: &crate::config::Normalizers) -> crate::config::Normalizers {
    let (t, s) = (
        *n.tokens.last().unwrap_or(&0.0),
        *n.seqs.last().unwrap_or(&0.0),
    );
    crate::config::Normalizers {
        tokens: vec![t, t],
        seqs: vec![s, s],
        seq_tokens: n.seq_tokens.clone(),
    }
}

/// Configuration of the logits ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogprobConfig {
    /// Temperature tau > 0: log-probabilities of `logits / tau` (verl's `temperature`).
    pub temperature: f32,
    /// Label that marks a token to ignore: its logp is 0 and it gets no gradient (default -100).
    pub ignore_index: i32,
}

impl Default for LogprobConfig {
    fn default() -> Self {
        LogprobConfig {
            temperature: 1.0,
            ignore_index: -100,
        }
    }
}

impl LogprobConfig {
    /// Checks the temperature.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid_argument(
                "config.temperature",
                format!(
                    "expected a finite temperature > 0, got {}",
                    self.temperature
                ),
            ));
        }
        Ok(())
    }
}

/// TRL's top-entropy-quantile mask: 1 at valid tokens (`valid != 0`) whose entropy is at or above
/// the `1 - q` quantile of the valid tokens' entropies (linear interpolation between order
/// statistics, as `torch.quantile`), else 0. `q = 1` keeps every valid token.
pub fn top_entropy_mask(entropy: &[f32], valid: &[f32], q: f32) -> Vec<f32> {
    let mut vals: Vec<f64> = entropy
        .iter()
        .zip(valid)
        .filter(|(_, v)| **v != 0.0)
        .map(|(e, _)| *e as f64)
        .collect();
    if vals.is_empty() {
        return vec![0.0; entropy.len()];
    }
    vals.sort_by(|a, b| a.total_cmp(b));
    let pos = (1.0 - q as f64).clamp(0.0, 1.0) * (vals.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(vals.len() - 1);
    let threshold = vals[lo] + frac * (vals[hi] - vals[lo]);
    entropy
        .iter()
        .zip(valid)
        .map(|(e, v)| (*v != 0.0 && *e as f64 >= threshold) as u8 as f32)
        .collect()
}
