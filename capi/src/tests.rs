//! The C ABI's argument errors: status codes and messages naming the argument, before any device
//! work (the library's own malformed-input table is `tests/bad_inputs.rs` at the root).

use super::*;

#[test]
fn c_abi_errors_name_the_argument() {
    // the C ABI: status codes and messages, before any device work

    let mut cfg = std::mem::MaybeUninit::<RecapGrpoConfig>::uninit();
    // SAFETY: a valid pointer to an uninitialized struct, which the call fills.
    assert_eq!(
        unsafe { recap_grpo_config_default(cfg.as_mut_ptr()) },
        RECAP_OK
    );
    // SAFETY: initialized by the call above.
    let cfg = unsafe { cfg.assume_init() };
    let last = || {
        // SAFETY: recap_last_error returns a valid NUL-terminated string owned by this thread.
        unsafe { std::ffi::CStr::from_ptr(recap_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let d = [0f32; 8];
    let mut res = RecapGrpoResult::default();
    let call =
        |cfg: &RecapGrpoConfig, cu: *const i32, kinds: *const i32, res: &mut RecapGrpoResult| {
            // SAFETY: host arrays hold what the sizes say (or are null, which is checked); the dummy
            // device pointers are never reached because validation fails first.
            unsafe {
                recap_grpo_loss(
                    0,
                    std::ptr::null_mut(),
                    4,
                    d.as_ptr(),
                    d.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    d.as_ptr(),
                    0,
                    d.as_ptr() as _,
                    0,
                    cu,
                    2,
                    [1.0f32].as_ptr(),
                    kinds,
                    std::ptr::null(),
                    1,
                    std::ptr::null(),
                    std::ptr::null(),
                    cfg,
                    d.as_ptr() as *mut f32,
                    res,
                    std::ptr::null_mut(),
                )
            }
        };
    let cu = [0i32, 2, 4];
    let kinds = [0i32];
    let bad = RecapGrpoConfig { agg_mode: 9, ..cfg };
    assert_eq!(
        call(&bad, cu.as_ptr(), kinds.as_ptr(), &mut res),
        RECAP_ERR_ARGUMENT
    );
    assert!(last().contains("agg_mode"), "{}", last());
    let bad = RecapGrpoConfig {
        rollout_level: 5,
        ..cfg
    };
    assert_eq!(
        call(&bad, cu.as_ptr(), kinds.as_ptr(), &mut res),
        RECAP_ERR_ARGUMENT
    );
    assert!(last().contains("rollout_level"), "{}", last());
    assert_eq!(
        call(&cfg, std::ptr::null(), kinds.as_ptr(), &mut res),
        RECAP_ERR_ARGUMENT
    );
    assert!(last().contains("cu_seqlens"), "{}", last());
    assert_eq!(
        call(&cfg, cu.as_ptr(), [4i32].as_ptr(), &mut res),
        RECAP_ERR_ARGUMENT
    );
    assert!(last().contains("objectives"), "{}", last());
}
