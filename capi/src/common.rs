//! The boundary's machinery: the last error, the status code of an error, the panic guard, the
//! version, and the host arrays, layout and raw arrays every entry point builds from its pointers.

#[allow(unused_imports)]
use crate::prelude::*;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub(crate) fn code(e: &Error) -> i32 {
    match e {
        Error::InvalidArgument { .. } => RECAP_ERR_ARGUMENT,
        Error::NonFinite { .. } => RECAP_ERR_NONFINITE,
        Error::NoKernels | Error::NoDevice(_) | Error::Driver(_) => RECAP_ERR_DEVICE,
        // a kind of error this ABI version does not know: the message says what it was
        _ => RECAP_ERR_INTERNAL,
    }
}

/// Runs `f`, turning errors and panics into a status code and the thread's last error.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            RECAP_OK
        }
        Ok(Err(e)) => {
            set_error(&e.to_string());
            code(&e)
        }
        Err(_) => {
            set_error("internal error (a panic was caught at the C boundary)");
            RECAP_ERR_INTERNAL
        }
    }
}

/// The message of the last failed call on this thread ("" after a success). Valid until the next
/// call on this thread.
#[no_mangle]
pub extern "C" fn recap_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The crate version, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn recap_version() -> *const c_char {
    static V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(c) => c,
            Err(_) => c"",
        };
    V.as_ptr()
}

/// A host array of `n` elements (null allowed when `n == 0`).
pub(crate) fn host<'a, T>(arg: &'static str, p: *const T, n: usize) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::invalid_argument(arg, "null pointer"));
    }
    // SAFETY: non-null; the C caller guarantees `n` readable elements (documented in the header).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// K of a call, checked: 1 to 16 objectives.
pub(crate) fn objectives_count(n: i32) -> Result<usize> {
    match usize::try_from(n) {
        Ok(k) if (1..=recap::MAX_OBJECTIVES).contains(&k) => Ok(k),
        _ => Err(Error::invalid_argument(
            "num_objectives",
            format!("expected 1 <= K <= {}, got {n}", recap::MAX_OBJECTIVES),
        )),
    }
}

pub(crate) fn len(arg: &'static str, n: i64) -> Result<usize> {
    usize::try_from(n)
        .map_err(|_| Error::invalid_argument(arg, format!("expected a size >= 0, got {n}")))
}

/// The host arrays of a batch's layout that the loss entry points take: `cu_seqlens [B + 1]`,
/// `lambda [K]` and, when not null, `membership [B]`.
type HostLayout<'a> = (&'a [i32], &'a [f32], Option<&'a [u32]>);

pub(crate) fn host_layout<'a>(
    cu_seqlens: *const i32,
    b: usize,
    lambda: *const f32,
    k: usize,
    membership: *const u32,
) -> Result<HostLayout<'a>> {
    let cu = host("cu_seqlens", cu_seqlens, b + 1)?;
    let lambda = host("lambda", lambda, k)?;
    let membership = if membership.is_null() {
        None
    } else {
        Some(host("membership", membership, b)?)
    };
    Ok((cu, lambda, membership))
}

/// `objectives [K]` (0 policy, 1 NLL) as objective kinds.
pub(crate) fn host_objectives(objectives: *const i32, k: usize) -> Result<Vec<ObjectiveKind>> {
    raw::objective_kinds(host("objectives", objectives, k)?)
}

/// Global normalizers from the host arrays `normalizers [2, K + 1]` (token weights, then sequence
/// counts; null: none) and `seq_tokens [B]` (nullable).
pub(crate) fn host_normalizers(
    normalizers: *const f64,
    seq_tokens: *const f64,
    k: usize,
    b: usize,
) -> Result<Option<Normalizers>> {
    if normalizers.is_null() {
        if !seq_tokens.is_null() {
            return Err(Error::invalid_argument(
                "seq_tokens",
                "given without normalizers (pass both, or neither)",
            ));
        }
        return Ok(None);
    }
    let n = host("normalizers", normalizers, 2 * (k + 1))?;
    let st = if seq_tokens.is_null() {
        None
    } else {
        Some(host("seq_tokens", seq_tokens, b)?.to_vec())
    };
    Ok(Some(Normalizers {
        tokens: n[..=k].to_vec(),
        seqs: n[k + 1..].to_vec(),
        seq_tokens: st,
    }))
}

/// Where a call runs: the host (the CPU reference, on host pointers) for `device < 0`, else CUDA
/// device `device` on `stream`.
pub(crate) fn place(device: i32, stream: *mut c_void) -> Place {
    match usize::try_from(device) {
        Ok(d) => Place::Cuda {
            device: d,
            stream: stream as usize,
        },
        Err(_) => Place::Host,
    }
}

/// A caller's array of `n` elements (a null pointer gives an empty one, which the op rejects
/// where it needs `n > 0` elements).
pub(crate) fn arr<T>(p: *const T, n: usize) -> In<T> {
    let n = if p.is_null() { 0 } else { n };
    // SAFETY: the C caller guarantees `n` readable elements at every non-null pointer, in the
    // memory of the call's place, for the call (documented in the header).
    unsafe { In::new(p as usize, n) }
}

pub(crate) fn opt_arr<T>(p: *const T, n: usize) -> Option<In<T>> {
    (!p.is_null()).then(|| arr(p, n))
}

pub(crate) fn out_arr<T>(p: *mut T, n: usize) -> Out<T> {
    let n = if p.is_null() { 0 } else { n };
    // SAFETY: as `arr`, for writable elements used by nobody else during the call.
    unsafe { Out::new(p as usize, n) }
}

/// A caller's mask `[n]`, u8 or f32.
pub(crate) fn mask_arr(mask: *const c_void, is_u8: i32, n: usize) -> Mask<In<f32>, In<u8>> {
    if is_u8 != 0 {
        Mask::U8(arr(mask as *const u8, n))
    } else {
        Mask::F32(arr(mask as *const f32, n))
    }
}

pub(crate) fn adv_arr(
    advantages: *const f32,
    per_token: i32,
    t: usize,
    b: usize,
    k: usize,
) -> Advantages<In<f32>> {
    if per_token != 0 {
        Advantages::PerToken(arr(advantages, t * k))
    } else {
        Advantages::PerSequence(arr(advantages, b * k))
    }
}

/// The caller's string argument `name`: an error if it is null or not UTF-8.
///
/// # Safety
/// `p` null or a NUL-terminated string that outlives the call.
pub(crate) unsafe fn text<'a>(name: &'static str, p: *const c_char) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid_argument(name, "null pointer"));
    }
    // SAFETY: non-null NUL-terminated string (the caller's contract).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::invalid_argument(name, "not UTF-8"))
}

/// Writes `values` to the caller's host array `out` when it is not null.
/// Errors unless the host outputs `(name, address, bytes)` (null ones skipped) are pairwise disjoint:
/// an output overlapping another would be overwritten by it.
pub(crate) fn host_outputs_disjoint(outs: &[(&'static str, usize, usize)]) -> Result<()> {
    for (i, &(a, pa, na)) in outs.iter().enumerate() {
        for &(b, pb, nb) in &outs[i + 1..] {
            if pa != 0 && pb != 0 && na > 0 && nb > 0 && pa < pb + nb && pb < pa + na {
                return Err(Error::invalid_argument(
                    b,
                    format!("overlaps `{a}`: an output may not share memory with another"),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn write_host(out: *mut f64, values: &[f64]) {
    if !out.is_null() {
        // SAFETY: the caller guarantees `values.len()` writable doubles (documented per function).
        unsafe { std::slice::from_raw_parts_mut(out, values.len()) }.copy_from_slice(values);
    }
}
