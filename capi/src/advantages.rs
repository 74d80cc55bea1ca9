//! Group advantages, the optimal token baseline and GAE.

#[allow(unused_imports)]
use crate::prelude::*;

/// Group advantages of rewards [B, K] into `out` [B, K]: groups of `group_size` consecutive
/// rollouts, or (`group_ids` non-null) dense ids in [0, num_groups) (any ids on the host);
/// `lengths` (nullable) [B] response lengths, needed by opo and REINFORCE++; `baselines`
/// (nullable) [B, K] (as `out`) baseline rewards, needed by remax; `modes` [K] host
/// (0 grpo, 1 dr_grpo, 2 rloo, 3 batch std, 4 grpo_passk, 5 dr_grpo_passk, 6 opo, 7 gpg,
/// 8 reinforce_plus_plus, 9 reinforce_plus_plus_baseline, 10 gdpo, 11 remax: `r - b`); `singletons`: what a group of one
/// rollout gets (0: 0, 1: verl's mean 0 and std 1); `reward_weights` (nullable) [K] host: one
/// advantage of the weighted columns (TRL's sum-then-normalize, normalize-then-sum with gdpo), one
/// mode in `modes` and `out` [B, 1].
///
/// # Safety
/// Arrays on the device (`device >= 0`) or the host (`device < 0`); `modes` K host ints.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_group_advantages(
    device: i32,
    stream: *mut c_void,
    rewards: *const f32,
    num_rollouts: i64,
    num_objectives: i32,
    group_size: i64,
    group_ids: *const i32,
    num_groups: i64,
    lengths: *const i32,
    baselines: *const f32,
    modes: *const i32,
    eps: f64,
    singletons: i32,
    reward_weights: *const f64,
    out: *mut f32,
) -> i32 {
    guard(|| {
        let b = len("num_rollouts", num_rollouts)?;
        let k = objectives_count(num_objectives)?;
        let weights = (!reward_weights.is_null())
            .then(|| host("reward_weights", reward_weights, k).map(<[f64]>::to_vec))
            .transpose()?;
        let k_out = if weights.is_some() { 1 } else { k };
        let modes = host("modes", modes, k_out)?
            .iter()
            .map(|&m| pick("modes", &AdvantageMode::ALL, m))
            .collect::<Result<Vec<_>>>()?;
        let cfg = AdvantageConfig {
            modes,
            eps,
            lead: None,
            reward_weights: weights,
            singletons: pick(
                "singletons",
                &[recap::Singletons::Zero, recap::Singletons::Verl],
                singletons,
            )?,
        };
        let groups = if group_ids.is_null() {
            raw::RawGroups::Consecutive(match len("group_size", group_size)? {
                0 => {
                    return Err(Error::invalid_argument(
                        "group_size",
                        "expected a group size >= 1 (or group_ids)",
                    ))
                }
                g => g,
            })
        } else {
            raw::RawGroups::Ids {
                ids: arr(group_ids, b),
                num_groups: len("num_groups", num_groups)?,
            }
        };
        raw::group_advantages(
            place(device, stream),
            arr(rewards, b * k),
            groups,
            opt_arr(lengths, b),
            opt_arr(baselines, b * k_out),
            &cfg,
            out_arr(out, b * k_out),
        )
    })
}

/// verl's optimal token baseline (`optimal_token_baseline`; with `multi_turn` nonzero the positions
/// are indices among unmasked tokens, verl's `tir_optimal_token_baseline`): advantages and returns
/// (`[T]` each) of `num_seqs` packed sequences (`cu_seqlens` [B + 1], host). Per token
/// `w = (1 - 2 exp(old_logp) + sum_pi_squared) rho^2` (`rollout_is_weights` rho, nullable: 1), `W`
/// its masked cumulative sum, `G` the masked reward to go; per group and position
/// `B = sum m G W / (sum m W + eps)`, `A = (G - B) m`, returns `G`. Groups of `group_size`
/// consecutive sequences, or (`group_ids` non-null, host) `[B]` ids of any values;
/// `handle_zero_tail` nonzero (verl's default): the strictly longest member's positions past the
/// second longest length get baseline 0 (verl: 1e-8 for `eps`). On a device the stream is
/// synchronized once (to check that the inputs were finite at unmasked tokens).
///
/// # Safety
/// Arrays of `num_tokens` elements on the device (`device >= 0`) or the host (`device < 0`);
/// `cu_seqlens` (`num_seqs + 1`) and `group_ids` (`num_seqs`) on the host.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_optimal_token_baseline(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    token_rewards: *const f32,
    old_logp: *const f32,
    sum_pi_squared: *const f32,
    rollout_is_weights: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    group_size: i64,
    group_ids: *const i32,
    multi_turn: i32,
    handle_zero_tail: i32,
    eps: f64,
    advantages: *mut f32,
    returns: *mut f32,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let groups = if group_ids.is_null() {
            recap::advantages::Groups::Consecutive(len("group_size", group_size)?)
        } else {
            recap::advantages::Groups::Ids(host("group_ids", group_ids, b)?)
        };
        let x = recap::TokenBaselineInputs {
            token_rewards: arr(token_rewards, t),
            old_logp: arr(old_logp, t),
            sum_pi_squared: arr(sum_pi_squared, t),
            rollout_is_weights: opt_arr(rollout_is_weights, t),
            mask: mask_arr(mask, mask_is_u8, t),
            cu_seqlens: host("cu_seqlens", cu_seqlens, b + 1)?,
            groups,
        };
        let config = recap::TokenBaselineConfig {
            multi_turn: multi_turn != 0,
            handle_zero_tail: handle_zero_tail != 0,
            eps,
        };
        raw::optimal_token_baseline(
            place(device, stream),
            &x,
            &config,
            out_arr(advantages, t),
            out_arr(returns, t),
        )
    })
}

/// GAE's options (verl's `algorithm.gamma` and `algorithm.lam`; `whiten` nonzero: the advantages
/// whitened over the batch, as verl always does). A null pointer means verl's defaults (1, 1,
/// whitened).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecapGaeOptions {
    /// Discount factor.
    pub gamma: f64,
    /// GAE's lambda.
    pub lam: f64,
    /// Nonzero: whiten the advantages over the batch.
    pub whiten: i32,
}

/// Generalized advantage estimation (verl's `compute_gae_advantage_return`): advantages and returns
/// (`[T]` each) of `num_seqs` packed sequences (`cu_seqlens` [B + 1], host; a padded `[B, L]` batch
/// is `0, L, 2L, ..`). Backward over each sequence: `delta = r + gamma nv - v`,
/// `A = m (delta + gamma lam A) + (1 - m) A`, `nv = m v + (1 - m) nv`; returns `A + v`; then the
/// advantages whitened over the batch's masked tokens (a batch whose mask sums to at most 1 gets
/// 0). A non-finite reward or value at an unmasked token is an error naming it; on a device the
/// stream is synchronized once to check that.
///
/// # Safety
/// Arrays of `num_tokens` elements on the device (`device >= 0`) or the host (`device < 0`);
/// `cu_seqlens` (`num_seqs + 1`) and `options` (nullable) on the host.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_gae(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    token_rewards: *const f32,
    values: *const f32,
    mask: *const c_void,
    mask_is_u8: i32,
    cu_seqlens: *const i32,
    num_seqs: i64,
    options: *const RecapGaeOptions,
    advantages: *mut f32,
    returns: *mut f32,
) -> i32 {
    guard(|| {
        let t = len("num_tokens", num_tokens)?;
        let b = len("num_seqs", num_seqs)?;
        let x = recap::ops::gae::GaeInputs {
            token_rewards: arr(token_rewards, t),
            values: arr(values, t),
            mask: mask_arr(mask, mask_is_u8, t),
            cu_seqlens: host("cu_seqlens", cu_seqlens, b + 1)?,
        };
        // SAFETY: the caller's options, when not null, are a valid struct on the host.
        let config = match unsafe { options.as_ref() } {
            None => recap::ops::gae::GaeConfig::default(),
            Some(o) => recap::ops::gae::GaeConfig {
                gamma: o.gamma,
                lam: o.lam,
                whiten: o.whiten != 0,
            },
        };
        recap::ops::gae::gae_at(
            place(device, stream),
            &x,
            &config,
            out_arr(advantages, t),
            out_arr(returns, t),
        )
    })
}
