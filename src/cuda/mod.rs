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
mod logits_loss;
#[doc(hidden)]
pub mod params;
mod reduce;
mod rollout_is;
mod tensor_parallel;
mod token_baseline;

pub use advantages::{group_advantages, AdvAddrs, AdvShape, DeviceGroups};
pub use counters::{count_calls, emulated_counters, DeviceCalls};
pub use fused_linear::{FusedLinearConfig, LinearHead};
pub use grpo::{
    grpo_loss, grpo_loss_async, grpo_output_len, DeviceGrpoInputs, DeviceLayout, PendingGrpo,
    GRPO_OUTPUT_LOSS,
};
pub use kl::{kl, rejection_grid, rejection_params, rollout_rejection};
pub use logits::{
    logprob_backward, logprob_backward_inplace, logprob_forward, DeviceLogitsLossInputs,
    LogprobGrads,
};
pub use logits_loss::{
    fused_linear_grpo_loss, fused_linear_grpo_loss_async, fused_linear_workspace_len,
    grpo_loss_from_logits, grpo_loss_from_logits_async, logits_output_len, logits_workspace_len,
    PendingLogitsLoss,
};
pub use reduce::{weighted_reduce, DeviceReduceInputs};
pub use rollout_is::{is_finalize_params, is_params, is_plan, rollout_is_weights, IsPlan};
pub use tensor_parallel::{tp_backward_inplace, tp_combine, tp_partials};
pub use token_baseline::{group_table, optimal_token_baseline, otb_launches, otb_params};

use crate::config::{Normalizers, MAX_OBJECTIVES};
use crate::error::{Error, Result};
use crate::kernel_layout::{
    ERR_CU_SEQLENS, ERR_LAMBDA, ERR_MEMBERSHIP, OUT_FLAGS, OUT_NORMS, OUT_SLOTS,
};
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

/// Threads per block of every kernel (`RECAP_BLOCK` in `kernels/common.cuh`, generated from it).
pub(crate) const BLOCK: u32 = crate::kernel_layout::BLOCK;

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
    /// Each stream's kept scratch (by `CUstream` handle), see [`StreamScratch`].
    scratch: Mutex<HashMap<usize, StreamScratch>>,
}

impl std::fmt::Debug for StreamScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScratch")
            .field("f64s", &self.f64s.as_ref().map(|b| b.len()))
            .field("i32s", &self.i32s.as_ref().map(|b| b.len()))
            .finish()
    }
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
            scratch: Mutex::new(HashMap::new()),
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

    /// Tokens per thread for a token kernel over `t` tokens: about 4 blocks per multiprocessor
    /// (one wave), each looping over its tile, so the last block's reduction of the blocks'
    /// partials stays short.
    pub fn items_per_thread(&self, t: usize) -> usize {
        let blocks = 4 * self.sms as usize;
        t.div_ceil(blocks * BLOCK as usize).max(1)
    }

    /// Takes `stream`'s kept scratch out of the cache (a concurrent call on the same stream finds
    /// none and makes its own).
    fn take_scratch(&self, key: usize) -> Result<StreamScratch> {
        let mut map = self
            .scratch
            .lock()
            .map_err(|_| Error::NoDevice("workspace cache poisoned".into()))?;
        Ok(map.remove(&key).unwrap_or_default())
    }

    /// Puts a call's scratch back (keeping the larger one if another call put one back first).
    fn return_scratch(&self, key: usize, s: StreamScratch) {
        if let Ok(mut map) = self.scratch.lock() {
            let size = |x: &StreamScratch| x.f64s.as_ref().map_or(0, |b| b.len());
            match map.get(&key) {
                Some(old) if size(old) >= size(&s) => {}
                _ => {
                    map.insert(key, s);
                }
            }
        }
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
        // `P` (generated from recap_params.h, layouts asserted at compile time); the caller validated
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

/// The device scratch of one stream, kept between calls so a call allocates nothing once it has
/// run at its size (a call that needs more grows it, 25 % ahead). Its buffers are created without
/// cudarc's event tracking: they are only ever used on their own stream, in stream order.
#[derive(Default)]
pub(crate) struct StreamScratch {
    f64s: Option<CudaSlice<f64>>,
    i32s: Option<CudaSlice<i32>>,
    /// `[2]` last-block tickets of the two launches (zero between launches; the kernels reset them).
    tickets: Option<CudaSlice<u32>>,
}

impl StreamScratch {
    fn ensure(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        f64s: usize,
        i32s: usize,
    ) -> Result<()> {
        let short = |len: Option<usize>, need: usize| len.map_or(true, |l| l < need);
        let grow = |n: usize| n + n / 4;
        let tracked = ctx.is_event_tracking();
        // SAFETY: buffers created while tracking is off are used only on `stream` (this scratch is
        // keyed by it) in stream order, and freed on it (cudarc frees on the allocating stream).
        if tracked {
            unsafe { ctx.disable_event_tracking() };
        }
        let r = (|| -> Result<()> {
            if short(self.f64s.as_ref().map(|b| b.len()), f64s) {
                self.f64s = None; // freed (stream-ordered) before the larger one is allocated
                                  // SAFETY: uninitialized f64s; every element a kernel reads is written earlier in
                                  // the same call, in stream order (see Workspace).
                self.f64s = Some(unsafe { stream.alloc::<f64>(grow(f64s).max(1)) }?);
            }
            if short(self.i32s.as_ref().map(|b| b.len()), i32s) {
                self.i32s = None;
                // SAFETY: as above: the layout is uploaded and tile_seq written before any read.
                self.i32s = Some(unsafe { stream.alloc::<i32>(grow(i32s).max(1)) }?);
            }
            if self.tickets.is_none() {
                self.tickets = Some(stream.alloc_zeros::<u32>(2)?);
            }
            Ok(())
        })();
        if tracked {
            // SAFETY: restores the context's setting for the caller's own buffers.
            unsafe { ctx.enable_event_tracking() };
        }
        r
    }
}

/// Where a token pass's per-batch arrays are: on the host (validated there, uploaded by the call)
/// or already on the device (device addresses; checked there into the output's flags).
#[derive(Clone, Copy, Debug)]
pub(crate) enum LayoutSrc<'a> {
    Host {
        cu_seqlens: &'a [i32],
        membership: Option<&'a [u32]>,
    },
    Device {
        b: usize,
        cu_seqlens: u64,
        membership: u64,
        lambda: u64,
    },
}

impl LayoutSrc<'_> {
    fn b(&self) -> usize {
        match self {
            LayoutSrc::Host { cu_seqlens, .. } => cu_seqlens.len() - 1,
            LayoutSrc::Device { b, .. } => *b,
        }
    }
}

/// f64 slots of the workspace's f32 reciprocals for `b` sequences: `2 NORM_SLOTS` normalizers, then
/// `b` per-sequence token weights.
fn inv_f64s(b: usize) -> usize {
    NORM_SLOTS + b.div_ceil(2)
}

/// Length of the output of a token pass with `slots` statistics: `RECAP_OUT_SLOTS + slots` (loss,
/// flags, normalizers, slots; `kernels/recap_params.h`).
pub(crate) const fn out_len(slots: usize) -> usize {
    OUT_SLOTS + slots
}

/// One call's view of its stream's scratch: the f64 part
/// `[out (OUT_SLOTS + slots) | seq_tokens (B) | seq_log_ratio (2B) | seq_is_log (B) | the f32
/// reciprocals (inv_norms: 2 NORM_SLOTS, seq_inv: B; INV_F64S(B) f64s) | partials of
/// recap_seq_stats (rows x blocks) | partials of the token pass (slots x blocks)]`, the i32 part
/// `[cu_seqlens (B + 1) | membership (B) | tile_seq (blocks)]` (the first two only when uploaded
/// from the host) and the two tickets. The buffers go back to the stream's cache when it drops.
pub(crate) struct Workspace<'g> {
    gpu: &'g Gpu,
    key: usize,
    bufs: StreamScratch,
    b: usize,
    slots: usize,
    pub blocks: usize,
    seq_blocks: usize,
    seq_rows: usize,
    host_layout: bool,
    has_membership: bool,
    /// The output's device address when the caller gave one (else the scratch's own).
    out: Option<u64>,
}

impl Drop for Workspace<'_> {
    fn drop(&mut self) {
        self.gpu
            .return_scratch(self.key, std::mem::take(&mut self.bufs));
    }
}

impl<'g> Workspace<'g> {
    /// Scratch for `blocks` token-pass blocks of `slots` statistics and `seq_blocks` blocks of
    /// `recap_seq_stats` over `k` objectives, with a host layout uploaded (one copy).
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &'g Gpu,
        stream: &Arc<CudaStream>,
        layout: &LayoutSrc<'_>,
        k: usize,
        slots: usize,
        blocks: usize,
        seq_blocks: usize,
        out: Option<u64>,
    ) -> Result<Self> {
        let b = layout.b();
        let seq_rows = 2 * (k + 1) + 2;
        let (host_layout, has_membership) = match layout {
            LayoutSrc::Host { membership, .. } => (true, membership.is_some()),
            LayoutSrc::Device { membership, .. } => (false, *membership != 0),
        };
        let key = stream.cu_stream() as usize;
        let bufs = gpu.take_scratch(key)?;
        // built first, so an error below hands the buffers back to the cache (Drop) instead of
        // freeing them (a free is not allowed while the stream captures a graph)
        let mut ws = Workspace {
            gpu,
            key,
            bufs,
            b,
            slots,
            blocks,
            seq_blocks,
            seq_rows,
            host_layout,
            has_membership,
            out,
        };
        let f64s =
            out_len(slots) + 4 * b.max(1) + inv_f64s(b) + seq_rows * seq_blocks + slots * blocks;
        let i32s = if host_layout { 2 * b + 1 } else { 0 } + blocks;
        ws.bufs.ensure(&gpu.ctx, stream, f64s, i32s)?;
        if let LayoutSrc::Host {
            cu_seqlens,
            membership,
        } = layout
        {
            let mut host: Vec<i32> = cu_seqlens.to_vec();
            if let Some(m) = membership {
                host.extend(m.iter().map(|x| *x as i32)); // same bits; the kernels read them as u32
            }
            if let Some(d) = ws.bufs.i32s.as_mut() {
                stream.memcpy_htod(&host, &mut d.slice_mut(..host.len()))?;
            }
        }
        Ok(ws)
    }

    fn f64s(&self) -> Result<&CudaSlice<f64>> {
        self.bufs
            .f64s
            .as_ref()
            .ok_or_else(|| Error::NoDevice("internal: workspace without scratch".into()))
    }

    fn i32s(&self) -> Result<&CudaSlice<i32>> {
        self.bufs
            .i32s
            .as_ref()
            .ok_or_else(|| Error::NoDevice("internal: workspace without layout".into()))
    }

    /// Device addresses of the parts (the buffers are untracked: no guards to hold).
    pub(crate) fn addrs(
        &self,
        stream: &CudaStream,
        layout: &LayoutSrc<'_>,
    ) -> Result<WorkspaceAddrs> {
        let base = addr_slice(self.f64s()?, stream).0;
        let lay = addr_slice(self.i32s()?, stream).0;
        let tickets = match &self.bufs.tickets {
            Some(t) => addr_slice(t, stream).0,
            None => {
                return Err(Error::NoDevice(
                    "internal: workspace without tickets".into(),
                ))
            }
        };
        let f = |off: usize| base + (off * 8) as u64;
        let b1 = self.b.max(1);
        let out = self.out.unwrap_or(base);
        let seq = out_len(self.slots);
        let (cu_seqlens, membership, lambda, tile_seq) = match layout {
            LayoutSrc::Host { .. } => (
                lay,
                if self.has_membership {
                    lay + ((self.b + 1) * 4) as u64
                } else {
                    0
                },
                0,
                lay + ((2 * self.b + 1) * 4) as u64,
            ),
            LayoutSrc::Device {
                cu_seqlens,
                membership,
                lambda,
                ..
            } => (*cu_seqlens, *membership, *lambda, lay),
        };
        Ok(WorkspaceAddrs {
            cu_seqlens,
            membership,
            lambda,
            tile_seq,
            out,
            norms: out + (OUT_NORMS * 8) as u64,
            flags: out + (OUT_FLAGS * 8) as u64,
            seq_tokens: f(seq),
            seq_log_ratio: f(seq + b1),
            seq_is_log: f(seq + 3 * b1),
            inv_norms: f(seq + 4 * b1),
            seq_inv: f(seq + 4 * b1) + (2 * NORM_SLOTS * 4) as u64,
            seq_partials: f(seq + 4 * b1 + inv_f64s(self.b)),
            partials: f(seq + 4 * b1 + inv_f64s(self.b) + self.seq_rows * self.seq_blocks),
            tickets,
            validate: !self.host_layout,
        })
    }

    /// Overwrites the per-sequence token weights (`[B]`) and their reciprocals on the stream.
    pub(crate) fn set_seq_tokens(&mut self, stream: &Arc<CudaStream>, st: &[f64]) -> Result<()> {
        let off = out_len(self.slots);
        let b1 = self.b.max(1);
        if let (false, Some(s)) = (st.is_empty(), self.bufs.f64s.as_mut()) {
            stream.memcpy_htod(st, &mut s.slice_mut(off..off + st.len()))?;
            // the f32 reciprocals, packed two per f64 slot after inv_norms (recap_inv_norm's rule)
            let inv: Vec<f32> = st.iter().map(|&x| crate::output::inv_norm(x)).collect();
            let mut packed = vec![0f64; inv.len().div_ceil(2)];
            for (i, pair) in inv.chunks(2).enumerate() {
                let lo = pair[0].to_bits() as u64;
                let hi = pair.get(1).map_or(0, |x| x.to_bits() as u64);
                packed[i] = f64::from_bits(lo | (hi << 32));
            }
            let at = off + 4 * b1 + NORM_SLOTS;
            stream.memcpy_htod(&packed, &mut s.slice_mut(at..at + packed.len()))?;
        }
        Ok(())
    }

    /// Reads the scratch's own output back (one copy; synchronizes the stream): the normalizers and
    /// the slots, after checking the flags of the device-side checks.
    pub(crate) fn read_back(&self, stream: &Arc<CudaStream>) -> Result<(Vec<f64>, Vec<f64>)> {
        // from the flags on: the passes other than the fused loss's write no loss
        let tail = read_out(
            stream,
            &self.f64s()?.slice(OUT_FLAGS..out_len(self.slots)),
            OUT_FLAGS,
        )?;
        let mut raw = vec![0.0; OUT_FLAGS];
        raw.extend_from_slice(&tail);
        Ok(split_out(&raw))
    }

    /// The scratch's own output, whole (one copy; synchronizes the stream; checks the flags).
    pub(crate) fn read_raw(&self, stream: &Arc<CudaStream>) -> Result<Vec<f64>> {
        read_out(stream, &self.f64s()?.slice(..out_len(self.slots)), 0)
    }

    /// The per-sequence token weights (`[B]`) read back (synchronizes the stream).
    fn read_seq_tokens(&self, stream: &Arc<CudaStream>) -> Result<Vec<f64>> {
        let off = out_len(self.slots);
        let mut st = vec![0f64; self.b];
        if self.b > 0 {
            stream.memcpy_dtoh(&self.f64s()?.slice(off..off + self.b), &mut st)?;
            stream.synchronize()?;
        }
        Ok(st)
    }
}

/// Copies a token pass's output (from index `from` of its layout on) back, synchronizing the
/// stream, and reports the device-side checks.
pub(crate) fn read_out(
    stream: &Arc<CudaStream>,
    out: &CudaView<'_, f64>,
    from: usize,
) -> Result<Vec<f64>> {
    let mut host = vec![0f64; out.len()];
    stream.memcpy_dtoh(out, &mut host)?;
    stream.synchronize()?;
    check_flags(host.get(OUT_FLAGS - from).copied().unwrap_or(0.0))?;
    Ok(host)
}

/// The error named by the `RECAP_ERR_*` bits of an output's flags.
pub(crate) fn check_flags(flags: f64) -> Result<()> {
    let f = flags as u32;
    if flags == 0.0 {
        return Ok(());
    }
    let (arg, what) = if f & ERR_CU_SEQLENS as u32 != 0 {
        (
            "cu_seqlens",
            "the device copy is not [B + 1] non-decreasing boundaries from 0 to T",
        )
    } else if f & ERR_MEMBERSHIP as u32 != 0 {
        ("membership", "the device copy has bits at or above K")
    } else if f & ERR_LAMBDA as u32 != 0 {
        (
            "lambda",
            "the device copy has a weight that is not finite and >= 0",
        )
    } else {
        ("flags", "unknown device-side check failed")
    };
    Err(Error::invalid_argument(
        arg,
        format!("{what} (checked on the device; the call's results are not valid)"),
    ))
}

/// `(norms, slots)` of a read-back output.
pub(crate) fn split_out(raw: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (
        raw[OUT_NORMS..OUT_SLOTS].to_vec(),
        raw[OUT_SLOTS..].to_vec(),
    )
}

/// Device addresses inside a [`Workspace`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorkspaceAddrs {
    pub cu_seqlens: u64,
    pub membership: u64,
    /// `[K]` lambda on the device, or 0.
    pub lambda: u64,
    pub tile_seq: u64,
    pub seq_tokens: u64,
    pub seq_log_ratio: u64,
    pub seq_is_log: u64,
    /// `[2 NORM_SLOTS]` f32: the reciprocals of the normalizers in use.
    pub inv_norms: u64,
    /// `[B]` f32: the reciprocals of the per-sequence token weights.
    pub seq_inv: u64,
    pub seq_partials: u64,
    pub out: u64,
    pub norms: u64,
    pub flags: u64,
    pub partials: u64,
    /// `[2]` u32: recap_seq_stats's ticket, then the token pass's.
    pub tickets: u64,
    /// The layout came from the device: check it there.
    pub validate: bool,
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

/// Blocks of `recap_seq_stats_*` over `b` sequences of `t` tokens (at least one, whose last block
/// writes the normalizers).
fn seq_stats_blocks(t: usize, b: usize) -> (usize, usize) {
    let warps_per_block = (BLOCK / 32) as usize;
    let wps = warps_per_seq(t, b, warps_per_block);
    (wps, (b * wps).div_ceil(warps_per_block).max(1))
}

/// Launches `recap_seq_stats_*`: the per-sequence token weights, the normalizers (its last
/// block), the device-side layout checks and the tile-to-sequence map of the token pass (tiles of
/// `tile_tokens` tokens, one per block of the workspace), shared by kernels 1 and 3.
#[allow(clippy::too_many_arguments)]
fn seq_stats(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ws: &Workspace<'_>,
    a: &WorkspaceAddrs,
    mask_addr: u64,
    mask_suffix: &str,
    t: usize,
    tile_tokens: usize,
    k: usize,
    global: Option<&Normalizers>,
    dev_norms: Option<&DeviceNorms>,
    extras: &SeqExtras,
) -> Result<()> {
    let b = ws.b;
    let (wps, grid) = seq_stats_blocks(t, b);
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
        warps_per_seq: wps as i32,
        validate: a.validate as i32,
        partials: a.seq_partials,
        ticket: a.tickets,
        flags: a.flags,
        lambda_dev: a.lambda,
        inv_norms: a.inv_norms,
        seq_inv: a.seq_inv,
        override_dev: dev_norms.map_or(0, |d| d.norms),
        override_slot: dev_norms.map_or(-1, |d| d.slot),
        ..Default::default()
    };
    if let Some(g) = global {
        p.has_override = 1;
        p.override_tokens[..=k].copy_from_slice(&g.tokens);
        p.override_seqs[..=k].copy_from_slice(&g.seqs);
    }
    debug_assert_eq!(grid, ws.seq_blocks);
    gpu.launch(
        stream,
        Module::Reduce,
        &format!("recap_seq_stats_{mask_suffix}"),
        grid,
        &p,
    )
}

/// What a token pass (kernels 1 and 3) has set up before its own launch: the workspace with the
/// per-sequence statistics computed, the tokens per thread, the mask's address and kernel-name
/// suffix, and the workspace's addresses (the guard keeps the mask borrowed for the launches).
pub(crate) struct TokenPass<'g, 'm> {
    pub ws: Workspace<'g>,
    pub items: usize,
    pub suffix: &'static str,
    pub mask_addr: u64,
    pub addrs: WorkspaceAddrs,
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

/// The whole batch's normalizers already on the device, from an earlier pass of the same call (the
/// fused-linear path's count over every chunk): its normalizer block (`[4 NORM_SLOTS]` f64, rows
/// `NORM_TOKENS` / `NORM_SEQS` used), the slot each of this pass's slots takes (`-1`: its own
/// index), and the per-sequence token weights (`[B]` f64) with their reciprocals (`[B]` f32).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceNorms {
    pub norms: u64,
    pub slot: i32,
    pub seq_tokens: u64,
    pub seq_inv: u64,
}

/// Tiling, workspace and `recap_seq_stats` (the call's first launch) for a token pass over `t`
/// tokens with `slots` statistics, writing its output at `out` (a device address) or into the
/// workspace. With `dev_norms`, the pass weighs its tokens by those normalizers (`normalizers`
/// must then be `None`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn begin_token_pass<'g, 'm>(
    gpu: &'g Gpu,
    stream: &'m Arc<CudaStream>,
    mask: &'m Mask<CudaView<'_, f32>, CudaView<'_, u8>>,
    t: usize,
    layout: &LayoutSrc<'_>,
    slots: usize,
    k: usize,
    normalizers: Option<&Normalizers>,
    dev_norms: Option<&DeviceNorms>,
    extras: &SeqExtras,
    out: Option<u64>,
) -> Result<TokenPass<'g, 'm>> {
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
    let blocks = t.div_ceil(tile).max(1);
    let (_, seq_blocks) = seq_stats_blocks(t, layout.b());
    let mut ws = Workspace::new(gpu, stream, layout, k, slots, blocks, seq_blocks, out)?;
    let mut addrs = ws.addrs(stream, layout)?;
    seq_stats(
        gpu,
        stream,
        &ws,
        &addrs,
        mask_addr,
        suffix,
        t,
        tile,
        k,
        normalizers,
        dev_norms,
        extras,
    )?;
    if let Some(d) = dev_norms {
        // the token pass weighs by the batch's per-sequence token weights, not this pass's
        addrs.seq_tokens = d.seq_tokens;
        addrs.seq_inv = d.seq_inv;
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
        addrs,
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
    let layout = LayoutSrc::Host {
        cu_seqlens,
        membership,
    };
    let pass = begin_token_pass(
        gpu,
        stream,
        mask,
        t,
        &layout,
        1,
        k,
        None,
        None,
        &SeqExtras::default(),
        None,
    )?;
    let (norms, _) = pass.ws.read_back(stream)?;
    let st = pass.ws.read_seq_tokens(stream)?;
    Ok(Normalizers {
        tokens: norms[..=k].to_vec(),
        seqs: norms[NORM_SLOTS..NORM_SLOTS + k + 1].to_vec(),
        seq_tokens: Some(st),
    })
}

/// Runs `recap_partials_finalize`: the fixed-order reduction of the token-pass blocks' rows into
/// the output's slots (slots whose bit is set in `min_bits` / `max_bits` reduce with min / max,
/// the others sum). The fused loss finalizes in its own last block instead.
pub(crate) fn finalize(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ws: &Workspace<'_>,
    a: &WorkspaceAddrs,
    min_bits: u64,
    max_bits: u64,
) -> Result<()> {
    let p = params::FinalizeParams {
        partials: a.partials,
        out: a.out + (OUT_SLOTS * 8) as u64,
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
