//! Reference of the vocabulary-parallel log-probabilities (`kernels/logits.cu` with `sharded`, and
//! `recap_tp_combine`), in f64: a shard's partial statistics, their combine over the shards, and
//! the backward on one shard from the combined statistics.

use crate::error::{Error, Result};
use crate::layout::check_len;
use crate::logits::{LogitElem, Logits, LogprobConfig};
use crate::ops::logits::cpu::{grad_rows, row_stats, row_sum_sq};
use crate::tensor_parallel::{combine_planes, planes};

/// One shard's partial statistics of each row into `partials` (`[3, T]`: the shard's LSE, its
/// entropy, and the label's logit `x_y`, or -inf where the label is another shard's or ignored;
/// `[4, T]` adds the shard's own `sum_j p_j^2`). The shard holds the vocabulary columns
/// `[vocab_start, vocab_start + V)`; labels are global.
pub fn tp_partials<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    vocab_start: usize,
    config: &LogprobConfig,
    partials: &mut [f32],
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    check_len("labels", labels.len(), t, "[T] (the rows of logits)")?;
    let planes = planes(partials.len(), t, "partials", "[planes, T]")?;
    let inv_tau = 1.0 / config.temperature as f64;
    for r in 0..t {
        let row = &logits.data[r * logits.ld..r * logits.ld + logits.vocab];
        let (lse, h) = match row_stats(row, inv_tau) {
            (l, _) if l == f64::NEG_INFINITY => (l, 0.0), // every logit -inf: an empty shard row
            stats => stats,
        };
        let y = labels[r];
        let local = y as i64 - vocab_start as i64;
        let here = y != config.ignore_index && local >= 0 && (local as usize) < logits.vocab;
        partials[r] = lse as f32;
        partials[t + r] = h as f32;
        partials[2 * t + r] = if here {
            (row[local as usize].to_f32() as f64 * inv_tau) as f32
        } else {
            f32::NEG_INFINITY
        };
        if planes == 4 {
            partials[3 * t + r] = if lse == f64::NEG_INFINITY {
                0.0
            } else {
                row_sum_sq(row, inv_tau, lse) as f32
            };
        }
    }
    Ok(())
}

/// The combine of `shards` shards' partials (`[P, 3, T]` or `[P, 4, T]`, in ascending order of
/// their `vocab_start`) into each row's log-probability (0 for ignored labels), entropy and LSE over
/// the whole vocabulary: `LSE = M + log sum_r exp(lse_r - M)`, `w_r = exp(lse_r - LSE)`,
/// `H = sum_r w_r (H_r - log w_r)`, `logp = x_y - LSE`; with 4 planes and `sum_pi_squared`,
/// `sum_j p_j^2 = sum_r w_r^2 q_r`. A label in no shard is an error.
#[allow(clippy::too_many_arguments)]
pub fn tp_combine(
    partials: &[f32],
    shards: usize,
    labels: &[i32],
    config: &LogprobConfig,
    logp: &mut [f32],
    entropy: &mut [f32],
    lse: &mut [f32],
    mut sum_pi_squared: Option<&mut [f32]>,
) -> Result<()> {
    let t = labels.len();
    if shards == 0 {
        return Err(Error::invalid_argument(
            "partials",
            "expected at least one shard",
        ));
    }
    let planes = combine_planes(
        partials.len(),
        shards,
        t,
        [logp.len(), entropy.len(), lse.len()],
        sum_pi_squared.as_deref().map(|q| q.len()),
    )?;
    let at = |r: usize, c: usize, row: usize| partials[(r * planes + c) * t + row] as f64;
    let mut missing = 0usize;
    for row in 0..t {
        let m = (0..shards)
            .map(|r| at(r, 0, row))
            .fold(f64::NEG_INFINITY, f64::max);
        let x_y = (0..shards)
            .map(|r| at(r, 2, row))
            .find(|x| *x > f64::NEG_INFINITY);
        let s: f64 = (0..shards).map(|r| (at(r, 0, row) - m).exp()).sum();
        let l = m + s.ln();
        let h: f64 = (0..shards)
            .map(|r| {
                let lw = at(r, 0, row) - l;
                let w = lw.exp();
                if w > 0.0 {
                    w * (at(r, 1, row) - lw)
                } else {
                    0.0
                }
            })
            .sum();
        if let Some(q) = sum_pi_squared.as_deref_mut() {
            q[row] = (0..shards)
                .map(|r| {
                    let w = (at(r, 0, row) - l).exp();
                    if w > 0.0 {
                        w * w * at(r, 3, row)
                    } else {
                        0.0
                    }
                })
                .sum::<f64>() as f32;
        }
        let ignored = labels[row] == config.ignore_index;
        if !ignored && x_y.is_none() {
            missing += 1;
        }
        logp[row] = match (ignored, x_y) {
            (false, Some(x)) => (x - l) as f32,
            _ => 0.0,
        };
        entropy[row] = h as f32;
        lse[row] = l as f32;
    }
    if missing > 0 {
        return Err(Error::invalid_argument(
            "labels",
            format!(
                "{missing} label(s) in no shard's vocabulary (and not ignore_index = {})",
                config.ignore_index
            ),
        ));
    }
    Ok(())
}

/// The backward on one shard: the shard's slice of the gradient of
/// `g_logp . logp + g_entropy . entropy (+ g_spp . sum_pi_squared)` over the whole vocabulary, from
/// the combined `lse`, `entropy` (and `sum_pi_squared`: `(S, g_spp)`):
/// `dz_j = (1/tau)(g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H) + 2 g_spp p_j (p_j - S))`,
/// `p_j = exp(x_j - LSE)`, with no one-hot where the label is another shard's, into `dlogits`.
#[allow(clippy::too_many_arguments)]
pub fn tp_backward<E: LogitElem>(
    logits: &Logits<&[E]>,
    labels: &[i32],
    vocab_start: usize,
    lse: &[f32],
    entropy: &[f32],
    g_logp: &[f32],
    g_entropy: Option<&[f32]>,
    sum_pi_squared: Option<(&[f32], &[f32])>,
    config: &LogprobConfig,
    dlogits: &mut Logits<&mut [E]>,
) -> Result<()> {
    config.validate()?;
    logits.validate("logits")?;
    let t = logits.rows;
    dlogits.check("dlogits", dlogits.data.len())?;
    if let Some((q, g)) = sum_pi_squared {
        check_len("sum_pi_squared", q.len(), t, "[T]")?;
        check_len("g_sum_pi_squared", g.len(), t, "[T]")?;
    }
    for (arg, n) in [
        ("labels", labels.len()),
        ("lse", lse.len()),
        ("entropy", entropy.len()),
        ("g_logp", g_logp.len()),
    ] {
        check_len(arg, n, t, "[T] (the rows of logits)")?;
    }
    if let Some(g) = g_entropy {
        check_len("g_entropy", g.len(), t, "[T]")?;
    }
    grad_rows(
        logits,
        labels,
        vocab_start,
        config,
        (g_logp, g_entropy, sum_pi_squared.map(|x| x.1)),
        dlogits,
        |r, _| {
            (
                lse[r] as f64,
                entropy[r] as f64,
                sum_pi_squared.map(|x| x.0[r] as f64),
            )
        },
    );
    Ok(())
}
