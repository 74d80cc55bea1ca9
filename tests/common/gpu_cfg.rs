// Included by the build scripts of the packages with GPU tests (build.rs, cli/build.rs): sets the
// `recap_gpu_tests` cfg, under which the GPU-only tests run; without it they are compiled as
// `#[ignore]`d, so `cargo test` on a machine without a GPU lists them as ignored (not passed).
// On when RECAP_GPU_TESTS=1 or RECAP_REQUIRE_GPU=1 (where an unusable GPU then fails them), or
// when the build machine has an NVIDIA device node; `cargo test -- --include-ignored` runs them
// regardless (the bundled suite does, on the GPU machine).

/// Emits the cargo instructions for the `recap_gpu_tests` cfg.
fn gpu_tests_cfg() {
    println!("cargo:rustc-check-cfg=cfg(recap_gpu_tests)");
    println!("cargo:rerun-if-env-changed=RECAP_GPU_TESTS");
    println!("cargo:rerun-if-env-changed=RECAP_REQUIRE_GPU");
    let on = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    if on("RECAP_GPU_TESTS")
        || on("RECAP_REQUIRE_GPU")
        || std::path::Path::new("/dev/nvidia0").exists()
    {
        println!("cargo:rustc-cfg=recap_gpu_tests");
    }
}
