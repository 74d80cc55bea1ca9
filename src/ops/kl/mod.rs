//! The standalone KL (kernel 2) and the rollout rejection launches.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::error::Result;
use crate::layout::check_len;

/// Checks the KL's lengths against `t = logp.len()` (before any launch): `ref_logp`, the mask
/// (when given), `kl_out` and `grad`.
pub(crate) fn validate(
    t: usize,
    ref_logp: usize,
    mask: Option<usize>,
    kl_out: usize,
    grad: usize,
) -> Result<()> {
    check_len("ref_logp", ref_logp, t, "[T] (the length of logp)")?;
    if let Some(m) = mask {
        check_len("mask", m, t, "[T]")?;
    }
    check_len("kl_out", kl_out, t, "[T]")?;
    check_len("grad", grad, t, "[T]")
}
