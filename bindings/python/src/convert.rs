//! The binding's shared machinery: PyTorch tensors read through their attributes (`Tensor`, `DType`,
//! `Device`), one call's place and checks (`Call`), host arrays, the batch layout, advantages,
//! normalizers and the JSON config, and the errors (`RecapError`).

#[allow(unused_imports)]
use crate::prelude::*;

pyo3::create_exception!(
    _native,
    RecapError,
    PyValueError,
    "A failed recap-kernels call (a ValueError): a bad argument (the message names it and what was \
     expected), non-finite inputs, or a CUDA error. Arguments of the wrong type raise its subclass \
     RecapTypeError, also a TypeError."
);

pub(crate) fn err(e: recap_kernels::Error) -> PyErr {
    RecapError::new_err(e.to_string())
}

pub(crate) fn arg_err(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    RecapError::new_err(format!("invalid argument `{arg}`: {msg}"))
}

/// The tensor dtypes the ops take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DType {
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
    pub(crate) fn parse(s: &str) -> DType {
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

    pub(crate) fn name(self) -> &'static str {
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
pub(crate) enum Device {
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
pub(crate) struct Tensor {
    pub(crate) name: &'static str,
    pub(crate) addr: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) contiguous: bool,
}

impl Tensor {
    pub(crate) fn of(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
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

    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn shape_str(&self) -> String {
        format!("{:?}", self.shape)
    }

    pub(crate) fn want(&self, dtypes: &[DType]) -> PyResult<DType> {
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
    pub(crate) fn arr<T>(&self) -> In<T> {
        // SAFETY: the tensor is alive for the call (the caller holds it); `numel` elements of its
        // dtype (checked by `want`, contiguous) start at `data_ptr` in its device's memory.
        unsafe { In::new(self.addr, self.numel()) }
    }

    pub(crate) fn out<T>(&self) -> Out<T> {
        // SAFETY: as `arr`; outputs are fresh tensors of the calling op, written by this call only.
        unsafe { Out::new(self.addr, self.numel()) }
    }
}

/// One op call: where its tensors live (the device of its first tensor, which every per-token
/// tensor must share) and the stream it runs on.
pub(crate) struct Call {
    pub(crate) device: Device,
    pub(crate) place: Place,
    pub(crate) first: &'static str,
}

impl Call {
    pub(crate) fn new(py: Python<'_>, first: &Tensor) -> PyResult<Call> {
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

    pub(crate) fn tensor(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
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

    pub(crate) fn f32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<f32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F32])?;
        Ok(t.arr())
    }

    pub(crate) fn opt_f32(
        &self,
        name: &'static str,
        obj: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<In<f32>>> {
        obj.map(|o| self.f32(name, o)).transpose()
    }

    pub(crate) fn i32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<i32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.arr())
    }

    /// A `[B]` bit-mask array on the call's device: int32 (or uint32) words, read as u32 bits.
    pub(crate) fn bits(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<In<u32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.arr())
    }

    pub(crate) fn out_f32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<f32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F32])?;
        Ok(t.out())
    }

    pub(crate) fn out_i32(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<i32>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::I32])?;
        Ok(t.out())
    }

    pub(crate) fn out_u8(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<u8>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::U8])?;
        Ok(t.out())
    }

    pub(crate) fn out_f64(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Out<f64>> {
        let t = self.tensor(name, obj)?;
        t.want(&[DType::F64])?;
        Ok(t.out())
    }

    /// A `[T]` mask: float32 weights, or uint8 / bool flags.
    pub(crate) fn mask(
        &self,
        name: &'static str,
        obj: &Bound<'_, PyAny>,
    ) -> PyResult<Mask<In<f32>, In<u8>>> {
        let t = self.tensor(name, obj)?;
        Ok(match t.want(&[DType::F32, DType::U8, DType::Bool])? {
            DType::F32 => Mask::F32(t.arr()),
            _ => Mask::U8(t.arr()), // torch.bool is one byte, 0 or 1
        })
    }

    /// A small array the op reads on the host: a CPU tensor, or (for the normalizers) one on this
    /// call's device, read back with a synchronization.
    pub(crate) fn host_f64(
        &self,
        name: &'static str,
        obj: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<f64>> {
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
    pub(crate) fn write<T: raw::Element>(
        &self,
        name: &'static str,
        out: Out<T>,
        v: &[T],
    ) -> PyResult<()> {
        raw::write(self.place, name, out, v).map_err(err)
    }
}

/// A CPU tensor of small host values (`cu_seqlens`, `lambda_`, `membership`).
pub(crate) fn host_tensor(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
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

pub(crate) fn host_i64(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
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

pub(crate) fn host_i32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
    host_i64(name, obj)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            i32::try_from(v)
                .map_err(|_| arg_err(name, format!("{name}[{i}] = {v} exceeds the int32 range")))
        })
        .collect()
}

pub(crate) fn host_u32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
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

pub(crate) fn host_f32(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let t = host_tensor(name, obj)?;
    t.want(&[DType::F32])?;
    raw::read::<f32>(Place::Host, name, t.arr()).map_err(err)
}

/// The whole batch's normalizers (`[2, K + 1]`: token weights, then sequence counts) and
/// per-sequence token weights, when given.
pub(crate) fn read_normalizers(
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
pub(crate) struct Layout {
    pub(crate) cu: Vec<i32>,
    pub(crate) lambda: Vec<f32>,
    pub(crate) kinds: Vec<recap_kernels::ObjectiveKind>,
    pub(crate) membership: Option<Vec<u32>>,
    pub(crate) normalizers: Option<Normalizers>,
}

impl Layout {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read(
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

pub(crate) fn advantages(
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

pub(crate) fn config(json: &str) -> PyResult<GrpoConfig> {
    GrpoConfig::from_json(json).map_err(err)
}
