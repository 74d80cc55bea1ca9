//! Kernel 3 on the GPU: the per-objective weighted loss reduction (`kernels/reduce.cu`).

use super::{addr, addr_mut, begin_token_pass, finalize, maxk, params::ReduceParams, Gpu, Module};
use crate::config::GrpoConfig;
use crate::error::Result;
use crate::layout::{check_len, validate_reduce, ReduceInputs};
use crate::output::{finish_reduce, ReduceOutput};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Device inputs of the weighted reduction.
pub type DeviceReduceInputs<'a> = ReduceInputs<'a, CudaView<'a, f32>, CudaView<'a, u8>>;

/// Aggregates per-token losses `[T, K]` per objective with `config.agg_mode` on `stream`, returns
/// the aggregates and `(1/K) sum_k lambda_k agg_k` (this synchronizes `stream`), and writes
/// `d total / d l_tk` into `grad` (`[T, K]`).
pub fn weighted_reduce(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    inputs: &DeviceReduceInputs<'_>,
    config: &GrpoConfig,
    grad: &mut CudaViewMut<'_, f32>,
) -> Result<ReduceOutput> {
    let shape = validate_reduce(inputs, config.agg_mode, config.norm_constant)?;
    let (t, b, k) = (shape.t, shape.b, shape.k);
    check_len("grad", grad.len(), t * k, "[T, K]")?;
    gpu.check_stream(stream)?;
    let layout = super::LayoutSrc::Host {
        cu_seqlens: inputs.cu_seqlens,
        membership: inputs.membership,
    };
    let pass = begin_token_pass(
        gpu,
        stream,
        &inputs.mask,
        t,
        &layout,
        k,
        k,
        inputs.normalizers,
        &super::SeqExtras::default(),
        None,
    )?;
    let (ws, items, suffix, w) = (&pass.ws, pass.items, pass.suffix, pass.addrs);
    {
        let (l_a, _g0) = addr(&inputs.losses, stream);
        let (g_a, _g1) = addr_mut(grad, stream);
        let mut lambda = [0f32; 16];
        lambda[..k].copy_from_slice(inputs.lambda);
        let p = ReduceParams {
            losses: l_a,
            mask: pass.mask_addr,
            cu_seqlens: w.cu_seqlens,
            membership: w.membership,
            seq_tokens: w.seq_tokens,
            norms: w.norms,
            grad: g_a,
            partials: w.partials,
            tile_seq: w.tile_seq,
            num_tokens: t as i64,
            num_seqs: b as i32,
            num_objectives: k as i32,
            items_per_thread: items as i32,
            agg_mode: config.agg_mode.code(),
            sum_norm_const: config.norm_constant.unwrap_or(0.0),
            pad0: 0.0,
            lambda,
        };
        gpu.launch(
            stream,
            Module::Reduce,
            &format!("recap_reduce_k{}_{suffix}", maxk(k)),
            ws.blocks,
            &p,
        )?;
        finalize(gpu, stream, ws, &w, 0, 0)?;
    }
    let (norms, agg) = ws.read_back(stream)?;
    Ok(finish_reduce(agg, &norms, inputs.lambda))
}
