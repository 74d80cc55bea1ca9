//! Reference of the fused-linear path: the logits materialized by a plain f64 GEMM (rounded to the
//! logits dtype), the loss from logits, then the two backward GEMMs in f64 from the gradient
//! rounded to bf16 (as the GPU feeds it to cuBLAS).

use crate::config::GrpoConfig;
use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{HostLogitsLossInputs, LogitElem, Logits, LogitsLossOutput, LogprobConfig};
use half::bf16;

/// `hidden [T, H]` and `weight [V, H]` (bf16) through the GRPO loss: writes `d_hidden` (`[T, H]`) and
/// `d_weight` (`[V, H]`) in f32 and returns the loss. `fp32_logits` keeps the logits in f32.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_grpo_loss(
    hidden: &[bf16],
    weight: &[bf16],
    hidden_size: usize,
    inputs: &HostLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    fp32_logits: bool,
    d_hidden: &mut [f32],
    d_weight: &mut [f32],
) -> Result<LogitsLossOutput> {
    fused_linear(
        hidden,
        weight,
        hidden_size,
        inputs,
        config,
        logits_config,
        fp32_logits,
        d_hidden,
        d_weight,
        None,
    )
}

/// The same into the layout of the asynchronous call's output (`cuda::logits_output_len(K)`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_linear_grpo_loss_out(
    hidden: &[bf16],
    weight: &[bf16],
    hidden_size: usize,
    inputs: &HostLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    fp32_logits: bool,
    d_hidden: &mut [f32],
    d_weight: &mut [f32],
    out: &mut [f64],
) -> Result<()> {
    fused_linear(
        hidden,
        weight,
        hidden_size,
        inputs,
        config,
        logits_config,
        fp32_logits,
        d_hidden,
        d_weight,
        Some(out),
    )
    .map(|_| ())
}

#[allow(clippy::too_many_arguments)]
fn fused_linear(
    hidden: &[bf16],
    weight: &[bf16],
    hidden_size: usize,
    inputs: &HostLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    fp32_logits: bool,
    d_hidden: &mut [f32],
    d_weight: &mut [f32],
    raw: Option<&mut [f64]>,
) -> Result<LogitsLossOutput> {
    let h = hidden_size;
    if h == 0 || hidden.len() % h != 0 || weight.len() % h != 0 || weight.is_empty() {
        return Err(Error::invalid_argument(
            "head",
            format!("expected hidden [T, H] and weight [V, H] with H = {h} >= 1"),
        ));
    }
    let (t, v) = (hidden.len() / h, weight.len() / h);
    check_len("d_hidden", d_hidden.len(), t * h, "[T, H]")?;
    check_len("d_weight", d_weight.len(), v * h, "[V, H]")?;
    if fp32_logits {
        run::<f32>(
            hidden,
            weight,
            h,
            t,
            v,
            inputs,
            config,
            logits_config,
            d_hidden,
            d_weight,
            raw,
        )
    } else {
        run::<bf16>(
            hidden,
            weight,
            h,
            t,
            v,
            inputs,
            config,
            logits_config,
            d_hidden,
            d_weight,
            raw,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn run<E: LogitElem>(
    x: &[bf16],
    w: &[bf16],
    h: usize,
    t: usize,
    v: usize,
    inputs: &HostLogitsLossInputs<'_>,
    config: &GrpoConfig,
    logits_config: &LogprobConfig,
    d_hidden: &mut [f32],
    d_weight: &mut [f32],
    raw: Option<&mut [f64]>,
) -> Result<LogitsLossOutput> {
    let xf: Vec<f64> = x.iter().map(|a| a.to_f64()).collect();
    let wf: Vec<f64> = w.iter().map(|a| a.to_f64()).collect();
    let mut logits = vec![E::default(); t * v];
    for r in 0..t {
        for j in 0..v {
            let dot: f64 = (0..h).map(|k| xf[r * h + k] * wf[j * h + k]).sum();
            logits[r * v + j] = E::from_f32(dot as f32);
        }
    }
    let mut dz = vec![E::default(); t * v];
    let out = crate::ops::logits::cpu::from_logits(
        &Logits::dense(&logits[..], t, v),
        inputs,
        config,
        logits_config,
        &mut Logits::dense(&mut dz[..], t, v),
        raw,
    )?;
    let dl: Vec<f64> = dz
        .iter()
        .map(|g| bf16::from_f32(g.to_f32()).to_f64())
        .collect();
    for r in 0..t {
        for k in 0..h {
            d_hidden[r * h + k] = (0..v).map(|j| dl[r * v + j] * wf[j * h + k]).sum::<f64>() as f32;
        }
    }
    for j in 0..v {
        for k in 0..h {
            d_weight[j * h + k] = (0..t).map(|r| dl[r * v + j] * xf[r * h + k]).sum::<f64>() as f32;
        }
    }
    Ok(out)
}
