//! The C ABI of recap-kernels (`capi/include/recap_kernels.h`, generated from this file by
//! cbindgen): raw pointers, sizes and a `CUstream` in the caller's
//! device's primary context (the one PyTorch uses), or host pointers for `device < 0` (the CPU
//! reference computes). Every function returns a status code
//! (`RECAP_OK` = 0) and `recap_last_error()` gives the message of the last failure on the calling
//! thread; no panic crosses the boundary (each body runs under `catch_unwind`). Arguments are
//! checked (null pointers, sizes, options) before anything touches the device.
//!
//! Each entry point translates its arguments into [`recap::raw`]'s arrays, which borrow the
//! caller's buffers for the call (device buffers are never freed here, the caller's stream never
//! destroyed) and check that outputs overlap nothing.

use recap::advantages::{AdvantageConfig, AdvantageMode};
use recap::config::{
    AggMode, GrpoConfig, IsLevel, IsMode, KlEstimator, Normalizers, ObjectiveKind, PolicyLoss,
    RolloutCorrection,
};
use recap::error::{Error, Result};
use recap::layout::{Advantages, GrpoInputs, Mask, ReduceInputs};
use recap::logits::{Logits, LogitsLossInputs, LogprobConfig};
use recap::output::GrpoOutput;
use recap::raw::{self, In, Out, Place};
use recap::recap::{Orientation, RecapConfig, RecapScheduler};
use recap::rejection::RejectionCriterion;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Success.
pub const RECAP_OK: i32 = 0;
/// An argument has the wrong shape or value (nothing was launched).
pub const RECAP_ERR_ARGUMENT: i32 = 1;
/// Non-finite inputs at unmasked tokens (and `allow_nonfinite` is off).
pub const RECAP_ERR_NONFINITE: i32 = 2;
/// No kernels, driver or device, or a CUDA error.
pub const RECAP_ERR_DEVICE: i32 = 3;
/// An internal error (a caught panic): please report it.
pub const RECAP_ERR_INTERNAL: i32 = 4;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn code(e: &Error) -> i32 {
    match e {
        Error::InvalidArgument { .. } => RECAP_ERR_ARGUMENT,
        Error::NonFinite { .. } => RECAP_ERR_NONFINITE,
        Error::NoKernels | Error::NoDevice(_) | Error::Driver(_) => RECAP_ERR_DEVICE,
        // a kind of error this ABI version does not know: the message says what it was
        _ => RECAP_ERR_INTERNAL,
    }
}

/// Runs `f`, turning errors and panics into a status code and the thread's last error.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
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

/// Loss options (`recap_grpo_config_default` fills verl's defaults); mirrors `GrpoConfig`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapGrpoConfig {
    /// Lower ratio clip epsilon (default 0.2).
    pub clip_low: f32,
    /// Upper ratio clip epsilon (default 0.2).
    pub clip_high: f32,
    /// Dual-clip constant (default 3.0); <= 0: off.
    pub dual_clip: f32,
    /// Clamp of `logp - old_logp` before `exp` (default 20).
    pub log_ratio_clamp: f32,
    /// `RECAP_AGG_*` (default `RECAP_AGG_TOKEN_MEAN`; the codes at the top of this header).
    pub agg_mode: i32,
    /// C of token-sum-norm (> 0 when that mode is used).
    pub norm_constant: f32,
    /// KL-to-reference coefficient (default 0: no KL term).
    pub kl_coef: f32,
    /// `RECAP_KL_*` (default `RECAP_KL_K3`, verl's low_var_kl; `RECAP_KL_K3_UNCLAMPED`: TRL's).
    pub kl_estimator: i32,
    /// Entropy bonus coefficient (default 0; the loss from logits only).
    pub entropy_coef: f32,
    /// Nonzero: return non-finite results instead of `RECAP_ERR_NONFINITE` (default 0).
    pub allow_nonfinite: i32,
    /// `RECAP_LOSS_*` (default `RECAP_LOSS_VANILLA`; `RECAP_LOSS_SAPO` takes `tau_pos` and
    /// `tau_neg`, `RECAP_LOSS_DRO` `dro_beta`; `RECAP_LOSS_GEO_MEAN` is GMPO, verl's geo_mean).
    pub policy_loss: i32,
    /// SAPO temperature for positive advantages (default 1.0).
    pub tau_pos: f32,
    /// SAPO temperature for negative advantages (default 1.05).
    pub tau_neg: f32,
    /// Two-sided clipping bound; <= 0: off (default).
    pub delta: f32,
    /// Nonzero: the KL term importance-weighted by the ratio (TRL `use_bias_correction_kl`).
    pub kl_is_correction: i32,
    /// Only the tokens of the top entropy quantile get the policy gradient (default 1.0: all; the
    /// loss from logits only).
    pub top_entropy_quantile: f32,
    /// Rollout importance sampling: `RECAP_IS_OFF` (default), `RECAP_IS_TOKEN`, `RECAP_IS_SEQUENCE`,
    /// `RECAP_IS_GEOMETRIC`.
    pub rollout_level: i32,
    /// The C ABI's own codes (not the kernels' `RECAP_IS_METRICS` ...): 0 truncate (default), 1
    /// mask, 2 metrics only.
    pub rollout_mode: i32,
    /// Upper rollout IS threshold (default 2.0).
    pub rollout_upper: f32,
    /// Lower rollout IS threshold; <= 0: 1 / upper (default).
    pub rollout_lower: f32,
    /// DRO's coefficient of the squared log-ratio (> 0 with `RECAP_LOSS_DRO`; default 0.1).
    pub dro_beta: f32,
    /// Aggregation of the objectives' terms when it differs from `agg_mode` (which the KL and
    /// entropy terms keep), codes as `agg_mode`; -1: `agg_mode` (default).
    pub policy_agg_mode: i32,
}

/// Fills `cfg` with the defaults (verl's).
///
/// # Safety
/// `cfg` must be null or point to a writable `RecapGrpoConfig`.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_config_default(cfg: *mut RecapGrpoConfig) -> i32 {
    guard(|| {
        // SAFETY: checked non-null; the caller guarantees it points to a writable struct.
        let out = unsafe { cfg.as_mut() }
            .ok_or_else(|| Error::invalid_argument("cfg", "null pointer"))?;
        let d = GrpoConfig::default();
        *out = RecapGrpoConfig {
            clip_low: d.clip_low,
            clip_high: d.clip_high,
            dual_clip: d.dual_clip.unwrap_or(0.0),
            log_ratio_clamp: d.log_ratio_clamp,
            agg_mode: d.agg_mode.code(),
            norm_constant: 0.0,
            kl_coef: d.kl_coef,
            kl_estimator: d.kl_estimator.code(),
            entropy_coef: d.entropy_coef,
            allow_nonfinite: 0,
            policy_loss: d.policy_loss.code(),
            tau_pos: 1.0,
            tau_neg: 1.05,
            delta: 0.0,
            kl_is_correction: 0,
            top_entropy_quantile: 1.0,
            rollout_level: -1,
            rollout_mode: 0,
            rollout_upper: 2.0,
            rollout_lower: 0.0,
            dro_beta: 0.1,
            policy_agg_mode: -1,
        };
        Ok(())
    })
}

/// The entry of `table` whose kernel code (`code`) is `c`.
fn by_code<T: Copy>(arg: &'static str, table: &[T], c: i32, code: impl Fn(T) -> i32) -> Result<T> {
    table
        .iter()
        .copied()
        .find(|t| code(*t) == c)
        .ok_or_else(|| {
            let codes: Vec<String> = table.iter().map(|t| code(*t).to_string()).collect();
            Error::invalid_argument(
                arg,
                format!("expected one of {}, got {c}", codes.join(", ")),
            )
        })
}

fn pick<T: Copy>(arg: &'static str, table: &[T], i: i32) -> Result<T> {
    usize::try_from(i)
        .ok()
        .and_then(|i| table.get(i).copied())
        .ok_or_else(|| {
            Error::invalid_argument(arg, format!("expected 0..{}, got {i}", table.len()))
        })
}

impl RecapGrpoConfig {
    fn to_config(self) -> Result<GrpoConfig> {
        // NaN compares false with everything: refused by name here, before "<= 0 means off" reads
        // it as off
        for (name, v) in [
            ("cfg.clip_low", self.clip_low),
            ("cfg.clip_high", self.clip_high),
            ("cfg.dual_clip", self.dual_clip),
            ("cfg.log_ratio_clamp", self.log_ratio_clamp),
            ("cfg.norm_constant", self.norm_constant),
            ("cfg.kl_coef", self.kl_coef),
            ("cfg.entropy_coef", self.entropy_coef),
            ("cfg.tau_pos", self.tau_pos),
            ("cfg.tau_neg", self.tau_neg),
            ("cfg.delta", self.delta),
            ("cfg.top_entropy_quantile", self.top_entropy_quantile),
            ("cfg.rollout_upper", self.rollout_upper),
            ("cfg.rollout_lower", self.rollout_lower),
            ("cfg.dro_beta", self.dro_beta),
        ] {
            if v.is_nan() {
                return Err(Error::invalid_argument(
                    name,
                    "NaN (a number is expected; 0 or less turns an optional feature off)",
                ));
            }
        }
        let c = GrpoConfig::default()
            .with_clip_low(self.clip_low)
            .with_clip_high(self.clip_high)
            .with_dual_clip((self.dual_clip > 0.0).then_some(self.dual_clip))
            .with_log_ratio_clamp(self.log_ratio_clamp)
            .with_agg_mode(by_code(
                "cfg.agg_mode",
                &AggMode::ALL,
                self.agg_mode,
                |m| m.code(),
            )?)
            .with_policy_agg_mode(match self.policy_agg_mode {
                -1 => None,
                m => Some(by_code("cfg.policy_agg_mode", &AggMode::ALL, m, |m| {
                    m.code()
                })?),
            })
            .with_norm_constant((self.norm_constant > 0.0).then_some(self.norm_constant))
            .with_kl_coef(self.kl_coef)
            .with_kl_estimator(by_code(
                "cfg.kl_estimator",
                &KlEstimator::ALL,
                self.kl_estimator,
                |e| e.code(),
            )?)
            .with_entropy_coef(self.entropy_coef)
            .with_allow_nonfinite(self.allow_nonfinite != 0)
            .with_policy_loss(by_code(
                "cfg.policy_loss",
                &[
                    PolicyLoss::Vanilla,
                    PolicyLoss::Cispo,
                    PolicyLoss::Sapo {
                        tau_pos: self.tau_pos,
                        tau_neg: self.tau_neg,
                    },
                    PolicyLoss::Gspo,
                    PolicyLoss::Gpg,
                    PolicyLoss::DppoTv,
                    PolicyLoss::DppoKl,
                    PolicyLoss::Dro {
                        beta: self.dro_beta,
                    },
                    PolicyLoss::GeoMean,
                ],
                self.policy_loss,
                |l| l.code(),
            )?)
            .with_delta((self.delta > 0.0).then_some(self.delta))
            .with_kl_is_correction(self.kl_is_correction != 0)
            .with_top_entropy_quantile(self.top_entropy_quantile)
            .with_rollout_correction(match self.rollout_level {
                -1 => None,
                l => Some(RolloutCorrection {
                    level: by_code(
                        "cfg.rollout_level",
                        &[IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric],
                        l,
                        |l| l.code(),
                    )?,
                    mode: pick(
                        "cfg.rollout_mode",
                        &[IsMode::Truncate, IsMode::Mask, IsMode::MetricsOnly],
                        self.rollout_mode,
                    )?,
                    upper: self.rollout_upper,
                    lower: (self.rollout_lower > 0.0).then_some(self.rollout_lower),
                }),
            });
        c.validate()?;
        Ok(c)
    }
}

/// Scalar results of the fused loss (per-objective values go to the caller's arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecapGrpoResult {
    /// The total loss (policy terms weighted by lambda, plus `kl_coef` times the KL loss).
    pub loss: f64,
    /// `actor/kl_loss`.
    pub kl_loss: f64,
    /// `actor/ppo_kl`: the mean of `old_logp - logp` over policy tokens.
    pub ppo_kl: f64,
    /// Mean ratio over policy tokens.
    pub ratio_mean: f64,
    /// Smallest ratio over policy tokens.
    pub ratio_min: f64,
    /// Largest ratio over policy tokens.
    pub ratio_max: f64,
    /// Masked mean of the per-token KL.
    pub kl_mean: f64,
    /// Token weight (the sum of the mask) of this call.
    pub num_tokens: f64,
    /// Sequences with at least one unmasked token.
    pub num_seqs: f64,
    /// Token weight of the policy objectives' tokens.
    pub policy_tokens: f64,
    /// Non-finite input values read at unmasked tokens.
    pub nonfinite: f64,
    /// Rollout IS weight: mean.
    pub rollout_is_mean: f64,
    /// Rollout IS weight: minimum.
    pub rollout_is_min: f64,
    /// Rollout IS weight: maximum.
    pub rollout_is_max: f64,
    /// Fraction of tokens whose rollout IS weight was truncated or masked.
    pub rollout_is_corrected_fraction: f64,
}

/// A host array of `n` elements (null allowed when `n == 0`).
fn host<'a, T>(arg: &'static str, p: *const T, n: usize) -> Result<&'a [T]> {
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
fn objectives_count(n: i32) -> Result<usize> {
    match usize::try_from(n) {
        Ok(k) if (1..=recap::MAX_OBJECTIVES).contains(&k) => Ok(k),
        _ => Err(Error::invalid_argument(
            "num_objectives",
            format!("expected 1 <= K <= {}, got {n}", recap::MAX_OBJECTIVES),
        )),
    }
}

fn len(arg: &'static str, n: i64) -> Result<usize> {
    usize::try_from(n)
        .map_err(|_| Error::invalid_argument(arg, format!("expected a size >= 0, got {n}")))
}

/// The host arrays of a batch's layout that the loss entry points take: `cu_seqlens [B + 1]`,
/// `lambda [K]` and, when not null, `membership [B]`.
type HostLayout<'a> = (&'a [i32], &'a [f32], Option<&'a [u32]>);

fn host_layout<'a>(
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
fn host_objectives(objectives: *const i32, k: usize) -> Result<Vec<ObjectiveKind>> {
    raw::objective_kinds(host("objectives", objectives, k)?)
}

/// Global normalizers from the host arrays `normalizers [2, K + 1]` (token weights, then sequence
/// counts; null: none) and `seq_tokens [B]` (nullable).
fn host_normalizers(
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
fn place(device: i32, stream: *mut c_void) -> Place {
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
fn arr<T>(p: *const T, n: usize) -> In<T> {
    let n = if p.is_null() { 0 } else { n };
    // SAFETY: the C caller guarantees `n` readable elements at every non-null pointer, in the
    // memory of the call's place, for the call (documented in the header).
    unsafe { In::new(p as usize, n) }
}

fn opt_arr<T>(p: *const T, n: usize) -> Option<In<T>> {
    (!p.is_null()).then(|| arr(p, n))
}

fn out_arr<T>(p: *mut T, n: usize) -> Out<T> {
    let n = if p.is_null() { 0 } else { n };
    // SAFETY: as `arr`, for writable elements used by nobody else during the call.
    unsafe { Out::new(p as usize, n) }
}

/// A caller's mask `[n]`, u8 or f32.
fn mask_arr(mask: *const c_void, is_u8: i32, n: usize) -> Mask<In<f32>, In<u8>> {
    if is_u8 != 0 {
        Mask::U8(arr(mask as *const u8, n))
    } else {
        Mask::F32(arr(mask as *const f32, n))
    }
}

fn adv_arr(
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
unsafe fn text<'a>(name: &'static str, p: *const c_char) -> Result<&'a str> {
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
fn host_outputs_disjoint(outs: &[(&'static str, usize, usize)]) -> Result<()> {
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

/// The result and statistics outputs of a loss call for K objectives: `result` not null, the two
/// disjoint.
fn result_outputs(result: *mut RecapGrpoResult, stats: *mut f64, k: usize) -> Result<()> {
    if result.is_null() {
        return Err(Error::invalid_argument("result", "null pointer"));
    }
    host_outputs_disjoint(&[
        (
            "result",
            result as usize,
            std::mem::size_of::<RecapGrpoResult>(),
        ),
        (
            "stats",
            stats as usize,
            8 * recap::output::grpo_stat_layout(k)
                .iter()
                .map(|f| f.offset + f.len)
                .max()
                .unwrap_or(0),
        ),
    ])
}

fn write_host(out: *mut f64, values: &[f64]) {
    if !out.is_null() {
        // SAFETY: the caller guarantees `values.len()` writable doubles (documented per function).
        unsafe { std::slice::from_raw_parts_mut(out, values.len()) }.copy_from_slice(values);
    }
}

/// The length of the `stats` array of the fused loss for `num_objectives` objectives (< 0 on a bad
/// count).
#[no_mangle]
pub extern "C" fn recap_grpo_stats_len(num_objectives: i32) -> i64 {
    match usize::try_from(num_objectives) {
        Ok(k) => recap::output::grpo_stat_layout(k)
            .last()
            .map_or(0, |f| (f.offset + f.len) as i64),
        Err(_) => -1,
    }
}

/// Field `index` of the `stats` array for `num_objectives` objectives: its name (verl's, static
/// storage), offset and length (1, or K for a per-objective statistic). `RECAP_ERR_ARGUMENT` past
/// the last field.
///
/// # Safety
/// `name`, `offset` and `len` must be null or writable.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_stat_field(
    num_objectives: i32,
    index: i32,
    name: *mut *const c_char,
    offset: *mut i64,
    len: *mut i64,
) -> i32 {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    guard(|| {
        let k = self::objectives_count(num_objectives)?;
        let fields = recap::output::grpo_stat_layout(k);
        let names = NAMES.get_or_init(|| {
            fields
                .iter()
                .map(|f| CString::new(f.name).unwrap_or_default())
                .collect()
        });
        let i = usize::try_from(index)
            .ok()
            .filter(|i| *i < fields.len())
            .ok_or_else(|| {
                Error::invalid_argument(
                    "index",
                    format!("expected 0 <= index < {}, got {index}", fields.len()),
                )
            })?;
        // SAFETY: each pointer is null or writable (the caller's contract).
        unsafe {
            if let Some(n) = name.as_mut() {
                *n = names[i].as_ptr();
            }
            if let Some(o) = offset.as_mut() {
                *o = fields[i].offset as i64;
            }
            if let Some(l) = len.as_mut() {
                *l = fields[i].len as i64;
            }
        }
        Ok(())
    })
}

/// The fused GRPO loss. Arrays on the device (`device >= 0`; on the host for `device < 0`, where
/// the CPU reference computes): `logp`, `old_logp`, `ref_logp`, `rollout_logp` and
/// `policy_weight` (nullable) [T], `mask` ([T] u8 or f32), `advantages` ([B, K], or [T, K] with
/// `adv_per_token`), `grad` [T] (written). Host arrays: `cu_seqlens` [B + 1], `lambda` [K],
/// `objectives` [K] (0 policy, 1 nll), `membership` [B] (nullable), `normalizers` [2, K + 1]
/// (the whole batch's token weights then sequence counts, from `recap_count_normalizers` summed
/// over the parts; nullable), `seq_tokens` [B] (nullable), `stats` [`recap_grpo_stats_len(K)`]
/// (nullable, written; fields from `recap_grpo_stat_field`).
///
/// # Safety
/// Every non-null pointer must hold the number of elements stated above; device pointers must
/// belong to `device`'s primary context and `stream` (nullable: the context's default stream).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_grpo_loss(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    logp: *const f32,
    old_logp: *const f32,
    ref_logp: *const f32,
    rollout_logp: *const f32,
    policy_weight: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    seq_tokens: *const f64,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        let (cu, lambda, membership) = host_layout(cu_seqlens, b, lambda, k, membership)?;
        let kinds = host_objectives(objectives, k)?;
        let norms = host_normalizers(normalizers, seq_tokens, k, b)?;
        result_outputs(result, stats, k)?;
        let inputs = GrpoInputs {
            logp: arr(logp, t),
            old_logp: arr(old_logp, t),
            ref_logp: opt_arr(ref_logp, t),
            rollout_logp: opt_arr(rollout_logp, t),
            policy_weight: opt_arr(policy_weight, t),
            advantages: adv_arr(advantages, adv_per_token, t, b, k),
            mask: mask_arr(mask, mask_is_u8, t),
            cu_seqlens: cu,
            lambda,
            objectives: &kinds,
            membership,
            normalizers: norms.as_ref(),
        };
        let out = raw::grpo_loss(place(device, stream), &inputs, &cfg, out_arr(grad, t))?;
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
/// the same layout at once. Nothing is allocated once the stream's
/// workspace has grown to the call's size. The arguments are those of `recap_grpo_loss`, but with
/// `layout_on_device != 0`, `cu_seqlens` [B + 1], `lambda` [K] and `membership` [B] (nullable) are
/// device pointers, checked on the device (a failed check makes the device loss NaN and
/// `recap_grpo_output_read` fail naming the argument); nothing is then copied from the host, so
/// the call can be captured in a CUDA graph (after one eager call of the same size). Read the
/// result with `recap_grpo_output_read`.
///
/// # Safety
/// As `recap_grpo_loss`; `out` must be device memory of the call's device.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_grpo_loss_async(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    logp: *const f32,
    old_logp: *const f32,
    ref_logp: *const f32,
    rollout_logp: *const f32,
    policy_weight: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    seq_tokens: *const f64,
    layout_on_device: i32,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    out: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        let kinds = host_objectives(objectives, k)?;
        let norms = host_normalizers(normalizers, seq_tokens, k, b)?;
        let on_device = layout_on_device != 0;
        let (cu, lam, mem) = if on_device {
            if cu_seqlens.is_null() || lambda.is_null() {
                return Err(Error::invalid_argument(
                    if cu_seqlens.is_null() {
                        "cu_seqlens"
                    } else {
                        "lambda"
                    },
                    "null pointer (with layout_on_device, a device pointer)",
                ));
            }
            (&[][..], &[][..], None)
        } else {
            host_layout(cu_seqlens, b, lambda, k, membership)?
        };
        let inputs = GrpoInputs {
            logp: arr(logp, t),
            old_logp: arr(old_logp, t),
            ref_logp: opt_arr(ref_logp, t),
            rollout_logp: opt_arr(rollout_logp, t),
            policy_weight: opt_arr(policy_weight, t),
            advantages: adv_arr(advantages, adv_per_token, t, b, k),
            mask: mask_arr(mask, mask_is_u8, t),
            cu_seqlens: cu,
            lambda: lam,
            objectives: &kinds,
            membership: mem,
            normalizers: norms.as_ref(),
        };
        let dev = on_device.then(|| raw::DeviceBatchArrays {
            cu_seqlens: arr(cu_seqlens, b + 1),
            membership: opt_arr(membership, b),
            lambda: Some(arr(lambda, k)),
        });
        let n_out = recap::cuda::grpo_output_len(k);
        raw::grpo_loss_async(
            place(device, stream),
            &inputs,
            dev.as_ref(),
            &cfg,
            out_arr(grad, t),
            out_arr(out, n_out),
        )?;
        Ok(())
    })
}

/// Reads the output `out` of a `recap_grpo_loss_async` call back (this synchronizes `stream`) into
/// `result` and `stats` (nullable), as `recap_grpo_loss` writes them. `num_objectives`, `cfg`,
/// `has_ref_logp` and `has_rollout_logp` describe the call (whether it was given `ref_logp` and
/// `rollout_logp`). Fails, naming the argument, when a check made on the device failed, and on
/// non-finite inputs unless the config allows them.
///
/// # Safety
/// `out` must hold `recap_grpo_output_len(num_objectives)` f64 of `device`'s memory; `result`
/// must be writable; `stats` null or `recap_grpo_stats_len(K)` writable f64.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_grpo_output_read(
    device: i32,
    stream: *mut c_void,
    num_objectives: i32,
    cfg: *const RecapGrpoConfig,
    has_ref_logp: i32,
    has_rollout_logp: i32,
    out: *const f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, k)?;
        if !(1..=recap::MAX_OBJECTIVES).contains(&k) {
            return Err(Error::invalid_argument(
                "num_objectives",
                format!("expected 1 <= K <= {}", recap::MAX_OBJECTIVES),
            ));
        }
        let pending =
            recap::cuda::PendingGrpo::new(k, has_ref_logp != 0, has_rollout_logp != 0, &cfg);
        let n_out = recap::cuda::grpo_output_len(k);
        let o = raw::read_grpo_output(place(device, stream), &pending, arr(out, n_out))?;
        write_result(&o, o.loss, result, stats);
        Ok(())
    })
}

/// The options behind a C config pointer.
fn config(cfg: *const RecapGrpoConfig) -> Result<GrpoConfig> {
    // SAFETY: checked for null; the caller guarantees a valid struct.
    unsafe { cfg.as_ref() }
        .ok_or_else(|| Error::invalid_argument("cfg", "null pointer"))?
        .to_config()
}

fn write_result(out: &GrpoOutput, loss: f64, result: *mut RecapGrpoResult, stats: *mut f64) {
    let m = &out.metrics;
    // SAFETY: checked non-null by the caller; the C caller guarantees a writable struct.
    unsafe {
        *result = RecapGrpoResult {
            loss,
            kl_loss: out.kl_loss,
            ppo_kl: m.ppo_kl,
            ratio_mean: m.ratio_mean,
            ratio_min: m.ratio_min,
            ratio_max: m.ratio_max,
            kl_mean: m.kl_mean,
            num_tokens: m.num_tokens,
            num_seqs: m.num_seqs as f64,
            policy_tokens: m.policy_tokens,
            nonfinite: m.nonfinite as f64,
            rollout_is_mean: m.rollout_is_mean,
            rollout_is_min: m.rollout_is_min,
            rollout_is_max: m.rollout_is_max,
            rollout_is_corrected_fraction: m.rollout_is_corrected_fraction,
        }
    };
    write_host(stats, &out.stats());
}

/// This batch's normalizers from its mask ([T] u8 or f32, on the device or, for `device < 0`, the
/// host): `normalizers` [2, K + 1] (host, written: token weights then sequence counts, the KL slot
/// last in each) and `seq_tokens` [B] (host, nullable, written). Sum the parts' `normalizers` and
/// pass the total to `recap_grpo_loss` of every part. Synchronizes the stream.
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_count_normalizers(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *mut f64,
    seq_tokens: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = objectives_count(num_objectives)?;
        let cu = host("cu_seqlens", cu_seqlens, b + 1)?;
        let membership = if membership.is_null() {
            None
        } else {
            Some(host("membership", membership, b)?)
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
            &mask_arr(mask, mask_is_u8, t),
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

/// The checked shape and options of a C call on logits.
struct LogitsShape {
    t: usize,
    v: usize,
    ld: usize,
    /// Elements the rows span: `(t - 1) ld + v`.
    span: usize,
    lc: LogprobConfig,
}

fn logits_shape(
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
fn backward(
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

/// Vocabulary parallelism, step 1: one shard's partial statistics of each row into `partials`
/// [planes, T] (the shard's LSE, entropy, label logit or -inf, and with `planes` = 4 the shard's
/// own sum_j p_j^2, for verl's sum_pi_squared) for logits [rows, ld] holding the columns
/// [vocab_start, vocab_start + vocab) of the whole vocabulary; `labels` are global. All-gather the
/// partials (and each shard's vocab_start) over the tensor-parallel group, then
/// `recap_tp_combine`.
///
/// # Safety
/// As `recap_logprob_forward`; `partials` planes * rows writable floats.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_tp_partials(
    device: i32,
    stream: *mut c_void,
    logits: *const c_void,
    dtype: i32,
    rows: i64,
    vocab: i64,
    ld: i64,
    labels: *const i32,
    vocab_start: i64,
    temperature: f32,
    ignore_index: i32,
    planes: i32,
    partials: *mut f32,
) -> i32 {
    guard(|| {
        let LogitsShape { t, v, ld, span, lc } =
            logits_shape(rows, vocab, ld, temperature, ignore_index)?;
        let start = len("vocab_start", vocab_start)?;
        let planes = tp_planes(planes)?;
        macro_rules! go {
            ($e:ty) => {
                raw::tp_partials::<$e>(
                    place(device, stream),
                    &Logits {
                        data: arr(logits as *const $e, span),
                        rows: t,
                        vocab: v,
                        ld,
                    },
                    arr(labels, t),
                    start,
                    &lc,
                    out_arr(partials, planes * t),
                )
            };
        }
        by_dtype!(dtype, go)
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
fn tp_planes(planes: i32) -> Result<usize> {
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
/// vocabulary, written over the shard's logits, from the combined `lse`, `entropy` (and
/// `sum_pi_squared`: both null or both given) of `recap_tp_combine` (no collective).
///
/// # Safety
/// As `recap_logprob_backward_inplace`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_tp_backward_inplace(
    device: i32,
    stream: *mut c_void,
    logits: *mut c_void,
    dtype: i32,
    rows: i64,
    vocab: i64,
    ld: i64,
    labels: *const i32,
    vocab_start: i64,
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
            Some(vocab_start),
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

/// Group advantages of rewards [B, K] into `out` [B, K]: groups of `group_size` consecutive
/// rollouts, or (`group_ids` non-null) dense ids in [0, num_groups) (any ids on the host);
/// `lengths` (nullable) [B] response lengths, needed by opo and REINFORCE++; `baselines`
/// (nullable) [B, K] (as `out`) baseline rewards, needed by remax; `modes` [K] host
/// (0 grpo, 1 dr_grpo, 2 rloo, 3 batch std, 4 grpo_passk, 5 dr_grpo_passk, 6 opo, 7 gpg,
/// 8 reinforce_plus_plus, 9 reinforce_plus_plus_baseline, 10 gdpo, 11 remax: `r - b`); `singletons`: what a group of one
/// rollout gets (0: 0, 1: verl's mean 0 and std 1); `reward_weights` (nullable) [K] host: one
/// advantage of the weighted columns (TRL's sum-then-normalize, normalize-then-sum with gdpo), one
/// mode in `modes` and `out` [B, 1].
///
/// # Safety
/// Arrays on the device (`device >= 0`) or the host (`device < 0`); `modes` K host ints.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_group_advantages(
    device: i32,
    stream: *mut c_void,
    rewards: *const f32,
    num_rollouts: i64,
    num_objectives: i32,
    group_size: i64,
    group_ids: *const i32,
    num_groups: i64,
    lengths: *const i32,
    baselines: *const f32,
    modes: *const i32,
    eps: f64,
    singletons: i32,
    reward_weights: *const f64,
    out: *mut f32,
) -> i32 {
    guard(|| {
        let b = len("num_rollouts", num_rollouts)?;
        let k = objectives_count(num_objectives)?;
        let weights = (!reward_weights.is_null())
            .then(|| host("reward_weights", reward_weights, k).map(<[f64]>::to_vec))
            .transpose()?;
        let k_out = if weights.is_some() { 1 } else { k };
        let modes = host("modes", modes, k_out)?
            .iter()
            .map(|&m| pick("modes", &AdvantageMode::ALL, m))
            .collect::<Result<Vec<_>>>()?;
        let cfg = AdvantageConfig {
            modes,
            eps,
            lead: None,
            reward_weights: weights,
            singletons: pick(
                "singletons",
                &[recap::Singletons::Zero, recap::Singletons::Verl],
                singletons,
            )?,
        };
        let groups = if group_ids.is_null() {
            raw::RawGroups::Consecutive(match len("group_size", group_size)? {
                0 => {
                    return Err(Error::invalid_argument(
                        "group_size",
                        "expected a group size >= 1 (or group_ids)",
                    ))
                }
                g => g,
            })
        } else {
            raw::RawGroups::Ids {
                ids: arr(group_ids, b),
                num_groups: len("num_groups", num_groups)?,
            }
        };
        raw::group_advantages(
            place(device, stream),
            arr(rewards, b * k),
            groups,
            opt_arr(lengths, b),
            opt_arr(baselines, b * k_out),
            &cfg,
            out_arr(out, b * k_out),
        )
    })
}

/// verl's optimal token baseline (`optimal_token_baseline`; with `multi_turn` nonzero the positions
/// are indices among unmasked tokens, verl's `tir_optimal_token_baseline`): advantages and returns
/// (`[T]` each) of `num_seqs` packed sequences (`cu_seqlens` [B + 1], host). Per token
/// `w = (1 - 2 exp(old_logp) + sum_pi_squared) rho^2` (`rollout_is_weights` rho, nullable: 1), `W`
/// its masked cumulative sum, `G` the masked reward to go; per group and position
/// `B = sum m G W / (sum m W + eps)`, `A = (G - B) m`, returns `G`. Groups of `group_size`
/// consecutive sequences, or (`group_ids` non-null, host) `[B]` ids of any values;
/// `handle_zero_tail` nonzero (verl's default): the strictly longest member's positions past the
/// second longest length get baseline 0 (verl: 1e-8 for `eps`). On a device the stream is
/// synchronized once (to check that the inputs were finite at unmasked tokens).
///
/// # Safety
/// Arrays of `num_tokens` elements on the device (`device >= 0`) or the host (`device < 0`);
/// `cu_seqlens` (`num_seqs + 1`) and `group_ids` (`num_seqs`) on the host.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_optimal_token_baseline(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    token_rewards: *const f32,
    old_logp: *const f32,
    sum_pi_squared: *const f32,
    rollout_is_weights: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    group_size: i64,
    group_ids: *const i32,
    multi_turn: i32,
    handle_zero_tail: i32,
    eps: f64,
    advantages: *mut f32,
    returns: *mut f32,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let groups = if group_ids.is_null() {
            recap::advantages::Groups::Consecutive(len("group_size", group_size)?)
        } else {
            recap::advantages::Groups::Ids(host("group_ids", group_ids, b)?)
        };
        let x = recap::TokenBaselineInputs {
            token_rewards: arr(token_rewards, t),
            old_logp: arr(old_logp, t),
            sum_pi_squared: arr(sum_pi_squared, t),
            rollout_is_weights: opt_arr(rollout_is_weights, t),
            mask: mask_arr(mask, mask_is_u8, t),
            cu_seqlens: host("cu_seqlens", cu_seqlens, b + 1)?,
            groups,
        };
        let config = recap::TokenBaselineConfig {
            multi_turn: multi_turn != 0,
            handle_zero_tail: handle_zero_tail != 0,
            eps,
        };
        raw::optimal_token_baseline(
            place(device, stream),
            &x,
            &config,
            out_arr(advantages, t),
            out_arr(returns, t),
        )
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

/// The per-objective weighted reduction of losses `[T, K]` with the mask and layout of the fused
/// loss: `d total / d l` into `grad` `[T, K]` (on the device or, for `device < 0`, the host);
/// `total` and `objective_loss` `[K]` (nullable) on the host; `normalizers` and `seq_tokens` as in
/// `recap_grpo_loss`. Aggregation and `norm_constant` from `cfg`.
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_weighted_reduce(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    losses: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    seq_tokens: *const f64,
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    total: *mut f64,
    objective_loss: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        let (cu, lambda, membership) = host_layout(cu_seqlens, b, lambda, k, membership)?;
        let norms = host_normalizers(normalizers, seq_tokens, k, b)?;
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
                mask: mask_arr(mask, mask_is_u8, t),
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

/// The chunked fused-linear GRPO loss: `hidden` `[T, H]` and `weight` `[V, H]` (bf16), per-token
/// `labels`, `old_logp`, `ref_logp` (nullable), `mask` (u8), advantages as in `recap_grpo_loss`;
/// writes `d_hidden` `[T, H]` (bf16) and `d_weight` `[V, H]` (f32, overwritten); arrays on the
/// device, or on the host for `device < 0` (the reference, which ignores the chunking).
/// `chunk_tokens` <= 0: sized from `memory_budget` bytes (<= 0: 512 MiB); `fp32_logits` keeps the
/// logits in f32. `result.loss` includes the entropy bonus; `stats` as in `recap_grpo_loss`. Reads
/// the result back (synchronizes `stream`): `recap_fused_linear_grpo_loss_async` does not. On the
/// device only the rows with `mask` nonzero and a label other than `ignore_index` are computed (the
/// labels and mask are read back first; the others' `d_hidden` rows are 0 and their labels are not
/// checked).
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    hidden_size: i64,
    vocab: i64,
    hidden: *const c_void,
    weight: *const c_void,
    labels: *const i32,
    old_logp: *const f32,
    ref_logp: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const u8,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    cfg: *const RecapGrpoConfig,
    temperature: f32,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        result_outputs(result, stats, objectives_count(num_objectives)?)?;
        let a = LinearArgs::new(
            [num_tokens, hidden_size, vocab, num_seqs],
            (
                cu_seqlens,
                lambda,
                objectives,
                membership,
                num_objectives,
                normalizers,
            ),
            false,
            (cfg, temperature, chunk_tokens, memory_budget, fp32_logits),
        )?;
        let (t, h, v) = (a.t, a.h, a.v);
        let inputs = a.inputs(
            labels,
            old_logp,
            ref_logp,
            (advantages, adv_per_token),
            mask,
        );
        let head = a.head(hidden, weight);
        let out = raw::fused_linear_grpo_loss(
            place(device, stream),
            &head,
            &inputs,
            &a.cfg,
            &a.lc,
            &a.opts,
            out_arr(d_hidden as *mut half::bf16, t * h),
            out_arr(d_weight, v * h),
        )?;
        write_result(&out.grpo, out.loss, result, stats);
        Ok(())
    })
}

/// The checked scalar arguments and host arrays of a fused-linear call.
struct LinearArgs<'a> {
    t: usize,
    h: usize,
    v: usize,
    b: usize,
    k: usize,
    cfg: GrpoConfig,
    lc: LogprobConfig,
    opts: recap::cuda::FusedLinearConfig,
    kinds: Vec<ObjectiveKind>,
    norms: Option<recap::Normalizers>,
    cu: &'a [i32],
    lambda: &'a [f32],
    membership: Option<&'a [u32]>,
}

/// The layout arguments of a C call: `cu_seqlens`, `lambda`, `objectives`, `membership`, K and
/// `normalizers`.
type CLayout = (
    *const i32,
    *const f32,
    *const i32,
    *const u32,
    i32,
    *const f64,
);

impl<'a> LinearArgs<'a> {
    /// The call's inputs from its per-token pointers (`T` elements each; advantages `[B, K]` or,
    /// with their flag, `[T, K]`).
    fn inputs(
        &self,
        labels: *const i32,
        old_logp: *const f32,
        ref_logp: *const f32,
        (advantages, adv_per_token): (*const f32, i32),
        mask: *const u8,
    ) -> LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>> {
        let t = self.t;
        LogitsLossInputs {
            labels: arr(labels, t),
            old_logp: arr(old_logp, t),
            ref_logp: opt_arr(ref_logp, t),
            rollout_logp: None,
            advantages: adv_arr(advantages, adv_per_token, t, self.b, self.k),
            mask: Mask::U8(arr(mask, t)),
            cu_seqlens: self.cu,
            lambda: self.lambda,
            objectives: &self.kinds,
            membership: self.membership,
            normalizers: self.norms.as_ref(),
        }
    }

    /// The head `hidden [T, H]`, `weight [V, H]` (bf16).
    fn head(&self, hidden: *const c_void, weight: *const c_void) -> raw::RawHead {
        raw::RawHead {
            hidden: arr(hidden as *const half::bf16, self.t * self.h),
            weight: arr(weight as *const half::bf16, self.v * self.h),
            hidden_size: self.h,
        }
    }

    /// `dims`: T, H, V, B; `layout_on_device`: `cu_seqlens`, `lambda` and `membership` are device
    /// pointers (not read here); `opts`: the config, temperature and chunking.
    unsafe fn new(
        dims: [i64; 4],
        (cu_seqlens, lambda, objectives, membership, num_objectives, normalizers): CLayout,
        layout_on_device: bool,
        (cfg, temperature, chunk_tokens, memory_budget, fp32_logits): (
            *const RecapGrpoConfig,
            f32,
            i64,
            i64,
            i32,
        ),
    ) -> Result<Self> {
        let (t, h, v) = (
            len("num_tokens", dims[0])?,
            len("hidden_size", dims[1])?,
            len("vocab", dims[2])?,
        );
        let b = len("num_seqs", dims[3])?;
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        let lc = LogprobConfig {
            temperature,
            ..LogprobConfig::default()
        };
        lc.validate()?;
        let (cu, lambda, membership) = if layout_on_device {
            if cu_seqlens.is_null() || lambda.is_null() {
                return Err(Error::invalid_argument(
                    if cu_seqlens.is_null() {
                        "cu_seqlens"
                    } else {
                        "lambda"
                    },
                    "null pointer (with layout_on_device, a device pointer)",
                ));
            }
            (&[][..], &[][..], None)
        } else {
            host_layout(cu_seqlens, b, lambda, k, membership)?
        };
        let kinds = host_objectives(objectives, k)?;
        let norms = host_normalizers(normalizers, std::ptr::null(), k, b)?;
        if t == 0 || h == 0 || v == 0 {
            return Err(Error::invalid_argument(
                "num_tokens",
                format!("expected T, H, V >= 1, got {t}, {h}, {v}"),
            ));
        }
        let opts = recap::cuda::FusedLinearConfig {
            chunk_tokens: (chunk_tokens > 0).then_some(chunk_tokens as usize),
            memory_budget: if memory_budget > 0 {
                memory_budget as usize
            } else {
                512 << 20
            },
            fp32_logits: fp32_logits != 0,
        };
        Ok(LinearArgs {
            t,
            h,
            v,
            b,
            k,
            cfg,
            lc,
            opts,
            kinds,
            norms,
            cu,
            lambda,
            membership,
        })
    }
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

/// Bytes of device workspace `recap_fused_linear_grpo_loss_async` needs for these sizes and
/// chunking options (as that call takes them), or -1 for a negative size.
#[no_mangle]
pub extern "C" fn recap_fused_linear_workspace_len(
    num_tokens: i64,
    num_seqs: i64,
    num_objectives: i32,
    vocab: i64,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
) -> i64 {
    let (Ok(t), Ok(b), Ok(k), Ok(v)) = (
        usize::try_from(num_tokens),
        usize::try_from(num_seqs),
        usize::try_from(num_objectives),
        usize::try_from(vocab),
    ) else {
        return -1;
    };
    let opts = recap::cuda::FusedLinearConfig {
        chunk_tokens: (chunk_tokens > 0).then_some(chunk_tokens as usize),
        memory_budget: if memory_budget > 0 {
            memory_budget as usize
        } else {
            512 << 20
        },
        fp32_logits: fp32_logits != 0,
    };
    i64::try_from(recap::cuda::fused_linear_workspace_len(t, b, k, v, &opts)).unwrap_or(-1)
}

/// The chunked fused-linear GRPO loss without a host synchronization: on a device it enqueues every
/// kernel and GEMM of the call on `stream` (writing `d_hidden` and `d_weight` as
/// `recap_fused_linear_grpo_loss` does, intermediates in `workspace`, `workspace_bytes` >=
/// `recap_fused_linear_workspace_len`, and the results in `out`, `recap_logits_output_len(K)`
/// f64 of device memory; `out[0]` is the total loss) and returns; on the host (`device < 0`) the
/// reference fills the same layout at once. With `layout_on_device != 0`, `cu_seqlens`, `lambda`
/// and `membership` are device pointers checked on the device, nothing is copied from the host and
/// the call can be captured in a CUDA graph (after one eager call of its size). Read the result
/// with `recap_logits_output_read`.
///
/// # Safety
/// As `recap_fused_linear_grpo_loss`; `workspace` and `out` device memory of the call's device.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss_async(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    hidden_size: i64,
    vocab: i64,
    hidden: *const c_void,
    weight: *const c_void,
    labels: *const i32,
    old_logp: *const f32,
    ref_logp: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const u8,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    layout_on_device: i32,
    cfg: *const RecapGrpoConfig,
    temperature: f32,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
    workspace: *mut c_void,
    workspace_bytes: i64,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    out: *mut f64,
) -> i32 {
    guard(|| {
        let on_device = layout_on_device != 0;
        let a = LinearArgs::new(
            [num_tokens, hidden_size, vocab, num_seqs],
            (
                cu_seqlens,
                lambda,
                objectives,
                membership,
                num_objectives,
                normalizers,
            ),
            on_device,
            (cfg, temperature, chunk_tokens, memory_budget, fp32_logits),
        )?;
        let (t, h, v, b, k) = (a.t, a.h, a.v, a.b, a.k);
        let inputs = a.inputs(
            labels,
            old_logp,
            ref_logp,
            (advantages, adv_per_token),
            mask,
        );
        let head = a.head(hidden, weight);
        let dev = on_device.then(|| raw::DeviceBatchArrays {
            cu_seqlens: arr(cu_seqlens, b + 1),
            membership: opt_arr(membership, b),
            lambda: Some(arr(lambda, k)),
        });
        let ws = len("workspace_bytes", workspace_bytes)?;
        raw::fused_linear_grpo_loss_async(
            place(device, stream),
            &head,
            &inputs,
            dev.as_ref(),
            &a.cfg,
            &a.lc,
            &a.opts,
            out_arr(workspace as *mut u8, ws),
            out_arr(d_hidden as *mut half::bf16, t * h),
            out_arr(d_weight, v * h),
            out_arr(out, recap::cuda::logits_output_len(k)),
        )?;
        Ok(())
    })
}

/// Reads the output `out` of a `recap_fused_linear_grpo_loss_async` call back (this synchronizes
/// `stream`) into `result` and `stats` (nullable), as `recap_fused_linear_grpo_loss` writes them.
/// `num_objectives`, `cfg`, `has_ref_logp` and `vocab` describe the call. Fails, naming the
/// argument, on labels outside [0, V), a check made on the device that failed, and non-finite
/// inputs unless the config allows them.
///
/// # Safety
/// `out` must hold `recap_logits_output_len(num_objectives)` f64 of `device`'s memory; `result`
/// must be writable; `stats` null or `recap_grpo_stats_len(K)` writable f64.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_logits_output_read(
    device: i32,
    stream: *mut c_void,
    num_objectives: i32,
    cfg: *const RecapGrpoConfig,
    has_ref_logp: i32,
    vocab: i64,
    out: *const f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        let k = objectives_count(num_objectives)?;
        let v = len("vocab", vocab)?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, k)?;
        if !(1..=recap::MAX_OBJECTIVES).contains(&k) {
            return Err(Error::invalid_argument(
                "num_objectives",
                format!("expected 1 <= K <= {}", recap::MAX_OBJECTIVES),
            ));
        }
        let pending = recap::cuda::PendingLogitsLoss::new(
            k,
            has_ref_logp != 0,
            false,
            &cfg,
            &LogprobConfig::default(),
            v,
        );
        let n_out = recap::cuda::logits_output_len(k);
        let o = raw::read_logits_output(place(device, stream), &pending, arr(out, n_out))?;
        write_result(&o.grpo, o.loss, result, stats);
        Ok(())
    })
}

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

fn handle<'a>(h: *mut RecapSchedulerHandle) -> Result<&'a mut RecapScheduler> {
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

#[cfg(test)]
mod tests;
