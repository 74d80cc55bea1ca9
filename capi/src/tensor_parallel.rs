//! The tensor-parallel log-probs: a shard's partials, their combine and the shard's backward.

#[allow(unused_imports)]
use crate::prelude::*;

/// Vocabulary parallelism, step 1: one shard's partial statistics of each row into `partials`
/// [planes, T] (the shard's LSE, entropy, label logit or -inf, and with `planes` = 4 the shard's
/// own sum_j p_j^2, for verl's sum_pi_squared) for `logits` holding the columns
/// [vocab_start, vocab_start + vocab) of the whole vocabulary; `labels` are global. All-gather the
/// partials (and each shard's vocab_start) over the tensor-parallel group, then
/// `recap_tp_combine`.
///
/// # Safety
/// As `recap_logprob_forward`; `partials` planes * rows writable floats.
#[no_mangle]
pub unsafe extern "C" fn recap_tp_partials(
    device: i32,
    stream: *mut c_void,
    logits: *const RecapLogits,
    planes: i32,
    partials: *mut f32,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let z = unsafe { LogitsArg::new(logits, true) }?;
        let planes = tp_planes(planes)?;
        macro_rules! go {
            ($e:ty) => {
                raw::tp_partials::<$e>(
                    place(device, stream),
                    &z.view::<$e>(),
                    z.labels(),
                    z.start.unwrap_or(0),
                    &z.lc,
                    out_arr(partials, planes * z.t),
                )
            };
        }
        by_dtype!(z.c.dtype, go)
    })
}

/// Vocabulary parallelism, step 2: the combine of `shards` shards' partials [P, planes, T]
/// (ordered by ascending vocab_start) into `logp`, `entropy` and `lse` [T] over the whole
/// vocabulary (labels equal to ignore_index give logp 0; a label in no shard is an error), and,
/// with `planes` = 4 and `sum_pi_squared` non-null, its sum_j p_j^2 [T].
///
/// # Safety
/// Arrays on the device (host for device < 0) of the stated sizes; `sum_pi_squared` null or [T].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_tp_combine(
    device: i32,
    stream: *mut c_void,
    partials: *const f32,
    shards: i32,
    planes: i32,
    rows: i64,
    labels: *const i32,
    ignore_index: i32,
    logp: *mut f32,
    entropy: *mut f32,
    lse: *mut f32,
    sum_pi_squared: *mut f32,
) -> i32 {
    guard(|| {
        let t = len("rows", rows)?;
        let p = len("shards", shards as i64)?;
        let planes = tp_planes(planes)?;
        let lc = LogprobConfig {
            ignore_index,
            ..LogprobConfig::default()
        };
        raw::tp_combine(
            place(device, stream),
            arr(partials, p * planes * t),
            p,
            arr(labels, t),
            &lc,
            out_arr(logp, t),
            out_arr(entropy, t),
            out_arr(lse, t),
            (!sum_pi_squared.is_null()).then(|| out_arr(sum_pi_squared, t)),
        )
    })
}

/// The number of planes of tensor-parallel partials: 3, or 4 with sum_j p_j^2.
pub(crate) fn tp_planes(planes: i32) -> Result<usize> {
    match planes {
        3 | 4 => Ok(planes as usize),
        _ => Err(Error::invalid_argument(
            "planes",
            format!("expected 3 or 4 (with sum_pi_squared), got {planes}"),
        )),
    }
}

/// Vocabulary parallelism, step 3: the shard's slice of the gradient of
/// `g_logp . logp + g_entropy . entropy (+ g_sum_pi_squared . sum_pi_squared)` over the whole
/// vocabulary, written over the shard's logits (`logits.vocab_start` its first column), from the
/// combined `lse`, `entropy` (and `sum_pi_squared`) of `recap_tp_combine` in `grads` (no
/// collective).
///
/// # Safety
/// As `recap_logprob_backward_inplace`.
#[no_mangle]
pub unsafe extern "C" fn recap_tp_backward_inplace(
    device: i32,
    stream: *mut c_void,
    logits: *const RecapLogits,
    grads: *const RecapLogprobGrads,
) -> i32 {
    // SAFETY: the caller's contract.
    guard(|| unsafe { backward(place(device, stream), logits, grads, true) })
}
