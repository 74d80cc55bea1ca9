//! Device memory on the host: one mapping per allocation, the buffer between two guard pages with
//! red zones checked after every launch, poisoned when new; copies checked against the allocations.

use crate::fail;
use cudarc::driver::sys::{CUdeviceptr, CUresult};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Device allocations are aligned to this, as cudaMalloc's are.
const ALIGN: usize = 256;
/// Bytes before the buffer checked for stray writes.
const RED: usize = 256;
const CANARY: u8 = 0xA5;

struct Alloc {
    map: usize,
    map_len: usize,
    size: usize,
}

static ALLOCS: Mutex<BTreeMap<u64, Alloc>> = Mutex::new(BTreeMap::new());

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

fn poison() -> bool {
    std::env::var("RECAP_EMU_POISON").map_or(true, |v| v != "0")
}

fn allocs() -> std::sync::MutexGuard<'static, BTreeMap<u64, Alloc>> {
    ALLOCS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new buffer of `size` bytes (0 is an error, as on the real driver).
pub(crate) fn alloc(size: usize) -> Result<CUdeviceptr, CUresult> {
    if size == 0 {
        return Err(fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            "cuMemAlloc of 0 bytes".into(),
        ));
    }
    let pg = page();
    let body = size.div_ceil(ALIGN) * ALIGN + RED;
    let map_len = body.div_ceil(pg) * pg + 2 * pg;
    // SAFETY: a fresh anonymous mapping; the two guard pages are made inaccessible, the rest is ours.
    let map = unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if m == libc::MAP_FAILED {
            return Err(fail(
                CUresult::CUDA_ERROR_OUT_OF_MEMORY,
                format!("cuMemAlloc of {size} bytes: out of host memory"),
            ));
        }
        libc::mprotect(m, pg, libc::PROT_NONE);
        libc::mprotect(
            (m as *mut u8).add(map_len - pg) as *mut _,
            pg,
            libc::PROT_NONE,
        );
        m as usize
    };
    let guard = map + map_len - pg;
    let user = (guard - size) & !(ALIGN - 1);
    // SAFETY: [user - RED, guard) lies inside the accessible part of the mapping.
    unsafe {
        std::ptr::write_bytes((user - RED) as *mut u8, CANARY, RED);
        std::ptr::write_bytes((user + size) as *mut u8, CANARY, guard - user - size);
        std::ptr::write_bytes(user as *mut u8, if poison() { 0xFF } else { 0 }, size);
    }
    allocs().insert(user as u64, Alloc { map, map_len, size });
    Ok(user as u64)
}

fn red_zones_intact(user: u64, a: &Alloc) -> Option<String> {
    let guard = a.map + a.map_len - page();
    let u = user as usize;
    // SAFETY: both ranges lie inside the accessible part of a live mapping.
    let (front, back) = unsafe {
        (
            std::slice::from_raw_parts((u - RED) as *const u8, RED),
            std::slice::from_raw_parts((u + a.size) as *const u8, guard - u - a.size),
        )
    };
    if let Some(i) = back.iter().position(|&b| b != CANARY) {
        return Some(format!(
            "a write {i} bytes past the end of the device allocation {user:#x} of {} bytes",
            a.size
        ));
    }
    if let Some(i) = front.iter().position(|&b| b != CANARY) {
        return Some(format!(
            "a write {} bytes before the start of the device allocation {user:#x} of {} bytes",
            RED - i,
            a.size
        ));
    }
    None
}

/// Frees a buffer, checking its red zones.
pub(crate) fn free(p: CUdeviceptr) -> Result<(), CUresult> {
    let a = allocs().remove(&p).ok_or_else(|| {
        fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("cuMemFree of {p:#x}, not a live device allocation"),
        )
    })?;
    let broken = red_zones_intact(p, &a);
    // SAFETY: the mapping made by alloc, no longer listed.
    unsafe { libc::munmap(a.map as *mut _, a.map_len) };
    match broken {
        Some(why) => Err(fail(
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            format!("at cuMemFree: {why}"),
        )),
        None => Ok(()),
    }
}

/// Errors unless `[p, p + n)` lies inside one live allocation.
pub(crate) fn check_range(p: CUdeviceptr, n: usize, what: &str) -> Result<(), CUresult> {
    let m = allocs();
    let below = m.range(..=p).next_back();
    // (an empty range at an allocation's end is inside it too, as p + 0 <= end)
    if below.is_some_and(|(&u, a)| {
        p.checked_add(n as u64)
            .is_some_and(|e| e <= u + a.size as u64)
    }) {
        return Ok(());
    }
    let near = below
        .map(|(u, a)| format!(" (the allocation below it: {u:#x}, {} bytes)", a.size))
        .unwrap_or_else(|| format!(" ({} live allocations, none below it)", m.len()));
    Err(fail(
        CUresult::CUDA_ERROR_INVALID_VALUE,
        format!("{what}: {n} bytes at {p:#x} are not inside one device allocation{near}"),
    ))
}

/// Errors (naming the allocation) when a launch wrote into any allocation's red zones.
pub(crate) fn check_red_zones(kernel: &str) -> Result<(), CUresult> {
    let m = allocs();
    for (u, a) in m.iter() {
        if let Some(why) = red_zones_intact(*u, a) {
            return Err(fail(
                CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                format!("{kernel}: {why}"),
            ));
        }
    }
    Ok(())
}

/// Bytes in live allocations.
pub(crate) fn allocated() -> usize {
    allocs().values().map(|a| a.size).sum()
}

static KERNEL: Mutex<String> = Mutex::new(String::new());

/// Names the kernel running now, for the fault handler's message.
pub(crate) fn set_running(name: &str) {
    if let Ok(mut k) = KERNEL.lock() {
        k.clear();
        k.push_str(name);
    }
}

extern "C" fn on_fault(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel gave a siginfo for SIGSEGV/SIGBUS; the process dies right after this
    // handler (the default action is restored and the access faults again).
    unsafe {
        let addr = (*info).si_addr() as u64;
        let kernel = KERNEL.try_lock().map(|k| k.clone()).unwrap_or_default();
        let mut what = format!("a fault at {addr:#x}");
        if let Ok(m) = ALLOCS.try_lock() {
            for (&u, a) in m.iter() {
                if addr >= a.map as u64 && addr < (a.map + a.map_len) as u64 {
                    what = if addr >= u {
                        format!(
                            "an access {} bytes past the end of the device allocation {u:#x} of {} bytes",
                            addr - u - a.size as u64,
                            a.size
                        )
                    } else {
                        format!(
                            "an access {} bytes before the device allocation {u:#x} of {} bytes",
                            u - addr,
                            a.size
                        )
                    };
                }
            }
        }
        let msg = format!(
            "emulated CUDA device: {what}{} (out of bounds; the process stops)\n",
            if kernel.is_empty() {
                String::new()
            } else {
                format!(" in kernel {kernel}")
            }
        );
        libc::write(2, msg.as_ptr() as *const _, msg.len());
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Reports an access to a guard page (an out-of-bounds access) before the process dies.
pub(crate) fn install_fault_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler for SIGSEGV/SIGBUS that only reports and restores the default.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}
