//! Kernel source run on the host: `tests/emulator/<file>.cpp` (a kernel file under the SIMT
//! emulator `tests/emulator/simt.h`) built with the machine's C++20 compiler into a shared library
//! in the test's temporary directory, and its `simt_<kernel>` entry points called with the crate's
//! own parameter mirrors (`recap_kernels::cuda::params`) holding host addresses.

use std::path::Path;

/// A built emulation of one kernel file.
pub struct Emulated {
    lib: libloading::Library,
}

impl Emulated {
    /// Builds `tests/emulator/<name>.cpp` (`CXX`, else `c++`); a missing compiler or a build error
    /// fails the test that asked for it.
    pub fn build(name: &str) -> Emulated {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // each build into its own file: two tests of one binary may build the same emulation at
        // once, and a shared path would let one load the other's half-written library
        static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let so = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("simt_{name}_{}_{n}.so", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = std::process::Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
                "-Wall",
                "-Wno-unknown-pragmas",
                "-Werror",
            ])
            .args(["-pthread", "-fPIC", "-shared"])
            .arg("-I")
            .arg(root.join("kernels"))
            .arg("-I")
            .arg(root.join("tests/emulator"))
            .arg(root.join(format!("tests/emulator/{name}.cpp")))
            .arg("-o")
            .arg(&so)
            .status()
            .unwrap_or_else(|e| panic!("the kernel emulation needs a C++20 compiler ({cxx}): {e}"));
        assert!(
            status.success(),
            "building tests/emulator/{name}.cpp failed"
        );
        // SAFETY: a library this test just built from the repository's sources; loading runs no
        // code of ours beyond the C++ runtime's static initialization.
        let lib = unsafe { libloading::Library::new(&so) }.expect("loading the kernel emulation");
        let _ = std::fs::remove_file(&so); // loaded: the mapping stays valid
        Emulated { lib }
    }

    /// Runs `kernel` over `grid` blocks of `block` threads with parameters `p`, whose addresses
    /// must point at host arrays of the sizes the kernel reads and writes; a launch the emulator
    /// refuses (a deadlock, a divergent warp operation) fails the test with the reason.
    #[allow(dead_code)] // not every test that builds an emulation uses both
    pub fn launch<P>(&self, kernel: &str, grid: usize, block: usize, p: &P) {
        if let Err(why) = self.try_launch(kernel, grid, block, p) {
            panic!("the emulated launch of {kernel} failed: {why}");
        }
    }

    /// As [`Emulated::launch`], the emulator's reason as an error.
    #[allow(dead_code)] // not every test that builds an emulation uses both
    pub fn try_launch<P>(
        &self,
        kernel: &str,
        grid: usize,
        block: usize,
        p: &P,
    ) -> Result<(), String> {
        let name = format!("simt_{kernel}\0");
        // SAFETY: `simt_<kernel>` is defined by SIMT_MODULE with exactly this signature, and `P`
        // is the crate's #[repr(C)] mirror of the kernel's parameter struct (generated from
        // recap_params.h, layouts asserted at compile time); the caller guarantees the addresses in `p`.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*const P, i32, i32) -> i32> = self
                .lib
                .get(name.as_bytes())
                .unwrap_or_else(|e| panic!("{kernel} is not exported by the emulation: {e}"));
            if f(p, grid as i32, block as i32) != 0 {
                let why: libloading::Symbol<unsafe extern "C" fn() -> *const std::ffi::c_char> =
                    self.lib.get(b"simt_last_error\0").expect("simt_last_error");
                return Err(std::ffi::CStr::from_ptr(why())
                    .to_string_lossy()
                    .into_owned());
            }
        }
        Ok(())
    }
}
