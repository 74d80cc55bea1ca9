//! The CUDA backend: one module per kernel family, a load-once module cache per device, and safe
//! wrappers that validate every argument on the host before any launch.
//!
//! Inputs are `CudaView`s, outputs `&mut CudaViewMut`, and every op takes the stream it runs on.
//! `unsafe` appears only around the launches. On a build without kernels (no nvcc at build time)
//! every entry point returns [`Error::NoKernels`].

mod advantages;
mod counters;
pub(crate) mod fused_linear;
mod grpo;
mod kl;
mod logits;
#[doc(hidden)]
pub mod params;
mod reduce;
mod rollout_is;
mod tensor_parallel;
mod token_baseline;

pub use advantages::{group_advantages, AdvAddrs, AdvShape, DeviceGroups};
pub use counters::{count_calls, emulated_counters, DeviceCalls};
pub use fused_linear::{fused_linear_grpo_loss, FusedLinearConfig, LinearHead};
pub use grpo::{grpo_loss, DeviceGrpoInputs};
pub use kl::{kl, rejection_grid, rejection_params, rollout_rejection};
pub use logits::{
    grpo_loss_from_logits, logprob_backward, logprob_backward_inplace, logprob_forward,
    DeviceLogitsLossInputs, LogprobGrads,
};
pub use reduce::{weighted_reduce, DeviceReduceInputs};
pub use rollout_is::{is_finalize_params, is_params, is_plan, rollout_is_weights, IsPlan};
pub use tensor_parallel::{tp_backward_inplace, tp_combine, tp_partials};
pub use token_baseline::{group_table, optimal_token_baseline, otb_launches, otb_params};

use crate::config::{Normalizers, MAX_OBJECTIVES};
use crate::error::{Error, Result};
use crate::layout::Mask;
use crate::output::NORM_SLOTS;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// the training driver's module image is used with the `tools` feature only
#[cfg_attr(not(feature = "tools"), allow(dead_code))]
mod images {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build embeds compiled kernels (nvcc was found at build time).
pub const KERNELS_COMPILED: bool = images::KERNELS_COMPILED;
/// The architectures the kernels were compiled for (`RECAP_CUDA_ARCHS`), e.g. `"80,90"`.
pub const CUDA_ARCHS: &str = images::CUDA_ARCHS;
/// The nvcc that compiled them.
pub const NVCC_VERSION: &str = images::NVCC_VERSION;

/// Threads per block of every kernel (`RECAP_BLOCK` in `kernels/common.cuh`).
pub(crate) const BLOCK: u32 = 256;

/// The kernel families, one embedded module image each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Advantages,
    GrpoLoss,
    Kl,
    Logits,
    Reduce,
    RolloutIs,
    TokenBaseline,
    /// The training driver's kernels (`recap train`, feature `tools`).
    #[cfg(feature = "tools")]
    Train,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Advantages => images::ADVANTAGES,
            Module::GrpoLoss => images::GRPO_LOSS,
            Module::Kl => images::KL,
            Module::Logits => images::LOGITS,
            Module::Reduce => images::REDUCE,
            Module::RolloutIs => images::ROLLOUT_IS,
            Module::TokenBaseline => images::TOKEN_BASELINE,
            #[cfg(feature = "tools")]
            Module::Train => images::TRAIN,
        }
    }
}

/// Whether a CUDA driver library can be loaded on this machine (without it, creating a context
/// would fail inside cudarc).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One GPU: its context, default stream and the cache of loaded modules and functions.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    sms: u32,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<Option<cudarc::cublas::CudaBlas>>,
}

impl Gpu {
    /// Opens device `ordinal`. Errors (never panics) when the build has no kernels, no driver is
    /// present, or the device does not exist.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        if !KERNELS_COMPILED {
            return Err(Error::NoKernels);
        }
        if !driver_present() {
            return Err(Error::NoDevice(
                "no CUDA driver library (libcuda) found".into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} CUDA device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let name = ctx.name()?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            name,
            sms: sms.max(1) as u32,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
        }))
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The context's default stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    fn module(&self, m: Module) -> Result<Arc<CudaModule>> {
        let mut cache = self
            .modules
            .lock()
            .map_err(|_| Error::NoDevice("module cache poisoned".into()))?;
        if let Some(module) = cache.get(&m) {
            return Ok(module.clone());
        }
        let module = self.ctx.load_module(Ptx::from_binary(m.image().to_vec()))?;
        cache.insert(m, module.clone());
        Ok(module)
    }

    pub(crate) fn function(&self, m: Module, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .map_err(|_| Error::NoDevice("function cache poisoned".into()))?
            .get(name)
        {
            return Ok(f.clone());
        }
        let f = self.module(m)?.load_function(name)?;
        self.functions
            .lock()
            .map_err(|_| Error::NoDevice("function cache poisoned".into()))?
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Runs `f` with this GPU's cuBLAS handle (created on first use), bound to `stream`.
    pub(crate) fn with_blas<R>(
        &self,
        stream: &Arc<CudaStream>,
        f: impl FnOnce(&cudarc::cublas::CudaBlas) -> Result<R>,
    ) -> Result<R> {
        // SAFETY: only tries to dlopen cuBLAS by its usual names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "cuBLAS (libcublas) not found: the fused-linear path needs it on the library path"
                    .into(),
            ));
        }
        let mut guard = self
            .blas
            .lock()
            .map_err(|_| Error::NoDevice("cuBLAS handle poisoned".into()))?;
        if guard.is_none() {
            let blas = cudarc::cublas::CudaBlas::new(stream.clone())
                .map_err(|e| Error::NoDevice(format!("cuBLAS handle: {e:?}")))?;
            *guard = Some(blas);
        }
        let blas = guard
            .as_mut()
            .ok_or_else(|| Error::NoDevice("cuBLAS handle missing".into()))?;
        // SAFETY: the handle is used only under this lock, on `stream`, which belongs to this context.
        unsafe { blas.set_stream(stream.clone()) }
            .map_err(|e| Error::NoDevice(format!("cuBLAS stream: {e:?}")))?;
        f(blas)
    }

    /// Errors unless `stream` belongs to this GPU's context.
    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::invalid_argument(
                "stream",
                "the stream belongs to another CUDA context than this Gpu",
            ));
        }
        Ok(())
    }

    /// Tokens per thread for a token kernel over `t` tokens: enough blocks to fill the device
    /// (about 4 per multiprocessor), at most 16 tokens per thread.
    pub fn items_per_thread(&self, t: usize) -> usize {
        let blocks = 4 * self.sms as usize;
        t.div_ceil(blocks * BLOCK as usize).clamp(1, 16)
    }

    /// Launches `name` from module `m` with `grid` blocks of [`BLOCK`] threads and the by-value
    /// parameter struct `params`. A grid of 0 launches nothing.
    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        stream: &CudaStream,
        m: Module,
        name: &str,
        grid: usize,
        params: &P,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let grid = u32::try_from(grid).map_err(|_| {
            Error::invalid_argument("logp", format!("{grid} blocks exceed the CUDA grid limit"))
        })?;
        let f = self.function(m, name)?;
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = stream.launch_builder(&f);
        builder.arg(params);
        // SAFETY: every kernel takes exactly one by-value parameter struct whose #[repr(C)] mirror is
        // `P` (layouts checked against recap_params.h by tests/device_math.rs); the caller validated
        // every array length on the host and holds the device buffers borrowed until after this
        // launch is enqueued on `stream`.
        unsafe { builder.launch(cfg) }?;
        Ok(())
    }
}

/// Smallest compiled objective-count specialization (`MAXK` of the kernels) that fits `k`.
pub(crate) fn maxk(k: usize) -> usize {
    debug_assert!((1..=MAX_OBJECTIVES).contains(&k));
    k.next_power_of_two()
}

/// Device address of a view, for a parameter struct; the guard must outlive the launch.
pub(crate) fn addr<'a, T>(v: &'a CudaView<'_, T>, s: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    let (p, g) = v.device_ptr(s);
    (p, g)
}

/// Device address of a mutable view, for an output of a parameter struct.
pub(crate) fn addr_mut<'a, T>(
    v: &'a mut CudaViewMut<'_, T>,
    s: &'a CudaStream,
) -> (u64, SyncOnDrop<'a>) {
    let (p, g) = v.device_ptr_mut(s);
    (p, g)
}

/// Device address of an owned buffer, for writing.
pub(crate) fn addr_slice_mut<'a, T>(
    v: &'a mut CudaSlice<T>,
    s: &'a CudaStream,
) -> (u64, SyncOnDrop<'a>) {
    v.device_ptr_mut(s)
}

/// Device address of an owned buffer.
pub(crate) fn addr_slice<'a, T>(v: &'a CudaSlice<T>, s: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    let (p, g) = v.device_ptr(s);
    (p, g)
}

/// Copies a host slice to a new device buffer of at least one element (a zero-length allocation is
/// not portable), so `buf.slice(..x.len())` is the data.
pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    x: &[T],
) -> Result<CudaSlice<T>> {
    let mut d = stream.alloc_zeros::<T>(x.len().max(1))?;
    if !x.is_empty() {
        stream.memcpy_htod(x, &mut d.slice_mut(..x.len()))?;
    }
    Ok(d)
}

/// One call's device scratch: a single f64 buffer
/// `[norms | out | seq_tokens | seq_log_ratio (2B) | seq_is_log | partials]` and a
/// single i32 buffer `[cu_seqlens | membership]`, so a call makes one allocation of each, one upload
/// and one read-back (`norms` and `out` are adjacent).
pub(crate) struct Workspace {
    scratch: CudaSlice<f64>,
    layout: CudaSlice<i32>,
    b: usize,
    slots: usize,
    pub blocks: usize,
    has_membership: bool,
}

const NORMS_LEN: usize = 4 * NORM_SLOTS;

impl Workspace {
    /// Scratch for `blocks` token-pass blocks of `slots` statistics each, with the layout uploaded.
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        cu_seqlens: &[i32],
        membership: Option<&[u32]>,
        slots: usize,
        blocks: usize,
    ) -> Result<Self> {
        let b = cu_seqlens.len() - 1;
        let mut host: Vec<i32> = cu_seqlens.to_vec();
        if let Some(m) = membership {
            host.extend(m.iter().map(|x| *x as i32)); // same bits; the kernels read them as u32
        }
        // SAFETY: uninitialized i32s; the first host.len() are copied in right below, the remaining
        // `blocks` (tile_seq) are all written by recap_seq_stats_* before the token pass reads them.
        let mut layout = unsafe { stream.alloc::<i32>(host.len() + blocks) }?;
        stream.memcpy_htod(&host, &mut layout.slice_mut(..host.len()))?;
        let len = NORMS_LEN + slots + 4 * b.max(1) + blocks * slots;
        // SAFETY: uninitialized device memory of `len` f64. Every element a kernel reads is written
        // first by an earlier launch on the same stream: norms by recap_norms_finalize, seq_tokens[b]
        // (and seq_log_ratio[b], seq_is_log[b] when the pass reads them) for every b by
        // recap_seq_stats_*, each block's
        // row of partials by its token-pass block, and out by recap_partials_finalize; nothing else
        // is read by a kernel (norms and out are zeroed below for the host's read-back).
        let mut scratch = unsafe { stream.alloc::<f64>(len) }?;
        // norms and out are read back whole in one copy (read_back) though a pass may leave some
        // slots unwritten (the variant slots of the plain path, say): zeroed, so the copy reads
        // defined memory (compute-sanitizer initcheck) and unused slots read back as 0
        stream.memset_zeros(&mut scratch.slice_mut(..NORMS_LEN + slots))?;
        Ok(Workspace {
            scratch,
            layout,
            b,
            slots,
            blocks,
            has_membership: membership.is_some(),
        })
    }

    /// Device addresses of the parts, with the guards that must outlive the launches using them.
    pub(crate) fn addrs<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> (WorkspaceAddrs, [SyncOnDrop<'a>; 2]) {
        let (base, g0) = addr_slice(&self.scratch, stream);
        let (lay, g1) = addr_slice(&self.layout, stream);
        let f = |off: usize| base + (off * 8) as u64;
        let membership_len = if self.has_membership { self.b } else { 0 };
        let a = WorkspaceAddrs {
            cu_seqlens: lay,
            membership: if self.has_membership {
                lay + ((self.b + 1) * 4) as u64
            } else {
                0
            },
            tile_seq: lay + ((self.b + 1 + membership_len) * 4) as u64,
            norms: f(0),
            out: f(NORMS_LEN),
            seq_tokens: f(NORMS_LEN + self.slots),
            seq_log_ratio: f(NORMS_LEN + self.slots + self.b.max(1)),
            seq_is_log: f(NORMS_LEN + self.slots + 3 * self.b.max(1)),
            partials: f(NORMS_LEN + self.slots + 4 * self.b.max(1)),
        };
        (a, [g0, g1])
    }

    /// Overwrites the per-sequence token weights (`[B]`) on the stream.
    pub(crate) fn set_seq_tokens(&mut self, stream: &Arc<CudaStream>, st: &[f64]) -> Result<()> {
        let off = NORMS_LEN + self.slots;
        if !st.is_empty() {
            stream.memcpy_htod(st, &mut self.scratch.slice_mut(off..off + st.len()))?;
        }
        Ok(())
    }

    /// Reads `norms` and the reduced statistics back (one copy; synchronizes the stream).
    pub(crate) fn read_back(&self, stream: &Arc<CudaStream>) -> Result<(Vec<f64>, Vec<f64>)> {
        let mut host = vec![0f64; NORMS_LEN + self.slots];
        stream.memcpy_dtoh(&self.scratch.slice(..host.len()), &mut host)?;
        stream.synchronize()?;
        let out = host.split_off(NORMS_LEN);
        Ok((host, out))
    }
}

/// Device addresses inside a [`Workspace`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorkspaceAddrs {
    pub cu_seqlens: u64,
    pub membership: u64,
    pub tile_seq: u64,
    pub seq_tokens: u64,
    pub seq_log_ratio: u64,
    pub seq_is_log: u64,
    pub norms: u64,
    pub partials: u64,
    pub out: u64,
}

/// Warps per sequence of `recap_seq_stats_*`: a power of two up to `warps_per_block` (so one
/// block holds all of a sequence's warps), with at least 256 tokens per warp on average.
pub(crate) fn warps_per_seq(t: usize, b: usize, warps_per_block: usize) -> usize {
    let per_seq = t / b.max(1);
    let mut w = 1;
    while w < warps_per_block && per_seq >= 512 * w {
        w *= 2;
    }
    w
}

/// Runs `recap_seq_stats_*` and `recap_norms_finalize`: the per-sequence token weights, the
/// normalizers and the tile-to-sequence map of the token pass (tiles of `tile_tokens` tokens, one
/// per block of the workspace), shared by kernels 1 and 3.
#[allow(clippy::too_many_arguments)]
fn seq_stats(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ws: &Workspace,
    a: &WorkspaceAddrs,
    mask_addr: u64,
    mask_suffix: &str,
    t: usize,
    tile_tokens: usize,
    k: usize,
    global: Option<&Normalizers>,
    extras: &SeqExtras,
) -> Result<()> {
    let b = ws.b;
    let mut p = params::SeqParams {
        mask: mask_addr,
        cu_seqlens: a.cu_seqlens,
        membership: a.membership,
        seq_tokens: a.seq_tokens,
        norms: a.norms,
        tile_seq: a.tile_seq,
        num_tokens: t as i64,
        tile_tokens: tile_tokens.max(1) as i64,
        num_seqs: b as i32,
        num_objectives: k as i32,
        num_tiles: ws.blocks as i32,
        logp: if extras.gspo || extras.geo_mean.is_some() {
            extras.logp
        } else {
            0
        },
        old_logp: extras.old_logp,
        seq_log_ratio: a.seq_log_ratio,
        rollout_logp: extras.seq_rollout,
        seq_is_log: a.seq_is_log,
        is_geometric: extras.is_geometric as i32,
        geo_mean: extras.geo_mean.is_some() as i32,
        clip_low: extras.geo_mean.map_or(0.0, |c| c.0),
        clip_high: extras.geo_mean.map_or(0.0, |c| c.1),
        ..Default::default()
    };
    if let Some(g) = global {
        p.has_override = 1;
        p.override_tokens[..=k].copy_from_slice(&g.tokens);
        p.override_seqs[..=k].copy_from_slice(&g.seqs);
    }
    let warps_per_block = (BLOCK / 32) as usize;
    // more warps per sequence for long sequences (a few long ones would leave most SMs idle);
    // 256 tokens (8 per lane) or more per warp
    p.warps_per_seq = warps_per_seq(t, b, warps_per_block) as i32;
    gpu.launch(
        stream,
        Module::Reduce,
        &format!("recap_seq_stats_{mask_suffix}"),
        (b * p.warps_per_seq as usize).div_ceil(warps_per_block),
        &p,
    )?;
    gpu.launch(stream, Module::Reduce, "recap_norms_finalize", k + 1, &p)
}

/// What a token pass (kernels 1 and 3) has set up before its own launch: the workspace with the
/// per-sequence statistics computed, the tokens per thread, and the mask's address and kernel-name
/// suffix (the guard keeps the mask borrowed for the launches).
pub(crate) struct TokenPass<'m> {
    pub ws: Workspace,
    pub items: usize,
    pub suffix: &'static str,
    pub mask_addr: u64,
    _mask_guard: SyncOnDrop<'m>,
}

/// What the per-sequence statistics pass computes beyond the token weights: GSPO's mean
/// log-ratio, GMPO's two sign-clipped means and the sequence-level rollout IS log-weight (device
/// addresses; 0 when absent).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SeqExtras {
    pub gspo: bool,
    /// GMPO: `(clip_low, clip_high)`.
    pub geo_mean: Option<(f32, f32)>,
    pub logp: u64,
    pub old_logp: u64,
    /// `rollout_logp` when the IS weight is sequence-level, else 0.
    pub seq_rollout: u64,
    pub is_geometric: bool,
}

/// Tiling, workspace and `seq_stats` for a token pass over `t` tokens with `slots` statistics.
#[allow(clippy::too_many_arguments)]
pub(crate) fn begin_token_pass<'m>(
    gpu: &Gpu,
    stream: &'m Arc<CudaStream>,
    mask: &'m Mask<CudaView<'_, f32>, CudaView<'_, u8>>,
    t: usize,
    cu_seqlens: &[i32],
    membership: Option<&[u32]>,
    slots: usize,
    k: usize,
    normalizers: Option<&Normalizers>,
    extras: &SeqExtras,
) -> Result<TokenPass<'m>> {
    let (mask_addr, guard, suffix) = match mask {
        Mask::F32(m) => {
            let (a, g) = addr(m, stream);
            (a, g, "f32")
        }
        Mask::U8(m) => {
            let (a, g) = addr(m, stream);
            (a, g, "u8")
        }
    };
    let items = gpu.items_per_thread(t);
    let tile = BLOCK as usize * items;
    let mut ws = Workspace::new(stream, cu_seqlens, membership, slots, t.div_ceil(tile))?;
    {
        let (w, _gw) = ws.addrs(stream);
        seq_stats(
            gpu,
            stream,
            &ws,
            &w,
            mask_addr,
            suffix,
            t,
            tile,
            k,
            normalizers,
            extras,
        )?;
    }
    if let Some(st) = normalizers.and_then(|n| n.seq_tokens.as_ref()) {
        // the whole batch's per-sequence token weights replace this part's (after the local
        // counts were taken), for the seq-mean-token-mean weights of sequences split across parts
        ws.set_seq_tokens(stream, st)?;
    }
    Ok(TokenPass {
        ws,
        items,
        suffix,
        mask_addr,
        _mask_guard: guard,
    })
}

/// The whole batch's normalizers (K objectives and the KL slot) and per-sequence token weights,
/// counted on the device from `mask`.
pub(crate) fn device_normalizers(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    mask: &Mask<CudaView<'_, f32>, CudaView<'_, u8>>,
    t: usize,
    cu_seqlens: &[i32],
    membership: Option<&[u32]>,
    k: usize,
) -> Result<Normalizers> {
    let pass = begin_token_pass(
        gpu,
        stream,
        mask,
        t,
        cu_seqlens,
        membership,
        1,
        k,
        None,
        &SeqExtras::default(),
    )?;
    let (norms, _) = pass.ws.read_back(stream)?;
    let b = cu_seqlens.len() - 1;
    let off = NORMS_LEN + 1;
    let mut st = vec![0f64; b];
    if b > 0 {
        stream.memcpy_dtoh(&pass.ws.scratch.slice(off..off + b), &mut st)?;
        stream.synchronize()?;
    }
    Ok(Normalizers {
        tokens: norms[..=k].to_vec(),
        seqs: norms[NORM_SLOTS..NORM_SLOTS + k + 1].to_vec(),
        seq_tokens: Some(st),
    })
}

/// Runs `recap_partials_finalize`: the fixed-order reduction of the token-pass blocks' rows (slots
/// whose bit is set in `min_bits` / `max_bits` reduce with min / max, the others sum).
pub(crate) fn finalize(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ws: &Workspace,
    a: &WorkspaceAddrs,
    min_bits: u64,
    max_bits: u64,
) -> Result<()> {
    let p = params::FinalizeParams {
        partials: a.partials,
        out: a.out,
        num_blocks: ws.blocks as i32,
        num_slots: ws.slots as i32,
        min_bits,
        max_bits,
    };
    gpu.launch(
        stream,
        Module::Reduce,
        "recap_partials_finalize",
        ws.slots,
        &p,
    )
}

#[cfg(test)]
mod tests {
    use super::warps_per_seq;

    #[test]
    fn warps_per_seq_grows_with_sequence_length_up_to_a_block() {
        assert_eq!(warps_per_seq(0, 0, 8), 1);
        assert_eq!(warps_per_seq(300, 10, 8), 1); // 30 tokens per sequence
        assert_eq!(warps_per_seq(1023, 1, 8), 2);
        assert_eq!(warps_per_seq(1024, 1, 8), 4);
        assert_eq!(warps_per_seq(262_144, 64, 8), 8);
        assert_eq!(warps_per_seq(1 << 24, 1, 8), 8);
        for (t, b) in [(5usize, 1usize), (4097, 3), (1 << 20, 7)] {
            let w = warps_per_seq(t, b, 8);
            assert!(w.is_power_of_two() && 8 % w == 0 && (w == 1 || t / b >= 256 * w));
        }
    }
}
