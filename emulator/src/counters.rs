//! Per-thread call counters: what a test or `recap bench` reads around a public call to see how many
//! launches, copies, allocations and synchronizations it made.

use std::cell::Cell;
use std::ffi::c_char;

/// The counters, in the order `recap_emu_counters` writes them.
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    /// cuLaunchKernel calls (each one kernel launch).
    Launches,
    /// Host-to-device copies.
    Htod,
    /// Device-to-host copies.
    Dtoh,
    /// Device-to-device copies.
    Dtod,
    /// Memsets.
    Memsets,
    /// Device allocations (cuMemAlloc, cuMemAllocAsync).
    Allocs,
    /// Device frees.
    Frees,
    /// Page-locked host allocations.
    HostAllocs,
    /// cuStreamSynchronize calls.
    StreamSyncs,
    /// cuCtxSynchronize calls.
    CtxSyncs,
    /// cuEventSynchronize calls.
    EventSyncs,
    /// Copies that make the host wait for the stream: the blocking (non-Async) entry points, and
    /// every device-to-host copy into pageable (not page-locked) memory, which the driver returns
    /// from only once it is done.
    SyncCopies,
    /// cuEventRecord calls.
    EventRecords,
    /// cuStreamWaitEvent calls.
    StreamWaits,
    /// cuModuleLoadData calls.
    ModuleLoads,
    /// cuBLAS GEMMs (each one launch on a GPU).
    Gemms,
    /// cuGraphLaunch calls (each replays a captured graph's launches, not counted as launches).
    GraphLaunches,
    /// The cuBLAS GEMMs' multiply-adds, `m n k` each (the work a call asked of cuBLAS).
    GemmMacs,
}

const COUNT: usize = Counter::GemmMacs as usize + 1;
/// The counters' names, comma-separated, in order (NUL-terminated for C).
const NAMES: &str = "launches,htod,dtoh,dtod,memsets,allocs,frees,host_allocs,stream_syncs,ctx_syncs,event_syncs,sync_copies,event_records,stream_waits,module_loads,gemms,graph_launches,gemm_macs\0";

thread_local! {
    static COUNTS: Cell<[u64; COUNT]> = const { Cell::new([0; COUNT]) };
}

pub(crate) fn bump(c: Counter) {
    bump_by(c, 1);
}

pub(crate) fn bump_by(c: Counter, n: u64) {
    COUNTS.with(|x| {
        let mut v = x.get();
        v[c as usize] += n;
        x.set(v);
    });
}

/// Writes the calling thread's counters (at most `n`) to `out`; returns how many there are.
#[no_mangle]
pub unsafe extern "C" fn recap_emu_counters(out: *mut u64, n: usize) -> usize {
    let v = COUNTS.with(|x| x.get());
    if !out.is_null() {
        for (i, c) in v.iter().take(n).enumerate() {
            *out.add(i) = *c;
        }
    }
    COUNT
}

/// The counters' names, comma-separated, in the order `recap_emu_counters` writes them.
#[no_mangle]
pub extern "C" fn recap_emu_counter_names() -> *const c_char {
    debug_assert_eq!(NAMES.trim_end_matches('\0').split(',').count(), COUNT);
    NAMES.as_ptr() as *const c_char
}
