//! Reference of kernels 4 and 5 (`kernels/logits.cu`) in f64.

use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogprobConfig};

/// Row statistics in f64: `(LSE, entropy)` of `x = z / tau`.
fn row_stats<E: LogitElem>(row: &[E], inv_tau: f64) -> (f64, f64) {
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

pub(crate) fn check_labels(labels: &[i32], vocab: usize, ignore: i32) -> Result<()> {
    if let Some((t, y)) = labels
        .iter()
        .enumerate()
        .find(|(_, y)| **y != ignore && (**y < 0 || **y as usize >= vocab))
    {
        return Err(Error::arg(
            "labels",
            format!(
                "labels[{t}] = {y} is outside [0, V = {vocab}) and is not ignore_index = {ignore}"
            ),
        ));
    }
    Ok(())
}

/// Kernel 4 on the CPU: per row, `logp = z_y/tau - LSE(z/tau)` (0 for ignored labels), the entropy
/// of `softmax(z/tau)` and the LSE, into `[T]` outputs.
pub fn logprob_forward<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    config: &LogprobConfig,
    logp: &mut [f32],
    entropy: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
    check_len("logp", logp.len(), t, "[T]")?;
    check_len("entropy", entropy.len(), t, "[T]")?;
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
        entropy[r] = h as f32;
        lse[r] = l as f32;
    }
    Ok(())
}

/// Kernel 5 on the CPU: `dz_j = (1/tau)(g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H))` per row
/// into `dlogits` (same shape; its own row stride), rounded to the logits' dtype. Ignored labels
/// take no logp gradient.
pub fn logprob_backward<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    config: &LogprobConfig,
    g_logp: &[f32],
    g_entropy: Option<&[f32]>,
    dlogits: &mut Logits<&mut [E]>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    dlogits.check("dlogits", dlogits.data.len())?;
    if dlogits.rows != t || dlogits.vocab != logits.vocab {
        return Err(Error::arg(
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
    check_labels(labels, logits.vocab, config.ignore_index)?;
    let inv_tau = 1.0 / config.temperature as f64;
    for r in 0..t {
        let row = &logits.data[r * logits.ld..r * logits.ld + logits.vocab];
        let (l, h) = row_stats(row, inv_tau);
        let y = labels[r];
        let g = if y == config.ignore_index {
            0.0
        } else {
            g_logp[r] as f64
        };
        let ge = g_entropy.map_or(0.0, |e| e[r] as f64);
        let out = &mut dlogits.data[r * dlogits.ld..r * dlogits.ld + dlogits.vocab];
        for (j, (o, z)) in out.iter_mut().zip(row).enumerate() {
            let lp = z.to_f32() as f64 * inv_tau - l;
            let p = lp.exp();
            let mut d = g * (if j as i32 == y { 1.0 } else { 0.0 } - p);
            if p > 0.0 {
                d -= ge * p * (lp + h);
            }
            *o = E::from_f32((inv_tau * d) as f32);
        }
    }
    Ok(())
}
