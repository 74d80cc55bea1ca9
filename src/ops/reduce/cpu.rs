//! Reference of kernel 3, the per-objective weighted loss reduction (formulas in `kernels/reduce.cu`).

use crate::config::GrpoConfig;
use crate::cpu::math::agg_weight;
use crate::cpu::norms::{mask_weight, norms, seq_tokens};
use crate::error::Result;
use crate::layout::{check_len, validate_reduce, HostReduceInputs};
use crate::output::{finish_reduce, ReduceOutput, NORM_SEQS, NORM_SLOTS, NORM_TOKENS};

/// Aggregates per-token losses `[T, K]` per objective with `config.agg_mode` (and
/// `config.norm_constant`), returns the aggregates and `(1/K) sum_k lambda_k agg_k`, and writes
/// `d total / d l_tk` into `grad` (`[T, K]`).
pub fn weighted_reduce(
    inputs: &HostReduceInputs<'_>,
    config: &GrpoConfig,
    grad: &mut [f32],
) -> Result<ReduceOutput> {
    let shape = validate_reduce(inputs, config.agg_mode, config.norm_constant)?;
    let k = shape.k;
    check_len("grad", grad.len(), shape.t * k, "[T, K]")?;
    let cu = inputs.cu_seqlens;
    let local_n_b = seq_tokens(&inputs.mask, cu);
    let norms = norms(&local_n_b, inputs.membership, k, inputs.normalizers);
    let n_b = inputs
        .normalizers
        .and_then(|g| g.seq_tokens.clone())
        .unwrap_or(local_n_b);
    let c = config.norm_constant.unwrap_or(0.0) as f64;
    let mut agg = vec![0.0f64; k];
    for b in 0..shape.b {
        let bits = inputs.membership.map_or(u32::MAX, |m| m[b]);
        for t in cu[b] as usize..cu[b + 1] as usize {
            let m = mask_weight(&inputs.mask, t);
            for j in 0..k {
                let mut g = 0.0;
                if m != 0.0 && (bits >> j) & 1 == 1 {
                    let w = m * agg_weight(
                        config.agg_mode,
                        norms[NORM_TOKENS * NORM_SLOTS + j],
                        norms[NORM_SEQS * NORM_SLOTS + j],
                        n_b[b],
                        c,
                    );
                    agg[j] += w * inputs.losses[t * k + j] as f64;
                    g = inputs.lambda[j] as f64 * w / k as f64;
                }
                grad[t * k + j] = g as f32;
            }
        }
    }
    Ok(finish_reduce(agg, &norms, inputs.lambda))
}
