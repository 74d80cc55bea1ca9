//! RECAP's scheduler behind an opaque handle.

#[allow(unused_imports)]
use crate::prelude::*;

/// An opaque RECAP scheduler.
pub struct RecapSchedulerHandle(RecapScheduler);

/// A scheduler for `k` objectives (`orientations` [K]: 0 loss, 1 reward) with the options in
/// `options_json` (the fields of `RecapConfig`, e.g. `{"window": 10, "priority": "alpha_mix",
/// "alpha": 0.5}`; null or "" for the defaults, the paper's equations). Null on error (see
/// `recap_last_error`).
///
/// # Safety
/// `orientations` must hold `k` ints; `options_json` null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_new(
    orientations: *const i32,
    k: i32,
    options_json: *const c_char,
) -> *mut RecapSchedulerHandle {
    let mut h = std::ptr::null_mut();
    guard(|| {
        let k = len("k", k as i64)?;
        let o = host("orientations", orientations, k)?
            .iter()
            .map(|&x| pick("orientations", &[Orientation::Loss, Orientation::Reward], x))
            .collect::<Result<Vec<_>>>()?;
        let json = if options_json.is_null() {
            ""
        } else {
            // SAFETY: non-null NUL-terminated string (the caller's contract).
            unsafe { text("options_json", options_json)? }
        };
        let cfg = RecapConfig::from_json(if json.is_empty() { "{}" } else { json })?;
        h = Box::into_raw(Box::new(RecapSchedulerHandle(RecapScheduler::new(
            &o, cfg,
        )?)));
        Ok(())
    });
    h
}

pub(crate) fn handle<'a>(h: *mut RecapSchedulerHandle) -> Result<&'a mut RecapScheduler> {
    // SAFETY: non-null handles come from recap_scheduler_new / _from_json and are not freed yet
    // (the caller's contract).
    unsafe { h.as_mut() }
        .map(|x| &mut x.0)
        .ok_or_else(|| Error::invalid_argument("scheduler", "null handle"))
}

/// Records one step's monitored values (`values` [K]).
///
/// # Safety
/// `h` from `recap_scheduler_new`; `values` K doubles.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_observe(
    h: *mut RecapSchedulerHandle,
    values: *const f64,
    k: i32,
) -> i32 {
    guard(|| {
        let s = handle(h)?;
        let v = host("values", values, len("k", k as i64)?)?;
        s.observe(v)
    })
}

/// The current weights into `out` [K].
///
/// # Safety
/// `h` from `recap_scheduler_new`; `out` K writable floats.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_weights(
    h: *mut RecapSchedulerHandle,
    out: *mut f32,
    k: i32,
) -> i32 {
    guard(|| {
        let s = handle(h)?;
        let k = len("k", k as i64)?;
        if k != s.num_objectives() {
            return Err(Error::invalid_argument(
                "k",
                format!(
                    "the scheduler has {} objectives, got k = {k}",
                    s.num_objectives()
                ),
            ));
        }
        if out.is_null() {
            return Err(Error::invalid_argument("out", "null pointer"));
        }
        // SAFETY: non-null; the caller guarantees k writable floats.
        unsafe { std::slice::from_raw_parts_mut(out, k) }.copy_from_slice(&s.weights());
        Ok(())
    })
}

/// The state as JSON into `buf` (`cap` bytes, NUL-terminated); `*needed` gets the length plus 1.
/// With `buf` null or too small nothing is written and the status is `RECAP_ERR_ARGUMENT` (call
/// again with `*needed` bytes).
///
/// # Safety
/// `h` from `recap_scheduler_new`; `buf` `cap` writable bytes or null; `needed` writable.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_to_json(
    h: *mut RecapSchedulerHandle,
    buf: *mut c_char,
    cap: i64,
    needed: *mut i64,
) -> i32 {
    guard(|| {
        let json = handle(h)?.to_json()?;
        let n = json.len() + 1;
        // SAFETY: checked non-null; the caller guarantees a writable i64.
        if let Some(nd) = unsafe { needed.as_mut() } {
            *nd = n as i64;
        }
        if buf.is_null() || (cap as usize) < n || cap < 0 {
            return Err(Error::invalid_argument(
                "buf",
                format!("needs {n} bytes, got {cap}"),
            ));
        }
        // SAFETY: buf holds at least n bytes (checked); the JSON has no interior NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(json.as_ptr(), buf as *mut u8, json.len());
            *buf.add(json.len()) = 0;
        }
        Ok(())
    })
}

/// A scheduler restored from `recap_scheduler_to_json`'s output (null on error).
///
/// # Safety
/// `json` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_from_json(
    json: *const c_char,
) -> *mut RecapSchedulerHandle {
    let mut h = std::ptr::null_mut();
    guard(|| {
        // SAFETY: a NUL-terminated string (the caller's contract).
        let s = unsafe { text("json", json)? };
        h = Box::into_raw(Box::new(RecapSchedulerHandle(RecapScheduler::from_json(
            s,
        )?)));
        Ok(())
    });
    h
}

/// Frees a scheduler (null is ignored).
///
/// # Safety
/// `h` from `recap_scheduler_new` / `_from_json`, freed once.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_free(h: *mut RecapSchedulerHandle) {
    if !h.is_null() {
        // SAFETY: created by Box::into_raw in this module and not freed before (the contract).
        drop(unsafe { Box::from_raw(h) });
    }
}
