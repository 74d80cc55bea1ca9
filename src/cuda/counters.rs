//! The emulated CUDA device's call counters (`emulator/`, loaded as `libcuda.so` by
//! `scripts/emulated-gpu.sh`): how many kernel launches, copies, allocations and synchronizations
//! the calling thread made, so tests and `recap bench` can state what a public call costs in driver
//! calls. On a real driver there are no counters ([`emulated_counters`] is `None`).

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};

/// One reading of the calling thread's counters, by name (`launches`, `htod`, `dtoh`, `dtod`,
/// `memsets`, `allocs`, `frees`, `host_allocs`, `stream_syncs`, `ctx_syncs`, `event_syncs`,
/// `sync_copies`, `event_records`, `stream_waits`, `module_loads`, `gemms`, `graph_launches`,
/// `gemm_macs` (the GEMMs' `m n k` summed): the emulated driver names them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceCalls(BTreeMap<String, u64>);

impl DeviceCalls {
    /// The counter `name` (0 if the driver has no such counter).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Work launched on the device: kernels plus cuBLAS GEMMs (one launch each on a GPU).
    pub fn launches(&self) -> u64 {
        self.get("launches") + self.get("gemms")
    }

    /// Host synchronizations: stream, context and event synchronizations and blocking copies.
    pub fn syncs(&self) -> u64 {
        self.get("stream_syncs")
            + self.get("ctx_syncs")
            + self.get("event_syncs")
            + self.get("sync_copies")
    }

    /// Device allocations.
    pub fn allocs(&self) -> u64 {
        self.get("allocs")
    }

    /// Copies to the device, and from it.
    pub fn copies(&self) -> (u64, u64) {
        (self.get("htod"), self.get("dtoh"))
    }

    /// The counts since `before` (an earlier reading on the same thread).
    pub fn since(&self, before: &DeviceCalls) -> DeviceCalls {
        DeviceCalls(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k))))
                .collect(),
        )
    }

    /// `(name, count)` for every counter.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// The calling thread's counters when the loaded CUDA driver is the emulated one, else `None`
/// (no driver loaded yet, or a real one).
pub fn emulated_counters() -> Option<DeviceCalls> {
    use libloading::os::unix::{Library, RTLD_LAZY};
    /// glibc's RTLD_NOLOAD: a handle only to a library already loaded.
    const RTLD_NOLOAD: std::ffi::c_int = 0x4;
    type Names = unsafe extern "C" fn() -> *const c_char;
    type Counts = unsafe extern "C" fn(*mut u64, usize) -> usize;
    // SAFETY: RTLD_NOLOAD only returns a handle to a library already loaded (the driver cudarc
    // loaded); the two symbols, when present, are the emulated driver's with exactly these types.
    unsafe {
        let lib = ["libcuda.so", "libcuda.so.1"]
            .iter()
            .find_map(|n| Library::open(Some(*n), RTLD_LAZY | RTLD_NOLOAD).ok())?;
        let names: libloading::os::unix::Symbol<Names> =
            lib.get(b"recap_emu_counter_names\0").ok()?;
        let counts: libloading::os::unix::Symbol<Counts> = lib.get(b"recap_emu_counters\0").ok()?;
        let names = CStr::from_ptr(names()).to_str().ok()?;
        let n = counts(std::ptr::null_mut(), 0);
        let mut v = vec![0u64; n];
        counts(v.as_mut_ptr(), n);
        Some(DeviceCalls(
            names.split(',').map(str::to_string).zip(v).collect(),
        ))
    }
}

/// Runs `f` and returns its result with the driver calls it made on this thread (`None` on a real
/// driver).
pub fn count_calls<R>(f: impl FnOnce() -> R) -> (R, Option<DeviceCalls>) {
    let before = emulated_counters();
    let r = f();
    let after = emulated_counters();
    let calls = match (before, after) {
        (Some(b), Some(a)) => Some(a.since(&b)),
        (None, Some(a)) => Some(a),
        _ => None,
    };
    (r, calls)
}
