//! The chunked fused-linear path: the GRPO loss of a policy whose last layer is
//! `logits = hidden [T, H] x W [V, H]^T`, without ever holding `[T, V]` logits.
//!
//! First the whole batch's mask (ignored labels out) and normalizers are counted on the device,
//! including each sequence's token weight, so that any chunk's tokens are weighted exactly as in the
//! whole batch, in every aggregation mode and whether or not a chunk cuts a sequence. Then, in one
//! pass over chunks of `c` tokens: logits by cuBLAS (bf16 inputs, fp32 accumulation, bf16 or fp32
//! logits), kernel 4 (log-probs, entropy, LSE), the fused GRPO loss on the chunk's tokens with the
//! global normalizers (dL/dlogp, KL, entropy bonus), kernel 5 in place (dlogits), then
//! `dH_chunk = dlogits x W` and `dW += dlogits^T x hidden_chunk` (fp32 accumulator): three GEMMs
//! per chunk, as the unfused path. The result does not depend on the chunk size beyond GEMM
//! rounding; peak extra memory is one chunk of logits (c x V) plus 7 floats per token, never
//! O(T x V).

use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaView;
use half::bf16;

/// The last layer: `hidden [T, H]` and `weight [V, H]`, row-major bf16.
#[derive(Debug)]
pub struct LinearHead<'a> {
    /// `[T, H]` final hidden states.
    pub hidden: CudaView<'a, bf16>,
    /// `[V, H]` LM-head weight.
    pub weight: CudaView<'a, bf16>,
    /// H.
    pub hidden_size: usize,
    /// V.
    pub vocab: usize,
}

/// Options of the fused-linear path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedLinearConfig {
    /// Tokens per chunk; `None` sizes chunks from `memory_budget`.
    pub chunk_tokens: Option<usize>,
    /// Bytes for one chunk of logits (with fp32 logits: and its bf16 copy) when `chunk_tokens` is
    /// `None` (default 512 MiB).
    pub memory_budget: usize,
    /// Keep the logits in fp32 (bf16 GEMM inputs, fp32 output), as users who find bf16 LM heads
    /// hurt RL ask; the gradient is rounded to bf16 for the two backward GEMMs.
    pub fp32_logits: bool,
    /// Batch-invariant mode (the synchronous call): every GEMM that produces a row's values (the
    /// logits, the hidden gradient) runs on exactly [`FusedLinearConfig::chunk`] rows, a partial
    /// chunk padded with zero rows, so cuBLAS sees one shape whatever the batch and each row's
    /// results (its log-prob, entropy, loss terms and `d_hidden` row, given the same normalizers)
    /// do not depend on the rows around it. Costs the padded rows (up to one chunk per call) and a
    /// scratch of one chunk of hidden rows. Off by default (its cost on a GPU is unmeasured).
    pub batch_invariant: bool,
}

impl Default for FusedLinearConfig {
    fn default() -> Self {
        FusedLinearConfig {
            chunk_tokens: None,
            memory_budget: 512 << 20,
            fp32_logits: false,
            batch_invariant: false,
        }
    }
}

impl FusedLinearConfig {
    /// The chunk size used for `t` tokens and vocabulary `v` (in the batch-invariant mode, not
    /// capped at `t`: the GEMMs' row count does not depend on the batch).
    pub fn chunk(&self, t: usize, v: usize) -> usize {
        // bf16 logits, or fp32 logits plus their bf16 copy for the backward GEMMs
        let elem = if self.fp32_logits { 4 + 2 } else { 2 };
        let c = self.chunk_tokens.unwrap_or_else(|| {
            let c = self.memory_budget / (v.max(1) * elem);
            if c >= 128 {
                c / 64 * 64 // GEMM-friendly
            } else {
                c
            }
        });
        if self.batch_invariant {
            c.max(1)
        } else {
            c.clamp(1, t.max(1))
        }
    }
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::NoDevice(format!("cuBLAS: {e:?}"))
}

/// `C[m, n] (col-major, ldc) = op(A) op(B) + beta C` with fp32 accumulation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    blas: &CudaBlas,
    ta: cublasOperation_t,
    tb: cublasOperation_t,
    (m, n, k): (usize, usize, usize),
    (a, a_type, lda): (u64, cudaDataType, usize),
    (b, b_type, ldb): (u64, cudaDataType, usize),
    (c, c_type, ldc): (u64, cudaDataType, usize),
    beta: f32,
) -> Result<()> {
    let alpha = 1.0f32;
    let dim = |x: usize, what: &'static str| {
        i32::try_from(x).map_err(|_| {
            Error::invalid_argument(what, format!("{x} exceeds cuBLAS's i32 dimensions"))
        })
    };
    // SAFETY: the addresses are device buffers of this context holding at least the m x k, k x n and
    // m x n column-major operands with the given leading dimensions (checked by the caller's shape
    // validation), the handle is bound to the stream the buffers are used on, and alpha/beta are
    // host f32 scalars as CUBLAS_COMPUTE_32F expects.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            ta,
            tb,
            dim(m, "head")?,
            dim(n, "head")?,
            dim(k, "head")?,
            &alpha as *const f32 as *const _,
            a as *const _,
            a_type,
            dim(lda, "head")?,
            b as *const _,
            b_type,
            dim(ldb, "head")?,
            &beta as *const f32 as *const _,
            c as *mut _,
            c_type,
            dim(ldc, "head")?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(blas_err)
}

/// The rows of a fused-linear batch that carry loss (mask weight not 0, label not ignored), read
/// on the host by the synchronous call, with their inputs gathered on the device: the call then
/// runs its GEMMs and kernels over these rows only. Dropping rows of weight 0 changes no
/// normalizer (each sequence's mask sum stays; a sequence left empty stays, with 0 rows), so the
/// loss and the gradients of the kept rows are those of the whole batch.
pub(crate) struct LossRows {
    /// The kept rows' positions in the batch, ascending (`[n]`, on the device).
    idx: cudarc::driver::CudaSlice<i32>,
    n: usize,
    cu_seqlens: Vec<i32>,
    hidden: cudarc::driver::CudaSlice<bf16>,
    labels: cudarc::driver::CudaSlice<i32>,
    old_logp: cudarc::driver::CudaSlice<f32>,
    ref_logp: Option<cudarc::driver::CudaSlice<f32>>,
    rollout_logp: Option<cudarc::driver::CudaSlice<f32>>,
    advantages: Option<cudarc::driver::CudaSlice<f32>>,
    mask: crate::layout::Mask<cudarc::driver::CudaSlice<f32>, cudarc::driver::CudaSlice<u8>>,
}

/// Moves `n` rows of `units` units of `unit` bytes: gathers `dst[i] = src[idx[i]]`, or scatters
/// `dst[idx[i]] = src[i]` (`recap_move_rows`).
#[allow(clippy::too_many_arguments)]
fn move_rows(
    gpu: &crate::cuda::device::Gpu,
    stream: &cudarc::driver::CudaStream,
    (src, dst, idx): (u64, u64, u64),
    n: usize,
    units: usize,
    unit: usize,
    scatter: bool,
) -> Result<()> {
    let p = crate::cuda::device::params::LogitsParams {
        logits: src,
        dlogits: dst,
        labels: idx,
        num_rows: n as i64,
        vocab: units as i64,
        ld: unit as i64,
        sharded: scatter as i32,
        ..Default::default()
    };
    let grid = (n * units)
        .div_ceil(crate::cuda::device::BLOCK as usize)
        .min(65_535);
    gpu.launch(
        stream,
        crate::cuda::device::Module::Logits,
        "recap_move_rows",
        grid,
        &p,
    )
}

impl LossRows {
    /// `None` when every row carries loss (nothing to gather); computes the valid mask on the
    /// device (`recap_valid_mask`: the mask weight, 0 at ignored labels) and reads it back
    /// (synchronizes `stream`). The inputs' lengths are checked by the caller.
    pub(crate) fn find(
        gpu: &crate::cuda::device::Gpu,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        head: &LinearHead<'_>,
        inputs: &crate::ops::logits::cuda::DeviceLogitsLossInputs<'_>,
        config: &crate::logits::LogprobConfig,
    ) -> Result<Option<LossRows>> {
        use crate::layout::{Advantages, Mask};
        let t = inputs.labels.len();
        let mut valid = stream.alloc_zeros::<f32>(t.max(1))?;
        {
            let (va, _gv) = crate::cuda::device::addr_slice_mut(&mut valid, stream);
            crate::ops::logits::cuda::valid_mask(gpu, stream, inputs, config, va)?;
        }
        let valid = stream.clone_dtoh(&valid.slice(..t))?;
        let keep: Vec<i32> = (0..t)
            .filter(|&r| valid[r] != 0.0)
            .map(|r| r as i32)
            .collect();
        let n = keep.len();
        if n == t {
            return Ok(None);
        }
        let mut cu_seqlens = Vec::with_capacity(inputs.cu_seqlens.len());
        let mut r = 0usize;
        for &end in inputs.cu_seqlens {
            while r < n && (keep[r] as i64) < end as i64 {
                r += 1;
            }
            cu_seqlens.push(r as i32);
        }
        let idx = stream.clone_htod(&keep)?;
        let h = head.hidden_size;
        let k = inputs.lambda.len();
        // the kept rows of a [T, units] array into a new [n, units] one
        fn gather<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
            gpu: &crate::cuda::device::Gpu,
            stream: &std::sync::Arc<cudarc::driver::CudaStream>,
            src: &cudarc::driver::CudaView<'_, T>,
            (idx_a, n, units): (u64, usize, usize),
        ) -> Result<cudarc::driver::CudaSlice<T>> {
            let mut dst = stream.alloc_zeros::<T>((n * units).max(1))?;
            {
                let (s, _gs) = crate::cuda::device::addr(src, stream);
                let (d, _gd) = crate::cuda::device::addr_slice_mut(&mut dst, stream);
                let unit = std::mem::size_of::<T>();
                move_rows(gpu, stream, (s, d, idx_a), n, units, unit, false)?;
            }
            Ok(dst)
        }
        let idx_view = idx.slice(..);
        let (idx_a, gi) = crate::cuda::device::addr(&idx_view, stream);
        let rows = (idx_a, n, 1);
        let g = |x: &cudarc::driver::CudaView<'_, f32>| gather(gpu, stream, x, rows);
        let hidden = gather(gpu, stream, &head.hidden, (idx_a, n, h))?;
        let labels = gather(gpu, stream, &inputs.labels, rows)?;
        let old_logp = g(&inputs.old_logp)?;
        let ref_logp = inputs.ref_logp.as_ref().map(g).transpose()?;
        let rollout_logp = inputs.rollout_logp.as_ref().map(g).transpose()?;
        let advantages = match &inputs.advantages {
            Advantages::PerToken(a) => Some(gather(gpu, stream, a, (idx_a, n, k))?),
            Advantages::PerSequence(_) => None,
        };
        let mask = match &inputs.mask {
            Mask::F32(m) => Mask::F32(g(m)?),
            Mask::U8(m) => Mask::U8(gather(gpu, stream, m, rows)?),
        };
        drop(gi);
        Ok(Some(LossRows {
            idx,
            n,
            cu_seqlens,
            hidden,
            labels,
            old_logp,
            ref_logp,
            rollout_logp,
            advantages,
            mask,
        }))
    }

    /// The kept rows' head (the LM head's weight unchanged).
    pub(crate) fn head<'s>(&'s self, head: &LinearHead<'s>) -> LinearHead<'s> {
        LinearHead {
            hidden: self.hidden.slice(..self.n * head.hidden_size),
            weight: head.weight.slice(..),
            hidden_size: head.hidden_size,
            vocab: head.vocab,
        }
    }

    /// The kept rows' inputs (the per-sequence ones unchanged, `cu_seqlens` over the kept rows).
    pub(crate) fn inputs<'s>(
        &'s self,
        inputs: &crate::ops::logits::cuda::DeviceLogitsLossInputs<'s>,
    ) -> crate::ops::logits::cuda::DeviceLogitsLossInputs<'s> {
        use crate::layout::{Advantages, Mask};
        let n = self.n;
        let k = inputs.lambda.len();
        crate::ops::logits::cuda::DeviceLogitsLossInputs {
            labels: self.labels.slice(..n),
            old_logp: self.old_logp.slice(..n),
            ref_logp: self.ref_logp.as_ref().map(|x| x.slice(..n)),
            rollout_logp: self.rollout_logp.as_ref().map(|x| x.slice(..n)),
            advantages: match (&self.advantages, &inputs.advantages) {
                (Some(a), _) => Advantages::PerToken(a.slice(..n * k)),
                (None, Advantages::PerSequence(a)) => Advantages::PerSequence(a.slice(..)),
                (None, Advantages::PerToken(a)) => Advantages::PerToken(a.slice(..)),
            },
            mask: match &self.mask {
                Mask::F32(m) => Mask::F32(m.slice(..n)),
                Mask::U8(m) => Mask::U8(m.slice(..n)),
            },
            cu_seqlens: &self.cu_seqlens,
            ..*inputs
        }
    }

    /// A `[n, H]` buffer for the kept rows' hidden gradient.
    pub(crate) fn d_hidden_buffer(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        h: usize,
    ) -> Result<cudarc::driver::CudaSlice<bf16>> {
        Ok(stream.alloc_zeros::<bf16>((self.n * h).max(1))?)
    }

    /// `d_hidden [T, H]`: the kept rows' gradient at their positions, 0 elsewhere.
    pub(crate) fn scatter_d_hidden(
        &self,
        gpu: &crate::cuda::device::Gpu,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        kept: &cudarc::driver::CudaSlice<bf16>,
        d_hidden: &mut cudarc::driver::CudaViewMut<'_, bf16>,
        h: usize,
    ) -> Result<()> {
        stream.memset_zeros(d_hidden)?;
        let (kept, idx) = (kept.slice(..), self.idx.slice(..));
        let (s, _gs) = crate::cuda::device::addr(&kept, stream);
        let (d, _gd) = crate::cuda::device::addr_mut(d_hidden, stream);
        let (i, _gi) = crate::cuda::device::addr(&idx, stream);
        move_rows(gpu, stream, (s, d, i), self.n, h, 2, true)
    }
}
