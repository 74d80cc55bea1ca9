//! The fused loss (synchronous and asynchronous) and the token ops beside it: normalizers, KL,
//! rollout rejection and IS weights, the weighted reduction.

#[allow(unused_imports)]
use crate::prelude::*;

/// The fused GRPO loss of the log-probabilities `logp` `[T]` (in the call's place: device memory
/// for `device >= 0`; host memory for `device < 0`, where the CPU reference computes) against
/// `batch` (its fields say what each array holds; `layout_on_device` must be 0 here), writing
/// `grad` `[T]` (dL/dlogp, same place), `result` and `stats` (host, nullable,
/// `recap_grpo_stats_len(K)` f64; fields from `recap_grpo_stat_field`).
///
/// # Safety
/// `batch`, `cfg` and `result` valid; every non-null pointer holds the elements stated; device
/// pointers belong to `device`'s primary context and `stream` (nullable: the context's default
/// stream).
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_loss(
    device: i32,
    stream: *mut c_void,
    logp: *const f32,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let batch = unsafe { Batch::new(batch, false) }?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, batch.k)?;
        let out = raw::grpo_loss(
            place(device, stream),
            &batch.grpo_inputs(logp),
            &cfg,
            out_arr(grad, batch.t),
        )?;
        write_result(&out, out.loss, result, stats);
        Ok(())
    })
}

/// Length (f64s) of the output buffer of `recap_grpo_loss_async` for `num_objectives` objectives
/// (the loss at index 0, then the device-side check flags, the normalizers and the statistics), or
/// -1 for a count outside 1..=16.
#[no_mangle]
pub extern "C" fn recap_grpo_output_len(num_objectives: i32) -> i64 {
    match usize::try_from(num_objectives) {
        Ok(k) if (1..=recap::MAX_OBJECTIVES).contains(&k) => recap::cuda::grpo_output_len(k) as i64,
        _ => -1,
    }
}

/// The fused GRPO loss without a host synchronization: on a device (`device >= 0`) it enqueues two
/// launches on `stream` that write `grad` [T] and `out` [`recap_grpo_output_len(K)`] (f64, device
/// memory; `out[0]` is the loss), and returns; on the host (`device < 0`) the CPU reference fills
/// the same layout at once. Nothing is allocated once the stream's workspace has grown to the
/// call's size. The arguments are those of `recap_grpo_loss`; with `batch->layout_on_device`,
/// `cu_seqlens`, `lambda` and `membership` are device pointers, checked on the device (a failed
/// check makes the device loss NaN and `recap_grpo_output_read` fail naming the argument); nothing
/// is then copied from the host, so the call can be captured in a CUDA graph (after one eager call
/// of the same size). Read the result with `recap_grpo_output_read`.
///
/// # Safety
/// As `recap_grpo_loss`; `out` must be device memory of the call's device.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_loss_async(
    device: i32,
    stream: *mut c_void,
    logp: *const f32,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    out: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let batch = unsafe { Batch::new(batch, true) }?;
        let cfg = config(cfg)?;
        raw::grpo_loss_async(
            place(device, stream),
            &batch.grpo_inputs(logp),
            batch.device_layout().as_ref(),
            &cfg,
            out_arr(grad, batch.t),
            out_arr(out, recap::cuda::grpo_output_len(batch.k)),
        )?;
        Ok(())
    })
}

/// Reads the output `out` of a `recap_grpo_loss_async` call back (this synchronizes `stream`) into
/// `result` and `stats` (nullable), as `recap_grpo_loss` writes them; `batch` and `cfg` are the
/// call's (only their sizes, options and which arrays were given are read). Fails, naming the
/// argument, when a check made on the device failed, and on non-finite inputs unless the config
/// allows them.
///
/// # Safety
/// `batch` and `cfg` as for the call; `out` must hold `recap_grpo_output_len(K)` f64 of `device`'s
/// memory; `result` must be writable; `stats` null or `recap_grpo_stats_len(K)` writable f64.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_output_read(
    device: i32,
    stream: *mut c_void,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    out: *const f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let (k, has_ref, has_rollout) = unsafe { batch_outline(batch) }?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, k)?;
        let pending = recap::cuda::PendingGrpo::new(k, has_ref, has_rollout, &cfg);
        let n_out = recap::cuda::grpo_output_len(k);
        let o = raw::read_grpo_output(place(device, stream), &pending, arr(out, n_out))?;
        write_result(&o, o.loss, result, stats);
        Ok(())
    })
}

/// This batch's normalizers from its mask ([T] u8 or f32, on the device or, for `device < 0`, the
/// host): `normalizers` [2, K + 1] (host, written: token weights then sequence counts, the KL slot
/// last in each) and `seq_tokens` [B] (host, nullable, written). Of `batch` it reads the sizes,
/// `mask`, `cu_seqlens` and `membership` (the same struct the loss takes). Sum the parts'
/// `normalizers` and pass the total to `recap_grpo_loss` of every part (`batch.normalizers`).
/// Synchronizes the stream.
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
pub unsafe extern "C" fn recap_count_normalizers(
    device: i32,
    stream: *mut c_void,
    batch: *const RecapGrpoBatch,
    normalizers: *mut f64,
    seq_tokens: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, t, b, k) = unsafe { batch_sizes(batch) }?;
        let cu = host("cu_seqlens", c.cu_seqlens, b + 1)?;
        let membership = if c.membership.is_null() {
            None
        } else {
            Some(host("membership", c.membership, b)?)
        };
        if normalizers.is_null() {
            return Err(Error::invalid_argument("normalizers", "null pointer"));
        }
        host_outputs_disjoint(&[
            ("normalizers", normalizers as usize, 16 * (k + 1)),
            ("seq_tokens", seq_tokens as usize, 8 * b),
        ])?;
        let n = raw::count_normalizers(
            place(device, stream),
            &mask_arr(c.mask, c.mask_is_u8, t),
            cu,
            membership,
            k,
        )?;
        write_host(normalizers, &[&n.tokens[..], &n.seqs[..]].concat());
        if let Some(st) = &n.seq_tokens {
            write_host(seq_tokens, st);
        }
        Ok(())
    })
}

/// Per-token KL to the reference: value and `d kl / d logp` (`[T]` each, on the device or, for
/// `device < 0`, the host), masked tokens 0 (`mask` nullable: every token). `estimator`: 0 k1, 1
/// abs, 2 k2, 3 k3, 4 k1+, 5 k3+, 6 k3-unclamped.
///
/// # Safety
/// Arrays of `num_tokens` elements in the memory of the call's place.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_kl(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    logp: *const f32,
    ref_logp: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    estimator: i32,
    kl: *mut f32,
    grad: *mut f32,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let est = pick("estimator", &KlEstimator::ALL, estimator)?;
        raw::kl(
            place(device, stream),
            arr(logp, t),
            arr(ref_logp, t),
            (!mask.is_null()).then(|| mask_arr(mask, mask_is_u8, t)),
            est,
            out_arr(kl, t),
            out_arr(grad, t),
        )
    })
}

/// Rollout rejection sampling (verl's `rollout_rs`): int32 flags `[T]` (on the device or, for
/// `device < 0`, the host) of the log-ratios `old_logp - rollout_logp`, bit i set where option i of
/// `rollout_rs` (comma-separated verl names, e.g. `"token_k1,seq_mean_k3"`) rejects the token, 0 at
/// masked tokens; `rollout_rs_threshold` as verl's (e.g. `"0.5_2.0,0.01"`). With
/// `rollout_token_veto_threshold > 0` (the older verl API's veto; 0: none) the last bit rejects every
/// sequence holding a token of ratio below it, and `rollout_rs` may be empty. The new mask is the mask
/// where the flags are 0. `cu_seqlens` `[num_seqs + 1]` on the host.
///
/// # Safety
/// Arrays of `num_tokens` elements in the memory of the call's place; the two strings non-null and
/// NUL-terminated.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_rollout_rejection(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    log_ratio: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    rollout_rs: *const c_char,
    rollout_rs_threshold: *const c_char,
    rollout_token_veto_threshold: f64,
    flags: *mut i32,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let cu = host("cu_seqlens", cu_seqlens, b + 1)?;
        let veto = rollout_token_veto_threshold;
        // SAFETY: NUL-terminated strings (the caller's contract).
        let options = unsafe { text("rollout_rs", rollout_rs)? };
        // SAFETY: as above.
        let thresholds = unsafe { text("rollout_rs_threshold", rollout_rs_threshold)? };
        let criteria = RejectionCriterion::parse_verl_with_veto(
            options,
            thresholds,
            (veto != 0.0).then_some(veto),
        )?;
        raw::rollout_rejection(
            place(device, stream),
            arr(log_ratio, t),
            mask_arr(mask, mask_is_u8, t),
            cu,
            &criteria,
            out_arr(flags, t),
        )
    })
}

/// Rollout importance-sampling weights (verl's `compute_rollout_correction_weights`): f32 `weights`
/// `[T]` (on the device or, for `device < 0`, the host) of the log-ratios `old_logp - rollout_logp`,
/// 0 at masked tokens; `rollout_is` `"token"`, `"sequence"` or `"geometric"` and
/// `rollout_is_threshold` as verl's (`"2.0"`: truncate at 2; `"0.5_2.0"`: IcePop, weights outside
/// the band set to 0). `batch_normalize` != 0 divides the weights by their batch mean (verl's
/// `rollout_is_batch_normalize`). `stats` (nullable) gets 7 doubles on the host: the weight sum,
/// the units (mask sum or sequence count), the smallest and largest raw ratio, the weight of the
/// corrected units, the batch mean and the factor the weights were divided by (1 without
/// normalization). `cu_seqlens` `[num_seqs + 1]` on the host.
///
/// # Safety
/// Arrays of `num_tokens` elements in the memory of the call's place; the two strings non-null and
/// NUL-terminated; `stats` null or 7 writable doubles.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_rollout_is_weights(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    log_ratio: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    rollout_is: *const c_char,
    rollout_is_threshold: *const c_char,
    batch_normalize: i32,
    weights: *mut f32,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let cu = host("cu_seqlens", cu_seqlens, b + 1)?;
        // SAFETY: NUL-terminated strings (the caller's contract).
        let level = unsafe { text("rollout_is", rollout_is)? };
        // SAFETY: as above.
        let threshold = unsafe { text("rollout_is_threshold", rollout_is_threshold)? };
        let correction = recap::rollout_is::parse_verl(level, threshold)?;
        let st = raw::rollout_is_weights(
            place(device, stream),
            arr(log_ratio, t),
            mask_arr(mask, mask_is_u8, t),
            cu,
            &correction,
            batch_normalize != 0,
            out_arr(weights, t),
        )?;
        write_host(stats, &st.to_array());
        Ok(())
    })
}

/// The per-objective weighted reduction of losses `[T, K]` with the mask and layout of `batch`
/// (its sizes, `mask`, `cu_seqlens`, `lambda`, `membership`, `normalizers` and `seq_tokens`; the
/// per-token policy arrays and `objectives` are not read): `d total / d l` into `grad` `[T, K]`
/// (on the device or, for `device < 0`, the host); `total` and `objective_loss` `[K]` (nullable)
/// on the host. Aggregation and `norm_constant` from `cfg`.
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_weighted_reduce(
    device: i32,
    stream: *mut c_void,
    losses: *const f32,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    total: *mut f64,
    objective_loss: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let (c, t, b, k) = unsafe { batch_sizes(batch) }?;
        let cfg = config(cfg)?;
        let (cu, lambda, membership) = host_layout(c.cu_seqlens, b, c.lambda, k, c.membership)?;
        let norms = host_normalizers(c.normalizers, c.seq_tokens, k, b)?;
        if total.is_null() {
            return Err(Error::invalid_argument("total", "null pointer"));
        }
        host_outputs_disjoint(&[
            ("total", total as usize, 8),
            ("objective_loss", objective_loss as usize, 8 * k),
        ])?;
        let out = raw::weighted_reduce(
            place(device, stream),
            &ReduceInputs {
                losses: arr(losses, t * k),
                mask: mask_arr(c.mask, c.mask_is_u8, t),
                cu_seqlens: cu,
                lambda,
                membership,
                normalizers: norms.as_ref(),
            },
            &cfg,
            out_arr(grad, t * k),
        )?;
        write_host(total, &[out.total]);
        write_host(objective_loss, &out.objective_loss);
        Ok(())
    })
}
