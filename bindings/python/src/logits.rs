//! Log-probabilities, entropy and Σπ² from logits, and their in-place backward.

#[allow(unused_imports)]
use crate::prelude::*;

/// A `[T, V]` logits tensor (rows may be `ld >= V` elements apart) as raw logits of element `E`.
pub(crate) fn logits_layout(
    call: &Call,
    name: &'static str,
    obj: &Bound<'_, PyAny>,
) -> PyResult<(Tensor, usize, usize, usize)> {
    let t = call.tensor(name, obj)?;
    if t.shape.len() != 2 {
        return Err(arg_err(
            name,
            format!("expected [T, V] logits, got shape {}", t.shape_str()),
        ));
    }
    let (rows, vocab) = (t.shape[0], t.shape[1]);
    let ld = if rows <= 1 { vocab } else { t.strides[0] };
    if vocab > 1 && t.strides[1] != 1 || ld < vocab {
        return Err(arg_err(
            name,
            format!(
                "expected rows of contiguous elements (strides [ld >= V, 1]), got shape {} with \
                 strides {:?} (call .contiguous())",
                t.shape_str(),
                t.strides
            ),
        ));
    }
    if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(arg_err(
            name,
            format!(
                "expected dtype torch.float32, torch.float16 or torch.bfloat16, got {}",
                t.dtype.name()
            ),
        ));
    }
    Ok((t, rows, vocab, ld))
}

pub(crate) fn span(rows: usize, vocab: usize, ld: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + vocab
    }
}

pub(crate) fn logits_in<E>(t: &Tensor, rows: usize, vocab: usize, ld: usize) -> Logits<In<E>> {
    Logits {
        // SAFETY: a live tensor whose rows of `vocab` elements start `ld` apart (checked by
        // `logits_layout`): `span` elements of E from `data_ptr`.
        data: unsafe { In::new(t.addr, span(rows, vocab, ld)) },
        rows,
        vocab,
        ld,
    }
}

pub(crate) fn logits_out<E>(t: &Tensor, rows: usize, vocab: usize, ld: usize) -> Logits<Out<E>> {
    Logits {
        // SAFETY: as `logits_in`; the op that writes it declares the mutation (mutates_args).
        data: unsafe { Out::new(t.addr, span(rows, vocab, ld)) },
        rows,
        vocab,
        ld,
    }
}

/// Runs `$go!(E)` for the element type of a logits tensor.
macro_rules! by_dtype {
    ($t:expr, $go:ident) => {
        match $t.dtype {
            DType::F32 => $go!(f32),
            DType::F16 => $go!(half::f16),
            _ => $go!(half::bf16),
        }
    };
}
pub(crate) use by_dtype;

/// Log-probabilities, entropy, LSE and (optionally) Σπ² ([T] float32 each) of `logits` [T, V].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, temperature, ignore_index, logp, entropy, lse, sum_pi_squared=None))]
pub(crate) fn logprob_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    temperature: f32,
    ignore_index: i32,
    logp: &Bound<'_, PyAny>,
    entropy: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    sum_pi_squared: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let y = call.i32("labels", labels)?;
    let (lp, h, l) = (
        call.out_f32("logp", logp)?,
        call.out_f32("entropy", entropy)?,
        call.out_f32("lse", lse)?,
    );
    let spp = sum_pi_squared
        .map(|o| call.out_f32("sum_pi_squared", o))
        .transpose()?;
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_in::<$e>(&t, rows, vocab, ld);
            py.detach(|| raw::logprob_forward::<$e>(call.place, &z, y, &lc, lp, Some(h), l, spp))
        }};
    }
    by_dtype!(t, go).map_err(err)
}

/// The gradient of `g_logp . logp + g_entropy . entropy (+ g_sum_pi_squared . sum_pi_squared)`
/// with respect to `logits`, written over `logits` in place.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index,
                    sum_pi_squared=None, g_sum_pi_squared=None))]

pub(crate) fn logprob_backward_(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    entropy: &Bound<'_, PyAny>,
    g_logp: &Bound<'_, PyAny>,
    g_entropy: Option<&Bound<'_, PyAny>>,
    temperature: f32,
    ignore_index: i32,
    sum_pi_squared: Option<&Bound<'_, PyAny>>,
    g_sum_pi_squared: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    backward(
        py,
        logits,
        [labels, lse, entropy, g_logp],
        (g_entropy, spp_pair(sum_pi_squared, g_sum_pi_squared)?),
        None,
        (temperature, ignore_index),
    )
}

/// `(sum_pi_squared, g_sum_pi_squared)` of a backward: both given or both None.
#[allow(clippy::type_complexity)]
pub(crate) fn spp_pair<'a, 'py>(
    sum_pi_squared: Option<&'a Bound<'py, PyAny>>,
    g_sum_pi_squared: Option<&'a Bound<'py, PyAny>>,
) -> PyResult<Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>> {
    match (sum_pi_squared, g_sum_pi_squared) {
        (None, None) => Ok(None),
        (Some(s), Some(g)) => Ok(Some((s, g))),
        (s, _) => Err(arg_err(
            if s.is_none() {
                "sum_pi_squared"
            } else {
                "g_sum_pi_squared"
            },
            "expected sum_pi_squared and g_sum_pi_squared both given or both None",
        )),
    }
}

/// The logits backward of both entry points: in place over `logits`, from `[labels, lse, entropy,
/// g_logp]`, `g_entropy` and `(sum_pi_squared, g_sum_pi_squared)`; with `vocab_start`, the shard's
/// slice of the whole gradient.
#[allow(clippy::type_complexity)]
pub(crate) fn backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    [labels, lse, entropy, g_logp]: [&Bound<'_, PyAny>; 4],
    (g_entropy, spp): (
        Option<&Bound<'_, PyAny>>,
        Option<(&Bound<'_, PyAny>, &Bound<'_, PyAny>)>,
    ),
    vocab_start: Option<usize>,
    (temperature, ignore_index): (f32, i32),
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let grads = raw::LogprobGrads {
        labels: call.i32("labels", labels)?,
        lse: call.f32("lse", lse)?,
        entropy: call.f32("entropy", entropy)?,
        g_logp: call.f32("g_logp", g_logp)?,
        g_entropy: call.opt_f32("g_entropy", g_entropy)?,
        sum_pi_squared: match spp {
            Some((s, g)) => Some((
                call.f32("sum_pi_squared", s)?,
                call.f32("g_sum_pi_squared", g)?,
            )),
            None => None,
        },
    };
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_out::<$e>(&t, rows, vocab, ld);
            py.detach(|| {
                raw::logprob_backward_inplace::<$e>(call.place, &z, &grads, &lc, vocab_start)
            })
        }};
    }
    by_dtype!(t, go).map_err(err)
}

/// Registers this family's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(logprob_forward, m)?)?;
    m.add_function(wrap_pyfunction!(logprob_backward_, m)?)?;
    Ok(())
}
