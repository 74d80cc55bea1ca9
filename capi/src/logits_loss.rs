//! The fused-linear loss (synchronous and asynchronous) and the outputs of the losses from logits.

#[allow(unused_imports)]
use crate::prelude::*;

/// The chunked fused-linear GRPO loss: the log-probabilities of `head->labels` under
/// `head->hidden` `[T, H]` times `head->weight` `[V, H]` (bf16), scored against `batch` as
/// `recap_grpo_loss` scores its `logp` (`layout_on_device` 0; `policy_weight` null); writes
/// `d_hidden` `[T, H]` (bf16) and `d_weight` `[V, H]` (f32, overwritten), arrays on the device, or on
/// the host for `device < 0` (the reference, which ignores the chunking). `opts` (nullable: the
/// defaults of `recap_fused_linear_options_default`) sets the temperature, the chunking, f32 logits
/// and the batch-invariant mode. `result.loss` includes the entropy bonus; `stats` as in
/// `recap_grpo_loss`. Reads the result back (synchronizes `stream`):
/// `recap_fused_linear_grpo_loss_async` does not. On the device only the rows with a mask weight
/// other than 0 and a label other than `ignore_index` are computed (their valid mask is read back
/// first; the others' `d_hidden` rows are 0 and their labels are not checked).
///
/// # Safety
/// As `recap_grpo_loss`; `head` valid, `opts` null or valid.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss(
    device: i32,
    stream: *mut c_void,
    head: *const RecapLinearHead,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    opts: *const RecapFusedLinearOptions,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let batch = unsafe { Batch::new(batch, false) }?;
        // SAFETY: the caller's contract.
        let head = unsafe { Head::new(head, opts, batch.t) }?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, batch.k)?;
        let out = raw::fused_linear_grpo_loss(
            place(device, stream),
            &head.raw,
            &batch.logits_inputs(head.labels)?,
            &cfg,
            &head.lc,
            &head.opts,
            out_arr(d_hidden as *mut half::bf16, batch.t * head.h),
            out_arr(d_weight, head.v * head.h),
        )?;
        write_result(&out.grpo, out.loss, result, stats);
        Ok(())
    })
}

/// Length (f64s) of the output buffer of `recap_fused_linear_grpo_loss_async` for `num_objectives`
/// objectives (the total loss at index 0, then the fused loss's output and the entropy terms), or
/// -1 for a count outside 1..=16.
#[no_mangle]
pub extern "C" fn recap_logits_output_len(num_objectives: i32) -> i64 {
    match usize::try_from(num_objectives) {
        Ok(k) if (1..=recap::MAX_OBJECTIVES).contains(&k) => {
            recap::cuda::logits_output_len(k) as i64
        }
        _ => -1,
    }
}

/// Bytes of device workspace `recap_fused_linear_grpo_loss_async` needs for these sizes and `opts`
/// (nullable: the defaults), or -1 for a negative size or invalid options.
///
/// # Safety
/// `opts` null or a valid struct.
#[no_mangle]
pub unsafe extern "C" fn recap_fused_linear_workspace_len(
    num_tokens: i64,
    num_seqs: i64,
    num_objectives: i32,
    vocab: i64,
    opts: *const RecapFusedLinearOptions,
) -> i64 {
    let (Ok(t), Ok(b), Ok(k), Ok(v)) = (
        usize::try_from(num_tokens),
        usize::try_from(num_seqs),
        usize::try_from(num_objectives),
        usize::try_from(vocab),
    ) else {
        return -1;
    };
    // SAFETY: the caller's contract.
    match unsafe { linear_options(opts) } {
        Ok((_, opts)) => {
            i64::try_from(recap::cuda::fused_linear_workspace_len(t, b, k, v, &opts)).unwrap_or(-1)
        }
        Err(_) => -1,
    }
}

/// The chunked fused-linear GRPO loss without a host synchronization: on a device it enqueues every
/// kernel and GEMM of the call on `stream` (writing `d_hidden` and `d_weight` as
/// `recap_fused_linear_grpo_loss` does, intermediates in `workspace`, `workspace_bytes` >=
/// `recap_fused_linear_workspace_len`, and the results in `out`, `recap_logits_output_len(K)`
/// f64 of device memory; `out[0]` is the total loss) and returns; on the host (`device < 0`) the
/// reference fills the same layout at once. It computes every row, and refuses
/// `opts->batch_invariant`. With `batch->layout_on_device`, `cu_seqlens`, `lambda` and `membership`
/// are device pointers checked on the device, nothing is copied from the host and the call can be
/// captured in a CUDA graph (after one eager call of its size). Read the result with
/// `recap_logits_output_read`.
///
/// # Safety
/// As `recap_fused_linear_grpo_loss`; `workspace` and `out` device memory of the call's device.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss_async(
    device: i32,
    stream: *mut c_void,
    head: *const RecapLinearHead,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    opts: *const RecapFusedLinearOptions,
    workspace: *mut c_void,
    workspace_bytes: i64,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    out: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let batch = unsafe { Batch::new(batch, true) }?;
        // SAFETY: the caller's contract.
        let head = unsafe { Head::new(head, opts, batch.t) }?;
        let cfg = config(cfg)?;
        let ws = len("workspace_bytes", workspace_bytes)?;
        raw::fused_linear_grpo_loss_async(
            place(device, stream),
            &head.raw,
            &batch.logits_inputs(head.labels)?,
            batch.device_layout().as_ref(),
            &cfg,
            &head.lc,
            &head.opts,
            out_arr(workspace as *mut u8, ws),
            out_arr(d_hidden as *mut half::bf16, batch.t * head.h),
            out_arr(d_weight, head.v * head.h),
            out_arr(out, recap::cuda::logits_output_len(batch.k)),
        )?;
        Ok(())
    })
}

/// Reads the output `out` of a `recap_fused_linear_grpo_loss_async` call back (this synchronizes
/// `stream`) into `result` and `stats` (nullable), as `recap_fused_linear_grpo_loss` writes them;
/// `head`, `batch`, `cfg` and `opts` are the call's (only their sizes, options and which arrays
/// were given are read). Fails, naming the argument, on labels outside [0, V), a check made on the
/// device that failed, and non-finite inputs unless the config allows them.
///
/// # Safety
/// `head`, `batch`, `cfg` and `opts` as for the call; `out` must hold `recap_logits_output_len(K)`
/// f64 of `device`'s memory; `result` must be writable; `stats` null or `recap_grpo_stats_len(K)`
/// writable f64.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_logits_output_read(
    device: i32,
    stream: *mut c_void,
    head: *const RecapLinearHead,
    batch: *const RecapGrpoBatch,
    cfg: *const RecapGrpoConfig,
    opts: *const RecapFusedLinearOptions,
    out: *const f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let (k, has_ref, has_rollout) = unsafe { batch_outline(batch) }?;
        // SAFETY: the caller's contract.
        let v = unsafe { head.as_ref() }
            .ok_or_else(|| Error::invalid_argument("head", "null pointer"))?
            .vocab;
        let v = len("head.vocab", v)?;
        // SAFETY: the caller's contract.
        let (lc, _) = unsafe { linear_options(opts) }?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, k)?;
        let pending = recap::cuda::PendingLogitsLoss::new(k, has_ref, has_rollout, &cfg, &lc, v);
        let n_out = recap::cuda::logits_output_len(k);
        let o = raw::read_logits_output(place(device, stream), &pending, arr(out, n_out))?;
        write_result(&o.grpo, o.loss, result, stats);
        Ok(())
    })
}
