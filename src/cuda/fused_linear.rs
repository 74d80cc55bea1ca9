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

use super::logits::{
    backward_rows, forward_rows, loss_on_logprobs, valid_mask, DeviceLogitsLossInputs, TokenWork,
};
use super::{
    addr, addr_mut, addr_slice, device_normalizers, params::LogitsParams, Gpu, Module, BLOCK,
};
use crate::config::{GrpoConfig, Normalizers};
use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::layout::Mask;
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
        return Err(Error::invalid_argument(
            "head",
            format!("expected H >= 1 and V >= 1, got H = {h}, V = {v}"),
        ));
    }
    if head.hidden.len() % h != 0 {
        return Err(Error::invalid_argument(
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
    let seq_level_is = inputs.rollout_logp.is_some()
        && config
            .rollout_correction
            .is_some_and(|r| r.level != crate::config::IsLevel::Token);
    let whole_batch = matches!(
        config.policy_loss,
        crate::config::PolicyLoss::Gspo | crate::config::PolicyLoss::GeoMean
    ) || seq_level_is
        || config.top_entropy_quantile < 1.0;
    if whole_batch && c < t {
        // GSPO's and GMPO's ratios and a sequence-level IS weight span each whole sequence: a chunk's loss
        // would need the log-probs of tokens in later chunks
        return Err(Error::invalid_argument(
            "options.chunk_tokens",
            format!(
                "GSPO, GMPO, sequence-level rollout IS and the top-entropy-quantile mask need the whole \
                 batch in one chunk ({t} tokens, got chunks of {c}): set chunk_tokens or raise \
                 memory_budget"
            ),
        ));
    }
    let mut work = TokenWork::new(stream, t)?;
    // The whole batch's mask (ignored labels out) and normalizers, before any logits: each chunk's
    // loss then weighs its tokens exactly as the whole batch would, in every aggregation mode.
    valid_mask(gpu, stream, inputs, logits_config, &mut work.valid)?;
    let k = inputs.lambda.len();
    let counted = {
        let vv = work.valid.slice(..t);
        device_normalizers(
            gpu,
            stream,
            &Mask::F32(vv),
            t,
            inputs.cu_seqlens,
            inputs.membership,
            k,
        )?
    };
    let global = match inputs.normalizers {
        Some(n) => Normalizers {
            seq_tokens: n.seq_tokens.clone().or(counted.seq_tokens),
            ..n.clone()
        },
        None => counted,
    };
    let mut valid_chunk = stream.alloc_zeros::<f32>(t.max(1))?;
    let mut chunk = stream.alloc_zeros::<E>((c * v).max(1))?;
    let mut chunk_bf16: Option<CudaSlice<bf16>> = if E::SUFFIX == "f32" {
        Some(stream.alloc_zeros::<bf16>((c * v).max(1))?)
    } else {
        None
    };
    let (ct, bf) = (data_type::<E>(), cudaDataType::CUDA_R_16BF);
    if t == 0 {
        stream.memset_zeros(d_weight)?;
        let out = loss_on_logprobs(
            gpu,
            stream,
            inputs,
            config,
            &mut work,
            Some(&valid_chunk),
            Some(&global),
            true,
        )?;
        return Ok(out);
    }
    let mut parts: Vec<LogitsLossOutput> = Vec::new();
    for (i, t0) in (0..t).step_by(c).enumerate() {
        let n = c.min(t - t0);
        {
            let (x_a, _gx) = addr(&head.hidden, stream);
            let (w_a, _gw) = addr(&head.weight, stream);
            let (c_a, _gc) = super::addr_slice_mut(&mut chunk, stream);
            // logits^T[V, n] = W[V, H] x X_chunk^T[H, n]
            gpu.with_blas(stream, |blas| {
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
            })?;
        }
        {
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
        stream.memcpy_dtod(
            &work.valid.slice(t0..t0 + n),
            &mut valid_chunk.slice_mut(t0..t0 + n),
        )?;
        // one chunk holds the batch here when the mask is on (checked above)
        work.set_entropy_mask(stream, config.top_entropy_quantile)?;
        parts.push(loss_on_logprobs(
            gpu,
            stream,
            inputs,
            config,
            &mut work,
            Some(&valid_chunk),
            Some(&global),
            false,
        )?);
        stream.memset_zeros(&mut valid_chunk.slice_mut(t0..t0 + n))?;
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
        if let Some(b16) = chunk_bf16.as_mut() {
            let (src, _g0) = addr_slice(&chunk, stream);
            let (dst, _g1) = super::addr_slice_mut(b16, stream);
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
        }
        let (x_a, _gx) = addr(&head.hidden, stream);
        let (w_a, _gw) = addr(&head.weight, stream);
        let (dl_a, _gdl) = match chunk_bf16.as_ref() {
            Some(b16) => addr_slice(b16, stream),
            None => addr_slice(&chunk, stream),
        };
        let (dh_a, _gdh) = addr_mut(d_hidden, stream);
        let (dw_a, _gdw) = addr_mut(d_weight, stream);
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
    work.check_labels(stream, v, logits_config)?;
    let grpo: Vec<crate::output::GrpoOutput> = parts.iter().map(|p| p.grpo.clone()).collect();
    let grpo = crate::output::GrpoOutput::merge_parts(&grpo, &global)
        .ok_or_else(|| Error::invalid_argument("head.hidden", "no tokens"))?;
    // the entropy term and mean over the whole batch, once (work holds every token's entropy)
    let (entropy_loss, entropy_mean) = entropy_stats(gpu, stream, inputs, config, &work, &global)?;
    Ok(LogitsLossOutput {
        loss: grpo.loss - config.entropy_coef as f64 * entropy_loss,
        grpo,
        entropy_loss,
        entropy_mean,
    })
}

/// `agg(entropy)` in the configured mode with the whole batch's normalizers, and its masked mean.
fn entropy_stats(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceLogitsLossInputs<'_>,
    config: &GrpoConfig,
    work: &TokenWork,
    global: &Normalizers,
) -> Result<(f64, f64)> {
    use crate::layout::ReduceInputs;
    let t = work.t;
    let norms = crate::logits::entropy_normalizers(global);
    let mut scratch = stream.alloc_zeros::<f32>(t.max(1))?;
    let mut reduce = |cfg: &GrpoConfig, n: Option<&Normalizers>| -> Result<f64> {
        Ok(super::weighted_reduce(
            gpu,
            stream,
            &ReduceInputs {
                losses: work.entropy.slice(..t),
                mask: Mask::F32(work.valid.slice(..t)),
                cu_seqlens: inputs.cu_seqlens,
                lambda: &[1.0],
                membership: None,
                normalizers: n,
            },
            cfg,
            &mut scratch.slice_mut(..t),
        )?
        .objective_loss[0])
    };
    let agg = reduce(config, Some(&norms))?;
    let mean_cfg = GrpoConfig {
        agg_mode: crate::config::AggMode::TokenMean,
        ..config.clone()
    };
    Ok((agg, reduce(&mean_cfg, None)?))
}
