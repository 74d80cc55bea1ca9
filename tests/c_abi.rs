//! The C ABI from C: `tests/c/abi_test.c` is compiled with the system C compiler against
//! `include/recap_kernels.h` and linked with the cdylib cargo built beside this test; it checks the
//! defaults, the scheduler and the argument errors (all before any device work), and prints the C
//! sizes of the structs, compared here with the Rust definitions.

use std::path::PathBuf;
use std::process::Command;

/// The cdylib built with this test (beside it in `deps/`, from the same profile), else the one
/// cargo uplifted to `target/<profile>/` (a bundled copy).
fn cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    [deps, deps.parent()?]
        .iter()
        .map(|d| d.join("librecap_kernels.so"))
        .find(|l| l.exists())
}

#[test]
fn c_abi_from_c() {
    use std::io::Write;
    let Some(lib) = cdylib() else {
        let _ = writeln!(
            std::io::stderr(),
            "skipping c_abi_from_c: librecap_kernels.so not found beside the test (a bundled copy)"
        );
        return;
    };
    // the crate's sources: where cargo built it, or the current directory (a bundled copy runs from
    // the project root)
    let root = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        PathBuf::from("."),
    ]
    .into_iter()
    .find(|r| r.join("include/recap_kernels.h").exists());
    let Some(root) = root else {
        let _ = writeln!(
            std::io::stderr(),
            "skipping c_abi_from_c: include/recap_kernels.h not found"
        );
        return;
    };
    let out = std::env::temp_dir().join(format!("recap-abi-test-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        let _ = writeln!(
            std::io::stderr(),
            "skipping c_abi_from_c: no C compiler `{cc}`"
        );
        return;
    }
    let status = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(root.join("tests/c/abi_test.c"))
        .arg("-I")
        .arg(root.join("include"))
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.parent().unwrap().display()))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "compiling tests/c/abi_test.c against the header"
    );
    let driver = recap_kernels::cuda::driver_present();
    let run = Command::new(&out)
        .arg(if driver { "1" } else { "0" })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.contains("ok"), "{stdout}");
    let sizes: Vec<usize> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sizes "))
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(
        sizes,
        vec![
            std::mem::size_of::<recap_kernels::ffi::RecapGrpoConfig>(),
            std::mem::size_of::<recap_kernels::ffi::RecapGrpoResult>()
        ],
        "C and Rust struct sizes"
    );
    let _ = std::fs::remove_file(out);
}
