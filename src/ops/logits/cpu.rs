//! Reference of kernels 4 and 5 (`kernels/logits.cu`) in f64.

use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogprobConfig};

/// Row statistics in f64: `(LSE, entropy)` of `x = z / tau`.
pub(crate) fn row_stats<E: LogitElem>(row: &[E], inv_tau: f64) -> (f64, f64) {
    let m = row
        .iter()
        .map(|z| z.to_f32() as f64 * inv_tau)
        .fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (f64::NEG_INFINITY, f64::NAN);
    }
    let s: f64 = row
        .iter()
        .map(|z| (z.to_f32() as f64 * inv_tau - m).exp())
        .sum();
    let lse = m + s.ln();
    let h = -row
        .iter()
        .map(|z| {
            let lp = z.to_f32() as f64 * inv_tau - lse;
            let p = lp.exp();
            if p > 0.0 {
                p * lp
            } else {
                0.0
            }
        })
        .sum::<f64>();
    (lse, h)
}

/// `sum_j p_j^2` of a row whose LSE (at `inv_tau`) is `lse`: `sum_j exp(2 (x_j - lse))`.
pub(crate) fn row_sum_sq<E: LogitElem>(row: &[E], inv_tau: f64, lse: f64) -> f64 {
    row.iter()
        .map(|z| (2.0 * (z.to_f32() as f64 * inv_tau - lse)).exp())
        .sum()
}

pub(crate) fn check_labels(labels: &[i32], vocab: usize, ignore: i32) -> Result<()> {
    if let Some((t, y)) = labels
        .iter()
        .enumerate()
        .find(|(_, y)| **y != ignore && (**y < 0 || **y as usize >= vocab))
    {
        return Err(Error::invalid_argument(
            "labels",
            format!(
                "labels[{t}] = {y} is outside [0, V = {vocab}) and is not ignore_index = {ignore}"
            ),
        ));
    }
    Ok(())
}

/// Kernel 4 on the CPU: per row, `logp = z_y/tau - LSE(z/tau)` (0 for ignored labels), the entropy
/// of `softmax(z/tau)` (when `entropy` is given) and the LSE, into `[T]` outputs: the arguments of
/// `cuda::logprob_forward` on host slices.
pub fn logprob_forward<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    config: &LogprobConfig,
    logp: &mut [f32],
    mut entropy: Option<&mut [f32]>,
    lse: &mut [f32],
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
    check_len("logp", logp.len(), t, "[T]")?;
    if let Some(h) = &entropy {
        check_len("entropy", h.len(), t, "[T]")?;
    }
    check_len("lse", lse.len(), t, "[T]")?;
    check_labels(labels, logits.vocab, config.ignore_index)?;
    let inv_tau = 1.0 / config.temperature as f64;
    for r in 0..t {
        let row = &logits.data[r * logits.ld..r * logits.ld + logits.vocab];
        let (l, h) = row_stats(row, inv_tau);
        let y = labels[r];
        logp[r] = if y == config.ignore_index {
            0.0
        } else {
            (row[y as usize].to_f32() as f64 * inv_tau - l) as f32
        };
        if let Some(e) = entropy.as_deref_mut() {
            e[r] = h as f32;
        }
        lse[r] = l as f32;
    }
    Ok(())
}

/// `sum_j p_j^2` of each row of `softmax(logits / tau)` in f64 (verl's `sum_pi_squared`, what its
/// optimal token baseline needs), into `out` (`[T]`); equal to `exp(LSE(2x) - 2 LSE(x))`.
pub fn sum_pi_squared<E: LogitElem>(
    logits: &Logits<&[E]>,
    config: &LogprobConfig,
    out: &mut [f32],
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    check_len(
        "sum_pi_squared",
        out.len(),
        logits.rows,
        "[T] (the rows of logits)",
    )?;
    let inv_tau = 1.0 / config.temperature as f64;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &logits.data[r * logits.ld..r * logits.ld + logits.vocab];
        let (l, _) = row_stats(row, inv_tau);
        *o = row_sum_sq(row, inv_tau, l) as f32;
    }
    Ok(())
}

/// Kernel 5 on the CPU: `dz_j = (1/tau)(g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H)
/// + 2 g_spp p_j (p_j - sum_k p_k^2))` per row into `dlogits` (same shape; its own row stride),
/// rounded once to the logits' dtype. Ignored labels take no logp gradient; `g_sum_pi_squared` is
/// the upstream gradient of [`sum_pi_squared`], if any.
pub fn logprob_backward<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    config: &LogprobConfig,
    g_logp: &[f32],
    g_entropy: Option<&[f32]>,
    g_sum_pi_squared: Option<&[f32]>,
    dlogits: &mut Logits<&mut [E]>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    dlogits.check("dlogits", dlogits.data.len())?;
    if dlogits.rows != t || dlogits.vocab != logits.vocab {
        return Err(Error::invalid_argument(
            "dlogits",
            format!(
                "expected [T = {t}, V = {}], got [{}, {}]",
                logits.vocab, dlogits.rows, dlogits.vocab
            ),
        ));
    }
    check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
    check_len("g_logp", g_logp.len(), t, "[T]")?;
    if let Some(g) = g_entropy {
        check_len("g_entropy", g.len(), t, "[T]")?;
    }
    if let Some(g) = g_sum_pi_squared {
        check_len("g_sum_pi_squared", g.len(), t, "[T]")?;
    }
    check_labels(labels, logits.vocab, config.ignore_index)?;
    let inv_tau = 1.0 / config.temperature as f64;
    grad_rows(
        logits,
        labels,
        0,
        config,
        (g_logp, g_entropy, g_sum_pi_squared),
        dlogits,
        |_, row| {
            let (l, h) = row_stats(row, inv_tau);
            (l, h, None)
        },
    );
    Ok(())
}

/// `dz_j = (1/tau)(g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H) + 2 g_spp p_j (p_j - S))` for
/// every row, with row `r`'s `(LSE, H)` and, where given, `S = sum_k p_k^2` (a shard's: the whole
/// vocabulary's; else computed over the row) from `stats(r, row)`; the label's column is
/// `y - vocab_start` (no one-hot where it falls outside the logits: another vocabulary shard's);
/// ignored labels take no logp gradient.
#[allow(clippy::type_complexity)]
pub(crate) fn grad_rows<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    vocab_start: usize,
    config: &LogprobConfig,
    (g_logp, g_entropy, g_spp): (&[f32], Option<&[f32]>, Option<&[f32]>),
    dlogits: &mut Logits<&mut [E]>,
    stats: impl Fn(usize, &[E]) -> (f64, f64, Option<f64>),
) {
    let inv_tau = 1.0 / config.temperature as f64;
    for r in 0..logits.rows {
        let row = &logits.data[r * logits.ld..r * logits.ld + logits.vocab];
        // the row's LSE and entropy, and its sum_j p_j^2 where given (a shard's is the whole
        // vocabulary's; otherwise computed from the row below)
        let (l, h, given_sq) = stats(r, row);
        let y = labels[r];
        let local = y as i64 - vocab_start as i64;
        let g = if y == config.ignore_index {
            0.0
        } else {
            g_logp[r] as f64
        };
        let ge = g_entropy.map_or(0.0, |e| e[r] as f64);
        let gs = g_spp.map_or(0.0, |e| e[r] as f64);
        let out = &mut dlogits.data[r * dlogits.ld..r * dlogits.ld + dlogits.vocab];
        if g == 0.0 && ge == 0.0 && gs == 0.0 {
            // no upstream gradient (a masked or ignored token): exactly 0, whatever the logits hold
            out.iter_mut().for_each(|o| *o = E::from_f32(0.0));
            continue;
        }
        let sq = if gs == 0.0 {
            0.0
        } else {
            given_sq.unwrap_or_else(|| row_sum_sq(row, inv_tau, l))
        };
        for (j, (o, z)) in out.iter_mut().zip(row).enumerate() {
            let lp = z.to_f32() as f64 * inv_tau - l;
            let p = lp.exp();
            let mut d = g * (if j as i64 == local { 1.0 } else { 0.0 } - p);
            if p > 0.0 {
                d -= ge * p * (lp + h);
            }
            if gs != 0.0 {
                d += 2.0 * gs * p * (p - sq);
            }
            *o = E::from_f32((inv_tau * d) as f32);
        }
    }
}

/// The GRPO loss straight from logits on the CPU (the reference of
/// [`crate::cuda::grpo_loss_from_logits`]): kernel 4, the fused GRPO loss on the log-probabilities
/// (tokens with ignored labels excluded), the entropy bonus, then kernel 5 into `dlogits`.
pub fn grpo_loss_from_logits<E: LogitElem>(
    logits: &Logits<&[E]>,
    inputs: &crate::logits::HostLogitsLossInputs<'_>,
    config: &crate::config::GrpoConfig,
    logits_config: &LogprobConfig,
    dlogits: &mut Logits<&mut [E]>,
) -> Result<crate::logits::LogitsLossOutput> {
    from_logits(logits, inputs, config, logits_config, dlogits, None)
}

/// The same into the layout of the asynchronous call's output (`cuda::logits_output_len(K)`
/// f64s: the fused loss's output, then the entropy terms; non-finite inputs reported when it is
/// read), so a binding's asynchronous entry point behaves the same on the host.
pub(crate) fn grpo_loss_from_logits_out<E: LogitElem>(
    logits: &Logits<&[E]>,
    inputs: &crate::logits::HostLogitsLossInputs<'_>,
    config: &crate::config::GrpoConfig,
    logits_config: &LogprobConfig,
    dlogits: &mut Logits<&mut [E]>,
    out: &mut [f64],
) -> Result<()> {
    from_logits(logits, inputs, config, logits_config, dlogits, Some(out)).map(|_| ())
}

/// The loss from logits, decoded, and with `raw` also written into the asynchronous output's
/// layout (non-finite inputs then left for the read to report).
pub(crate) fn from_logits<E: LogitElem>(
    logits: &Logits<&[E]>,
    inputs: &crate::logits::HostLogitsLossInputs<'_>,
    config: &crate::config::GrpoConfig,
    logits_config: &LogprobConfig,
    dlogits: &mut Logits<&mut [E]>,
    mut raw: Option<&mut [f64]>,
) -> Result<crate::logits::LogitsLossOutput> {
    use crate::kernel_layout::{
        LOGITS_BAD_LABELS, LOGITS_ENTROPY_LOSS, LOGITS_ENTROPY_MEAN, LOGITS_EXTRA,
        LOGITS_GRPO_LOSS, OUT_LOSS,
    };
    use crate::layout::{GrpoInputs, Mask, ReduceInputs};
    config.validate()?;
    logits_config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_len("labels", inputs.labels.len(), t, "[T] (the rows of logits)")?;
    check_len("mask", inputs.mask.array_len(), t, "[T]")?;
    let (mut logp, mut ent, mut lse) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
    logprob_forward(
        logits,
        inputs.labels,
        logits_config,
        &mut logp,
        Some(&mut ent),
        &mut lse,
    )?;
    let valid: Vec<f32> = (0..t)
        .map(|r| {
            if inputs.labels[r] == logits_config.ignore_index {
                0.0
            } else {
                crate::cpu::norms::mask_weight(&inputs.mask, r) as f32
            }
        })
        .collect();
    let mut g_logp = vec![0f32; t];
    let policy_weight = (config.top_entropy_quantile < 1.0)
        .then(|| crate::logits::top_entropy_mask(&ent, &valid, config.top_entropy_quantile));
    let x: crate::layout::HostGrpoInputs<'_> = GrpoInputs {
        logp: &logp,
        old_logp: inputs.old_logp,
        ref_logp: inputs.ref_logp,
        rollout_logp: inputs.rollout_logp,
        policy_weight: policy_weight.as_deref(),
        advantages: inputs.advantages,
        mask: Mask::F32(&valid),
        cu_seqlens: inputs.cu_seqlens,
        lambda: inputs.lambda,
        objectives: inputs.objectives,
        membership: inputs.membership,
        normalizers: inputs.normalizers,
    };
    let grpo = match raw.as_deref_mut() {
        Some(out) => {
            let main =
                crate::kernel_layout::OUT_SLOTS + crate::output::grpo_slots(inputs.lambda.len());
            check_len(
                "out",
                out.len(),
                main + LOGITS_EXTRA,
                "logits_output_len(K)",
            )?;
            crate::ops::grpo::cpu::grpo_loss_out(&x, config, &mut g_logp, &mut out[..main])?
        }
        None => crate::ops::grpo::cpu::grpo_loss(&x, config, &mut g_logp)?,
    };
    let ent_norms = inputs.normalizers.map(crate::logits::entropy_normalizers);
    let mut w = vec![0f32; t];
    let ent_out = crate::ops::reduce::cpu::weighted_reduce(
        &ReduceInputs {
            losses: &ent,
            mask: Mask::F32(&valid),
            cu_seqlens: inputs.cu_seqlens,
            lambda: &[1.0],
            membership: None,
            normalizers: ent_norms.as_ref(),
        },
        config,
        &mut w,
    )?;
    let vsum: f64 = valid.iter().map(|v| *v as f64).sum();
    let entropy_mean = if vsum > 0.0 {
        valid
            .iter()
            .zip(&ent)
            .filter(|(v, _)| **v != 0.0) // a masked row's entropy is never read
            .map(|(v, h)| *v as f64 * *h as f64)
            .sum::<f64>()
            / vsum
    } else {
        0.0
    };
    let entropy_loss = ent_out.objective_loss[0];
    let g_ent: Vec<f32> = w.iter().map(|x| -config.entropy_coef * x).collect();
    logprob_backward(
        logits,
        inputs.labels,
        logits_config,
        &g_logp,
        Some(&g_ent),
        None,
        dlogits,
    )?;
    let loss = grpo.loss - config.entropy_coef as f64 * entropy_loss;
    if let Some(out) = raw {
        let main = out.len() - LOGITS_EXTRA;
        let extra = &mut out[main..];
        extra[LOGITS_GRPO_LOSS] = grpo.loss;
        extra[LOGITS_ENTROPY_LOSS] = entropy_loss;
        extra[LOGITS_ENTROPY_MEAN] = entropy_mean;
        extra[LOGITS_BAD_LABELS] = 0.0; // the host refused them above
        out[OUT_LOSS] = loss;
    }
    Ok(crate::logits::LogitsLossOutput {
        loss,
        grpo,
        entropy_loss,
        entropy_mean,
    })
}
