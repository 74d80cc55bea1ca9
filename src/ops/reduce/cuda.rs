//! Kernel 3 on the GPU: the per-objective weighted loss reduction (`kernels/reduce.cu`).

use crate::config::{GrpoConfig, Normalizers};
use crate::cuda::device::{
    addr, addr_mut, begin_token_pass, finalize, maxk, params::ReduceParams, DeviceNorms, Gpu,
    LayoutSrc, Module, SeqExtras, Workspace,
};
use crate::error::Result;
use crate::layout::{check_len, validate_reduce, Mask, ReduceInputs};
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
    let (t, k) = (shape.t, shape.k);
    check_len("grad", grad.len(), t * k, "[T, K]")?;
    gpu.check_stream(stream)?;
    let layout = LayoutSrc::Host {
        cu_seqlens: inputs.cu_seqlens,
        membership: inputs.membership,
    };
    let (g_a, _g) = addr_mut(grad, stream);
    let pass = ReducePass {
        losses: &inputs.losses,
        mask: &inputs.mask,
        layout: &layout,
        k,
        lambda: inputs.lambda,
        normalizers: inputs.normalizers,
        dev_norms: None,
    };
    let ws = pass.enqueue(gpu, stream, config, g_a, None)?;
    let (norms, agg) = ws.read_back(stream)?;
    Ok(finish_reduce(agg, &norms, inputs.lambda))
}

/// One weighted reduction as a step of a larger call (the losses from logits reduce the entropy
/// term with it): the inputs were validated by the caller; the layout may be on the device, the
/// normalizers given on the host or on the device, and the output written at a device address.
pub(crate) struct ReducePass<'p, 'a> {
    pub losses: &'p CudaView<'a, f32>,
    pub mask: &'p Mask<CudaView<'a, f32>, CudaView<'a, u8>>,
    pub layout: &'p LayoutSrc<'p>,
    pub k: usize,
    pub lambda: &'p [f32],
    pub normalizers: Option<&'p Normalizers>,
    pub dev_norms: Option<&'p DeviceNorms>,
}

impl ReducePass<'_, '_> {
    /// Enqueues the pass (3 launches) writing `d total / d l_tk` at `grad` and the output
    /// (`out_len(K)` f64s: flags, normalizers, the K aggregates) at `out`, or into the returned
    /// workspace when `None`.
    pub(crate) fn enqueue<'g>(
        &self,
        gpu: &'g Gpu,
        stream: &Arc<CudaStream>,
        config: &GrpoConfig,
        grad: u64,
        out: Option<u64>,
    ) -> Result<Workspace<'g>> {
        let (t, k, b) = (self.losses.len() / self.k.max(1), self.k, self.layout.b());
        let pass = begin_token_pass(
            gpu,
            stream,
            self.mask,
            t,
            self.layout,
            k,
            k,
            self.normalizers,
            self.dev_norms,
            &SeqExtras::default(),
            out,
        )?;
        let (items, suffix, w) = (pass.items, pass.suffix, pass.addrs);
        {
            let (l_a, _g0) = addr(self.losses, stream);
            let mut lambda = [0f32; 16];
            lambda[..k].copy_from_slice(self.lambda);
            let p = ReduceParams {
                losses: l_a,
                mask: pass.mask_addr,
                cu_seqlens: w.cu_seqlens,
                membership: w.membership,
                seq_tokens: w.seq_tokens,
                norms: w.norms,
                grad,
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
                pass.ws.blocks,
                &p,
            )?;
            finalize(gpu, stream, &pass.ws, &w, 0, 0)?;
        }
        Ok(pass.ws)
    }
}
