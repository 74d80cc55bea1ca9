//! Vocabulary-parallel (tensor-parallel) log-probabilities and entropy, in three steps a framework
//! can put its collective between, with no gather of the `[T, V]` logits:
//!
//! 1. **partials**: each rank computes, for its shard of the vocabulary (columns
//!    `[vocab_start, vocab_start + V_r)` of the logits, and of the LM head), each row's partial
//!    statistics `[3, T]`: the shard's LSE, its entropy, and the label's logit (or -inf where the
//!    label is another shard's), or `[4, T]` with the shard's own `sum_j p_j^2` (for verl's
//!    `sum_pi_squared`) — [`crate::cpu::tp_partials`], [`crate::cuda::tp_partials`];
//! 2. **combine**: after one all-gather of the packed partials (and each shard's `vocab_start`),
//!    every rank combines the P partials in ascending order of `vocab_start` ([`shard_order`]) into
//!    the whole vocabulary's log-probability, entropy and LSE — [`crate::cpu::tp_combine`],
//!    [`crate::cuda::tp_combine`]. The order is fixed by the shards, not by the collective, so every
//!    rank gets the same bits whatever order the partials arrived in:
//!    `LSE = M + log sum_r exp(lse_r - M)`, `w_r = exp(lse_r - LSE)`,
//!    `H = sum_r w_r (H_r - log w_r)`, `logp = x_y - LSE`, and with 4 planes
//!    `sum_pi_squared = sum_r w_r^2 q_r`;
//! 3. **backward**: each rank writes its shard's slice of the whole-vocabulary gradient over its
//!    logits, from the combined LSE and entropy, with no collective (the convention of Megatron's
//!    vocab-parallel cross entropy) — [`crate::cpu::tp_backward`],
//!    [`crate::cuda::tp_backward_inplace`].
//!
//! With a vocabulary-sharded LM head (`logits_r = hidden W_r^T`), the gradient with respect to
//! `hidden` is the sum over the ranks of `dlogits_r W_r`: it needs an all-reduce (sum) over the
//! tensor-parallel group, as any column-parallel output layer does; the weight gradient
//! `dlogits_r^T hidden` is the rank's own. The Python package does both
//! (`recap_kernels.tensor_parallel`).

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::error::{Error, Result};

/// The planes of partials `[.., planes, rows]` from their length `len`: 3 (LSE, entropy, label
/// logit) or 4 (and the shard's own `sum_j p_j^2`); anything else is an error naming `arg`.
pub(crate) fn planes(len: usize, rows: usize, arg: &'static str, what: &str) -> Result<usize> {
    match len {
        l if l == 3 * rows => Ok(3),
        l if l == 4 * rows => Ok(4),
        l => Err(Error::invalid_argument(
            arg,
            format!(
                "expected {what} with 3 or 4 planes ({} or {} values), got {l}",
                3 * rows,
                4 * rows
            ),
        )),
    }
}

/// The checks of a combine's arrays: the partials' planes (from their length over `shards` shards
/// of `t` rows), the `[T]` outputs (logp, entropy, lse), and `sum_pi_squared` (its length, and the
/// 4 planes it needs). Returns the planes.
pub(crate) fn combine_planes(
    partials: usize,
    shards: usize,
    t: usize,
    [logp, entropy, lse]: [usize; 3],
    sum_pi_squared: Option<usize>,
) -> Result<usize> {
    let planes = planes(partials, shards * t, "partials", "[P, planes, T]")?;
    for (arg, n) in [("logp", logp), ("entropy", entropy), ("lse", lse)] {
        crate::layout::check_len(arg, n, t, "[T]")?;
    }
    if let Some(q) = sum_pi_squared {
        crate::layout::check_len("sum_pi_squared", q, t, "[T]")?;
        if planes != 4 {
            return Err(Error::invalid_argument(
                "sum_pi_squared",
                "needs the shards' partials with 4 planes ([P, 4, T])",
            ));
        }
    }
    Ok(planes)
}

/// The order in which to combine shards whose first vocabulary indices are `starts`: ascending
/// `vocab_start` (ties, which a valid sharding has not, by position).
pub fn shard_order(starts: &[i64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..starts.len()).collect();
    order.sort_by_key(|&i| (starts[i], i));
    order
}

/// The columns of shard `rank` of `shards` over a vocabulary of `vocab`: contiguous ranges, the
/// first `vocab % shards` one column longer (so any V splits over any number of ranks).
pub fn shard_range(vocab: usize, shards: usize, rank: usize) -> std::ops::Range<usize> {
    let shards = shards.max(1);
    let (base, extra) = (vocab / shards, vocab % shards);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_vocabulary_in_order() {
        for (v, p) in [(37usize, 4usize), (8, 8), (151_936, 3), (5, 7)] {
            let ranges: Vec<_> = (0..p).map(|r| shard_range(v, p, r)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[p - 1].end, v);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(shard_order(&[20, 0, 30, 10]), vec![1, 3, 0, 2]);
    }
}
