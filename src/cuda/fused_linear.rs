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
}

impl Default for FusedLinearConfig {
    fn default() -> Self {
        FusedLinearConfig {
            chunk_tokens: None,
            memory_budget: 512 << 20,
            fp32_logits: false,
        }
    }
}

impl FusedLinearConfig {
    /// The chunk size used for `t` tokens and vocabulary `v`.
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
        c.clamp(1, t.max(1))
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
