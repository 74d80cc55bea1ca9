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
                "logits.dtype",
                format!("expected 0 (f32), 1 (f16) or 2 (bf16), got {x}"),
            )),
        }
    };
}
pub(crate) use by_dtype;

/// Logits in the caller's memory with the labels they score and the log-probs' options: the
/// argument of every call on logits (`recap_logprob_forward`, `recap_logprob_backward_inplace`,
/// `recap_tp_partials`, `recap_tp_backward_inplace`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapLogits {
    /// `[rows, ld]` logits of `dtype`, row-major with a row stride of `ld` elements (the backward
    /// calls write the gradient over them; the other calls only read them).
    pub data: *mut c_void,
    /// 0 f32, 1 f16, 2 bf16.
    pub dtype: i32,
    /// The label that excludes a row: its logp 0, no gradient (verl's and TRL's -100).
    pub ignore_index: i32,
    /// Rows T.
    pub rows: i64,
    /// Columns V (under tensor parallelism, the shard's own).
    pub vocab: i64,
    /// Row stride in elements, >= `vocab`.
    pub ld: i64,
    /// Tensor parallelism: the shard's first column in the whole vocabulary (the unsharded calls
    /// take 0).
    pub vocab_start: i64,
    /// `[rows]` token ids (of the whole vocabulary).
    pub labels: *const i32,
    /// Temperature tau > 0: the log-probabilities of `logits / tau`.
    pub temperature: f32,
}

/// A logits backward's inputs besides the logits: the forward's statistics at the same temperature
/// (under tensor parallelism the whole vocabulary's, from `recap_tp_combine`) and the upstream
/// gradients, `[rows]` each.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapLogprobGrads {
    /// The forward's LSE.
    pub lse: *const f32,
    /// The forward's entropy.
    pub entropy: *const f32,
    /// dL/dlogp.
    pub g_logp: *const f32,
    /// dL/dentropy, or null.
    pub g_entropy: *const f32,
    /// The forward's Σπ², or null (with `g_sum_pi_squared`: both null or both given).
    pub sum_pi_squared: *const f32,
    /// dL/dΣπ², or null.
    pub g_sum_pi_squared: *const f32,
}

/// A checked `RecapLogits`: sizes, the elements the rows span (`(t - 1) ld + v`), the options and
/// the shard's first column (`None` for an unsharded call).
pub(crate) struct LogitsArg {
    pub(crate) t: usize,
    pub(crate) v: usize,
    pub(crate) ld: usize,
    pub(crate) span: usize,
    pub(crate) lc: LogprobConfig,
    pub(crate) start: Option<usize>,
    pub(crate) c: RecapLogits,
}

impl LogitsArg {
    /// Checks `logits`; `sharded`: a tensor-parallel shard's call (else `vocab_start` must be 0).
    ///
    /// # Safety
    /// `logits` null or a valid struct.
    pub(crate) unsafe fn new(logits: *const RecapLogits, sharded: bool) -> Result<Self> {
        // SAFETY: checked for null; the caller guarantees a valid struct.
        let c = *unsafe { logits.as_ref() }
            .ok_or_else(|| Error::invalid_argument("logits", "null pointer"))?;
        let (t, v, ld) = (
            len("logits.rows", c.rows)?,
            len("logits.vocab", c.vocab)?,
            len("logits.ld", c.ld)?,
        );
        let lc = LogprobConfig {
            temperature: c.temperature,
            ignore_index: c.ignore_index,
        };
        lc.validate()?;
        if ld < v {
            return Err(Error::invalid_argument(
                "logits.ld",
                format!("expected ld >= vocab = {v}, got {ld}"),
            ));
        }
        let start = len("logits.vocab_start", c.vocab_start)?;
        if !sharded && start != 0 {
            return Err(Error::invalid_argument(
                "logits.vocab_start",
                format!("expected 0 for unsharded logits (a shard: recap_tp_*), got {start}"),
            ));
        }
        let span = if t == 0 { 0 } else { (t - 1) * ld + v };
        Ok(LogitsArg {
            t,
            v,
            ld,
            span,
            lc,
            start: sharded.then_some(start),
            c,
        })
    }

    /// The logits as a raw read-only view of element type `E`.
    pub(crate) fn view<E>(&self) -> Logits<In<E>> {
        Logits {
            data: arr(self.c.data as *const E, self.span),
            rows: self.t,
            vocab: self.v,
            ld: self.ld,
        }
    }

    /// The labels, `[rows]`.
    pub(crate) fn labels(&self) -> In<i32> {
        arr(self.c.labels, self.t)
    }
}

/// Log-probabilities, entropy (nullable), LSE and Σπ² (nullable: the sum of the squared
/// probabilities, verl's `sum_pi_squared`) of each row of `logits` (unsharded: `vocab_start` 0).
///
/// # Safety
/// `logits` valid; arrays on the device (`device >= 0`) or the host (`device < 0`): `logits.data`
/// [rows, ld], `logits.labels`, `logp`, `entropy`, `lse`, `sum_pi_squared` [rows]; `stream`
/// nullable.
#[no_mangle]
pub unsafe extern "C" fn recap_logprob_forward(
    device: i32,
    stream: *mut c_void,
    logits: *const RecapLogits,
    logp: *mut f32,
    entropy: *mut f32,
    lse: *mut f32,
    sum_pi_squared: *mut f32,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let z = unsafe { LogitsArg::new(logits, false) }?;
        let t = z.t;
        let entropy = (!entropy.is_null()).then(|| out_arr(entropy, t));
        let sum_pi_squared = (!sum_pi_squared.is_null()).then(|| out_arr(sum_pi_squared, t));
        macro_rules! go {
            ($e:ty) => {
                raw::logprob_forward::<$e>(
                    place(device, stream),
                    &z.view::<$e>(),
                    z.labels(),
                    &z.lc,
                    out_arr(logp, t),
                    entropy,
                    out_arr(lse, t),
                    sum_pi_squared,
                )
            };
        }
        by_dtype!(z.c.dtype, go)
    })
}

/// The gradient of `g_logp . logp + g_entropy . entropy + g_sum_pi_squared . sum_pi_squared` with
/// respect to the logits, written over `logits.data` in place, from `grads` (the statistics of
/// `recap_logprob_forward` at the same temperature).
///
/// # Safety
/// As `recap_logprob_forward`; `logits.data` writable; `grads` valid, its arrays [rows].
#[no_mangle]
pub unsafe extern "C" fn recap_logprob_backward_inplace(
    device: i32,
    stream: *mut c_void,
    logits: *const RecapLogits,
    grads: *const RecapLogprobGrads,
) -> i32 {
    // SAFETY: the caller's contract.
    guard(|| unsafe { backward(place(device, stream), logits, grads, false) })
}

/// The logits backward of the C entry points (`sharded`: a tensor-parallel shard's slice).
///
/// # Safety
/// As `recap_logprob_backward_inplace`.
pub(crate) unsafe fn backward(
    at: Place,
    logits: *const RecapLogits,
    grads: *const RecapLogprobGrads,
    sharded: bool,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let z = unsafe { LogitsArg::new(logits, sharded) }?;
    // SAFETY: checked for null; the caller guarantees a valid struct.
    let g = *unsafe { grads.as_ref() }
        .ok_or_else(|| Error::invalid_argument("grads", "null pointer"))?;
    let t = z.t;
    let sum_pi_squared = match (g.sum_pi_squared.is_null(), g.g_sum_pi_squared.is_null()) {
        (true, true) => None,
        (false, false) => Some((arr(g.sum_pi_squared, t), arr(g.g_sum_pi_squared, t))),
        _ => {
            return Err(Error::invalid_argument(
                if g.sum_pi_squared.is_null() {
                    "grads.sum_pi_squared"
                } else {
                    "grads.g_sum_pi_squared"
                },
                "expected sum_pi_squared and g_sum_pi_squared both null or both given",
            ))
        }
    };
    let grads = raw::LogprobGrads {
        labels: z.labels(),
        lse: arr(g.lse, t),
        entropy: arr(g.entropy, t),
        g_logp: arr(g.g_logp, t),
        g_entropy: opt_arr(g.g_entropy, t),
        sum_pi_squared,
    };
    macro_rules! go {
        ($e:ty) => {
            raw::logprob_backward_inplace::<$e>(
                at,
                &Logits {
                    data: out_arr(z.c.data as *mut $e, z.span),
                    rows: t,
                    vocab: z.v,
                    ld: z.ld,
                },
                &grads,
                &z.lc,
                z.start,
            )
        };
    }
    by_dtype!(z.c.dtype, go)
}
