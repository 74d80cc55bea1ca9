//! `#[repr(C)]` mirrors of the kernel-parameter structs of `kernels/recap_params.h` (the one
//! definition). `tests/device_math.rs` checks their size and every field offset against the C
//! compiler's layout of that header.

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
    pub sum_norm_const: f32,
    pub lambda: [f32; 16],
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

/// Mirror of `RecapFinalizeParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FinalizeParams {
    pub partials: u64,
    pub out: u64,
    pub num_blocks: i32,
    pub num_slots: i32,
    pub min_slot: i32,
    pub max_slot: i32,
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
unsafe impl DeviceRepr for FinalizeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for LogitsParams {}

macro_rules! layout {
    ($t:ty; $($f:ident),*) => { vec![size_of::<$t>() $(, offset_of!($t, $f))*] };
}

/// Size and field offsets, in declaration order, of each mirror, indexed as the C shim's
/// `recap_host_params_layout` (0 grpo, 1 seq, 2 reduce, 3 kl, 4 finalize, 5 logits).
pub fn layouts() -> Vec<Vec<usize>> {
    vec![
        layout!(GrpoParams; logp, old_logp, ref_logp, advantages, mask, cu_seqlens, membership, seq_tokens,
            norms, grad, partials, tile_seq, num_tokens, num_seqs, num_objectives, items_per_thread, adv_per_token,
            agg_mode, kl_estimator, dual_clip, policy_bits, clip_low, clip_high, clip_c, log_ratio_clamp,
            beta, sum_norm_const, lambda),
        layout!(SeqParams; mask, cu_seqlens, membership, seq_tokens, norms, tile_seq, num_tokens, tile_tokens,
            num_seqs, num_objectives, has_override, num_tiles, override_tokens, override_seqs),
        layout!(ReduceParams; losses, mask, cu_seqlens, membership, seq_tokens, norms, grad, partials,
            tile_seq, num_tokens, num_seqs, num_objectives, items_per_thread, agg_mode, sum_norm_const, pad0, lambda),
        layout!(KlParams; logp, ref_logp, mask, kl, grad, num_tokens, kl_estimator, pad0),
        layout!(FinalizeParams; partials, out, num_blocks, num_slots, min_slot, max_slot),
        layout!(LogitsParams; logits, labels, logp, entropy, lse, bad_labels, mask, valid, g_logp, g_entropy,
            dlogits, num_rows, vocab, ld, out_ld, ignore_index, mask_u8, inv_temperature, g_entropy_scale),
    ]
}
