//! Reference of kernel 1, the fused GRPO loss (formulas in `kernels/grpo_loss.cu`).

use crate::config::{GrpoConfig, IsLevel, ObjectiveKind, PolicyLoss};
use crate::cpu::math::{
    agg_weight, geo_mean_ratio, gspo_ratio, kl_is_corrected, kl_token, policy_token, ratio,
    rollout_is, seq_is_log_weight,
};
use crate::cpu::norms::{mask_weight, masked_sum, norms, seq_tokens};
use crate::error::Result;
use crate::layout::{check_len, validate_grpo, Advantages, HostGrpoInputs};
use crate::output::{
    finish_grpo, grpo_slots, slots, GrpoOutput, GrpoSums, NORM_SEQS, NORM_SLOTS, NORM_TOKENS,
};

/// The fused GRPO loss on the CPU: writes `dL/dlogp` into `grad` (`[T]`) and returns the loss,
/// per-objective aggregates and metrics. Validation errors name the argument; non-finite inputs at
/// unmasked tokens are an error unless `config.allow_nonfinite`.
pub fn grpo_loss(
    inputs: &HostGrpoInputs<'_>,
    config: &GrpoConfig,
    grad: &mut [f32],
) -> Result<GrpoOutput> {
    let shape = validate_grpo(inputs, config)?;
    check_len("grad", grad.len(), shape.t, "[T]")?;
    let sums = grpo_sums(inputs, config, grad);
    finish_grpo(
        &sums,
        inputs.lambda,
        config,
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
    )
}

/// The fused loss on the host, into the layout of the asynchronous call's device output
/// (`[RECAP_OUT_SLOTS + slots]`: the loss, the check flags (0), the normalizers, the slots), so a
/// binding's asynchronous entry point behaves the same on a host place. Non-finite inputs are
/// reported when the output is read, as on the device. Returns the output decoded (non-finite
/// inputs allowed).
pub(crate) fn grpo_loss_out(
    inputs: &HostGrpoInputs<'_>,
    config: &GrpoConfig,
    grad: &mut [f32],
    out: &mut [f64],
) -> Result<GrpoOutput> {
    use crate::kernel_layout::{OUT_FLAGS, OUT_LOSS, OUT_NORMS, OUT_SLOTS};
    let shape = validate_grpo(inputs, config)?;
    check_len("grad", grad.len(), shape.t, "[T]")?;
    check_len(
        "out",
        out.len(),
        OUT_SLOTS + grpo_slots(shape.k),
        "grpo_output_len(K)",
    )?;
    let sums = grpo_sums(inputs, config, grad);
    let lenient = GrpoConfig {
        allow_nonfinite: true,
        ..config.clone()
    };
    let o = finish_grpo(
        &sums,
        inputs.lambda,
        &lenient,
        inputs.ref_logp.is_some(),
        inputs.rollout_logp.is_some(),
    )?;
    out[OUT_LOSS] = o.loss;
    out[OUT_FLAGS] = 0.0;
    out[OUT_NORMS..OUT_SLOTS].copy_from_slice(&sums.norms);
    out[OUT_SLOTS..].copy_from_slice(&sums.slots);
    Ok(o)
}

#[allow(clippy::needless_range_loop)] // token loops index several arrays
fn grpo_sums(inp: &HostGrpoInputs<'_>, cfg: &GrpoConfig, grad: &mut [f32]) -> GrpoSums {
    let k = inp.lambda.len();
    let cu = inp.cu_seqlens;
    let local_n_b = seq_tokens(&inp.mask, cu);
    let norms = norms(&local_n_b, inp.membership, k, inp.normalizers);
    let n_b = inp
        .normalizers
        .and_then(|g| g.seq_tokens.clone())
        .unwrap_or(local_n_b);
    let mut s = vec![0.0f64; grpo_slots(k)];
    let e = 3 * k;
    s[e + slots::RATIO_MIN] = f64::INFINITY;
    s[e + slots::RATIO_MAX] = f64::NEG_INFINITY;
    s[e + slots::IS_MIN] = f64::INFINITY;
    s[e + slots::IS_MAX] = f64::NEG_INFINITY;
    let rc = cfg.rollout_correction.as_ref();
    let is_level = rc.map_or(IsLevel::Token, |r| r.level);
    let c = cfg.norm_constant.unwrap_or(0.0) as f64;
    // slots j < k: the objectives' aggregation; slot k: the KL term's (agg_mode)
    let weight = |j: usize, nb: f64| {
        agg_weight(
            if j < k {
                cfg.objective_agg_mode()
            } else {
                cfg.agg_mode
            },
            norms[NORM_TOKENS * NORM_SLOTS + j],
            norms[NORM_SEQS * NORM_SLOTS + j],
            nb,
            c,
        )
    };
    let nonfinite = |v: f32| if v.is_finite() { 0.0 } else { 1.0 };
    let gspo = cfg.policy_loss == PolicyLoss::Gspo;
    let geo = cfg.policy_loss == PolicyLoss::GeoMean;
    let (el, eh) = (cfg.clip_low as f64, cfg.clip_high as f64);
    for b in 0..cu.len() - 1 {
        // GMPO: the sequence's means of min(d, eh) (for A > 0) and max(d, -el) (for A < 0)
        let (geo_up, geo_lo) = if geo {
            let (mut up, mut lo, mut n) = (0.0f64, 0.0f64, 0.0f64);
            for t in cu[b] as usize..cu[b + 1] as usize {
                let m = mask_weight(&inp.mask, t);
                if m != 0.0 {
                    let d = inp.logp[t] as f64 - inp.old_logp[t] as f64;
                    up += m * d.min(eh);
                    lo += m * d.max(-el);
                    n += m;
                }
            }
            if n != 0.0 {
                (up / n, lo / n)
            } else {
                (0.0, 0.0)
            }
        } else {
            (0.0, 0.0)
        };
        // GSPO: the sequence's mean log-ratio over its unmasked tokens (this call's tokens)
        let toks = cu[b] as usize..cu[b + 1] as usize;
        let seq_lr = if gspo {
            let (d, n) = masked_sum(&inp.mask, toks.clone(), |t| {
                inp.logp[t] as f64 - inp.old_logp[t] as f64
            });
            if n != 0.0 {
                d / n
            } else {
                0.0
            }
        } else {
            0.0
        };
        // sequence-level rollout IS: sum (or mean) of m (old - rollout) over unmasked tokens
        let seq_is = match (inp.rollout_logp, is_level) {
            (Some(roll), IsLevel::Sequence | IsLevel::Geometric) => {
                let (d, n) =
                    masked_sum(&inp.mask, toks, |t| inp.old_logp[t] as f64 - roll[t] as f64);
                seq_is_log_weight(is_level, d, n)
            }
            _ => 0.0,
        };
        let bits = inp.membership.map_or(u32::MAX, |m| m[b]) & ((1u64 << k) - 1) as u32;
        let pol =
            (0..k).any(|j| (bits >> j) & 1 == 1 && inp.objectives[j] == ObjectiveKind::Policy);
        for t in cu[b] as usize..cu[b + 1] as usize {
            let m = mask_weight(&inp.mask, t);
            if m == 0.0 {
                grad[t] = 0.0;
                continue;
            }
            s[e + slots::NONFINITE] += if m.is_finite() { 0.0 } else { 1.0 };
            let lp = inp.logp[t];
            s[e + slots::NONFINITE] += nonfinite(lp);
            let mut isw = 1.0f64; // rollout IS weight of the policy terms
            let q = if pol {
                let old = inp.old_logp[t];
                s[e + slots::NONFINITE] += nonfinite(old);
                let q = ratio(lp, old, cfg.log_ratio_clamp);
                s[e + slots::NEG_LOG_RATIO_SUM] -= m * q.log_ratio; // ppo_kl: the token log-ratio in every variant
                let q = if gspo { gspo_ratio(seq_lr) } else { q };
                s[e] += m * q.ratio;
                if let Some(roll) = inp.rollout_logp {
                    let lw = if is_level == IsLevel::Token {
                        s[e + slots::NONFINITE] += nonfinite(roll[t]);
                        old as f64 - roll[t] as f64
                    } else {
                        s[e + slots::NONFINITE] += if seq_is.is_finite() { 0.0 } else { 1.0 };
                        seq_is
                    };
                    let (ratio, weight, corrected) = rollout_is(lw, rc);
                    s[e + slots::IS_SUM] += m * ratio;
                    s[e + slots::IS_MIN] = s[e + slots::IS_MIN].min(ratio);
                    s[e + slots::IS_MAX] = s[e + slots::IS_MAX].max(ratio);
                    s[e + slots::IS_CORRECTED] += if corrected { m } else { 0.0 };
                    isw = weight;
                }
                if let Some(pw) = inp.policy_weight {
                    s[e + slots::NONFINITE] += nonfinite(pw[t]);
                    isw *= pw[t] as f64;
                }
                s[e + slots::POLICY_TOKENS] += m;
                s[e + slots::RATIO_MIN] = s[e + slots::RATIO_MIN].min(q.ratio);
                s[e + slots::RATIO_MAX] = s[e + slots::RATIO_MAX].max(q.ratio);
                Some(q)
            } else {
                None
            };
            let mut g = 0.0f64;
            for j in (0..k).filter(|j| (bits >> j) & 1 == 1) {
                let w = m * weight(j, n_b[b]);
                match (inp.objectives[j], q) {
                    (ObjectiveKind::Policy, Some(q)) => {
                        let a = match inp.advantages {
                            Advantages::PerSequence(a) => a[b * k + j],
                            Advantages::PerToken(a) => a[t * k + j],
                        };
                        s[e + slots::NONFINITE] += nonfinite(a);
                        let q = if geo {
                            geo_mean_ratio(q.log_ratio, if a > 0.0 { geo_up } else { geo_lo })
                        } else {
                            q
                        };
                        let pt = policy_token(q, a, lp, inp.old_logp[t], cfg);
                        s[j] += w * isw * pt.loss;
                        s[k + j] += if pt.clipped { m } else { 0.0 };
                        s[2 * k + j] += if pt.dual { m } else { 0.0 };
                        g += inp.lambda[j] as f64 * w * isw * pt.grad;
                    }
                    _ => {
                        s[j] -= w * lp as f64;
                        g -= inp.lambda[j] as f64 * w;
                    }
                }
            }
            g /= k as f64;
            if let Some(r) = inp.ref_logp {
                let rv = r[t];
                s[e + slots::NONFINITE] += nonfinite(rv);
                let mut kt = kl_token(lp, rv, cfg.kl_estimator);
                if let (true, Some(q)) = (cfg.kl_is_correction, q) {
                    kt = kl_is_corrected(kt, q);
                }
                let w = m * weight(k, n_b[b]);
                s[e + slots::KL_AGG] += w * kt.value;
                s[e + slots::KL_SUM] += m * kt.value;
                g += cfg.kl_coef as f64 * w * kt.grad;
            }
            grad[t] = g as f32;
        }
    }
    GrpoSums { slots: s, norms }
}
