//! Log-probabilities, entropy and Σπ² from logits, and their in-place backward.

#[allow(unused_imports)]
use crate::prelude::*;

/// Runs the caller's macro `$go!(E)` with the logits element type of C code `dtype` (0 f32, 1 f16,
/// 2 bf16), or returns an error naming `dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $go:ident) => {
        match $dtype {
            0 => $go!(f32),
            1 => $go!(half::f16),
            2 => $go!(half::bf16),
            x => Err(Error::invalid_argument(
                "dtype",
                format!("expected 0 (f32), 1 (f16) or 2 (bf16), got {x}"),
            )),
        }
    };
}
pub(crate) use by_dtype;

/// The checked shape and options of a C call on logits.
pub(crate) struct LogitsShape {
    pub(crate) t: usize,
    pub(crate) v: usize,
    pub(crate) ld: usize,
    /// Elements the rows span: `(t - 1) ld + v`.
    pub(crate) span: usize,
    pub(crate) lc: LogprobConfig,
}

pub(crate) fn logits_shape(
    rows: i64,
    vocab: i64,
    ld: i64,
    temperature: f32,
    ignore_index: i32,
) -> Result<LogitsShape> {
    let (t, v, ld) = (len("rows", rows)?, len("vocab", vocab)?, len("ld", ld)?);
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    lc.validate()?;
    if ld < v {
        return Err(Error::invalid_argument(
            "ld",
            format!("expected ld >= vocab = {v}, got {ld}"),
        ));
    }
    let span = if t == 0 { 0 } else { (t - 1) * ld + v };
    Ok(LogitsShape { t, v, ld, span, lc })
}

/// Log-probabilities, entropy (nullable), LSE and Σπ² (nullable: the sum of the squared
/// probabilities, verl's `sum_pi_squared`) of `rows` rows of `vocab` logits (row stride `ld`
/// elements; `dtype` 0 f32, 1 f16, 2 bf16) at `temperature`, labels `ignore_index` giving 0.
///
/// # Safety
/// Arrays on the device (`device >= 0`) or the host (`device < 0`): `logits` [rows, ld], `labels`,
/// `logp`, `entropy`, `lse`, `sum_pi_squared` [rows]; `stream` nullable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_logprob_forward(
    device: i32,
    stream: *mut c_void,
    logits: *const c_void,
    dtype: i32,
    rows: i64,
    vocab: i64,
    ld: i64,
    labels: *const i32,
    temperature: f32,
    ignore_index: i32,
    logp: *mut f32,
    entropy: *mut f32,
    lse: *mut f32,
    sum_pi_squared: *mut f32,
) -> i32 {
    guard(|| {
        let LogitsShape { t, v, ld, span, lc } =
            logits_shape(rows, vocab, ld, temperature, ignore_index)?;
        let entropy = (!entropy.is_null()).then(|| out_arr(entropy, t));
        let sum_pi_squared = (!sum_pi_squared.is_null()).then(|| out_arr(sum_pi_squared, t));
        macro_rules! go {
            ($e:ty) => {
                raw::logprob_forward::<$e>(
                    place(device, stream),
                    &Logits {
                        data: arr(logits as *const $e, span),
                        rows: t,
                        vocab: v,
                        ld,
                    },
                    arr(labels, t),
                    &lc,
                    out_arr(logp, t),
                    entropy,
                    out_arr(lse, t),
                    sum_pi_squared,
                )
            };
        }
        by_dtype!(dtype, go)
    })
}

/// The gradient of `g_logp . logp + g_entropy . entropy + g_sum_pi_squared . sum_pi_squared` with
/// respect to the logits, written over the logits in place (`lse`, `entropy` and `sum_pi_squared`
/// from `recap_logprob_forward` at the same temperature; `g_entropy` nullable; `sum_pi_squared`
/// and `g_sum_pi_squared` both null or both given).
///
/// # Safety
/// As `recap_logprob_forward`; `logits` writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_logprob_backward_inplace(
    device: i32,
    stream: *mut c_void,
    logits: *mut c_void,
    dtype: i32,
    rows: i64,
    vocab: i64,
    ld: i64,
    labels: *const i32,
    lse: *const f32,
    entropy: *const f32,
    g_logp: *const f32,
    g_entropy: *const f32,
    sum_pi_squared: *const f32,
    g_sum_pi_squared: *const f32,
    temperature: f32,
    ignore_index: i32,
) -> i32 {
    guard(|| {
        backward(
            (device, stream),
            (logits, dtype, rows, vocab, ld),
            None,
            [
                labels as _,
                lse as _,
                entropy as _,
                g_logp as _,
                g_entropy as _,
                sum_pi_squared as _,
                g_sum_pi_squared as _,
            ],
            (temperature, ignore_index),
        )
    })
}

/// The logits backward of the C entry points: `logits` = (pointer, dtype, rows, vocab, ld), the
/// per-row arrays `[labels, lse, entropy, g_logp, g_entropy, sum_pi_squared, g_sum_pi_squared]`
/// (the last three nullable), and the shard's first vocabulary index for tensor parallelism.
pub(crate) fn backward(
    (device, stream): (i32, *mut c_void),
    (logits, dtype, rows, vocab, ld): (*mut c_void, i32, i64, i64, i64),
    vocab_start: Option<i64>,
    arrays: [*const c_void; 7],
    (temperature, ignore_index): (f32, i32),
) -> Result<()> {
    let LogitsShape { t, v, ld, span, lc } =
        logits_shape(rows, vocab, ld, temperature, ignore_index)?;
    let start = vocab_start.map(|s| len("vocab_start", s)).transpose()?;
    let [labels, lse, entropy, g_logp, g_entropy, spp, g_spp] = arrays;
    let sum_pi_squared = match (spp.is_null(), g_spp.is_null()) {
        (true, true) => None,
        (false, false) => Some((arr(spp as *const f32, t), arr(g_spp as *const f32, t))),
        _ => {
            return Err(Error::invalid_argument(
                if spp.is_null() {
                    "sum_pi_squared"
                } else {
                    "g_sum_pi_squared"
                },
                "expected sum_pi_squared and g_sum_pi_squared both null or both given",
            ))
        }
    };
    let grads = raw::LogprobGrads {
        labels: arr(labels as *const i32, t),
        lse: arr(lse as *const f32, t),
        entropy: arr(entropy as *const f32, t),
        g_logp: arr(g_logp as *const f32, t),
        g_entropy: opt_arr(g_entropy as *const f32, t),
        sum_pi_squared,
    };
    macro_rules! go {
        ($e:ty) => {
            raw::logprob_backward_inplace::<$e>(
                place(device, stream),
                &Logits {
                    data: out_arr(logits as *mut $e, span),
                    rows: t,
                    vocab: v,
                    ld,
                },
                &grads,
                &lc,
                start,
            )
        };
    }
    by_dtype!(dtype, go)
}
