//! Per-sequence token weights and per-objective normalizers (reference of `recap_seq_stats_*` and
//! `recap_norms_finalize`).

use crate::config::{Normalizers, MAX_OBJECTIVES};
use crate::error::Result;
pub(crate) use crate::layout::mask_weight;
use crate::layout::{validate_cu_seqlens, HostMask};
use crate::output::{NORM_LOCAL_SEQS, NORM_LOCAL_TOKENS, NORM_SEQS, NORM_SLOTS, NORM_TOKENS};

/// `(sum m x_t, sum m)` over the unmasked tokens of `toks` (masked tokens are not read, so a NaN
/// there does not count).
pub(crate) fn masked_sum(
    mask: &HostMask<'_>,
    toks: std::ops::Range<usize>,
    x: impl Fn(usize) -> f64,
) -> (f64, f64) {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for t in toks {
        let m = mask_weight(mask, t);
        if m != 0.0 {
            d += m * x(t);
            n += m;
        }
    }
    (d, n)
}

/// `n_b`: the mask sum of each sequence.
pub(crate) fn seq_tokens(mask: &HostMask<'_>, cu: &[i32]) -> Vec<f64> {
    cu.windows(2)
        .map(|w| {
            (w[0] as usize..w[1] as usize)
                .map(|t| mask_weight(mask, t))
                .sum()
        })
        .collect()
}

/// The `norms` buffer (layout in `kernels/recap_params.h`) for K objectives plus the KL slot.
pub(crate) fn norms(
    seq_tokens: &[f64],
    membership: Option<&[u32]>,
    k: usize,
    global: Option<&Normalizers>,
) -> Vec<f64> {
    let mut out = vec![0.0; 4 * NORM_SLOTS];
    for j in 0..=k {
        let (mut tok, mut seq) = (0.0, 0.0);
        for (b, &n) in seq_tokens.iter().enumerate() {
            let bits = membership.map_or(u32::MAX, |m| m[b]);
            if j == k || (bits >> j) & 1 == 1 {
                tok += n;
                seq += if n > 0.0 { 1.0 } else { 0.0 };
            }
        }
        out[NORM_LOCAL_TOKENS * NORM_SLOTS + j] = tok;
        out[NORM_LOCAL_SEQS * NORM_SLOTS + j] = seq;
        out[NORM_TOKENS * NORM_SLOTS + j] = global.map_or(tok, |g| g.tokens[j]);
        out[NORM_SEQS * NORM_SLOTS + j] = global.map_or(seq, |g| g.seqs[j]);
    }
    out
}

/// This batch's normalizers for `k` objectives (and the KL slot): sum them over micro-batches or
/// ranks with [`Normalizers::add`] and pass the total to every part to normalize by the global batch.
pub fn count_normalizers(
    mask: HostMask<'_>,
    cu_seqlens: &[i32],
    membership: Option<&[u32]>,
    k: usize,
) -> Result<Normalizers> {
    let t = mask.array_len();
    let b = validate_cu_seqlens(cu_seqlens, t)?;
    if k == 0 || k > MAX_OBJECTIVES {
        return Err(crate::Error::invalid_argument(
            "k",
            format!("expected 1 <= K <= {MAX_OBJECTIVES}, got {k}"),
        ));
    }
    crate::layout::validate_membership(membership, b, k)?;
    let n = norms(&seq_tokens(&mask, cu_seqlens), membership, k, None);
    Ok(Normalizers {
        tokens: n[NORM_LOCAL_TOKENS * NORM_SLOTS..][..=k].to_vec(),
        seqs: n[NORM_LOCAL_SEQS * NORM_SLOTS..][..=k].to_vec(),
        seq_tokens: None,
    })
}
