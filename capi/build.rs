//! Build script of the C ABI crate: only the cfg of its GPU-only tests (the device path from C).

include!("../tests/common/gpu_cfg.rs");

fn main() {
    gpu_tests_cfg();
}
