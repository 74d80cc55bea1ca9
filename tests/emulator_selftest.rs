//! The SIMT emulator itself (tests/emulator/simt.h), on kernels written to test it
//! (tests/emulator/selftest.cpp): the warp operations give what CUDA defines (xor butterfly,
//! ballot, shfl_up at the warp's edge, indexed shuffle, all/any, atomics and shared memory across
//! a barrier), and the launches a GPU would hang on or leave undefined fail with a message: a
//! lane at `__syncthreads` while its warp waits for it at `__syncwarp`, a shuffle after a lane of
//! the warp exited, a partial mask. The kernels' own emulated tests rely on these.

mod emulator;

#[repr(C)]
struct SelfParams {
    out: u64,
    mode: i32,
}

fn launch(
    emu: &emulator::Emulated,
    mode: i32,
    grid: usize,
    block: usize,
) -> Result<Vec<i32>, String> {
    let mut out = vec![-1i32; grid * block];
    let p = SelfParams {
        out: out.as_mut_ptr() as u64,
        mode,
    };
    emu.try_launch("selftest", grid, block, &p)?;
    Ok(out)
}

#[test]
fn warp_operations_give_what_cuda_defines() {
    let emu = emulator::Emulated::build("selftest");
    for (grid, block) in [(1, 32), (3, 256), (2, 1024)] {
        let out = launch(&emu, 0, grid, block).unwrap();
        assert!(
            out.iter().all(|&x| x == 1),
            "grid {grid} block {block}: {out:?}"
        );
    }
}

#[test]
fn undefined_launches_fail_with_a_message() {
    let emu = emulator::Emulated::build("selftest");
    let deadlock = launch(&emu, 1, 1, 64).unwrap_err();
    assert!(deadlock.contains("deadlock"), "{deadlock}");
    let exited = launch(&emu, 2, 1, 64).unwrap_err();
    assert!(exited.contains("exited"), "{exited}");
    let partial = launch(&emu, 3, 1, 32).unwrap_err();
    assert!(partial.contains("partial mask"), "{partial}");
    // a refused launch leaves the emulator usable
    assert!(launch(&emu, 0, 2, 128).unwrap().iter().all(|&x| x == 1));
}
