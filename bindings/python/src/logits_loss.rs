//! The losses from logits and from the last layer (fused-linear), synchronous and asynchronous.

#[allow(unused_imports)]
use crate::prelude::*;

/// The same for the loss from logits (the fused loss's fields, then the entropy statistics).
#[pyfunction]
pub(crate) fn logits_stat_layout(k: usize) -> Vec<(&'static str, usize, usize, bool)> {
    recap_kernels::logits_stat_layout(k)
        .into_iter()
        .map(|f| (f.name, f.offset, f.len, f.per_objective))
        .collect()
}

/// The batch every loss takes besides its per-token policy inputs: a dict the Python op passes
/// (`recap_kernels.ops._batch`), its keys the field names.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct Batch<'py> {
    pub(crate) advantages: Bound<'py, PyAny>,
    pub(crate) mask: Bound<'py, PyAny>,
    pub(crate) cu_seqlens: Bound<'py, PyAny>,
    pub(crate) lambda_: Bound<'py, PyAny>,
    pub(crate) objectives: Vec<i32>,
    pub(crate) membership: Option<Bound<'py, PyAny>>,
    pub(crate) ref_logp: Option<Bound<'py, PyAny>>,
    pub(crate) rollout_logp: Option<Bound<'py, PyAny>>,
    pub(crate) normalizers: Option<Bound<'py, PyAny>>,
    pub(crate) seq_tokens: Option<Bound<'py, PyAny>>,
    pub(crate) adv_per_token: bool,
    pub(crate) config: String,
}

/// A [`Batch`] read for one call: the host layout, the per-token arrays and the options.
pub(crate) struct Loaded {
    pub(crate) lay: Layout,
    pub(crate) advantages: Advantages<In<f32>>,
    pub(crate) mask: Mask<In<f32>, In<u8>>,
    pub(crate) ref_logp: Option<In<f32>>,
    pub(crate) rollout_logp: Option<In<f32>>,
    pub(crate) cfg: GrpoConfig,
}

impl Batch<'_> {
    pub(crate) fn load(&self, call: &Call) -> PyResult<Loaded> {
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
    pub(crate) fn load_async(
        &self,
        call: &Call,
    ) -> PyResult<(Loaded, Option<raw::DeviceBatchArrays>)> {
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
    pub(crate) fn load_device_layout(&self, call: &Call) -> PyResult<Loaded> {
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
    pub(crate) fn logits_inputs(
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

    /// The fused loss's inputs, with these `logp`, `old_logp` and `policy_weight`.
    pub(crate) fn grpo_inputs(
        &self,
        logp: In<f32>,
        old_logp: In<f32>,
        policy_weight: Option<In<f32>>,
    ) -> GrpoInputs<'_, In<f32>, In<u8>> {
        GrpoInputs {
            logp,
            old_logp,
            ref_logp: self.ref_logp,
            rollout_logp: self.rollout_logp,
            policy_weight,
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
pub(crate) fn grpo_loss_from_logits_(
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
                    memory_budget, fp32_logits, d_hidden, d_weight, loss, stats,
                    batch_invariant=false))]

pub(crate) fn fused_linear_grpo_loss(
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
    batch_invariant: bool,
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
        batch_invariant,
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
pub(crate) fn logits_output_len(k: usize) -> usize {
    recap_kernels::cuda::logits_output_len(k)
}

/// Bytes of workspace the asynchronous loss from logits needs for `t` rows.
#[pyfunction]
pub(crate) fn logits_workspace_len(t: usize) -> usize {
    recap_kernels::cuda::logits_workspace_len(t)
}

/// Bytes of workspace the asynchronous fused-linear loss needs.
#[pyfunction]
#[pyo3(signature = (t, b, k, v, chunk_tokens, memory_budget, fp32_logits))]
pub(crate) fn fused_linear_workspace_len(
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
        ..FusedLinearConfig::default()
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
pub(crate) fn grpo_loss_from_logits_async_(
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

pub(crate) fn fused_linear_grpo_loss_async(
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
        ..FusedLinearConfig::default()
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
pub(crate) fn logits_output_read(
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
pub(crate) fn linear_head(
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

/// Registers this family's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(logits_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(logits_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(logits_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_from_logits_async_, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_grpo_loss_async, m)?)?;
    m.add_function(wrap_pyfunction!(logits_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_from_logits_, m)?)?;
    m.add_function(wrap_pyfunction!(fused_linear_grpo_loss, m)?)?;
    Ok(())
}
