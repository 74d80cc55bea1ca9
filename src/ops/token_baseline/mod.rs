//! verl's optimal token baseline (`adv_estimator=optimal_token_baseline`, and the multi-turn
//! `tir_optimal_token_baseline`): a baseline per group and per response position (host reference,
//! f64).
//!
//! Per token t of a sequence, with m its mask weight, r its reward, `pi = exp(old_logp)`, `spp` the
//! policy's sum of squared probabilities over the vocabulary and rho the rollout IS weight (1
//! without one):
//!
//! ```text
//! w_t = (1 - 2 pi_t + spp_t) rho_t^2       the score-norm proxy of the token
//! W_t = sum_{j <= t} m_j w_j               cumulative path variance
//! G_t = sum_{j >= t} m_j r_j               reward to go (the returns)
//! B_p = sum_i m G W / (sum_i m W + eps)    over the group's members i at aligned position p
//! A_t = (G_t - B_p(t)) m_t
//! ```
//!
//! The aligned position `p(t)` is the token's index in its sequence, or with `multi_turn` its index
//! among the sequence's unmasked tokens (the tool outputs between turns are skipped; a masked token
//! then gets advantage 0 and no position). A group of one member has baseline 0 (A = G m); with
//! `multi_turn` a sequence without unmasked tokens is no member. With `handle_zero_tail`, when one
//! member is strictly the longest (lengths: counts of unmasked tokens), its positions from the
//! second longest length on get baseline 0. Returns are `G_t` at every token, masked ones included.
//!
//! For 0/1 masks this is verl's `compute_optimal_token_baseline_advantage` and
//! `compute_multi_turn_optimal_token_baseline_advantage` on the padded batch. Differences: a
//! non-finite value at an unmasked token is an error naming the argument, and masked tokens are not
//! read (verl multiplies by the mask, so a NaN there spreads).
//!
//! The kernel (`kernels/token_baseline.cu`, [`crate::cuda::optimal_token_baseline`]) computes the
//! same in double precision: one block per sequence for the scans, one per group for the baselines,
//! the members summed in the same (ascending) order.

pub(crate) mod cuda;

use crate::advantages::{group_members, Groups};
use crate::error::{Error, Result};
use crate::layout::mask_weight;
use crate::layout::{check_len, validate_cu_seqlens, Array, Mask};

/// Options of the optimal token baseline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBaselineConfig {
    /// Align positions by the index among unmasked tokens (verl's `tir_optimal_token_baseline`).
    pub multi_turn: bool,
    /// Baseline 0 on the strictly longest member's tail beyond the second longest length.
    pub handle_zero_tail: bool,
    /// Added to the baseline's denominator (verl: 1e-8).
    pub eps: f64,
}

impl Default for TokenBaselineConfig {
    /// verl's `optimal_token_baseline` defaults (verl 0.8 and 0.9): positions, the zero tail,
    /// eps 1e-8.
    fn default() -> Self {
        TokenBaselineConfig {
            multi_turn: false,
            handle_zero_tail: true,
            eps: 1e-8,
        }
    }
}

impl TokenBaselineConfig {
    /// verl's `tir_optimal_token_baseline` defaults: multi-turn alignment and the zero tail.
    pub fn multi_turn() -> Self {
        TokenBaselineConfig {
            multi_turn: true,
            handle_zero_tail: true,
            eps: 1e-8,
        }
    }
}

/// Inputs of the optimal token baseline: packed `[T]` per-token arrays of B sequences. `F` is the
/// f32 array type, `U` the u8 array type: host slices ([`HostTokenBaselineInputs`]) or CUDA views.
#[derive(Clone, Copy, Debug)]
pub struct TokenBaselineInputs<'a, F, U> {
    /// `[T]` token rewards (verl's `token_level_rewards`; masked ones are ignored).
    pub token_rewards: F,
    /// `[T]` log-probabilities of the policy that sampled (verl's `old_log_probs`).
    pub old_logp: F,
    /// `[T]` the policy's sum over the vocabulary of squared probabilities.
    pub sum_pi_squared: F,
    /// `[T]` rollout IS weights (w is scaled by their square), or none.
    pub rollout_is_weights: Option<F>,
    /// `[T]` mask.
    pub mask: Mask<F, U>,
    /// `[B + 1]` sequence offsets (host).
    pub cu_seqlens: &'a [i32],
    /// Rollout groups of the B sequences (host).
    pub groups: Groups<'a>,
}

/// Host inputs of [`optimal_token_baseline`].
pub type HostTokenBaselineInputs<'a> = TokenBaselineInputs<'a, &'a [f32], &'a [u8]>;

/// Checks every length, `eps`, `cu_seqlens` and the groups (before any launch): B and the
/// members of each group, in ascending order.
pub(crate) fn validate<F: Array, U: Array>(
    x: &TokenBaselineInputs<'_, F, U>,
    config: &TokenBaselineConfig,
    advantages: usize,
    returns: usize,
) -> Result<(usize, Vec<Vec<usize>>)> {
    let t = x.token_rewards.array_len();
    let shape = "[T] (the length of token_rewards)";
    check_len("old_logp", x.old_logp.array_len(), t, shape)?;
    check_len("sum_pi_squared", x.sum_pi_squared.array_len(), t, shape)?;
    if let Some(w) = &x.rollout_is_weights {
        check_len("rollout_is_weights", w.array_len(), t, shape)?;
    }
    check_len("mask", x.mask.array_len(), t, shape)?;
    check_len("advantages", advantages, t, shape)?;
    check_len("returns", returns, t, shape)?;
    if !(config.eps.is_finite() && config.eps >= 0.0) {
        return Err(Error::invalid_argument(
            "eps",
            format!("expected a finite value >= 0, got {}", config.eps),
        ));
    }
    let b = validate_cu_seqlens(x.cu_seqlens, t)?;
    Ok((b, group_members(x.groups, b)?))
}

/// The optimal token baseline's advantages and returns (`[T]` each) of `x` (see the module).
pub fn optimal_token_baseline(
    x: &HostTokenBaselineInputs<'_>,
    config: &TokenBaselineConfig,
    advantages: &mut [f32],
    returns: &mut [f32],
) -> Result<()> {
    let t = x.token_rewards.len();
    let (b, groups) = validate(x, config, advantages.len(), returns.len())?;

    let finite = |name: &'static str, v: f32, tok: usize| -> Result<f64> {
        if v.is_finite() {
            Ok(v as f64)
        } else {
            Err(Error::invalid_argument(
                name,
                format!("expected finite values at unmasked tokens, got {v} at token {tok}"),
            ))
        }
    };
    // G and W per token; each sequence's aligned tokens (all, or the unmasked ones)
    let (mut g, mut w) = (vec![0f64; t], vec![0f64; t]);
    let mut aligned: Vec<Vec<usize>> = Vec::with_capacity(b);
    let mut live: Vec<usize> = Vec::with_capacity(b);
    for s in 0..b {
        let toks = x.cu_seqlens[s] as usize..x.cu_seqlens[s + 1] as usize;
        let (mut acc, mut count) = (0.0, 0usize);
        for tok in toks.clone() {
            let m = mask_weight(&x.mask, tok);
            if m != 0.0 {
                let pi = finite("old_logp", x.old_logp[tok], tok)?.exp();
                let mut wt = 1.0 - 2.0 * pi + finite("sum_pi_squared", x.sum_pi_squared[tok], tok)?;
                if let Some(rho) = x.rollout_is_weights {
                    let rho = finite("rollout_is_weights", rho[tok], tok)?;
                    wt *= rho * rho;
                }
                acc += m * wt;
                count += 1;
            }
            w[tok] = acc;
        }
        live.push(count);
        let mut acc = 0.0;
        for tok in toks.clone().rev() {
            let m = mask_weight(&x.mask, tok);
            if m != 0.0 {
                acc += m * finite("token_rewards", x.token_rewards[tok], tok)?;
            }
            g[tok] = acc;
        }
        aligned.push(if config.multi_turn {
            toks.filter(|&tok| mask_weight(&x.mask, tok) != 0.0)
                .collect()
        } else {
            toks.collect()
        });
    }
    for tok in 0..t {
        returns[tok] = g[tok] as f32;
        advantages[tok] = 0.0;
    }
    for group in groups {
        let members: Vec<usize> = group
            .into_iter()
            .filter(|&s| !config.multi_turn || live[s] > 0)
            .collect();
        let n = members.len();
        let longest = aligned_len(&members, &aligned);
        let mut baseline = vec![0f64; longest];
        if n > 1 {
            for (p, bp) in baseline.iter_mut().enumerate() {
                let (mut num, mut den) = (0.0, 0.0);
                for &s in &members {
                    if let Some(&tok) = aligned[s].get(p) {
                        let mw = mask_weight(&x.mask, tok) * w[tok];
                        num += mw * g[tok];
                        den += mw;
                    }
                }
                *bp = num / (den + config.eps);
            }
        }
        // the strictly longest member's tail past the second longest length
        let tail = if config.handle_zero_tail && n > 1 {
            zero_tail(&members, &live)
        } else {
            None
        };
        for &s in &members {
            for (p, &tok) in aligned[s].iter().enumerate() {
                let base = match tail {
                    Some((who, from)) if who == s && p >= from => 0.0,
                    _ => baseline[p],
                };
                advantages[tok] = ((g[tok] - base) * mask_weight(&x.mask, tok)) as f32;
            }
        }
    }
    Ok(())
}

fn aligned_len(members: &[usize], aligned: &[Vec<usize>]) -> usize {
    members.iter().map(|&s| aligned[s].len()).max().unwrap_or(0)
}

/// `(member, second longest length)` when one member is strictly the longest (by unmasked tokens).
fn zero_tail(members: &[usize], live: &[usize]) -> Option<(usize, usize)> {
    let mut lens: Vec<usize> = members.iter().map(|&s| live[s]).collect();
    lens.sort_unstable();
    let (max, second) = (lens[lens.len() - 1], lens[lens.len() - 2]);
    if max == second {
        return None;
    }
    members
        .iter()
        .copied()
        .find(|&s| live[s] == max)
        .map(|s| (s, second))
}
