//! The chunked fused-linear path: the GRPO loss of a policy whose last layer is
//! `logits = hidden [T, H] x W [V, H]^T`, without ever holding `[T, V]` logits.
//!
//! Tokens go in chunks of `c`. Pass 1, per chunk: logits by cuBLAS (bf16 inputs, fp32 accumulation,
//! bf16 or fp32 logits), then kernel 4 into per-token log-probs, entropy and LSE. Then the loss on
//! all T log-probs at once (the fused GRPO loss with global normalizers, KL, entropy bonus), which
//! gives dL/dlogp for every token, whatever the aggregation mode. Pass 2, per chunk: the logits
//! again (except the last), kernel 5 in place (dlogits), `dH_chunk = dlogits x W` and `dW += dlogits^T x hidden_chunk`
//! (fp32 accumulator). The result does not depend on the chunk size beyond GEMM rounding; peak extra
//! memory is one chunk of logits (c x V) plus 6 floats per token, never O(T x V).

use super::logits::{
    backward_rows, forward_rows, loss_on_logprobs, DeviceLogitsLossInputs, TokenWork,
};
use super::{addr, addr_mut, addr_slice, params::LogitsParams, Gpu, Module, BLOCK};
use crate::config::GrpoConfig;
use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogitsLossOutput, LogprobConfig};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;
use std::sync::Arc;

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
    /// Bytes for one chunk of logits when `chunk_tokens` is `None` (default 512 MiB).
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
        let elem = if self.fp32_logits { 4 } else { 2 };
        let c = self
            .chunk_tokens
            .unwrap_or(self.memory_budget / (v.max(1) * elem));
        c.clamp(1, t.max(1))
    }
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::NoDevice(format!("cuBLAS: {e:?}"))
}

/// `C[m, n] (col-major, ldc) = op(A) op(B) + beta C` with fp32 accumulation.
#[allow(clippy::too_many_arguments)]
fn gemm(
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
        i32::try_from(x)
            .map_err(|_| Error::arg(what, format!("{x} exceeds cuBLAS's i32 dimensions")))
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

/// The GRPO loss from the last layer's inputs, chunked (see the module docs): writes `d_hidden`
/// (`[T, H]` bf16) and `d_weight` (`[V, H]` fp32, overwritten) and returns the loss and metrics.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_grpo_loss(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    head: &LinearHead<'_>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    d_hidden: &mut CudaViewMut<'_, bf16>,
    d_weight: &mut CudaViewMut<'_, f32>,
) -> Result<LogitsLossOutput> {
    config.validate()?;
    logits_config.validate()?;
    let (h, v) = (head.hidden_size, head.vocab);
    if h == 0 || v == 0 {
        return Err(Error::arg(
            "head",
            format!("expected H >= 1 and V >= 1, got H = {h}, V = {v}"),
        ));
    }
    if head.hidden.len() % h != 0 {
        return Err(Error::arg(
            "head.hidden",
            format!("expected [T, H = {h}], got {} elements", head.hidden.len()),
        ));
    }
    let t = head.hidden.len() / h;
    check_len("head.weight", head.weight.len(), v * h, "[V, H]")?;
    check_len("labels", inputs.labels.len(), t, "[T] (the rows of hidden)")?;
    check_len("mask", inputs.mask.array_len(), t, "[T]")?;
    check_len("d_hidden", d_hidden.len(), t * h, "[T, H]")?;
    check_len("d_weight", d_weight.len(), v * h, "[V, H]")?;
    gpu.check_stream(stream)?;
    if options.fp32_logits {
        run::<f32>(
            gpu,
            stream,
            head,
            inputs,
            config,
            logits_config,
            options,
            t,
            d_hidden,
            d_weight,
        )
    } else {
        run::<bf16>(
            gpu,
            stream,
            head,
            inputs,
            config,
            logits_config,
            options,
            t,
            d_hidden,
            d_weight,
        )
    }
}

fn data_type<E: LogitElem>() -> cudaDataType {
    if E::SUFFIX == "f32" {
        cudaDataType::CUDA_R_32F
    } else {
        cudaDataType::CUDA_R_16BF
    }
}

#[allow(clippy::too_many_arguments)]
fn run<E: LogitElem>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    head: &LinearHead<'_>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    options: &FusedLinearConfig,
    t: usize,
    d_hidden: &mut CudaViewMut<'_, bf16>,
    d_weight: &mut CudaViewMut<'_, f32>,
) -> Result<LogitsLossOutput> {
    use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
    let (h, v) = (head.hidden_size, head.vocab);
    let c = options.chunk(t, v);
    let mut work = TokenWork::new(stream, t)?;
    let mut chunk = stream.alloc_zeros::<E>((c * v).max(1))?;
    let mut chunk_bf16: Option<CudaSlice<bf16>> = if E::SUFFIX == "f32" {
        Some(stream.alloc_zeros::<bf16>((c * v).max(1))?)
    } else {
        None
    };
    let (x_a, _gx) = addr(&head.hidden, stream);
    let (w_a, _gw) = addr(&head.weight, stream);
    let (ct, bf) = (data_type::<E>(), cudaDataType::CUDA_R_16BF);
    let logits_gemm =
        |blas: &CudaBlas, chunk: &mut CudaSlice<E>, t0: usize, n: usize| -> Result<()> {
            let (c_a, _g) = super::addr_slice_mut(chunk, stream);
            gemm(
                blas,
                T,
                N,
                (v, n, h),
                (w_a, bf, h),
                (x_a + (t0 * h * 2) as u64, bf, h),
                (c_a, ct, v),
                0.0,
            )
        };
    // pass 1: log-probs, entropy, LSE of every token
    for t0 in (0..t).step_by(c) {
        let n = c.min(t - t0);
        gpu.with_blas(stream, |blas| logits_gemm(blas, &mut chunk, t0, n))?;
        let zv = Logits::dense(chunk.slice(..n * v), n, v);
        forward_rows(
            gpu,
            stream,
            &zv,
            inputs,
            t0..t0 + n,
            logits_config,
            &mut work,
        )?;
    }
    let out = loss_on_logprobs(gpu, stream, inputs, config, &mut work)?;
    // pass 2: gradients
    if t == 0 {
        stream.memset_zeros(d_weight)?;
    }
    let (dh_a, _gdh) = addr_mut(d_hidden, stream);
    let (dw_a, _gdw) = addr_mut(d_weight, stream);
    // In reverse: the last chunk's logits are still in the buffer from pass 1 (one GEMM saved; with a
    // single chunk this is exactly the unfused three-GEMM path).
    let starts: Vec<usize> = (0..t).step_by(c).collect();
    for (i, &t0) in starts.iter().rev().enumerate() {
        let n = c.min(t - t0);
        if i > 0 {
            gpu.with_blas(stream, |blas| logits_gemm(blas, &mut chunk, t0, n))?;
        }
        {
            let mut zl = Logits::dense(chunk.slice_mut(..n * v), n, v);
            backward_rows(
                gpu,
                stream,
                &mut zl,
                &inputs.labels,
                t0..t0 + n,
                logits_config,
                config.entropy_coef,
                &work,
            )?;
        }
        // the gradient chunk as bf16 for the GEMMs
        let dl_a = match chunk_bf16.as_mut() {
            Some(b16) => {
                let (src, _g0) = addr_slice(&chunk, stream);
                let (dst, g1) = super::addr_slice_mut(b16, stream);
                let p = LogitsParams {
                    logits: src,
                    dlogits: dst,
                    num_rows: (n * v) as i64,
                    ..Default::default()
                };
                gpu.launch(
                    stream,
                    Module::Logits,
                    "recap_f32_to_bf16",
                    (n * v).div_ceil(BLOCK as usize).min(65_535),
                    &p,
                )?;
                drop(g1);
                super::addr_slice(b16, stream).0
            }
            None => addr_slice(&chunk, stream).0,
        };
        gpu.with_blas(stream, |blas| {
            // dH rows [t0, t0 + n): (dH^T)[H, n] = W^T[H, V] x dL^T[V, n]
            gemm(
                blas,
                N,
                N,
                (h, n, v),
                (w_a, bf, h),
                (dl_a, bf, v),
                (dh_a + (t0 * h * 2) as u64, bf, h),
                0.0,
            )?;
            // dW^T[H, V] (+)= X_chunk^T[H, n] x dL[n, V]
            gemm(
                blas,
                N,
                T,
                (h, v, n),
                (x_a + (t0 * h * 2) as u64, bf, h),
                (dl_a, bf, v),
                (dw_a, cudaDataType::CUDA_R_32F, h),
                if i == 0 { 0.0 } else { 1.0 },
            )
        })?;
    }
    Ok(out)
}
