//! `#[repr(C)]` mirrors of the kernel-parameter structs of `kernels/recap_params.h` (the one
//! definition, where each field is documented). `tests/device_math.rs` checks their size and every
//! field offset against the C
//! compiler's layout of that header.

// The fields are documented once, in the header.
#![allow(missing_docs)]

use cudarc::driver::DeviceRepr;
use std::mem::{offset_of, size_of};

/// Mirror of `RecapGrpoParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpoParams {
    pub logp: u64,
    pub old_logp: u64,
    pub ref_logp: u64,
    pub advantages: u64,
    pub mask: u64,
    pub cu_seqlens: u64,
    pub membership: u64,
    pub seq_tokens: u64,
    pub norms: u64,
    pub grad: u64,
    pub partials: u64,
    pub tile_seq: u64,
    pub num_tokens: i64,
    pub num_seqs: i32,
    pub num_objectives: i32,
    pub items_per_thread: i32,
    pub adv_per_token: i32,
    pub agg_mode: i32,
    pub kl_estimator: i32,
    pub dual_clip: i32,
    pub policy_bits: u32,
    pub clip_low: f32,
    pub clip_high: f32,
    pub clip_c: f32,
    pub log_ratio_clamp: f32,
    pub beta: f32,
    pub inv_norm_const: f32,
    pub lambda: [f32; 16],
    pub loss_type: i32,
    pub kl_is_correction: i32,
    pub delta: f32,
    pub tau_pos: f32,
    pub tau_neg: f32,
    pub dro_beta: f32,
    pub seq_log_ratio: u64,
    pub rollout_logp: u64,
    pub seq_is_log: u64,
    pub is_level: i32,
    pub is_mode: i32,
    pub is_lower: f32,
    pub is_upper: f32,
    pub policy_weight: u64,
    pub policy_agg_mode: i32,
    pub pad1: i32,
    pub out: u64,
    pub ticket: u64,
    pub lambda_dev: u64,
    pub inv_norms: u64,
    pub seq_inv: u64,
}

/// Mirror of `RecapSeqParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqParams {
    pub mask: u64,
    pub cu_seqlens: u64,
    pub membership: u64,
    pub seq_tokens: u64,
    pub norms: u64,
    pub tile_seq: u64,
    pub num_tokens: i64,
    pub tile_tokens: i64,
    pub num_seqs: i32,
    pub num_objectives: i32,
    pub has_override: i32,
    pub num_tiles: i32,
    pub override_tokens: [f64; 17],
    pub override_seqs: [f64; 17],
    pub logp: u64,
    pub old_logp: u64,
    pub seq_log_ratio: u64,
    pub rollout_logp: u64,
    pub seq_is_log: u64,
    pub is_geometric: i32,
    pub warps_per_seq: i32,
    pub geo_mean: i32,
    pub clip_low: f32,
    pub clip_high: f32,
    pub validate: i32,
    pub partials: u64,
    pub ticket: u64,
    pub flags: u64,
    pub lambda_dev: u64,
    pub inv_norms: u64,
    pub seq_inv: u64,
    pub override_dev: u64,
    pub override_slot: i32,
    pub pad0: i32,
}

/// Mirror of `RecapReduceParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReduceParams {
    pub losses: u64,
    pub mask: u64,
    pub cu_seqlens: u64,
    pub membership: u64,
    pub seq_tokens: u64,
    pub norms: u64,
    pub grad: u64,
    pub partials: u64,
    pub tile_seq: u64,
    pub num_tokens: i64,
    pub num_seqs: i32,
    pub num_objectives: i32,
    pub items_per_thread: i32,
    pub agg_mode: i32,
    pub sum_norm_const: f32,
    pub pad0: f32,
    pub lambda: [f32; 16],
}

/// Mirror of `RecapKlParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KlParams {
    pub logp: u64,
    pub ref_logp: u64,
    pub mask: u64,
    pub kl: u64,
    pub grad: u64,
    pub num_tokens: i64,
    pub kl_estimator: i32,
    pub pad0: i32,
}

/// Mirror of `RecapRejectParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RejectParams {
    pub log_ratio: u64,
    pub mask: u64,
    pub cu_seqlens: u64,
    pub flags: u64,
    pub num_tokens: i64,
    pub num_seqs: i32,
    pub num_criteria: i32,
    pub level: [i32; 16],
    pub statistic: [i32; 16],
    pub lower: [f64; 16],
    pub upper: [f64; 16],
}

/// Mirror of `RecapLogitsFinishParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LogitsFinishParams {
    pub out: u64,
    pub parts: u64,
    pub norms: u64,
    pub entropy_agg: u64,
    pub entropy_mean: u64,
    pub bad_labels: u64,
    pub lambda_dev: u64,
    pub num_objectives: i32,
    pub num_parts: i32,
    pub has_ref: i32,
    pub beta: f32,
    pub entropy_coef: f32,
    pub pad0: f32,
    pub lambda: [f32; 16],
}

/// Mirror of `RecapFinalizeParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FinalizeParams {
    pub partials: u64,
    pub out: u64,
    pub num_blocks: i32,
    pub num_slots: i32,
    pub min_bits: u64,
    pub max_bits: u64,
}

/// Mirror of `RecapLogitsParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LogitsParams {
    pub logits: u64,
    pub labels: u64,
    pub logp: u64,
    pub entropy: u64,
    pub lse: u64,
    pub bad_labels: u64,
    pub mask: u64,
    pub valid: u64,
    pub g_logp: u64,
    pub g_entropy: u64,
    pub dlogits: u64,
    pub num_rows: i64,
    pub vocab: i64,
    pub ld: i64,
    pub out_ld: i64,
    pub ignore_index: i32,
    pub mask_u8: i32,
    pub inv_temperature: f32,
    pub g_entropy_scale: f32,
    pub label_logit: u64,
    pub label_offset: i64,
    pub sharded: i32,
    pub pad0: i32,
    pub sum_pi_squared: u64,
    pub g_sum_pi_squared: u64,
}

/// Mirror of `RecapTpParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpParams {
    pub partials: u64,
    pub logp: u64,
    pub entropy: u64,
    pub lse: u64,
    pub labels: u64,
    pub missing: u64,
    pub sum_pi_squared: u64,
    pub num_rows: i64,
    pub num_shards: i32,
    pub ignore_index: i32,
    pub planes: i32,
    pub pad0: i32,
}

// SAFETY: each struct is #[repr(C)], Copy, holds only plain integers and floats, and has the layout
// of its C twin (checked by tests/device_math.rs), which the kernels take by value.
unsafe impl DeviceRepr for GrpoParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for SeqParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ReduceParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for KlParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for RejectParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for FinalizeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for LogitsParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TpParams {}

macro_rules! layout {
    ($t:ty; $($f:ident),*) => { vec![size_of::<$t>() $(, offset_of!($t, $f))*] };
}

/// Mirror of `RecapAdvParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AdvParams {
    pub rewards: u64,
    pub group_ids: u64,
    pub lengths: u64,
    pub work: u64,
    pub batch_std: u64,
    pub pre: u64,
    pub out: u64,
    pub counts: u64,
    pub num_rollouts: i32,
    pub num_objectives: i32,
    pub num_groups: i32,
    pub group_size: i32,
    pub modes: u64,
    pub correctness: i32,
    pub has_length: i32,
    pub has_difficulty: i32,
    pub verl_singletons: i32,
    pub eps: f64,
    pub length_alpha: f64,
    pub diff_a: f64,
    pub diff_b: f64,
    pub diff_rho0: f64,
    pub diff_k: f64,
    pub num_outputs: i32,
    pub has_reward_weights: i32,
    pub reward_weights: [f64; 16],
    pub baselines: u64,
}

/// Mirror of `RecapTrainParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainParams {
    pub logits: u64,
    pub row_max: u64,
    pub row_sum: u64,
    pub row_lse: u64,
    pub tokens: u64,
    pub feat: u64,
    pub logp: u64,
    pub w: u64,
    pub m: u64,
    pub v: u64,
    pub grad: u64,
    pub w_bf16: u64,
    pub seed: u64,
    pub num_rows: i64,
    pub vocab: i64,
    pub num_tokens: i64,
    pub n: i64,
    pub counter_base: i64,
    pub group: i32,
    pub resp_len: i32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bias1: f32,
    pub bias2: f32,
    pub pad0: f32,
}

/// Mirror of `RecapOtbParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OtbParams {
    pub token_rewards: u64,
    pub old_logp: u64,
    pub sum_pi_squared: u64,
    pub rollout_is_weights: u64,
    pub mask: u64,
    pub cu_seqlens: u64,
    pub group_offsets: u64,
    pub group_members: u64,
    pub cum_w: u64,
    pub to_go: u64,
    pub aligned: u64,
    pub live: u64,
    pub bad: u64,
    pub advantages: u64,
    pub returns: u64,
    pub num_tokens: i64,
    pub num_seqs: i32,
    pub num_groups: i32,
    pub multi_turn: i32,
    pub zero_tail: i32,
    pub eps: f64,
}

/// Mirror of `RecapIsParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IsParams {
    pub log_ratio: u64,
    pub mask: u64,
    pub cu_seqlens: u64,
    pub weights: u64,
    pub partials: u64,
    pub stats: u64,
    pub num_tokens: i64,
    pub num_seqs: i32,
    pub level: i32,
    pub mode: i32,
    pub pad0: i32,
    pub lower: f32,
    pub upper: f32,
}

// SAFETY: as above.
unsafe impl DeviceRepr for IsParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdvParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for OtbParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TrainParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for LogitsFinishParams {}

/// Size and field offsets, in declaration order, of each mirror, indexed as the C shim's
/// `recap_host_params_layout` (0 grpo, 1 seq, 2 reduce, 3 kl, 4 finalize, 5 logits, 6 advantages,
/// 7 train, 8 tensor-parallel combine, 9 rollout rejection, 10 optimal token baseline, 11 rollout IS
/// weights, 12 the logits losses' finish).
pub fn layouts() -> Vec<Vec<usize>> {
    vec![
        layout!(GrpoParams; logp, old_logp, ref_logp, advantages, mask, cu_seqlens, membership, seq_tokens,
            norms, grad, partials, tile_seq, num_tokens, num_seqs, num_objectives, items_per_thread, adv_per_token,
            agg_mode, kl_estimator, dual_clip, policy_bits, clip_low, clip_high, clip_c, log_ratio_clamp,
            beta, inv_norm_const, lambda, loss_type, kl_is_correction, delta, tau_pos, tau_neg, dro_beta,
            seq_log_ratio, rollout_logp, seq_is_log, is_level, is_mode, is_lower, is_upper, policy_weight,
            policy_agg_mode, pad1, out, ticket, lambda_dev, inv_norms, seq_inv),
        layout!(SeqParams; mask, cu_seqlens, membership, seq_tokens, norms, tile_seq, num_tokens, tile_tokens,
            num_seqs, num_objectives, has_override, num_tiles, override_tokens, override_seqs, logp, old_logp,
            seq_log_ratio, rollout_logp, seq_is_log, is_geometric, warps_per_seq, geo_mean, clip_low, clip_high,
            validate, partials, ticket, flags, lambda_dev, inv_norms, seq_inv, override_dev,
            override_slot, pad0),
        layout!(ReduceParams; losses, mask, cu_seqlens, membership, seq_tokens, norms, grad, partials,
            tile_seq, num_tokens, num_seqs, num_objectives, items_per_thread, agg_mode, sum_norm_const, pad0, lambda),
        layout!(KlParams; logp, ref_logp, mask, kl, grad, num_tokens, kl_estimator, pad0),
        layout!(FinalizeParams; partials, out, num_blocks, num_slots, min_bits, max_bits),
        layout!(LogitsParams; logits, labels, logp, entropy, lse, bad_labels, mask, valid, g_logp, g_entropy,
            dlogits, num_rows, vocab, ld, out_ld, ignore_index, mask_u8, inv_temperature, g_entropy_scale,
            label_logit, label_offset, sharded, pad0, sum_pi_squared, g_sum_pi_squared),
        layout!(AdvParams; rewards, group_ids, lengths, work, batch_std, pre, out, counts, num_rollouts,
            num_objectives, num_groups, group_size, modes, correctness, has_length, has_difficulty,
            verl_singletons, eps, length_alpha, diff_a, diff_b, diff_rho0, diff_k, num_outputs,
            has_reward_weights, reward_weights, baselines),
        layout!(TrainParams; logits, row_max, row_sum, row_lse, tokens, feat, logp, w, m, v, grad, w_bf16, seed,
            num_rows, vocab, num_tokens, n, counter_base, group, resp_len, lr, beta1, beta2, eps, weight_decay,
            bias1, bias2, pad0),
        layout!(TpParams; partials, logp, entropy, lse, labels, missing, sum_pi_squared, num_rows, num_shards,
            ignore_index, planes, pad0),
        layout!(RejectParams; log_ratio, mask, cu_seqlens, flags, num_tokens, num_seqs, num_criteria, level,
            statistic, lower, upper),
        layout!(OtbParams; token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, cu_seqlens,
            group_offsets, group_members, cum_w, to_go, aligned, live, bad, advantages, returns, num_tokens,
            num_seqs, num_groups, multi_turn, zero_tail, eps),
        layout!(IsParams; log_ratio, mask, cu_seqlens, weights, partials, stats, num_tokens, num_seqs, level,
            mode, pad0, lower, upper),
        layout!(LogitsFinishParams; out, parts, norms, entropy_agg, entropy_mean, bad_labels, lambda_dev,
            num_objectives, num_parts, has_ref, beta, entropy_coef, pad0, lambda),
    ]
}
