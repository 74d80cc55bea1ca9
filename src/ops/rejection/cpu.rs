//! Reference of the rollout rejection mask (`kernels/kl.cu`, `recap_rejection_*`), in f64.

use crate::cpu::norms::mask_weight;
use crate::error::Result;
use crate::layout::HostMask;
use crate::rejection::{validate, RejectionCriterion, RsLevel, RsStatistic};

fn statistic(lr: f64, s: RsStatistic) -> f64 {
    let lr = if lr.is_nan() {
        lr
    } else {
        lr.clamp(-20.0, 20.0)
    };
    match s {
        RsStatistic::K1 => -lr,
        RsStatistic::K2 => 0.5 * lr * lr,
        RsStatistic::K3 => lr.exp() - 1.0 - lr,
    }
}

fn keeps(c: &RejectionCriterion, v: f64) -> bool {
    match c.statistic {
        RsStatistic::K1 => v >= c.lower && v <= c.upper,
        _ => v <= c.upper,
    }
}

/// Rejection flags `[T]` of the log-ratios `old_logp - rollout_logp` (`[T]`): bit i set where
/// criterion i rejects the token, 0 at masked tokens (see [`crate::rejection`]).
pub fn rollout_rejection(
    log_ratio: &[f32],
    mask: HostMask<'_>,
    cu_seqlens: &[i32],
    criteria: &[RejectionCriterion],
    flags: &mut [i32],
) -> Result<()> {
    let b = validate(
        log_ratio.len(),
        mask.array_len(),
        cu_seqlens,
        criteria,
        flags.len(),
    )?;
    for s in 0..b {
        let toks = cu_seqlens[s] as usize..cu_seqlens[s + 1] as usize;
        let live: Vec<(usize, f64)> = toks
            .clone()
            .map(|t| (t, mask_weight(&mask, t)))
            .filter(|(_, m)| *m != 0.0)
            .collect();
        let n: f64 = live.iter().map(|(_, m)| m).sum();
        let has_nan = live.iter().any(|(t, _)| log_ratio[*t].is_nan());
        let mut seq_bits = 0i32;
        for (i, c) in criteria.iter().enumerate() {
            let values = live
                .iter()
                .map(|(t, m)| (m, statistic(log_ratio[*t] as f64, c.statistic)));
            let v = match c.level {
                RsLevel::Token => continue,
                RsLevel::SeqSum => values.map(|(m, v)| m * v).sum::<f64>(),
                RsLevel::SeqMean => values.map(|(m, v)| m * v).sum::<f64>() / (n + 1e-8),
                RsLevel::SeqMax => values
                    .map(|(_, v)| v)
                    .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
                    .unwrap_or(0.0),
            };
            if has_nan || !keeps(c, v) {
                seq_bits |= 1 << i;
            }
        }
        for t in toks {
            flags[t] = 0;
        }
        for (t, _) in live {
            let mut bits = seq_bits;
            for (i, c) in criteria.iter().enumerate() {
                if c.level == RsLevel::Token
                    && !keeps(c, statistic(log_ratio[t] as f64, c.statistic))
                {
                    bits |= 1 << i;
                }
            }
            flags[t] = bits;
        }
    }
    Ok(())
}
