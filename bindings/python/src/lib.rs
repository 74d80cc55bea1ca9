//! `recap_kernels._native`: the Python extension of recap-kernels.
//!
//! Each function takes PyTorch tensors (read through their `data_ptr`, `shape`, `stride`, `dtype`
//! and `device`, without linking libtorch), checks them (dtype, device, contiguity; the error names
//! the argument) and calls the crate's pointer-level layer [`recap_kernels::raw`]: CPU tensors run
//! the f64 CPU reference, CUDA tensors the kernels on PyTorch's current stream of their device.
//! Outputs are tensors the caller allocated (the Python package's `torch.library` custom ops do,
//! with the same shapes as their fake implementations); loss and statistics are written into them
//! on the tensors' device. Options arrive as the JSON form of [`GrpoConfig`]: one definition, in
//! Rust. The GIL is released while an op runs.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyAny;
use recap_kernels::advantages::{AdvantageConfig, AdvantageMode, Groups};
use recap_kernels::cuda::FusedLinearConfig;
use recap_kernels::raw::{self, In, Out, Place, RawGroups};
use recap_kernels::rollout_is;
use recap_kernels::{
    Advantages, GrpoConfig, GrpoInputs, KlEstimator, Logits, LogitsLossInputs, LogprobConfig, Mask,
    Normalizers, Orientation, RecapConfig, RecapScheduler, ReduceInputs, RejectionCriterion,
};

pyo3::create_exception!(
    _native,
    RecapError,
    PyValueError,
    "A failed recap-kernels call (a ValueError): a bad argument (the message names it and what was \
     expected), non-finite inputs, or a CUDA error. Arguments of the wrong type raise its subclass \
     RecapTypeError, also a TypeError."
);

fn err(e: recap_kernels::Error) -> PyErr {
    RecapError::new_err(e.to_string())
}

fn arg_err(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    RecapError::new_err(format!("invalid argument `{arg}`: {msg}"))
}

/// The tensor dtypes the ops take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    F16,
    BF16,
    F64,
    U8,
    Bool,
    I32,
    I64,
    Other,
}

impl DType {
    fn parse(s: &str) -> DType {
        match s {
            "torch.float32" => DType::F32,
            "torch.float16" => DType::F16,
            "torch.bfloat16" => DType::BF16,
            "torch.float64" => DType::F64,
            "torch.uint8" => DType::U8,
            "torch.bool" => DType::Bool,
            "torch.int32" => DType::I32,
            "torch.int64" => DType::I64,
            _ => DType::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DType::F32 => "torch.float32",
            DType::F16 => "torch.float16",
            DType::BF16 => "torch.bfloat16",
            DType::F64 => "torch.float64",
            DType::U8 => "torch.uint8",
            DType::Bool => "torch.bool",
            DType::I32 => "torch.int32",
            DType::I64 => "torch.int64",
            DType::Other => "another dtype",
        }
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What the ops need to know of a `torch.Tensor`.
struct Tensor {
    name: &'static str,
    addr: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
    dtype: DType,
    device: Device,
    contiguous: bool,
}

impl Tensor {
    fn of(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        if !obj.hasattr("data_ptr")? || !obj.hasattr("dtype")? {
            return Err(arg_err(
                name,
                format!("expected a torch.Tensor, got {}", obj.get_type().name()?),
            ));
        }
        let dev = obj.getattr("device")?;
        let kind: String = dev.getattr("type")?.extract()?;
        let device = match kind.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(
                dev.getattr("index")?
                    .extract::<Option<usize>>()?
                    .unwrap_or(0),
            ),
            other => {
                return Err(arg_err(
                    name,
                    format!("expected a CPU or CUDA tensor, got one on {other}"),
                ))
            }
        };
        let dtype = DType::parse(&obj.getattr("dtype")?.str()?.to_string());
        let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
        let strides: Vec<usize> = obj
            .call_method0("stride")?
            .extract::<Vec<i64>>()?
            .into_iter()
            .map(|s| s.max(0) as usize)
            .collect();
        Ok(Tensor {
            name,
            addr: obj.call_method0("data_ptr")?.extract()?,
            contiguous: obj.call_method0("is_contiguous")?.extract()?,
            shape,
            strides,
            dtype,
            device,
        })
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn shape_str(&self) -> String {
        format!("{:?}", self.shape)
    }

    fn want(&self, dtypes: &[DType]) -> PyResult<DType> {
        if !dtypes.contains(&self.dtype) {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(arg_err(
                self.name,
                format!(
                    "expected dtype {}, got {}",
                    names.join(" or "),
                    self.dtype.name()
                ),
            ));
        }
        if !self.contiguous {
            return Err(arg_err(
                self.name,
                format!(
                    "expected a contiguous tensor, got shape {} with strides {:?} (call .contiguous())",
                    self.shape_str(),
                    self.strides
                ),
            ));
        }
        Ok(self.dtype)
    }

    /// The elements as a raw array.
    fn arr<T>(&self) -> In<T> {
        // SAFETY: the tensor is alive for the call (the caller holds it); `numel` elements of its
        // dtype (checked by `want`, contiguous) start at `data_ptr` in its device's memory.
        unsafe { In::new(self.addr, self.numel()) }
    }

    fn out<T>(&self) -> Out<T> {
        // SAFETY: as `arr`; outputs are fresh tensors of the calling op, written by this call only.
        unsafe { Out::new(self.addr, self.numel()) }
    }
}

/// One op call: where its tensors live (the device of its first tensor, which every per-token
/// tensor must share) and the stream it runs on.
struct Call {
    device: Device,
    place: Place,
    first: &'static str,
}

impl Call {
    fn new(py: Python<'_>, first: &Tensor) -> PyResult<Call> {
        let place = match first.device {
            Device::Cpu => Place::Host,
            Device::Cuda(i) => {
                let stream: usize = py
                    .import("torch.cuda")?
                    .call_method1("current_stream", (i,))?
                    .getattr("cuda_stream")?
                    .extract()?;
                Place::Cuda { device: i, stream }
            }
        };
        Ok(Call {
            device: first.device,
            place,
            first: first.name,
        })
    }

    fn tensor(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        let t = Tensor::of(name, obj)?;
        if t.device != self.device {
            return Err(arg_err(
                name,
                format!(
                    "expected a tensor on {} like `{}`, got one on {}",
                    self.device, self.first, t.device
                ),
            ));
        }
        Ok(t)
    }

    fn f32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<f32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F32])?;
        Ok(t.arr())
    }

    fn opt_f32(
        &self,
        name: &'static str,
        obj: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<In<f32>>> {
        obj.map(|o| self.f32(name, o)).transpose()
    }

    fn i32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<i32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.arr())
    }

    /// A `[B]` bit-mask array on the call's device: int32 (or uint32) words, read as u32 bits.
    fn bits(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<u32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.arr())
    }

    fn out_f32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<f32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F32])?;
        Ok(t.out())
    }

    fn out_i32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<i32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.out())
    }

    fn out_u8(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<u8>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::U8])?;
        Ok(t.out())
    }

    fn out_f64(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<f64>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F64])?;
        Ok(t.out())
    }

    /// A `[T]` mask: float32 weights, or uint8 / bool flags.
    fn mask(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Mask<In<f32>, In<u8>>> {
        let t = self.tensor(name, obj)?;
        Ok(match t.want(&[DType::F32, DType::U8, DType::Bool])? {
            DType::F32 => Mask::F32(t.arr()),
            _ => Mask::U8(t.arr()), // torch.bool is one byte, 0 or 1
        })
    }

    /// A small array the op reads on the host: a CPU tensor, or (for the normalizers) one on this
    /// call's device, read back with a synchronization.
    fn host_f64(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
        let t = Tensor::of(name, obj)?;
        let place = if t.device == Device::Cpu {
            Place::Host
        } else if t.device == self.device {
            self.place
        } else {
            return Err(arg_err(
                name,
                format!(
                    "expected a CPU tensor or one on {}, got one on {}",
                    self.device, t.device
                ),
            ));
        };
        match t.want(&[DType::F64, DType::F32])? {
            DType::F64 => raw::read::<f64>(place, name, t.arr()).map_err(err),
            _ => Ok(raw::read::<f32>(place, name, t.arr())
                .map_err(err)?
                .into_iter()
                .map(f64::from)
                .collect()),
        }
    }

    /// Writes an op's scalar results into its output tensors.
    fn write<T: raw::Element>(&self, name: &'static str, out: Out<T>, v: &[T]) -> PyResult<()> {
        raw::write(self.place, name, out, v).map_err(err)
    }
}

/// A CPU tensor of small host values (`cu_seqlens`, `lambda_`, `membership`).
fn host_tensor(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let t = Tensor::of(name, obj)?;
    if t.device != Device::Cpu {
        return Err(arg_err(
            name,
            format!(
                "expected a CPU tensor (it is read on the host before any launch; reading it from \
                 {} would synchronize), got one on {}",
                t.device, t.device
            ),
        ));
    }
    Ok(t)
}

fn host_i64(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    let t = host_tensor(name, obj)?;
    Ok(match t.want(&[DType::I32, DType::I64])? {
        DType::I32 => raw::read::<i32>(Place::Host, name, t.arr())
            .map_err(err)?
            .into_iter()
            .map(i64::from)
            .collect(),
        _ => raw::read::<i64>(Place::Host, name, t.arr()).map_err(err)?,
    })
}

fn host_i32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
    host_i64(name, obj)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            i32::try_from(v)
                .map_err(|_| arg_err(name, format!("{name}[{i}] = {v} exceeds the int32 range")))
        })
        .collect()
}

fn host_u32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    host_i64(name, obj)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).map_err(|_| {
                arg_err(
                    name,
                    format!("{name}[{i}] = {v} is not a bit mask of objectives"),
                )
            })
        })
        .collect()
}

fn host_f32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let t = host_tensor(name, obj)?;
    t.want(&[DType::F32])?;
    raw::read::<f32>(Place::Host, name, t.arr()).map_err(err)
}

/// The whole batch's normalizers (`[2, K + 1]`: token weights, then sequence counts) and
/// per-sequence token weights, when given.
fn read_normalizers(
    call: &Call,
    normalizers: Option<&Bound<'_, PyAny>>,
    seq_tokens: Option<&Bound<'_, PyAny>>,
    k: usize,
) -> PyResult<Option<Normalizers>> {
    Ok(match normalizers {
        None => {
            if seq_tokens.is_some() {
                return Err(arg_err("seq_tokens", "given without normalizers"));
            }
            None
        }
        Some(n) => {
            let v = call.host_f64("normalizers", n)?;
            if v.len() != 2 * (k + 1) {
                return Err(arg_err(
                    "normalizers",
                    format!(
                        "expected [2, K + 1] = [2, {}] (token weights, then sequence counts; the \
                             KL slot last), got {} elements",
                        k + 1,
                        v.len()
                    ),
                ));
            }
            Some(Normalizers {
                tokens: v[..=k].to_vec(),
                seqs: v[k + 1..].to_vec(),
                seq_tokens: seq_tokens
                    .map(|s| call.host_f64("seq_tokens", s))
                    .transpose()?,
            })
        }
    })
}

/// The batch layout every loss takes: `cu_seqlens`, `lambda_`, `membership`, objectives and the
/// global normalizers, read on the host.
struct Layout {
    cu: Vec<i32>,
    lambda: Vec<f32>,
    kinds: Vec<recap_kernels::ObjectiveKind>,
    membership: Option<Vec<u32>>,
    normalizers: Option<Normalizers>,
}

impl Layout {
    #[allow(clippy::too_many_arguments)]
    fn read(
        call: &Call,
        cu_seqlens: &Bound<'_, PyAny>,
        lambda_: &Bound<'_, PyAny>,
        objectives: &[i32],
        membership: Option<&Bound<'_, PyAny>>,
        normalizers: Option<&Bound<'_, PyAny>>,
        seq_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Layout> {
        let cu = host_i32("cu_seqlens", cu_seqlens)?;
        let lambda = host_f32("lambda_", lambda_)?;
        let kinds = raw::objective_kinds(objectives).map_err(err)?;
        let membership = membership.map(|m| host_u32("membership", m)).transpose()?;
        let k = lambda.len();
        let normalizers = read_normalizers(call, normalizers, seq_tokens, k)?;
        Ok(Layout {
            cu,
            lambda,
            kinds,
            membership,
            normalizers,
        })
    }
}

fn advantages(
    call: &Call,
    obj: &Bound<'_, PyAny>,
    per_token: bool,
) -> PyResult<Advantages<In<f32>>> {
    let a = call.f32("advantages", obj)?;
    Ok(if per_token {
        Advantages::PerToken(a)
    } else {
        Advantages::PerSequence(a)
    })
}

fn config(json: &str) -> PyResult<GrpoConfig> {
    GrpoConfig::from_json(json).map_err(err)
}

/// The validated, canonical JSON form of a loss configuration given as JSON (absent fields take
/// verl's defaults; an unknown field or a value out of range is a RecapError naming it).
#[pyfunction]
fn grpo_config(json: &str) -> PyResult<String> {
    Ok(config(json)?.to_json())
}

/// The fields of the fused loss's statistics vector for `k` objectives: `(name, offset, length,
/// per_objective)`.
#[pyfunction]
fn grpo_stat_layout(k: usize) -> Vec<(&'static str, usize, usize, bool)> {
    recap_kernels::grpo_stat_layout(k)
        .into_iter()
        .map(|f| (f.name, f.offset, f.len, f.per_objective))
        .collect()
}

/// Length (float64 values) of the asynchronous fused loss's output for `k` objectives.
#[pyfunction]
fn grpo_output_len(k: usize) -> usize {
    recap_kernels::cuda::grpo_output_len(k)
}

/// The same for the loss from logits (the fused loss's fields, then the entropy statistics).
#[pyfunction]
fn logits_stat_layout(k: usize) -> Vec<(&'static str, usize, usize, bool)> {
    recap_kernels::logits_stat_layout(k)
        .into_iter()
        .map(|f| (f.name, f.offset, f.len, f.per_objective))
        .collect()
}

/// The fused GRPO loss: `grad` [T] gets dL/dlogp, `loss` (0-dim float32) the loss, `stats`
/// [grpo_stat_layout] the statistics.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logp, old_logp, policy_weight, batch, grad, loss, stats))]
fn grpo_loss(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    policy_weight: Option<&Bound<'_, PyAny>>,
    batch: Batch<'_>,
    grad: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let b = batch.load(&call)?;
    let inputs = GrpoInputs {
        logp: call.f32("logp", logp)?,
        old_logp: call.f32("old_logp", old_logp)?,
        ref_logp: b.ref_logp,
        rollout_logp: b.rollout_logp,
        policy_weight: call.opt_f32("policy_weight", policy_weight)?,
        advantages: b.advantages,
        mask: b.mask,
        cu_seqlens: &b.lay.cu,
        lambda: &b.lay.lambda,
        objectives: &b.lay.kinds,
        membership: b.lay.membership.as_deref(),
        normalizers: b.lay.normalizers.as_ref(),
    };
    let (g, l, s) = (
        call.out_f32("grad", grad)?,
        call.out_f32("loss", loss)?,
        call.out_f64("stats", stats)?,
    );
    let out = py
        .detach(|| raw::grpo_loss(call.place, &inputs, &b.cfg, g))
        .map_err(err)?;
    call.write("loss", l, &[out.loss as f32])?;
    call.write("stats", s, &out.stats())
}

/// The fused GRPO loss without a host synchronization: `grad` [T] gets dL/dlogp, `out`
/// [grpo_output_len(K)] (float64) the device-resident output (the loss at index 0, the check flags,
/// the normalizers, the statistics). `cu_seqlens`, `lambda_` and `membership` are CPU tensors
/// (uploaded) or all three on the call's CUDA device (int32, float32, int32 bits; checked on the
/// device, reported by `grpo_output_read`). On CPU tensors the reference fills the same layout.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logp, old_logp, policy_weight, batch, grad, out))]
fn grpo_loss_async(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    policy_weight: Option<&Bound<'_, PyAny>>,
    batch: Batch<'_>,
    grad: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let (l, dev) = batch.load_async(&call)?;
    let inputs = GrpoInputs {
        logp: call.f32("logp", logp)?,
        old_logp: call.f32("old_logp", old_logp)?,
        ref_logp: l.ref_logp,
        rollout_logp: l.rollout_logp,
        policy_weight: call.opt_f32("policy_weight", policy_weight)?,
        advantages: l.advantages,
        mask: l.mask,
        cu_seqlens: &l.lay.cu,
        lambda: &l.lay.lambda,
        objectives: &l.lay.kinds,
        membership: l.lay.membership.as_deref(),
        normalizers: l.lay.normalizers.as_ref(),
    };
    let (g, o) = (call.out_f32("grad", grad)?, call.out_f64("out", out)?);
    py.detach(|| raw::grpo_loss_async(call.place, &inputs, dev.as_ref(), &l.cfg, g, o))
        .map_err(err)?;
    Ok(())
}

/// Reads an asynchronous fused-loss output back (synchronizing its stream on a device):
/// `(loss, stats)` with stats as `grpo_stat_layout(k)`; `has_ref` / `has_rollout`: whether the call
/// had `ref_logp` / `rollout_logp`. Raises the error of a failed device-side check.
#[pyfunction]
#[pyo3(signature = (out, k, config, has_ref, has_rollout))]
fn grpo_output_read(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    k: usize,
    config: &str,
    has_ref: bool,
    has_rollout: bool,
) -> PyResult<(f64, Vec<f64>)> {
    let t = Tensor::of("out", out)?;
    let call = Call::new(py, &t)?;
    t.want(&[DType::F64])?;
    let cfg = self::config(config)?;
    if !(1..=recap_kernels::MAX_OBJECTIVES).contains(&k) {
        return Err(arg_err(
            "k",
            format!("expected 1 <= K <= {}", recap_kernels::MAX_OBJECTIVES),
        ));
    }
    let pending = recap_kernels::cuda::PendingGrpo::new(k, has_ref, has_rollout, &cfg);
    let o = py
        .detach(|| raw::read_grpo_output(call.place, &pending, t.arr()))
        .map_err(err)?;
    Ok((o.loss, o.stats()))
}

/// Per-token KL value and d kl / d logp into `kl` and `grad` ([T] each).
#[pyfunction]
#[pyo3(signature = (logp, ref_logp, mask, estimator, kl, grad))]
fn kl(
    py: Python<'_>,
    logp: &Bound<'_, PyAny>,
    ref_logp: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    estimator: &str,
    kl: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logp", logp)?;
    let call = Call::new(py, &first)?;
    let est: KlEstimator = estimator.parse().map_err(err)?;
    let (lp, rf) = (call.f32("logp", logp)?, call.f32("ref_logp", ref_logp)?);
    let m = mask.map(|m| call.mask("mask", m)).transpose()?;
    let (k, g) = (call.out_f32("kl", kl)?, call.out_f32("grad", grad)?);
    py.detach(|| raw::kl(call.place, lp, rf, m, est, k, g))
        .map_err(err)
}

/// Rollout rejection flags into `flags` ([T] int32: bit i where option i of verl's `rollout_rs`
/// rejects the token, 0 at masked tokens; the veto, when given, last) of `log_ratio` =
/// old_logp - rollout_logp ([T]).
#[pyfunction]
#[pyo3(signature = (log_ratio, mask, cu_seqlens, rollout_rs, rollout_rs_threshold, veto_threshold, flags))]
#[allow(clippy::too_many_arguments)]
fn rollout_rejection(
    py: Python<'_>,
    log_ratio: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    rollout_rs: &str,
    rollout_rs_threshold: &str,
    veto_threshold: Option<f64>,
    flags: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("log_ratio", log_ratio)?;
    let call = Call::new(py, &first)?;
    let criteria =
        RejectionCriterion::parse_verl_with_veto(rollout_rs, rollout_rs_threshold, veto_threshold)
            .map_err(err)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let (lr, m) = (call.f32("log_ratio", log_ratio)?, call.mask("mask", mask)?);
    let f = call.out_i32("flags", flags)?;
    py.detach(|| raw::rollout_rejection(call.place, lr, m, &cu, &criteria, f))
        .map_err(err)
}

/// Rollout IS weights into `weights` ([T] float32, 0 at masked tokens) of `log_ratio` =
/// old_logp - rollout_logp ([T]), with verl's `rollout_is` level and `rollout_is_threshold`; divided
/// by the batch mean when `batch_normalize`. `stats` ([7] float64): weight sum, units, smallest and
/// largest raw ratio, corrected units, batch mean, the factor the weights were divided by.
#[pyfunction]
#[pyo3(signature = (log_ratio, mask, cu_seqlens, rollout_is, rollout_is_threshold, batch_normalize,
                    weights, stats))]
#[allow(clippy::too_many_arguments)]
fn rollout_is_weights(
    py: Python<'_>,
    log_ratio: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    rollout_is: &str,
    rollout_is_threshold: &str,
    batch_normalize: bool,
    weights: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("log_ratio", log_ratio)?;
    let call = Call::new(py, &first)?;
    let correction = rollout_is::parse_verl(rollout_is, rollout_is_threshold).map_err(err)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let (lr, m) = (call.f32("log_ratio", log_ratio)?, call.mask("mask", mask)?);
    let (w, s) = (
        call.out_f32("weights", weights)?,
        call.out_f64("stats", stats)?,
    );
    let st = py
        .detach(|| raw::rollout_is_weights(call.place, lr, m, &cu, &correction, batch_normalize, w))
        .map_err(err)?;
    call.write("stats", s, &st.to_array())
}

/// `(mean, factor)` of rollout IS weights for the batch whose parts' weight sums and units add up
/// to `weight_sum` and `units`: the batch mean and what the weights are divided by (the
/// data-parallel form of `rollout_is_batch_normalize`).
#[pyfunction]
fn rollout_is_batch_factor(weight_sum: f64, units: f64, rollout_is: &str) -> PyResult<(f64, f64)> {
    let level = rollout_is::parse_level(rollout_is).map_err(err)?;
    Ok((
        rollout_is::batch_mean(weight_sum, units, level),
        rollout_is::batch_factor(weight_sum, units, level),
    ))
}

/// The per-objective weighted reduction of `losses` [T, K]: `grad` [T, K], `total` (0-dim
/// float32) and `stats` ([3K]: each objective's aggregate, token weight and sequence count).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (losses, mask, cu_seqlens, lambda_, membership, normalizers, seq_tokens,
                    config_json, grad, total, stats))]
fn weighted_reduce(
    py: Python<'_>,
    losses: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    lambda_: &Bound<'_, PyAny>,
    membership: Option<&Bound<'_, PyAny>>,
    normalizers: Option<&Bound<'_, PyAny>>,
    seq_tokens: Option<&Bound<'_, PyAny>>,
    config_json: &str,
    grad: &Bound<'_, PyAny>,
    total: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("losses", losses)?;
    let call = Call::new(py, &first)?;
    let cfg = config(config_json)?;
    let lay = Layout::read(
        &call,
        cu_seqlens,
        lambda_,
        &[],
        membership,
        normalizers,
        seq_tokens,
    )?;
    let inputs = ReduceInputs {
        losses: call.f32("losses", losses)?,
        mask: call.mask("mask", mask)?,
        cu_seqlens: &lay.cu,
        lambda: &lay.lambda,
        membership: lay.membership.as_deref(),
        normalizers: lay.normalizers.as_ref(),
    };
    let (g, t, s) = (
        call.out_f32("grad", grad)?,
        call.out_f32("total", total)?,
        call.out_f64("stats", stats)?,
    );
    let out = py
        .detach(|| raw::weighted_reduce(call.place, &inputs, &cfg, g))
        .map_err(err)?;
    call.write("total", t, &[out.total as f32])?;
    let objective_seqs: Vec<f64> = out.objective_seqs.iter().map(|&x| x as f64).collect();
    call.write(
        "stats",
        s,
        &[
            &out.objective_loss[..],
            &out.objective_tokens[..],
            &objective_seqs[..],
        ]
        .concat(),
    )
}

/// This batch's normalizers ([2, K + 1] float64: token weights, then sequence counts, the KL slot
/// last) and per-sequence token weights ([B] float64), on the mask's device.
#[pyfunction]
#[pyo3(signature = (mask, cu_seqlens, membership, k, normalizers, seq_tokens))]
fn count_normalizers(
    py: Python<'_>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    membership: Option<&Bound<'_, PyAny>>,
    k: usize,
    normalizers: &Bound<'_, PyAny>,
    seq_tokens: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("mask", mask)?;
    let call = Call::new(py, &first)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let membership = membership.map(|m| host_u32("membership", m)).transpose()?;
    let m = call.mask("mask", mask)?;
    let (n_out, st_out) = (
        call.out_f64("normalizers", normalizers)?,
        call.out_f64("seq_tokens", seq_tokens)?,
    );
    let n = py
        .detach(|| raw::count_normalizers(call.place, &m, &cu, membership.as_deref(), k))
        .map_err(err)?;
    call.write("normalizers", n_out, &[&n.tokens[..], &n.seqs[..]].concat())?;
    let st = n.seq_tokens.unwrap_or_default();
    call.write("seq_tokens", st_out, &st)
}

/// A `[T, V]` logits tensor (rows may be `ld >= V` elements apart) as raw logits of element `E`.
fn logits_layout(
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

fn span(rows: usize, vocab: usize, ld: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + vocab
    }
}

fn logits_in<E>(t: &Tensor, rows: usize, vocab: usize, ld: usize) -> Logits<In<E>> {
    Logits {
        // SAFETY: a live tensor whose rows of `vocab` elements start `ld` apart (checked by
        // `logits_layout`): `span` elements of E from `data_ptr`.
        data: unsafe { In::new(t.addr, span(rows, vocab, ld)) },
        rows,
        vocab,
        ld,
    }
}

fn logits_out<E>(t: &Tensor, rows: usize, vocab: usize, ld: usize) -> Logits<Out<E>> {
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

/// Log-probabilities, entropy, LSE and (optionally) Σπ² ([T] float32 each) of `logits` [T, V].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, temperature, ignore_index, logp, entropy, lse, sum_pi_squared=None))]
fn logprob_forward(
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
fn logprob_backward_(
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
fn spp_pair<'a, 'py>(
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

/// Tensor parallelism, step 1: a vocabulary shard's partials `[3, T]` (LSE, entropy, label logit
/// or -inf; `[4, T]` adds the shard's own sum_j p_j^2) of `logits` [T, V_r] holding the columns
/// from `vocab_start` on.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, vocab_start, temperature, ignore_index, partials))]
fn tp_partials(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    vocab_start: usize,
    temperature: f32,
    ignore_index: i32,
    partials: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let y = call.i32("labels", labels)?;
    let out = call.out_f32("partials", partials)?;
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_in::<$e>(&t, rows, vocab, ld);
            py.detach(|| raw::tp_partials::<$e>(call.place, &z, y, vocab_start, &lc, out))
        }};
    }
    by_dtype!(t, go).map_err(err)
}

/// Tensor parallelism, step 2: the combine of the shards' partials `[P, 3, T]` or `[P, 4, T]`
/// (ascending vocab_start) into `logp`, `entropy` and `lse` [T], and with 4 planes
/// `sum_pi_squared` [T] where given.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (partials, labels, ignore_index, logp, entropy, lse, sum_pi_squared=None))]
fn tp_combine(
    py: Python<'_>,
    partials: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    ignore_index: i32,
    logp: &Bound<'_, PyAny>,
    entropy: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    sum_pi_squared: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let first = Tensor::of("partials", partials)?;
    let call = Call::new(py, &first)?;
    if first.shape.len() != 3 || !(3..=4).contains(&first.shape[1]) {
        return Err(arg_err(
            "partials",
            format!("expected [P, 3 or 4, T], got shape {}", first.shape_str()),
        ));
    }
    let shards = first.shape[0];
    let part = call.f32("partials", partials)?;
    let y = call.i32("labels", labels)?;
    let (lp, h, l) = (
        call.out_f32("logp", logp)?,
        call.out_f32("entropy", entropy)?,
        call.out_f32("lse", lse)?,
    );
    let lc = LogprobConfig {
        ignore_index,
        ..LogprobConfig::default()
    };
    let q = sum_pi_squared
        .map(|q| call.out_f32("sum_pi_squared", q))
        .transpose()?;
    py.detach(|| raw::tp_combine(call.place, part, shards, y, &lc, lp, h, l, q))
        .map_err(err)
}

/// Tensor parallelism, step 3: the shard's slice of the whole-vocabulary gradient, written over
/// the shard's `logits`, from the combined `lse` and `entropy` (and the combined `sum_pi_squared`
/// with its gradient, both or neither).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, vocab_start, lse, entropy, g_logp, g_entropy, temperature, ignore_index,
                    sum_pi_squared=None, g_sum_pi_squared=None))]
fn tp_backward_(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    vocab_start: usize,
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
        Some(vocab_start),
        (temperature, ignore_index),
    )
}

/// The logits backward of both entry points: in place over `logits`, from `[labels, lse, entropy,
/// g_logp]`, `g_entropy` and `(sum_pi_squared, g_sum_pi_squared)`; with `vocab_start`, the shard's
/// slice of the whole gradient.
#[allow(clippy::type_complexity)]
fn backward(
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

/// The batch every loss takes besides its per-token policy inputs: a dict the Python op passes
/// (`recap_kernels.ops._batch`), its keys the field names.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Batch<'py> {
    advantages: Bound<'py, PyAny>,
    mask: Bound<'py, PyAny>,
    cu_seqlens: Bound<'py, PyAny>,
    lambda_: Bound<'py, PyAny>,
    objectives: Vec<i32>,
    membership: Option<Bound<'py, PyAny>>,
    ref_logp: Option<Bound<'py, PyAny>>,
    rollout_logp: Option<Bound<'py, PyAny>>,
    normalizers: Option<Bound<'py, PyAny>>,
    seq_tokens: Option<Bound<'py, PyAny>>,
    adv_per_token: bool,
    config: String,
}

/// A [`Batch`] read for one call: the host layout, the per-token arrays and the options.
struct Loaded {
    lay: Layout,
    advantages: Advantages<In<f32>>,
    mask: Mask<In<f32>, In<u8>>,
    ref_logp: Option<In<f32>>,
    rollout_logp: Option<In<f32>>,
    cfg: GrpoConfig,
}

impl Batch<'_> {
    fn load(&self, call: &Call) -> PyResult<Loaded> {
        Ok(Loaded {
            cfg: config(&self.config)?,
            lay: Layout::read(
                call,
                &self.cu_seqlens,
                &self.lambda_,
                &self.objectives,
                self.membership.as_ref(),
                self.normalizers.as_ref(),
                self.seq_tokens.as_ref(),
            )?,
            advantages: advantages(call, &self.advantages, self.adv_per_token)?,
            mask: call.mask("mask", &self.mask)?,
            ref_logp: call.opt_f32("ref_logp", self.ref_logp.as_ref())?,
            rollout_logp: call.opt_f32("rollout_logp", self.rollout_logp.as_ref())?,
        })
    }
}

impl Batch<'_> {
    /// The batch of an asynchronous call: with `cu_seqlens` a tensor on the call's CUDA device,
    /// `cu_seqlens`, `lambda_` and `membership` are device arrays (checked there), else as
    /// [`Batch::load`].
    fn load_async(&self, call: &Call) -> PyResult<(Loaded, Option<raw::DeviceBatchArrays>)> {
        let on_device = call.device != Device::Cpu
            && Tensor::of("cu_seqlens", &self.cu_seqlens)?.device != Device::Cpu;
        if !on_device {
            return Ok((self.load(call)?, None));
        }
        let dev = raw::DeviceBatchArrays {
            cu_seqlens: call.i32("cu_seqlens", &self.cu_seqlens)?,
            membership: self
                .membership
                .as_ref()
                .map(|m| call.bits("membership", m))
                .transpose()?,
            lambda: Some(call.f32("lambda_", &self.lambda_)?),
        };
        Ok((self.load_device_layout(call)?, Some(dev)))
    }

    /// As [`Batch::load`], with `cu_seqlens`, `lambda_` and `membership` on the device (not read
    /// here): the layout's host arrays stay empty, the objectives and normalizers are read.
    fn load_device_layout(&self, call: &Call) -> PyResult<Loaded> {
        let kinds = raw::objective_kinds(&self.objectives).map_err(err)?;
        let k = kinds.len();
        Ok(Loaded {
            cfg: config(&self.config)?,
            lay: Layout {
                cu: Vec::new(),
                lambda: Vec::new(),
                kinds,
                membership: None,
                normalizers: read_normalizers(
                    call,
                    self.normalizers.as_ref(),
                    self.seq_tokens.as_ref(),
                    k,
                )?,
            },
            advantages: advantages(call, &self.advantages, self.adv_per_token)?,
            mask: call.mask("mask", &self.mask)?,
            ref_logp: call.opt_f32("ref_logp", self.ref_logp.as_ref())?,
            rollout_logp: call.opt_f32("rollout_logp", self.rollout_logp.as_ref())?,
        })
    }
}

impl Loaded {
    /// The inputs of the losses from logits or from the last layer, with these `labels` and
    /// `old_logp`.
    fn logits_inputs(
        &self,
        labels: In<i32>,
        old_logp: In<f32>,
    ) -> LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>> {
        LogitsLossInputs {
            labels,
            old_logp,
            ref_logp: self.ref_logp,
            rollout_logp: self.rollout_logp,
            advantages: self.advantages,
            mask: self.mask,
            cu_seqlens: &self.lay.cu,
            lambda: &self.lay.lambda,
            objectives: &self.lay.kinds,
            membership: self.lay.membership.as_deref(),
            normalizers: self.lay.normalizers.as_ref(),
        }
    }
}

/// The GRPO loss from logits (log-probs, the fused loss with its KL term, the entropy bonus); the
/// gradient is written over `logits` in place. `loss` (0-dim float32), `stats`
/// [logits_stat_layout].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, old_logp, batch, temperature, ignore_index, loss, stats))]
fn grpo_loss_from_logits_(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    batch: Batch<'_>,
    temperature: f32,
    ignore_index: i32,
    loss: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let b = batch.load(&call)?;
    let inputs = b.logits_inputs(call.i32("labels", labels)?, call.f32("old_logp", old_logp)?);
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    let (l, s) = (call.out_f32("loss", loss)?, call.out_f64("stats", stats)?);
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_out::<$e>(&t, rows, vocab, ld);
            py.detach(|| raw::grpo_loss_from_logits::<$e>(call.place, &z, &inputs, &b.cfg, &lc))
        }};
    }
    let out = by_dtype!(t, go).map_err(err)?;
    call.write("loss", l, &[out.loss as f32])?;
    call.write("stats", s, &out.stats())
}

/// The chunked fused-linear GRPO loss from `hidden` [T, H] and `weight` [V, H] (bf16):
/// `d_hidden` [T, H] (bf16), `d_weight` [V, H] (float32), `loss`, `stats` [logits_stat_layout].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (hidden, weight, labels, old_logp, batch, temperature, chunk_tokens,
                    memory_budget, fp32_logits, d_hidden, d_weight, loss, stats))]
fn fused_linear_grpo_loss(
    py: Python<'_>,
    hidden: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    batch: Batch<'_>,
    temperature: f32,
    chunk_tokens: Option<usize>,
    memory_budget: usize,
    fp32_logits: bool,
    d_hidden: &Bound<'_, PyAny>,
    d_weight: &Bound<'_, PyAny>,
    loss: &Bound<'_, PyAny>,
    stats: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("hidden", hidden)?;
    let call = Call::new(py, &first)?;
    let (head, dho) = linear_head(&call, hidden, weight, d_hidden)?;
    let b = batch.load(&call)?;
    let inputs = b.logits_inputs(call.i32("labels", labels)?, call.f32("old_logp", old_logp)?);
    let lc = LogprobConfig {
        temperature,
        ..LogprobConfig::default()
    };
    let opts = FusedLinearConfig {
        chunk_tokens,
        memory_budget,
        fp32_logits,
    };
    let (dw, l, s) = (
        call.out_f32("d_weight", d_weight)?,
        call.out_f32("loss", loss)?,
        call.out_f64("stats", stats)?,
    );
    let out = py
        .detach(|| {
            raw::fused_linear_grpo_loss(call.place, &head, &inputs, &b.cfg, &lc, &opts, dho, dw)
        })
        .map_err(err)?;
    call.write("loss", l, &[out.loss as f32])?;
    call.write("stats", s, &out.stats())
}

/// Length (float64 values) of the asynchronous losses' from logits output for `k` objectives.
#[pyfunction]
fn logits_output_len(k: usize) -> usize {
    recap_kernels::cuda::logits_output_len(k)
}

/// Bytes of workspace the asynchronous loss from logits needs for `t` rows.
#[pyfunction]
fn logits_workspace_len(t: usize) -> usize {
    recap_kernels::cuda::logits_workspace_len(t)
}

/// Bytes of workspace the asynchronous fused-linear loss needs.
#[pyfunction]
#[pyo3(signature = (t, b, k, v, chunk_tokens, memory_budget, fp32_logits))]
fn fused_linear_workspace_len(
    t: usize,
    b: usize,
    k: usize,
    v: usize,
    chunk_tokens: Option<usize>,
    memory_budget: usize,
    fp32_logits: bool,
) -> usize {
    let opts = FusedLinearConfig {
        chunk_tokens,
        memory_budget,
        fp32_logits,
    };
    recap_kernels::cuda::fused_linear_workspace_len(t, b, k, v, &opts)
}

/// The GRPO loss from logits without a host synchronization: the gradient over `logits` in place,
/// intermediates in `workspace` (uint8, logits_workspace_len(T) bytes), the device-resident output
/// in `out` (float64, logits_output_len(K); the total loss at index 0). `cu_seqlens`, `lambda_` and
/// `membership` are CPU tensors or all three on the call's CUDA device (checked there, reported by
/// `logits_output_read`). On CPU tensors the reference fills the same layout.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, labels, old_logp, batch, temperature, ignore_index, workspace, out))]
fn grpo_loss_from_logits_async_(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    batch: Batch<'_>,
    temperature: f32,
    ignore_index: i32,
    workspace: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("logits", logits)?;
    let call = Call::new(py, &first)?;
    let (t, rows, vocab, ld) = logits_layout(&call, "logits", logits)?;
    let (b, dev) = batch.load_async(&call)?;
    let inputs = b.logits_inputs(call.i32("labels", labels)?, call.f32("old_logp", old_logp)?);
    let lc = LogprobConfig {
        temperature,
        ignore_index,
    };
    let (ws, o) = (
        call.out_u8("workspace", workspace)?,
        call.out_f64("out", out)?,
    );
    macro_rules! go {
        ($e:ty) => {{
            let z = logits_out::<$e>(&t, rows, vocab, ld);
            py.detach(|| {
                raw::grpo_loss_from_logits_async::<$e>(
                    call.place,
                    &z,
                    &inputs,
                    dev.as_ref(),
                    &b.cfg,
                    &lc,
                    ws,
                    o,
                )
            })
        }};
    }
    by_dtype!(t, go).map_err(err)?;
    Ok(())
}

/// The chunked fused-linear GRPO loss without a host synchronization: `d_hidden`, `d_weight` as
/// `fused_linear_grpo_loss` writes them, intermediates in `workspace` (uint8,
/// fused_linear_workspace_len bytes), the output in `out` (float64, logits_output_len(K)).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (hidden, weight, labels, old_logp, batch, temperature, chunk_tokens,
                    memory_budget, fp32_logits, workspace, d_hidden, d_weight, out))]
fn fused_linear_grpo_loss_async(
    py: Python<'_>,
    hidden: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    labels: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    batch: Batch<'_>,
    temperature: f32,
    chunk_tokens: Option<usize>,
    memory_budget: usize,
    fp32_logits: bool,
    workspace: &Bound<'_, PyAny>,
    d_hidden: &Bound<'_, PyAny>,
    d_weight: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("hidden", hidden)?;
    let call = Call::new(py, &first)?;
    let (head, dh) = linear_head(&call, hidden, weight, d_hidden)?;
    let (b, dev) = batch.load_async(&call)?;
    let inputs = b.logits_inputs(call.i32("labels", labels)?, call.f32("old_logp", old_logp)?);
    let lc = LogprobConfig {
        temperature,
        ..LogprobConfig::default()
    };
    let opts = FusedLinearConfig {
        chunk_tokens,
        memory_budget,
        fp32_logits,
    };
    let (ws, dw, o) = (
        call.out_u8("workspace", workspace)?,
        call.out_f32("d_weight", d_weight)?,
        call.out_f64("out", out)?,
    );
    py.detach(|| {
        raw::fused_linear_grpo_loss_async(
            call.place,
            &head,
            &inputs,
            dev.as_ref(),
            &b.cfg,
            &lc,
            &opts,
            ws,
            dh,
            dw,
            o,
        )
    })
    .map_err(err)?;
    Ok(())
}

/// Reads an asynchronous loss-from-logits or fused-linear output back (synchronizing its stream on
/// a device): `(loss, stats)` with stats as `logits_stat_layout(k)`. Raises the error of labels out
/// of range or of a failed device-side check.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, k, config, has_ref, has_rollout, ignore_index, vocab))]
fn logits_output_read(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    k: usize,
    config: &str,
    has_ref: bool,
    has_rollout: bool,
    ignore_index: i32,
    vocab: usize,
) -> PyResult<(f64, Vec<f64>)> {
    let t = Tensor::of("out", out)?;
    let call = Call::new(py, &t)?;
    t.want(&[DType::F64])?;
    let cfg = self::config(config)?;
    if !(1..=recap_kernels::MAX_OBJECTIVES).contains(&k) {
        return Err(arg_err(
            "k",
            format!("expected 1 <= K <= {}", recap_kernels::MAX_OBJECTIVES),
        ));
    }
    let lc = LogprobConfig {
        ignore_index,
        ..LogprobConfig::default()
    };
    let pending =
        recap_kernels::cuda::PendingLogitsLoss::new(k, has_ref, has_rollout, &cfg, &lc, vocab);
    let o = py
        .detach(|| raw::read_logits_output(call.place, &pending, t.arr()))
        .map_err(err)?;
    Ok((o.loss, o.stats()))
}

/// The head of a fused-linear call: `hidden` [T, H] and `weight` [V, H] (bf16), and `d_hidden`
/// [T, H] (bf16) to write.
fn linear_head(
    call: &Call,
    hidden: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    d_hidden: &Bound<'_, PyAny>,
) -> PyResult<(raw::RawHead, Out<half::bf16>)> {
    let (x, w) = (
        call.tensor("hidden", hidden)?,
        call.tensor("weight", weight)?,
    );
    x.want(&[DType::BF16])?;
    w.want(&[DType::BF16])?;
    if x.shape.len() != 2 || w.shape.len() != 2 || x.shape[1] != w.shape[1] {
        return Err(arg_err(
            "weight",
            format!(
                "expected hidden [T, H] and weight [V, H], got {} and {}",
                x.shape_str(),
                w.shape_str()
            ),
        ));
    }
    let dh = call.tensor("d_hidden", d_hidden)?;
    dh.want(&[DType::BF16])?;
    Ok((
        raw::RawHead {
            hidden: x.arr(),
            weight: w.arr(),
            hidden_size: x.shape[1],
        },
        dh.out(),
    ))
}

/// Group advantages of `rewards` [B, K] into `out` [B, K]: groups of `group_size` consecutive
/// rollouts, or `group_ids` [B] (any ids on the CPU; dense ids in [0, num_groups) on a GPU); one
/// mode per objective (the crate's `AdvantageMode` names); `lengths` [B] int32 response lengths
/// (opo, reinforce_plus_plus*); `baselines` [B, K] float32 (as `out`; remax);
/// `reward_weights` [K]: one advantage of the weighted columns
/// (sum-then-normalize, or normalize-then-sum with gdpo), `out` [B, 1].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (rewards, group_ids, lengths, baselines, group_size, num_groups, modes, eps, singletons, reward_weights, out))]
fn group_advantages(
    py: Python<'_>,
    rewards: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    lengths: Option<&Bound<'_, PyAny>>,
    baselines: Option<&Bound<'_, PyAny>>,
    group_size: usize,
    num_groups: usize,
    modes: Vec<String>,
    eps: f64,
    singletons: &str,
    reward_weights: Option<Vec<f64>>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("rewards", rewards)?;
    let call = Call::new(py, &first)?;
    let modes = modes
        .iter()
        .map(|m| m.parse::<AdvantageMode>())
        .collect::<recap_kernels::Result<Vec<_>>>()
        .map_err(err)?;
    let r = call.f32("rewards", rewards)?;
    let groups = match group_ids {
        Some(g) => RawGroups::Ids {
            ids: call.i32("group_ids", g)?,
            num_groups,
        },
        None => RawGroups::Consecutive(group_size),
    };
    let lengths = lengths.map(|l| call.i32("lengths", l)).transpose()?;
    let baselines = baselines.map(|b| call.f32("baselines", b)).transpose()?;
    let o = call.out_f32("out", out)?;
    let cfg = AdvantageConfig {
        modes,
        eps,
        lead: None,
        reward_weights,
        singletons: singletons.parse().map_err(err)?,
    };
    py.detach(|| raw::group_advantages(call.place, r, groups, lengths, baselines, &cfg, o))
        .map_err(err)
}

/// verl's optimal token baseline into `advantages` and `returns` ([T] float32 each) of packed
/// per-token inputs; groups of `group_size` consecutive sequences, or `group_ids` [B] (a CPU
/// tensor of any int ids, read on the host like `cu_seqlens`).
#[pyfunction]
#[pyo3(signature = (token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, cu_seqlens, group_ids, group_size, multi_turn, handle_zero_tail, eps, advantages, returns))]
#[allow(clippy::too_many_arguments)]
fn optimal_token_baseline(
    py: Python<'_>,
    token_rewards: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    sum_pi_squared: &Bound<'_, PyAny>,
    rollout_is_weights: Option<&Bound<'_, PyAny>>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    group_size: usize,
    multi_turn: bool,
    handle_zero_tail: bool,
    eps: f64,
    advantages: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("token_rewards", token_rewards)?;
    let call = Call::new(py, &first)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let ids = group_ids.map(|g| host_i32("group_ids", g)).transpose()?;
    let groups = match &ids {
        Some(ids) => Groups::Ids(ids),
        None => Groups::Consecutive(group_size),
    };
    let x = recap_kernels::TokenBaselineInputs {
        token_rewards: call.f32("token_rewards", token_rewards)?,
        old_logp: call.f32("old_logp", old_logp)?,
        sum_pi_squared: call.f32("sum_pi_squared", sum_pi_squared)?,
        rollout_is_weights: call.opt_f32("rollout_is_weights", rollout_is_weights)?,
        mask: call.mask("mask", mask)?,
        cu_seqlens: &cu,
        groups,
    };
    let config = recap_kernels::TokenBaselineConfig {
        multi_turn,
        handle_zero_tail,
        eps,
    };
    let (a, r) = (
        call.out_f32("advantages", advantages)?,
        call.out_f32("returns", returns)?,
    );
    py.detach(|| raw::optimal_token_baseline(call.place, &x, &config, a, r))
        .map_err(err)
}

/// RECAP's dynamic objective weights (the crate's `RecapScheduler`): `observe` one monitored value
/// per objective and step, `weights` gives the K objective weights.
#[pyclass(name = "RecapScheduler", module = "recap_kernels._native")]
struct PyRecapScheduler(RecapScheduler);

#[pymethods]
impl PyRecapScheduler {
    /// `orientations`: "reward" (higher is better) or "loss" per objective; `config_json`: the
    /// scheduler options as JSON over the preset's ("paper": its equations, "authors": its
    /// authors' code; `RecapConfig::preset`).
    #[new]
    #[pyo3(signature = (orientations, config_json="{}", preset="paper"))]
    fn new(orientations: Vec<String>, config_json: &str, preset: &str) -> PyResult<Self> {
        let o = orientations
            .iter()
            .map(|x| x.parse::<Orientation>())
            .collect::<recap_kernels::Result<Vec<_>>>()
            .map_err(err)?;
        let cfg = RecapConfig::preset_with_json(preset, config_json).map_err(err)?;
        Ok(PyRecapScheduler(RecapScheduler::new(&o, cfg).map_err(err)?))
    }

    /// Records one step's monitored values (K floats).
    fn observe(&mut self, values: Vec<f64>) -> PyResult<()> {
        self.0.observe(&values).map_err(err)
    }

    /// The current K weights.
    fn weights(&self) -> Vec<f32> {
        self.0.weights()
    }

    /// The number of objectives.
    #[getter]
    fn num_objectives(&self) -> usize {
        self.0.num_objectives()
    }

    /// The number of observed steps.
    #[getter]
    fn steps(&self) -> u64 {
        self.0.steps()
    }

    /// The whole state as JSON (a checkpoint).
    fn to_json(&self) -> PyResult<String> {
        self.0.to_json().map_err(err)
    }

    /// A scheduler restored from `to_json`'s output.
    #[staticmethod]
    fn from_json(json: &str) -> PyResult<Self> {
        Ok(PyRecapScheduler(
            RecapScheduler::from_json(json).map_err(err)?,
        ))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KERNELS_COMPILED", recap_kernels::cuda::KERNELS_COMPILED)?;
    m.add("CUDA_ARCHS", recap_kernels::cuda::CUDA_ARCHS)?;
    m.add("NVCC_VERSION", recap_kernels::cuda::NVCC_VERSION)?;
    m.add("RecapError", m.py().get_type::<RecapError>())?;
    m.add("ROLLOUT_IS_STATS", recap_kernels::RolloutIsStats::LEN)?;
    m.add_class::<PyRecapScheduler>()?;
    m.add_function(wrap_pyfunction!(grpo_config, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(logits_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_async, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(logits_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(logits_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_from_logits_async_, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_grpo_loss_async, m)?)?;
    m.add_function(wrap_pyfunction!(logits_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(kl, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_rejection, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_is_weights, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_is_batch_factor, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(count_normalizers, m)?)?;
    m.add_function(wrap_pyfunction!(logprob_forward, m)?)?;
    m.add_function(wrap_pyfunction!(logprob_backward_, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_from_logits_, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_grpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(group_advantages, m)?)?;
    m.add_function(wrap_pyfunction!(optimal_token_baseline, m)?)?;
    m.add_function(wrap_pyfunction!(tp_partials, m)?)?;
    m.add_function(wrap_pyfunction!(tp_combine, m)?)?;
    m.add_function(wrap_pyfunction!(tp_backward_, m)?)?;
    Ok(())
}
