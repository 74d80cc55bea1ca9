//! An emulated CUDA device: `librecap_emulated_cuda.so`, loaded as `libcuda.so`, for recap-kernels' tests on machines without a GPU.
//!
//! cudarc loads the CUDA driver with `dlopen("libcuda.so")` and resolves each entry point when it
//! is first called; this library exports the ones the crate calls (device and primary-context
//! queries, streams, events, allocations, copies and memsets, modules, launches, error strings)
//! and the cuBLAS ones of the fused-linear path (`libcublas.so` is a second name of this library).
//! Put its directory first on `LD_LIBRARY_PATH` (`scripts/emulated-gpu.sh`); the crate under test
//! runs unchanged.
//!
//! - **Memory** is host memory, one mapping per allocation between two inaccessible pages, the
//!   buffer (256-byte aligned) ending as close to the upper one as its alignment allows: an access
//!   past either end faults and is reported, a write into the bytes between the buffer and a guard
//!   page (its red zones) is found after the launch and fails it. New allocations are filled with
//!   `0xFF` bytes (NaN as floats, -1 as integers; `RECAP_EMU_POISON=0` leaves them zeroed) so a read
//!   of memory no one wrote shows. Copies and memsets must lie inside one allocation.
//! - **Work** runs when it is enqueued, in the caller's thread: a stream is always complete, an
//!   event always reached. Kernels are the kernel files compiled for the host under the SIMT
//!   emulator (`tests/emulator/simt.h`), found by name in the module image's kernel table
//!   (`cuModuleGetFunction` also requires the name in the image); `kernelParams[0]` is the
//!   kernel's one parameter struct. Launches are serialized across threads.
//! - **Counters** per calling thread: launches, copies each way, memsets, allocations and frees,
//!   stream, context and event synchronizations, blocking copies, event records and waits, module
//!   loads and GEMMs; read with `recap_emu_counters` / `recap_emu_counter_names`
//!   (`recap_kernels::cuda::emulated_counters`).
//! - **The device**: one, named "recap-kernels emulated CUDA device (SIMT on the host)", compute
//!   capability 9.0, `RECAP_EMU_SMS` multiprocessors (default 4: token kernels then give each
//!   thread several tokens from a few thousand on, as on a GPU at scale).
//!
//! What it cannot tell: timing, occupancy, register spills, races the fixed fiber order hides,
//! fast-math rounding, the real driver's behaviour (see simt.h and docs/reliability.md).
#![allow(non_snake_case, clippy::missing_safety_doc)]

mod blas;
mod counters;
mod graphs;
mod kernels;
mod memory;

use counters::{bump, Counter};
use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute as Attr, CUdeviceptr, CUevent, CUfunction, CUmodule,
    CUresult, CUstream, CUuuid,
};
use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_uchar, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const NAME: &str = "recap-kernels emulated CUDA device (SIMT on the host)";
const TOTAL_MEM: usize = 64 << 30;

static INIT: AtomicBool = AtomicBool::new(false);
/// The primary context (one device): its address is the handle.
static PRIMARY: u8 = 0;
static LAST_ERROR: Mutex<Option<std::ffi::CString>> = Mutex::new(None);

thread_local! {
    static CURRENT: std::cell::Cell<CUcontext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn primary() -> CUcontext {
    &PRIMARY as *const u8 as CUcontext
}

/// Reports a failed call (stderr and `recap_emu_last_error`) and returns its code.
pub(crate) fn fail(code: CUresult, what: String) -> CUresult {
    eprintln!("emulated CUDA device: {what}");
    if let Ok(mut e) = LAST_ERROR.lock() {
        *e = std::ffi::CString::new(what.replace('\0', " ")).ok();
    }
    code
}

fn sms() -> c_int {
    std::env::var("RECAP_EMU_SMS")
        .ok()
        .and_then(|v| v.parse::<c_int>().ok())
        .filter(|&n| (1..=1024).contains(&n))
        .unwrap_or(4)
}

fn initialized() -> Result<(), CUresult> {
    if INIT.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_NOT_INITIALIZED)
    }
}

fn device_ok(dev: CUdevice) -> Result<(), CUresult> {
    initialized()?;
    if dev == 0 {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_DEVICE)
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

// ---- handles: streams, events, modules and functions are boxes whose addresses are tracked ----

struct Handles(Mutex<BTreeSet<usize>>);

impl Handles {
    const fn new() -> Self {
        Handles(Mutex::new(BTreeSet::new()))
    }
    fn add(&self, p: usize) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(p);
    }
    fn remove(&self, p: usize) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&p)
    }
    fn has(&self, p: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
    }
}

static STREAMS: Handles = Handles::new();
static EVENTS: Handles = Handles::new();
static MODULES: Handles = Handles::new();

struct Event {
    at: Option<Instant>,
}

/// The null stream, or one this driver created.
pub(crate) fn stream_ok(s: CUstream) -> Result<(), CUresult> {
    if s.is_null() || STREAMS.has(s as usize) {
        Ok(())
    } else {
        Err(fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("stream {s:p} is not a live stream"),
        ))
    }
}

fn event_mut(e: CUevent) -> Result<&'static mut Event, CUresult> {
    if EVENTS.has(e as usize) {
        // SAFETY: a live box created by cuEventCreate (freed only by cuEventDestroy_v2).
        Ok(unsafe { &mut *(e as *mut Event) })
    } else {
        Err(fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("event {e:p} is not a live event"),
        ))
    }
}

// ---- initialization, devices, contexts ----------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    memory::install_fault_handler();
    INIT.store(true, Ordering::Release);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    if v.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *v = 13000;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    tri!(initialized());
    if count.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *count = 1;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut CUdevice, ordinal: c_int) -> CUresult {
    tri!(initialized());
    if dev.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    if ordinal != 0 {
        return CUresult::CUDA_ERROR_INVALID_DEVICE;
    }
    *dev = 0;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    tri!(device_ok(dev));
    if name.is_null() || len <= 0 {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let n = NAME.len().min(len as usize - 1);
    std::ptr::copy_nonoverlapping(NAME.as_ptr() as *const c_char, name, n);
    *name.add(n) = 0;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    tri!(device_ok(dev));
    if pi.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let a = |x: Attr| x as c_int;
    *pi = match attrib {
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) => sms(),
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) => 9,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) => 0,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK) => 1024,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X) => 1024,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y) => 1024,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z) => 64,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X) => i32::MAX,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y) => 65535,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z) => 65535,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_WARP_SIZE) => 32,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK) => 49152,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR) => 2048,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED) => 1,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING) => 1,
        x if x == a(Attr::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS) => 1,
        _ => 0,
    };
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    tri!(device_ok(dev));
    if bytes.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *bytes = TOTAL_MEM;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    tri!(device_ok(dev));
    if uuid.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    for (i, b) in (*uuid).bytes.iter_mut().enumerate() {
        *b = b"recap-emulated!!"[i] as c_char;
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    cuDeviceGetUuid_v2(uuid, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    tri!(device_ok(dev));
    if ctx.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *ctx = primary();
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    tri!(device_ok(dev));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    tri!(initialized());
    if !ctx.is_null() && ctx != primary() {
        return CUresult::CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|c| c.set(ctx));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> CUresult {
    tri!(initialized());
    if ctx.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *ctx = CURRENT.with(|c| c.get());
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut CUdevice) -> CUresult {
    tri!(initialized());
    if dev.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *dev = 0;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    tri!(graphs::refuse_while_capturing("cuCtxSynchronize"));
    tri!(initialized());
    bump(Counter::CtxSyncs);
    CUresult::CUDA_SUCCESS
}

// ---- streams and events --------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut CUstream, _flags: c_uint) -> CUresult {
    tri!(initialized());
    if s.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let p = Box::into_raw(Box::new(0u64)) as CUstream;
    STREAMS.add(p as usize);
    *s = p;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut CUstream,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    cuStreamCreate(s, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: CUstream) -> CUresult {
    if s.is_null() || !STREAMS.remove(s as usize) {
        return fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("cuStreamDestroy of {s:p}, not a live stream"),
        );
    }
    drop(Box::from_raw(s as *mut u64));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(s: CUstream) -> CUresult {
    tri!(graphs::refuse_while_capturing("cuStreamSynchronize"));
    tri!(stream_ok(s));
    bump(Counter::StreamSyncs);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(s: CUstream) -> CUresult {
    tri!(stream_ok(s));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(s: CUstream, e: CUevent, _flags: c_uint) -> CUresult {
    tri!(stream_ok(s));
    tri!(event_mut(e));
    bump(Counter::StreamWaits);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut CUevent, _flags: c_uint) -> CUresult {
    tri!(initialized());
    if e.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let p = Box::into_raw(Box::new(Event { at: None })) as CUevent;
    EVENTS.add(p as usize);
    *e = p;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: CUevent, s: CUstream) -> CUresult {
    tri!(stream_ok(s));
    let ev = tri!(event_mut(e));
    ev.at = Some(Instant::now());
    bump(Counter::EventRecords);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    tri!(graphs::refuse_while_capturing("cuEventSynchronize"));
    tri!(event_mut(e));
    bump(Counter::EventSyncs);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    tri!(event_mut(e));
    CUresult::CUDA_SUCCESS
}

/// Host time between the two records: what the emulation took, not what a GPU would.
#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    if ms.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let a = tri!(event_mut(start)).at;
    let b = tri!(event_mut(end)).at;
    match (a, b) {
        (Some(a), Some(b)) => {
            *ms = b.saturating_duration_since(a).as_secs_f32() * 1e3;
            CUresult::CUDA_SUCCESS
        }
        _ => CUresult::CUDA_ERROR_INVALID_HANDLE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    cuEventElapsedTime_v2(ms, start, end)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    if !EVENTS.remove(e as usize) {
        return fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("cuEventDestroy of {e:p}, not a live event"),
        );
    }
    drop(Box::from_raw(e as *mut Event));
    CUresult::CUDA_SUCCESS
}

// ---- memory ------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(p: *mut CUdeviceptr, bytes: usize) -> CUresult {
    tri!(graphs::refuse_while_capturing(
        "cuMemAlloc (a device allocation)"
    ));
    tri!(initialized());
    if p.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *p = tri!(memory::alloc(bytes));
    bump(Counter::Allocs);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    p: *mut CUdeviceptr,
    bytes: usize,
    s: CUstream,
) -> CUresult {
    tri!(stream_ok(s));
    cuMemAlloc_v2(p, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CUresult {
    tri!(graphs::refuse_while_capturing("cuMemFree"));
    tri!(memory::free(p));
    bump(Counter::Frees);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(p: CUdeviceptr, s: CUstream) -> CUresult {
    tri!(stream_ok(s));
    cuMemFree_v2(p)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    tri!(initialized());
    if free.is_null() || total.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *total = TOTAL_MEM;
    *free = TOTAL_MEM.saturating_sub(memory::allocated());
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    tri!(graphs::refuse_while_capturing("cuMemHostAlloc"));
    tri!(initialized());
    if pp.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let p = libc::calloc(bytes.max(1), 1);
    if p.is_null() {
        return CUresult::CUDA_ERROR_OUT_OF_MEMORY;
    }
    *pp = p;
    PINNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(p as usize, bytes.max(1));
    bump(Counter::HostAllocs);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    if PINNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&(p as usize))
        .is_none()
    {
        return fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("cuMemFreeHost of {p:p}, not page-locked memory of this driver"),
        );
    }
    libc::free(p);
    CUresult::CUDA_SUCCESS
}

/// Page-locked host allocations (cuMemHostAlloc): start and length.
static PINNED: Mutex<std::collections::BTreeMap<usize, usize>> =
    Mutex::new(std::collections::BTreeMap::new());

fn pinned(p: usize, n: usize) -> bool {
    PINNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .range(..=p)
        .next_back()
        .is_some_and(|(&a, &len)| p + n <= a + len)
}

unsafe fn copy(dst: *mut u8, src: *const u8, n: usize) {
    if n > 0 {
        std::ptr::copy(src, dst, n);
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    s: CUstream,
) -> CUresult {
    tri!(graphs::refuse_while_capturing("a host-to-device copy"));
    tri!(stream_ok(s));
    tri!(memory::check_range(dst, n, "cuMemcpyHtoD destination"));
    copy(dst as *mut u8, src as *const u8, n);
    bump(Counter::Htod);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    let r = cuMemcpyHtoDAsync_v2(dst, src, n, std::ptr::null_mut());
    bump(Counter::SyncCopies);
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    s: CUstream,
) -> CUresult {
    tri!(graphs::refuse_while_capturing("a device-to-host copy"));
    tri!(stream_ok(s));
    tri!(memory::check_range(src, n, "cuMemcpyDtoH source"));
    copy(dst as *mut u8, src as *const u8, n);
    bump(Counter::Dtoh);
    // into pageable memory the driver returns only once the copy is done: the host waits for
    // the stream, a synchronization like any other
    if !pinned(dst as usize, n) {
        bump(Counter::SyncCopies);
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    let r = cuMemcpyDtoHAsync_v2(dst, src, n, std::ptr::null_mut());
    // blocking either way: the async call counted the copy into pageable memory already
    if pinned(dst as usize, n) {
        bump(Counter::SyncCopies);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    s: CUstream,
) -> CUresult {
    tri!(stream_ok(s));
    tri!(memory::check_range(dst, n, "cuMemcpyDtoD destination"));
    tri!(memory::check_range(src, n, "cuMemcpyDtoD source"));
    bump(Counter::Dtod);
    if graphs::record(s, || graphs::Node::Copy { dst, src, n }) {
        return CUresult::CUDA_SUCCESS;
    }
    copy(dst as *mut u8, src as *const u8, n);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    let r = cuMemcpyDtoDAsync_v2(dst, src, n, std::ptr::null_mut());
    bump(Counter::SyncCopies);
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    v: c_uchar,
    n: usize,
    s: CUstream,
) -> CUresult {
    tri!(stream_ok(s));
    tri!(memory::check_range(dst, n, "cuMemsetD8 destination"));
    if graphs::record(s, || graphs::Node::Memset {
        dst,
        value: v as u32,
        width: 1,
        n,
    }) {
        bump(Counter::Memsets);
        return CUresult::CUDA_SUCCESS;
    }
    if n > 0 {
        std::ptr::write_bytes(dst as *mut u8, v, n);
    }
    bump(Counter::Memsets);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: c_uchar, n: usize) -> CUresult {
    cuMemsetD8Async(dst, v, n, std::ptr::null_mut())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    v: c_uint,
    n: usize,
    s: CUstream,
) -> CUresult {
    tri!(stream_ok(s));
    if !dst.is_multiple_of(4) {
        return fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("cuMemsetD32 at {dst:#x}, not 4-byte aligned"),
        );
    }
    tri!(memory::check_range(
        dst,
        n.saturating_mul(4),
        "cuMemsetD32 destination"
    ));
    if graphs::record(s, || graphs::Node::Memset {
        dst,
        value: v,
        width: 4,
        n,
    }) {
        bump(Counter::Memsets);
        return CUresult::CUDA_SUCCESS;
    }
    for i in 0..n {
        *(dst as *mut u32).add(i) = v;
    }
    bump(Counter::Memsets);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, v: c_uint, n: usize) -> CUresult {
    cuMemsetD32Async(dst, v, n, std::ptr::null_mut())
}

// ---- modules and launches ---------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut CUmodule, image: *const c_void) -> CUresult {
    tri!(initialized());
    if m.is_null() || image.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let module = tri!(kernels::Module::load(image as *const u8));
    let p = Box::into_raw(Box::new(module)) as CUmodule;
    MODULES.add(p as usize);
    *m = p;
    bump(Counter::ModuleLoads);
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: CUmodule) -> CUresult {
    if !MODULES.remove(m as usize) {
        return CUresult::CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(m as *mut kernels::Module));
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut CUfunction,
    m: CUmodule,
    name: *const c_char,
) -> CUresult {
    if f.is_null() || name.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    if !MODULES.has(m as usize) {
        return CUresult::CUDA_ERROR_INVALID_HANDLE;
    }
    let module = &*(m as *const kernels::Module);
    let name = CStr::from_ptr(name).to_string_lossy();
    *f = tri!(module.function(&name)) as CUfunction;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    _attrib: c_int,
    f: CUfunction,
) -> CUresult {
    if pi.is_null() || !kernels::is_function(f as *const kernels::Function) {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *pi = 0;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    tri!(initialized());
    tri!(stream_ok(s));
    if graphs::capturing(s) {
        let node = tri!(graphs::launch_node(
            f as *const kernels::Function,
            [gx, gy, gz],
            [bx, by, bz],
            params
        ));
        graphs::record(s, || node);
        bump(Counter::Launches);
        return CUresult::CUDA_SUCCESS;
    }
    let r = kernels::launch(
        f as *const kernels::Function,
        [gx, gy, gz],
        [bx, by, bz],
        shared,
        params,
        extra,
    );
    bump(Counter::Launches);
    r
}

// ---- errors --------------------------------------------------------------------------------------

fn error_text(e: CUresult) -> &'static CStr {
    use CUresult::*;
    match e {
        CUDA_SUCCESS => c"no error",
        CUDA_ERROR_INVALID_VALUE => c"invalid argument",
        CUDA_ERROR_OUT_OF_MEMORY => c"out of memory",
        CUDA_ERROR_NOT_INITIALIZED => c"initialization error",
        CUDA_ERROR_INVALID_DEVICE => c"invalid device ordinal",
        CUDA_ERROR_INVALID_IMAGE => c"device kernel image is invalid",
        CUDA_ERROR_INVALID_CONTEXT => c"invalid device context",
        CUDA_ERROR_INVALID_HANDLE => c"invalid resource handle",
        CUDA_ERROR_NOT_FOUND => c"named symbol not found",
        CUDA_ERROR_ILLEGAL_ADDRESS => c"an illegal memory access was encountered",
        CUDA_ERROR_LAUNCH_FAILED => c"unspecified launch failure",
        CUDA_ERROR_NOT_SUPPORTED => c"operation not supported",
        _ => c"unknown error (emulated device)",
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: CUresult, s: *mut *const c_char) -> CUresult {
    if s.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *s = error_text(e).as_ptr();
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: CUresult, s: *mut *const c_char) -> CUresult {
    cuGetErrorString(e, s)
}

/// The last failure this library reported, as text ("" before any; valid until the next failure).
#[no_mangle]
pub unsafe extern "C" fn recap_emu_last_error() -> *const c_char {
    match LAST_ERROR.lock().ok().as_deref() {
        Some(Some(e)) => e.as_ptr(),
        _ => c"".as_ptr(),
    }
}
