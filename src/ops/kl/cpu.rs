//! Reference of kernel 2, the standalone per-token KL (formulas in `kernels/grpo_math.cuh`).

use crate::config::KlEstimator;
use crate::cpu::math::kl_token;
use crate::cpu::norms::mask_weight;
use crate::error::Result;
use crate::layout::HostMask;

/// Per-token KL value and gradient `d kl_t / d logp_t` into `kl_out` and `grad` (`[T]` each);
/// masked tokens (weight 0) get 0 in both. `mask = None` computes every token.
pub fn kl(
    logp: &[f32],
    ref_logp: &[f32],
    mask: Option<HostMask<'_>>,
    estimator: KlEstimator,
    kl_out: &mut [f32],
    grad: &mut [f32],
) -> Result<()> {
    let t = logp.len();
    super::validate(
        t,
        ref_logp.len(),
        mask.as_ref().map(|m| m.array_len()),
        kl_out.len(),
        grad.len(),
    )?;
    for i in 0..t {
        if mask.as_ref().is_some_and(|m| mask_weight(m, i) == 0.0) {
            kl_out[i] = 0.0;
            grad[i] = 0.0;
            continue;
        }
        let v = kl_token(logp[i], ref_logp[i], estimator);
        kl_out[i] = v.value as f32;
        grad[i] = v.grad as f32;
    }
    Ok(())
}
