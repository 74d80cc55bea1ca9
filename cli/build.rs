//! Build script of the `recap` command: only the cfg of its GPU-only tests.

include!("../tests/common/gpu_cfg.rs");

fn main() {
    gpu_tests_cfg();
}
