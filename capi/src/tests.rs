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
    let lambda = [1.0f32];
    let call =
        |cfg: &RecapGrpoConfig, cu: *const i32, kinds: *const i32, res: &mut RecapGrpoResult| {
            let batch = RecapGrpoBatch {
                num_tokens: 4,
                num_seqs: 2,
                num_objectives: 1,
                adv_per_token: 0,
                mask_is_u8: 0,
                layout_on_device: 0,
                old_logp: d.as_ptr(),
                ref_logp: std::ptr::null(),
                rollout_logp: std::ptr::null(),
                policy_weight: std::ptr::null(),
                advantages: d.as_ptr(),
                mask: d.as_ptr() as _,
                cu_seqlens: cu,
                lambda: lambda.as_ptr(),
                objectives: kinds,
                membership: std::ptr::null(),
                normalizers: std::ptr::null(),
                seq_tokens: std::ptr::null(),
            };
            // SAFETY: host arrays hold what the sizes say (or are null, which is checked); the dummy
            // device pointers are never reached because validation fails first.
            unsafe {
                recap_grpo_loss(
                    0,
                    std::ptr::null_mut(),
                    d.as_ptr(),
                    &batch,
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

/// Vocabulary parallelism through the C ABI on the host: two shards' 4-plane partials combine into
/// the whole vocabulary's log-probs and Σπ² (as `recap_logprob_forward` gives them unsharded), the
/// shards' backward with the Σπ² gradient joins into the unsharded gradient; `planes` other than 3
/// or 4, and Σπ² from 3-plane partials, are errors naming the argument.
#[test]
fn c_abi_tensor_parallel_with_sum_pi_squared() {
    let (t, v, split) = (3usize, 7usize, 3usize);
    let z: Vec<f32> = (0..t * v)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4)
        .collect();
    let y = [1i32, 5, -100];
    let (gl, ge, gs) = (
        [0.5f32, -1.0, 0.3],
        [0.2f32, 0.1, -0.4],
        [1.0f32, -0.7, 0.6],
    );
    let last = || {
        // SAFETY: recap_last_error returns a valid NUL-terminated string owned by this thread.
        unsafe { std::ffi::CStr::from_ptr(recap_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    // logits `data` [t, width] holding the columns from `start` (f32)
    let logits = |data: *mut std::ffi::c_void, width: usize, start: usize| RecapLogits {
        data,
        dtype: 0,
        ignore_index: -100,
        rows: t as i64,
        vocab: width as i64,
        ld: width as i64,
        vocab_start: start as i64,
        labels: y.as_ptr(),
        temperature: 1.0,
    };
    // unsharded
    let (mut lp, mut h, mut l, mut q) = ([0f32; 3], [0f32; 3], [0f32; 3], [0f32; 3]);
    // SAFETY: host arrays of the stated sizes.
    let rc = unsafe {
        recap_logprob_forward(
            -1,
            std::ptr::null_mut(),
            &logits(z.as_ptr() as _, v, 0),
            lp.as_mut_ptr(),
            h.as_mut_ptr(),
            l.as_mut_ptr(),
            q.as_mut_ptr(),
        )
    };
    assert_eq!(rc, RECAP_OK, "{}", last());
    // SAFETY: as above.
    let rc = unsafe {
        recap_logprob_forward(
            -1,
            std::ptr::null_mut(),
            &logits(z.as_ptr() as _, v, 2),
            lp.as_mut_ptr(),
            h.as_mut_ptr(),
            l.as_mut_ptr(),
            q.as_mut_ptr(),
        )
    };
    assert_eq!(rc, RECAP_ERR_ARGUMENT);
    assert!(last().contains("logits.vocab_start"), "{}", last());
    let mut whole = z.clone();
    // SAFETY: as above; the gradient overwrites `whole`.
    let rc = unsafe {
        recap_logprob_backward_inplace(
            -1,
            std::ptr::null_mut(),
            &logits(whole.as_mut_ptr() as _, v, 0),
            &RecapLogprobGrads {
                lse: l.as_ptr(),
                entropy: h.as_ptr(),
                g_logp: gl.as_ptr(),
                g_entropy: ge.as_ptr(),
                sum_pi_squared: q.as_ptr(),
                g_sum_pi_squared: gs.as_ptr(),
            },
        )
    };
    assert_eq!(rc, RECAP_OK, "{}", last());
    // two shards: columns [0, 3) and [3, 7)
    let shard = |a: usize, b: usize| -> Vec<f32> {
        (0..t)
            .flat_map(|r| z[r * v + a..r * v + b].to_vec())
            .collect()
    };
    let mut parts = vec![0f32; 2 * 4 * t];
    for (k, (a, b)) in [(0, split), (split, v)].into_iter().enumerate() {
        let s = shard(a, b);
        // SAFETY: host arrays of the stated sizes; partials 4 * t floats.
        let rc = unsafe {
            recap_tp_partials(
                -1,
                std::ptr::null_mut(),
                &logits(s.as_ptr() as _, b - a, a),
                4,
                parts[k * 4 * t..].as_mut_ptr(),
            )
        };
        assert_eq!(rc, RECAP_OK, "{}", last());
    }
    let (mut lp2, mut h2, mut l2, mut q2) = ([0f32; 3], [0f32; 3], [0f32; 3], [0f32; 3]);
    let combine = |planes: i32, q: *mut f32, out: (&mut [f32; 3], &mut [f32; 3], &mut [f32; 3])| {
        // SAFETY: host arrays of the stated sizes (partials 2 * 4 * t floats).
        unsafe {
            recap_tp_combine(
                -1,
                std::ptr::null_mut(),
                parts.as_ptr(),
                2,
                planes,
                t as i64,
                y.as_ptr(),
                -100,
                out.0.as_mut_ptr(),
                out.1.as_mut_ptr(),
                out.2.as_mut_ptr(),
                q,
            )
        }
    };
    assert_eq!(
        combine(4, q2.as_mut_ptr(), (&mut lp2, &mut h2, &mut l2)),
        RECAP_OK,
        "{}",
        last()
    );
    for r in 0..t {
        assert!(
            (lp2[r] - lp[r]).abs() < 1e-5 && (q2[r] - q[r]).abs() < 1e-6,
            "row {r}"
        );
    }
    assert_ne!(
        combine(5, q2.as_mut_ptr(), (&mut lp2, &mut h2, &mut l2)),
        RECAP_OK
    );
    assert!(last().contains("planes"), "{}", last());
    // 3 planes: the first 3 * t of each shard would be read as another layout; Σπ² needs 4
    assert_ne!(
        combine(3, q2.as_mut_ptr(), (&mut lp2, &mut h2, &mut l2)),
        RECAP_OK
    );
    assert!(last().contains("sum_pi_squared"), "{}", last());
    // the shards' backward with the combined values joins into the unsharded gradient
    for (a, b) in [(0, split), (split, v)] {
        let mut s = shard(a, b);
        // SAFETY: host arrays of the stated sizes; the gradient overwrites `s`.
        let rc = unsafe {
            recap_tp_backward_inplace(
                -1,
                std::ptr::null_mut(),
                &logits(s.as_mut_ptr() as _, b - a, a),
                &RecapLogprobGrads {
                    lse: l2.as_ptr(),
                    entropy: h2.as_ptr(),
                    g_logp: gl.as_ptr(),
                    g_entropy: ge.as_ptr(),
                    sum_pi_squared: q2.as_ptr(),
                    g_sum_pi_squared: gs.as_ptr(),
                },
            )
        };
        assert_eq!(rc, RECAP_OK, "{}", last());
        for r in 0..t {
            for j in 0..b - a {
                let (got, want) = (s[r * (b - a) + j], whole[r * v + a + j]);
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} column {}: {got} vs {want}",
                    a + j
                );
            }
        }
    }
}
