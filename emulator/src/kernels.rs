//! Modules and launches: a module image is checked and kept; a function is a kernel of the SIMT
//! emulator's tables (one per kernel file, built from `tests/emulator/<stem>.cpp`) whose name the
//! image holds; a launch runs it over the grid on the host.

use crate::{fail, memory};
use cudarc::driver::sys::CUresult;
use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::{Mutex, OnceLock};

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// `SimtKernel` of `tests/emulator/simt.h`.
#[repr(C)]
pub(crate) struct SimtKernel {
    name: *const c_char,
    launch: unsafe extern "C" fn(params: *const c_void, grid: c_uint, block: c_uint) -> i32,
    /// The parameter struct's size (a captured launch copies that many bytes).
    params_size: usize,
}

// SAFETY: the tables are immutable statics of the C++ library (names are string literals).
unsafe impl Sync for SimtKernel {}
unsafe impl Send for SimtKernel {}

extern "C" {
    fn simt_last_error() -> *const c_char;
}

/// A function handle: the kernel and the kernel file it comes from.
pub(crate) struct Function {
    name: String,
    file: &'static str,
    kernel: &'static SimtKernel,
}

// SAFETY: the tables are immutable statics of the C++ library.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// Every emulated kernel by name, with its kernel file.
fn registry() -> &'static HashMap<String, (&'static str, &'static SimtKernel)> {
    static R: OnceLock<HashMap<String, (&'static str, &'static SimtKernel)>> = OnceLock::new();
    R.get_or_init(|| {
        let mut m = HashMap::new();
        for (file, table) in MODULES {
            let mut n = 0usize;
            // SAFETY: simt_module_<stem> returns its static table and its length.
            let t = unsafe { table(&mut n) };
            for i in 0..n {
                // SAFETY: i < n entries of a static table; names are string literals.
                let k: &'static SimtKernel = unsafe { &*t.add(i) };
                let name = unsafe { CStr::from_ptr(k.name) }
                    .to_string_lossy()
                    .into_owned();
                m.insert(name, (*file, k));
            }
        }
        m
    })
}

/// Live function handles (one per kernel name, kept for the process).
fn functions() -> &'static Mutex<HashMap<String, usize>> {
    static F: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    F.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The size of the parameter struct of function `f` (its kernel table's entry).
pub(crate) fn params_size(f: *const Function) -> Result<usize, CUresult> {
    if !is_function(f) {
        return Err(crate::fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("cuLaunchKernel of {f:p}, not a function handle"),
        ));
    }
    // SAFETY: a live handle (checked above), never freed while the module is loaded.
    Ok(unsafe { (*f).kernel.params_size })
}

pub(crate) fn is_function(f: *const Function) -> bool {
    functions()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .any(|&p| p == f as usize)
}

/// A loaded module: a copy of its image (a fatbin, as build.rs embeds; or NUL-terminated PTX).
pub(crate) struct Module {
    image: Vec<u8>,
}

const FATBIN_MAGIC: u32 = 0xBA55_ED50;

impl Module {
    /// Checks and copies the image at `p`.
    pub(crate) unsafe fn load(p: *const u8) -> Result<Module, CUresult> {
        let magic = u32::from_le_bytes(
            std::slice::from_raw_parts(p, 4)
                .try_into()
                .unwrap_or([0; 4]),
        );
        let len = if magic == FATBIN_MAGIC {
            // fatbin header: magic u32, version u16, header size u16, size of the rest u64
            let h = std::slice::from_raw_parts(p, 16);
            let header = u16::from_le_bytes([h[6], h[7]]) as usize;
            let rest = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8])) as usize;
            header + rest
        } else if std::slice::from_raw_parts(p, 4) == b"\x7fELF" {
            return Err(fail(
                CUresult::CUDA_ERROR_INVALID_IMAGE,
                "cuModuleLoadData: a bare cubin (the emulator takes fatbins, as the crate embeds)"
                    .into(),
            ));
        } else {
            CStr::from_ptr(p as *const c_char).to_bytes().len()
        };
        if len == 0 {
            return Err(fail(
                CUresult::CUDA_ERROR_INVALID_IMAGE,
                "cuModuleLoadData: an empty image".into(),
            ));
        }
        Ok(Module {
            image: std::slice::from_raw_parts(p, len).to_vec(),
        })
    }

    /// Whether the image holds `name` as a symbol (NUL-terminated, after a NUL or a '.').
    fn holds(&self, name: &str) -> bool {
        let n = name.as_bytes();
        self.image
            .windows(n.len() + 2)
            .any(|w| (w[0] == 0 || w[0] == b'.') && &w[1..=n.len()] == n && w[n.len() + 1] == 0)
    }

    /// The function `name`: a kernel the image holds and the emulator has.
    pub(crate) fn function(&self, name: &str) -> Result<*const Function, CUresult> {
        if !self.holds(name) {
            return Err(fail(
                CUresult::CUDA_ERROR_NOT_FOUND,
                format!("cuModuleGetFunction: no kernel {name} in this module's image"),
            ));
        }
        let Some(&(file, kernel)) = registry().get(name) else {
            return Err(fail(
                CUresult::CUDA_ERROR_NOT_FOUND,
                format!("cuModuleGetFunction: {name} is in the image but not in the emulator's kernel tables (add it to its tests/emulator/<file>.cpp)"),
            ));
        };
        let mut f = functions().lock().unwrap_or_else(|e| e.into_inner());
        let p = *f.entry(name.to_string()).or_insert_with(|| {
            Box::into_raw(Box::new(Function {
                name: name.to_string(),
                file,
                kernel,
            })) as usize
        });
        Ok(p as *const Function)
    }
}

/// `RECAP_EMU_TRACE=1`: every launch on stderr.
pub(crate) fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var("RECAP_EMU_TRACE").is_ok_and(|v| v == "1"))
}

/// cuLaunchKernel: 1-D grids and blocks, no dynamic shared memory, the parameters as
/// `kernelParams` (the first entry points at the kernel's parameter struct).
pub(crate) unsafe fn launch(
    f: *const Function,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared: c_uint,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if !is_function(f) {
        return fail(
            CUresult::CUDA_ERROR_INVALID_HANDLE,
            format!("cuLaunchKernel of {f:p}, not a function handle"),
        );
    }
    let f = &*f;
    let what = format!("{} ({}.cu)", f.name, f.file);
    if grid[1] != 1 || grid[2] != 1 || block[1] != 1 || block[2] != 1 {
        return fail(
            CUresult::CUDA_ERROR_NOT_SUPPORTED,
            format!(
                "{what}: grid {grid:?} block {block:?}: the emulator runs 1-D grids and blocks"
            ),
        );
    }
    if grid[0] == 0 || grid[0] > i32::MAX as c_uint || block[0] == 0 || block[0] > 1024 {
        return fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!(
                "{what}: grid {} x block {}: out of the device's limits",
                grid[0], block[0]
            ),
        );
    }
    if shared != 0 {
        return fail(
            CUresult::CUDA_ERROR_NOT_SUPPORTED,
            format!("{what}: {shared} bytes of dynamic shared memory (not emulated; the kernels use static)"),
        );
    }
    if !extra.is_null() || params.is_null() || (*params).is_null() {
        return fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("{what}: the parameters must come as kernelParams[0], the kernel's one parameter struct"),
        );
    }
    if trace() {
        eprintln!(
            "emulated CUDA device: launch {what} grid {} block {}",
            grid[0], block[0]
        );
    }
    memory::set_running(&what);
    let rc = (f.kernel.launch)(*params as *const c_void, grid[0], block[0]);
    memory::set_running("");
    if rc != 0 {
        let why = CStr::from_ptr(simt_last_error())
            .to_string_lossy()
            .into_owned();
        return fail(CUresult::CUDA_ERROR_LAUNCH_FAILED, format!("{what}: {why}"));
    }
    match memory::check_red_zones(&what) {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(code) => code,
    }
}
