//! The C ABI (`include/recap_kernels.h`): raw device pointers, sizes and a `CUstream` in the
//! caller's device's primary context (the one PyTorch uses). Every function returns a status code
//! (`RECAP_OK` = 0) and `recap_last_error()` gives the message of the last failure on the calling
//! thread; no panic crosses the boundary (each body runs under `catch_unwind`). Arguments are
//! checked (null pointers, sizes, options) before anything touches the device.
//!
//! Device buffers are borrowed for the call only: they are wrapped with
//! `CudaStream::upgrade_device_ptr` and released with `leak` (never freed here); the caller's stream
//! is wrapped with `wrap_borrowed_stream` (never destroyed here).

use crate::advantages::{AdvantageConfig, AdvantageMode};
use crate::config::{
    AggMode, GrpoConfig, IsLevel, IsMode, KlEstimator, ObjectiveKind, PolicyLoss, RolloutCorrection,
};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::layout::{Advantages, GrpoInputs, Mask};
use crate::logits::{Logits, LogprobConfig};
use crate::recap::{Orientation, RecapConfig, RecapScheduler};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

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
    pub clip_low: f32,
    pub clip_high: f32,
    /// Dual-clip constant; <= 0: off.
    pub dual_clip: f32,
    pub log_ratio_clamp: f32,
    /// 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum, 3 token-sum-norm.
    pub agg_mode: i32,
    /// C of token-sum-norm (> 0 when that mode is used).
    pub norm_constant: f32,
    pub kl_coef: f32,
    /// 0 k1, 1 abs, 2 k2, 3 k3 (low_var_kl), 4 k1+, 5 k3+.
    pub kl_estimator: i32,
    pub entropy_coef: f32,
    pub allow_nonfinite: i32,
    /// 0 vanilla, 1 CISPO, 2 SAPO, 3 GSPO.
    pub policy_loss: i32,
    pub tau_pos: f32,
    pub tau_neg: f32,
    /// Two-sided clipping bound; <= 0: off.
    pub delta: f32,
    pub kl_is_correction: i32,
    pub top_entropy_quantile: f32,
    /// Rollout IS: -1 off, 0 token, 1 sequence, 2 geometric.
    pub rollout_level: i32,
    /// 0 truncate, 1 mask, 2 metrics only.
    pub rollout_mode: i32,
    pub rollout_upper: f32,
    /// <= 0: 1 / upper.
    pub rollout_lower: f32,
}

/// Fills `cfg` with the defaults (verl's).
///
/// # Safety
/// `cfg` must be null or point to a writable `RecapGrpoConfig`.
#[no_mangle]
pub unsafe extern "C" fn recap_grpo_config_default(cfg: *mut RecapGrpoConfig) -> i32 {
    guard(|| {
        // SAFETY: checked non-null; the caller guarantees it points to a writable struct.
        let out = unsafe { cfg.as_mut() }.ok_or_else(|| Error::arg("cfg", "null pointer"))?;
        let d = GrpoConfig::default();
        *out = RecapGrpoConfig {
            clip_low: d.clip_low,
            clip_high: d.clip_high,
            dual_clip: d.dual_clip.unwrap_or(0.0),
            log_ratio_clamp: d.log_ratio_clamp,
            agg_mode: 0,
            norm_constant: 0.0,
            kl_coef: d.kl_coef,
            kl_estimator: 3,
            entropy_coef: d.entropy_coef,
            allow_nonfinite: 0,
            policy_loss: 0,
            tau_pos: 1.0,
            tau_neg: 1.05,
            delta: 0.0,
            kl_is_correction: 0,
            top_entropy_quantile: 1.0,
            rollout_level: -1,
            rollout_mode: 0,
            rollout_upper: 2.0,
            rollout_lower: 0.0,
        };
        Ok(())
    })
}

fn pick<T: Copy>(arg: &'static str, table: &[T], i: i32) -> Result<T> {
    usize::try_from(i)
        .ok()
        .and_then(|i| table.get(i).copied())
        .ok_or_else(|| Error::arg(arg, format!("expected 0..{}, got {i}", table.len())))
}

impl RecapGrpoConfig {
    fn to_config(self) -> Result<GrpoConfig> {
        let c = GrpoConfig {
            clip_low: self.clip_low,
            clip_high: self.clip_high,
            dual_clip: (self.dual_clip > 0.0).then_some(self.dual_clip),
            log_ratio_clamp: self.log_ratio_clamp,
            agg_mode: pick("cfg.agg_mode", &AggMode::ALL, self.agg_mode)?,
            norm_constant: (self.norm_constant > 0.0).then_some(self.norm_constant),
            kl_coef: self.kl_coef,
            kl_estimator: pick("cfg.kl_estimator", &KlEstimator::ALL, self.kl_estimator)?,
            entropy_coef: self.entropy_coef,
            allow_nonfinite: self.allow_nonfinite != 0,
            policy_loss: match self.policy_loss {
                0 => PolicyLoss::Vanilla,
                1 => PolicyLoss::Cispo,
                2 => PolicyLoss::Sapo {
                    tau_pos: self.tau_pos,
                    tau_neg: self.tau_neg,
                },
                3 => PolicyLoss::Gspo,
                x => {
                    return Err(Error::arg(
                        "cfg.policy_loss",
                        format!("expected 0..4, got {x}"),
                    ))
                }
            },
            delta: (self.delta > 0.0).then_some(self.delta),
            kl_is_correction: self.kl_is_correction != 0,
            top_entropy_quantile: self.top_entropy_quantile,
            rollout_correction: match self.rollout_level {
                -1 => None,
                l => Some(RolloutCorrection {
                    level: pick(
                        "cfg.rollout_level",
                        &[IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric],
                        l,
                    )?,
                    mode: pick(
                        "cfg.rollout_mode",
                        &[IsMode::Truncate, IsMode::Mask, IsMode::MetricsOnly],
                        self.rollout_mode,
                    )?,
                    upper: self.rollout_upper,
                    lower: (self.rollout_lower > 0.0).then_some(self.rollout_lower),
                }),
            },
        };
        c.validate()?;
        Ok(c)
    }
}

/// Scalar results of the fused loss (per-objective values go to the caller's arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecapGrpoResult {
    pub loss: f64,
    pub kl_loss: f64,
    pub ppo_kl: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub kl_mean: f64,
    pub num_tokens: f64,
    pub num_seqs: f64,
    pub policy_tokens: f64,
    pub nonfinite: f64,
    pub rollout_is_mean: f64,
    pub rollout_is_min: f64,
    pub rollout_is_max: f64,
    pub rollout_is_corrected_fraction: f64,
}

/// A host array of `n` elements (null allowed when `n == 0`).
fn host<'a, T>(arg: &'static str, p: *const T, n: usize) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::arg(arg, "null pointer"));
    }
    // SAFETY: non-null; the C caller guarantees `n` readable elements (documented in the header).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

fn len(arg: &'static str, n: i64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::arg(arg, format!("expected a size >= 0, got {n}")))
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
    host("objectives", objectives, k)?
        .iter()
        .map(|&o| {
            pick(
                "objectives",
                &[ObjectiveKind::Policy, ObjectiveKind::Nll],
                o,
            )
        })
        .collect()
}

/// The primary context of device `ordinal`, opened once per process.
fn gpu(ordinal: i32) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<i32, Arc<Gpu>>>> = OnceLock::new();
    let ord = usize::try_from(ordinal)
        .map_err(|_| Error::arg("device", format!("expected >= 0, got {ordinal}")))?;
    let mut map = GPUS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| Error::NoDevice("device table poisoned".into()))?;
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Gpu::new(ord)?;
    map.insert(ordinal, g.clone());
    Ok(g)
}

/// A caller's device buffer borrowed for one call: released with `leak` (never freed) when
/// dropped, on every path out of the call.
struct Lent<T>(Option<CudaSlice<T>>);

impl<T> Lent<T> {
    fn get(&self) -> Option<&CudaSlice<T>> {
        self.0.as_ref()
    }

    fn get_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        self.0.as_mut()
    }
}

impl<T> Drop for Lent<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.leak();
        }
    }
}

/// The caller's stream, wrapped for one call.
struct Borrowed {
    stream: Arc<CudaStream>,
}

impl Borrowed {
    /// `n` elements at device address `p` (0 elements: a null pointer is fine).
    fn slice<T: DeviceRepr>(
        &self,
        arg: &'static str,
        p: *const c_void,
        n: usize,
    ) -> Result<Lent<T>> {
        if p.is_null() {
            return if n == 0 {
                Ok(Lent(None))
            } else {
                Err(Error::arg(arg, "null device pointer"))
            };
        }
        // SAFETY: the caller guarantees `p` is a device allocation of this context holding at
        // least `n` elements of T, alive for the call; `Lent` leaks (never frees) it on drop.
        Ok(Lent(Some(unsafe {
            self.stream.upgrade_device_ptr::<T>(p as u64, n.max(1))
        })))
    }
}

/// A caller's `[n]` mask, u8 or f32 (null with `n = 0` gives none).
struct LentMask(Lent<u8>, Lent<f32>);

impl LentMask {
    fn new(bw: &Borrowed, mask: *const c_void, is_u8: i32, n: usize) -> Result<Self> {
        Ok(if is_u8 != 0 {
            LentMask(bw.slice::<u8>("mask", mask, n)?, Lent(None))
        } else {
            LentMask(Lent(None), bw.slice::<f32>("mask", mask, n)?)
        })
    }

    fn view(
        &self,
        n: usize,
    ) -> Option<Mask<cudarc::driver::CudaView<'_, f32>, cudarc::driver::CudaView<'_, u8>>> {
        match (self.0.get(), self.1.get()) {
            (Some(m), _) => Some(Mask::U8(m.slice(..n))),
            (_, Some(m)) => Some(Mask::F32(m.slice(..n))),
            _ => None,
        }
    }
}

fn borrow_stream(g: &Arc<Gpu>, stream: *mut c_void) -> Borrowed {
    let s = if stream.is_null() {
        g.stream().clone()
    } else {
        // SAFETY: the caller passes a live CUstream of this device's primary context and keeps it
        // alive for the call; the wrapper does not destroy it.
        unsafe {
            g.context()
                .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream)
        }
    };
    Borrowed { stream: s }
}

/// The fused GRPO loss on device data. Host arrays: `cu_seqlens` [B + 1], `lambda` [K],
/// `objectives` [K] (0 policy, 1 nll), `membership` [B] (nullable). Device arrays: `logp`,
/// `old_logp`, `ref_logp` (nullable), `rollout_logp` (nullable), `mask` ([T] u8 or f32), `advantages`
/// ([B, K], or [T, K] with `adv_per_token`), `grad` [T] (written). `objective_loss` [K] (nullable,
/// host) receives each objective's aggregate.
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
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    result: *mut RecapGrpoResult,
    objective_loss: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = len("num_objectives", num_objectives as i64)?;
        // SAFETY: checked for null; the caller guarantees a valid struct.
        let cfg = unsafe { cfg.as_ref() }
            .ok_or_else(|| Error::arg("cfg", "null pointer"))?
            .to_config()?;
        let (cu, lambda, membership) = host_layout(cu_seqlens, b, lambda, k, membership)?;
        let kinds = host_objectives(objectives, k)?;
        if result.is_null() {
            return Err(Error::arg("result", "null pointer"));
        }
        let adv_rows = if adv_per_token != 0 { t } else { b };
        if t == 0 {
            // an empty batch: the defined result (loss 0, counts 0) without touching the device
            let (zeros, adv0) = (vec![0f32; 0], vec![0f32; adv_rows * k]);
            let out = crate::cpu::grpo_loss(
                &GrpoInputs {
                    logp: &zeros[..],
                    old_logp: &zeros[..],
                    ref_logp: None,
                    rollout_logp: None,
                    policy_weight: None,
                    advantages: Advantages::PerSequence(&adv0[..]),
                    mask: Mask::U8(&[]),
                    cu_seqlens: cu,
                    lambda,
                    objectives: &kinds,
                    membership,
                    normalizers: None,
                },
                &GrpoConfig {
                    rollout_correction: None,
                    ..cfg
                },
                &mut [],
            )?;
            return write_result(&out, result, objective_loss, k);
        }
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let lp = bw.slice::<f32>("logp", logp as _, t)?;
        let old = bw.slice::<f32>("old_logp", old_logp as _, t)?;
        let rf = bw.slice::<f32>(
            "ref_logp",
            ref_logp as _,
            if ref_logp.is_null() { 0 } else { t },
        )?;
        let ro = bw.slice::<f32>(
            "rollout_logp",
            rollout_logp as _,
            if rollout_logp.is_null() { 0 } else { t },
        )?;
        let adv = bw.slice::<f32>("advantages", advantages as _, adv_rows * k)?;
        let lm = LentMask::new(&bw, mask, mask_is_u8, t)?;
        let mut gr = bw.slice::<f32>("grad", grad as _, t)?;
        let s = bw.stream.clone();
        let out = {
            fn view(x: &Lent<f32>, t: usize) -> Option<cudarc::driver::CudaView<'_, f32>> {
                x.get().map(|x| x.slice(..t))
            }
            let (lpv, oldv) = (view(&lp, t), view(&old, t));
            let advv = adv.get().map(|a| a.slice(..adv_rows * k));
            let (Some(lpv), Some(oldv), Some(advv)) = (lpv, oldv, advv) else {
                return Err(Error::arg(
                    "logp",
                    "empty batch: num_tokens = 0 needs no call",
                ));
            };
            let mask = lm
                .view(t)
                .ok_or_else(|| Error::arg("mask", "null device pointer"))?;
            let inputs = GrpoInputs {
                logp: lpv,
                old_logp: oldv,
                ref_logp: view(&rf, t),
                rollout_logp: view(&ro, t),
                policy_weight: None,
                advantages: if adv_per_token != 0 {
                    Advantages::PerToken(advv)
                } else {
                    Advantages::PerSequence(advv)
                },
                mask,
                cu_seqlens: cu,
                lambda,
                objectives: &kinds,
                membership,
                normalizers: None,
            };
            let gslice = gr
                .get_mut()
                .ok_or_else(|| Error::arg("grad", "null device pointer"))?;
            crate::cuda::grpo_loss(&g, &s, &inputs, &cfg, &mut gslice.slice_mut(..t))
        };
        write_result(&out?, result, objective_loss, k)
    })
}

fn write_result(
    out: &crate::output::GrpoOutput,
    result: *mut RecapGrpoResult,
    objective_loss: *mut f64,
    k: usize,
) -> Result<()> {
    let m = &out.metrics;
    // SAFETY: checked non-null by the caller; the C caller guarantees a writable struct.
    unsafe {
        *result = RecapGrpoResult {
            loss: out.loss,
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
    if !objective_loss.is_null() {
        // SAFETY: the caller guarantees K writable doubles.
        unsafe { std::slice::from_raw_parts_mut(objective_loss, k) }
            .copy_from_slice(&out.objective_loss);
    }
    Ok(())
}

/// Runs the caller's macro `$go!(E)` with the logits element type of C code `dtype` (0 f32, 1 f16,
/// 2 bf16), or returns an error naming `dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $go:ident) => {
        match $dtype {
            0 => $go!(f32),
            1 => $go!(half::f16),
            2 => $go!(half::bf16),
            x => Err(Error::arg(
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
        return Err(Error::arg(
            "ld",
            format!("expected ld >= vocab = {v}, got {ld}"),
        ));
    }
    let span = if t == 0 { 0 } else { (t - 1) * ld + v };
    Ok(LogitsShape { t, v, ld, span, lc })
}

/// Log-probabilities, entropy (nullable) and LSE of `rows` rows of `vocab` logits (row stride `ld`
/// elements; `dtype` 0 f32, 1 f16, 2 bf16) at `temperature`, labels `ignore_index` giving 0.
///
/// # Safety
/// Device pointers of `device`'s primary context: `logits` [rows, ld], `labels`, `logp`, `entropy`,
/// `lse` [rows]; `stream` nullable.
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
) -> i32 {
    guard(|| {
        let LogitsShape { t, v, ld, span, lc } =
            logits_shape(rows, vocab, ld, temperature, ignore_index)?;
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let y = bw.slice::<i32>("labels", labels as _, t)?;
        let mut lp = bw.slice::<f32>("logp", logp as _, t)?;
        let mut h = bw.slice::<f32>(
            "entropy",
            entropy as _,
            if entropy.is_null() { 0 } else { t },
        )?;
        let mut l = bw.slice::<f32>("lse", lse as _, t)?;
        let s = bw.stream.clone();
        macro_rules! go {
            ($e:ty) => {{
                let z = bw.slice::<$e>("logits", logits, span)?;
                match (z.get(), y.get(), lp.get_mut(), l.get_mut()) {
                    (Some(z), Some(y), Some(lp), Some(l)) => crate::cuda::logprob_forward(
                        &g,
                        &s,
                        &Logits {
                            data: z.slice(..span),
                            rows: t,
                            vocab: v,
                            ld,
                        },
                        &y.slice(..t),
                        &lc,
                        &mut lp.slice_mut(..t),
                        h.get_mut().map(|h| h.slice_mut(..t)).as_mut(),
                        &mut l.slice_mut(..t),
                    ),
                    _ => Ok(()), // rows = 0
                }
            }};
        }
        by_dtype!(dtype, go)
    })
}

/// The gradient of `g_logp . logp + g_entropy . entropy` with respect to the logits, written over
/// the logits in place (`lse` and `entropy` from `recap_logprob_forward` at the same temperature;
/// `g_entropy` nullable).
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
    temperature: f32,
    ignore_index: i32,
) -> i32 {
    guard(|| {
        let LogitsShape { t, v, ld, span, lc } =
            logits_shape(rows, vocab, ld, temperature, ignore_index)?;
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let y = bw.slice::<i32>("labels", labels as _, t)?;
        let l = bw.slice::<f32>("lse", lse as _, t)?;
        let h = bw.slice::<f32>("entropy", entropy as _, t)?;
        let gl = bw.slice::<f32>("g_logp", g_logp as _, t)?;
        let ge = bw.slice::<f32>(
            "g_entropy",
            g_entropy as _,
            if g_entropy.is_null() { 0 } else { t },
        )?;
        let s = bw.stream.clone();
        macro_rules! go {
            ($e:ty) => {{
                let mut z = bw.slice::<$e>("logits", logits, span)?;
                match (z.get_mut(), y.get(), l.get(), h.get(), gl.get()) {
                    (Some(z), Some(y), Some(l), Some(h), Some(gl)) => {
                        let (yv, lv, hv, gv) =
                            (y.slice(..t), l.slice(..t), h.slice(..t), gl.slice(..t));
                        let gev = ge.get().map(|x| x.slice(..t));
                        let grads = crate::cuda::LogprobGrads {
                            labels: &yv,
                            lse: &lv,
                            entropy: &hv,
                            g_logp: &gv,
                            g_entropy: gev.as_ref(),
                        };
                        crate::cuda::logprob_backward_inplace(
                            &g,
                            &s,
                            &mut Logits {
                                data: z.slice_mut(..span),
                                rows: t,
                                vocab: v,
                                ld,
                            },
                            &grads,
                            &lc,
                        )
                    }
                    _ => Ok(()),
                }
            }};
        }
        by_dtype!(dtype, go)
    })
}

/// Group advantages of device rewards [B, K] into `out` [B, K]: groups of `group_size`
/// consecutive rollouts, or (`group_ids` non-null) dense ids in [0, num_groups); `modes` [K] host
/// (0 grpo, 1 dr_grpo, 2 rloo, 3 batch std).
///
/// # Safety
/// Device pointers of `device`'s primary context; `modes` K host ints.
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
    modes: *const i32,
    eps: f64,
    out: *mut f32,
) -> i32 {
    guard(|| {
        let b = len("num_rollouts", num_rollouts)?;
        let k = len("num_objectives", num_objectives as i64)?;
        let modes = host("modes", modes, k)?
            .iter()
            .map(|&m| {
                pick(
                    "modes",
                    &[
                        AdvantageMode::Grpo,
                        AdvantageMode::DrGrpo,
                        AdvantageMode::Rloo,
                        AdvantageMode::BatchStd,
                    ],
                    m,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = AdvantageConfig {
            modes,
            eps,
            lead: None,
        };
        crate::advantages::validate(b * k, None, &cfg, b * k)?;
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let r = bw.slice::<f32>("rewards", rewards as _, b * k)?;
        let ids = bw.slice::<i32>(
            "group_ids",
            group_ids as _,
            if group_ids.is_null() { 0 } else { b },
        )?;
        let mut o = bw.slice::<f32>("out", out as _, b * k)?;
        let s = bw.stream.clone();
        match (r.get(), o.get_mut()) {
            (Some(r), Some(o)) => {
                let groups = match ids.get() {
                    Some(i) => crate::cuda::DeviceGroups::Ids {
                        ids: i.slice(..b),
                        num_groups: len("num_groups", num_groups)?,
                    },
                    None => crate::cuda::DeviceGroups::Consecutive(len("group_size", group_size)?),
                };
                crate::cuda::group_advantages(
                    &g,
                    &s,
                    &r.slice(..b * k),
                    groups,
                    None,
                    &cfg,
                    &mut o.slice_mut(..b * k),
                )
            }
            _ => Ok(()),
        }
    })
}

/// Per-token KL to the reference: value and `d kl / d logp` (`[T]` each, device), masked tokens 0
/// (`mask` nullable: every token). `estimator`: 0 k1, 1 abs, 2 k2, 3 k3, 4 k1+, 5 k3+.
///
/// # Safety
/// Device pointers of `device`'s primary context holding `num_tokens` elements.
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
        if t == 0 {
            return Ok(());
        }
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let (lp, rf) = (
            bw.slice::<f32>("logp", logp as _, t)?,
            bw.slice::<f32>("ref_logp", ref_logp as _, t)?,
        );
        let m_len = if mask.is_null() { 0 } else { t };
        let lm = LentMask::new(&bw, mask, mask_is_u8, m_len)?;
        let (mut k, mut gr) = (
            bw.slice::<f32>("kl", kl as _, t)?,
            bw.slice::<f32>("grad", grad as _, t)?,
        );
        let mask = lm.view(t);
        match (lp.get(), rf.get(), k.get_mut(), gr.get_mut()) {
            (Some(lp), Some(rf), Some(k), Some(gr)) => crate::cuda::kl(
                &g,
                &bw.stream,
                &lp.slice(..t),
                &rf.slice(..t),
                mask,
                est,
                &mut k.slice_mut(..t),
                &mut gr.slice_mut(..t),
            ),
            _ => Err(Error::arg("logp", "null device pointer")),
        }
    })
}

/// The per-objective weighted reduction of losses `[T, K]` (device) with the mask and layout of the
/// fused loss: `d total / d l` into `grad` `[T, K]` (device); `total` and `objective_loss` `[K]`
/// (nullable) on the host. Aggregation, `norm_constant` from `cfg`.
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
    cfg: *const RecapGrpoConfig,
    grad: *mut f32,
    total: *mut f64,
    objective_loss: *mut f64,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let k = len("num_objectives", num_objectives as i64)?;
        // SAFETY: checked for null; the caller guarantees a valid struct.
        let cfg = unsafe { cfg.as_ref() }
            .ok_or_else(|| Error::arg("cfg", "null pointer"))?
            .to_config()?;
        let (cu, lambda, membership) = host_layout(cu_seqlens, b, lambda, k, membership)?;
        if total.is_null() {
            return Err(Error::arg("total", "null pointer"));
        }
        let out = if t == 0 {
            let zero: [f32; 0] = [];
            crate::cpu::weighted_reduce(
                &crate::layout::ReduceInputs {
                    losses: &zero[..],
                    mask: Mask::U8(&[]),
                    cu_seqlens: cu,
                    lambda,
                    membership,
                    normalizers: None,
                },
                &cfg,
                &mut [],
            )?
        } else {
            let g = gpu(device)?;
            let bw = borrow_stream(&g, stream);
            let l = bw.slice::<f32>("losses", losses as _, t * k)?;
            let lm = LentMask::new(&bw, mask, mask_is_u8, t)?;
            let mut gr = bw.slice::<f32>("grad", grad as _, t * k)?;
            let mask = lm
                .view(t)
                .ok_or_else(|| Error::arg("mask", "null device pointer"))?;
            let (Some(l), Some(gr)) = (l.get(), gr.get_mut()) else {
                return Err(Error::arg("losses", "null device pointer"));
            };
            crate::cuda::weighted_reduce(
                &g,
                &bw.stream,
                &crate::layout::ReduceInputs {
                    losses: l.slice(..t * k),
                    mask,
                    cu_seqlens: cu,
                    lambda,
                    membership,
                    normalizers: None,
                },
                &cfg,
                &mut gr.slice_mut(..t * k),
            )?
        };
        // SAFETY: checked non-null; the caller guarantees a writable double (and K for the array).
        unsafe {
            *total = out.total;
            if !objective_loss.is_null() {
                std::slice::from_raw_parts_mut(objective_loss, k)
                    .copy_from_slice(&out.objective_loss);
            }
        }
        Ok(())
    })
}

/// The chunked fused-linear GRPO loss: `hidden` `[T, H]` and `weight` `[V, H]` (bf16, device),
/// per-token `labels`, `old_logp`, `ref_logp` (nullable), `mask` (u8), advantages as in
/// `recap_grpo_loss`; writes `d_hidden` `[T, H]` (bf16) and `d_weight` `[V, H]` (f32, overwritten).
/// `chunk_tokens` <= 0: sized from `memory_budget` bytes (<= 0: 512 MiB); `fp32_logits` keeps the
/// logits in f32. `result.loss` includes the entropy bonus.
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
    cfg: *const RecapGrpoConfig,
    temperature: f32,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    result: *mut RecapGrpoResult,
    objective_loss: *mut f64,
) -> i32 {
    guard(|| {
        let (t, h, v) = (
            len("num_tokens", num_tokens)?,
            len("hidden_size", hidden_size)?,
            len("vocab", vocab)?,
        );
        let b = len("num_seqs", num_seqs)?;
        let k = len("num_objectives", num_objectives as i64)?;
        // SAFETY: checked for null; the caller guarantees a valid struct.
        let cfg = unsafe { cfg.as_ref() }
            .ok_or_else(|| Error::arg("cfg", "null pointer"))?
            .to_config()?;
        let lc = LogprobConfig {
            temperature,
            ..LogprobConfig::default()
        };
        lc.validate()?;
        let (cu, lambda, membership) = host_layout(cu_seqlens, b, lambda, k, membership)?;
        let kinds = host_objectives(objectives, k)?;
        if result.is_null() {
            return Err(Error::arg("result", "null pointer"));
        }
        if t == 0 || h == 0 || v == 0 {
            return Err(Error::arg(
                "num_tokens",
                format!("expected T, H, V >= 1, got {t}, {h}, {v}"),
            ));
        }
        let opts = crate::cuda::FusedLinearConfig {
            chunk_tokens: (chunk_tokens > 0).then_some(chunk_tokens as usize),
            memory_budget: if memory_budget > 0 {
                memory_budget as usize
            } else {
                512 << 20
            },
            fp32_logits: fp32_logits != 0,
        };
        let adv_rows = if adv_per_token != 0 { t } else { b };
        let g = gpu(device)?;
        let bw = borrow_stream(&g, stream);
        let x = bw.slice::<half::bf16>("hidden", hidden, t * h)?;
        let w = bw.slice::<half::bf16>("weight", weight, v * h)?;
        let y = bw.slice::<i32>("labels", labels as _, t)?;
        let old = bw.slice::<f32>("old_logp", old_logp as _, t)?;
        let rf = bw.slice::<f32>(
            "ref_logp",
            ref_logp as _,
            if ref_logp.is_null() { 0 } else { t },
        )?;
        let adv = bw.slice::<f32>("advantages", advantages as _, adv_rows * k)?;
        let m = bw.slice::<u8>("mask", mask as _, t)?;
        let mut dh = bw.slice::<half::bf16>("d_hidden", d_hidden, t * h)?;
        let mut dw = bw.slice::<f32>("d_weight", d_weight as _, v * h)?;
        let (Some(x), Some(w), Some(y), Some(old), Some(adv), Some(m), Some(dh), Some(dw)) = (
            x.get(),
            w.get(),
            y.get(),
            old.get(),
            adv.get(),
            m.get(),
            dh.get_mut(),
            dw.get_mut(),
        ) else {
            return Err(Error::arg("hidden", "null device pointer"));
        };
        let advv = adv.slice(..adv_rows * k);
        let inputs = crate::cuda::DeviceLogitsLossInputs {
            labels: y.slice(..t),
            old_logp: old.slice(..t),
            ref_logp: rf.get().map(|r| r.slice(..t)),
            rollout_logp: None,
            advantages: if adv_per_token != 0 {
                Advantages::PerToken(advv)
            } else {
                Advantages::PerSequence(advv)
            },
            mask: Mask::U8(m.slice(..t)),
            cu_seqlens: cu,
            lambda,
            objectives: &kinds,
            membership,
            normalizers: None,
        };
        let head = crate::cuda::LinearHead {
            hidden: x.slice(..t * h),
            weight: w.slice(..v * h),
            hidden_size: h,
            vocab: v,
        };
        let out = crate::cuda::fused_linear_grpo_loss(
            &g,
            &bw.stream,
            &head,
            &inputs,
            &cfg,
            &lc,
            &opts,
            &mut dh.slice_mut(..t * h),
            &mut dw.slice_mut(..v * h),
        )?;
        let mut grpo = out.grpo.clone();
        grpo.loss = out.loss;
        write_result(&grpo, result, objective_loss, k)
    })
}

/// An opaque RECAP scheduler.
pub struct RecapSchedulerHandle(RecapScheduler);

/// A scheduler for `k` objectives (`orientations` [K]: 0 loss, 1 reward), half-window `window`
/// (<= 0: 10), softmax temperature (<= 0: 5), `alpha` in [0, 1] for `alpha c + (1 - alpha) i`
/// (< 0: `c + i`). Null on error (see `recap_last_error`).
///
/// # Safety
/// `orientations` must hold `k` ints.
#[no_mangle]
pub unsafe extern "C" fn recap_scheduler_new(
    orientations: *const i32,
    k: i32,
    window: i32,
    temperature: f64,
    alpha: f64,
) -> *mut RecapSchedulerHandle {
    let mut h = std::ptr::null_mut();
    guard(|| {
        let k = len("k", k as i64)?;
        let o = host("orientations", orientations, k)?
            .iter()
            .map(|&x| pick("orientations", &[Orientation::Loss, Orientation::Reward], x))
            .collect::<Result<Vec<_>>>()?;
        let d = RecapConfig::default();
        let cfg = RecapConfig {
            window: if window > 0 {
                window as usize
            } else {
                d.window
            },
            temperature: if temperature > 0.0 {
                temperature
            } else {
                d.temperature
            },
            alpha: (alpha >= 0.0).then_some(alpha),
        };
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
        .ok_or_else(|| Error::arg("scheduler", "null handle"))
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
            return Err(Error::arg(
                "k",
                format!(
                    "the scheduler has {} objectives, got k = {k}",
                    s.num_objectives()
                ),
            ));
        }
        if out.is_null() {
            return Err(Error::arg("out", "null pointer"));
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
            return Err(Error::arg("buf", format!("needs {n} bytes, got {cap}")));
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
        if json.is_null() {
            return Err(Error::arg("json", "null pointer"));
        }
        // SAFETY: non-null NUL-terminated string (the caller's contract).
        let s = unsafe { CStr::from_ptr(json) }
            .to_str()
            .map_err(|_| Error::arg("json", "not UTF-8"))?;
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
