//! The CPU reference backend: every op in plain Rust with f64 arithmetic and accumulation from the
//! f32 inputs. It is the default backend and the reference the GPU kernels are tested against.
//! Each op's reference lives with the op (`ops/<op>/cpu.rs`); this module holds the shared math and
//! normalizers and re-exports the ops' functions.

pub(crate) mod math;
pub(crate) mod norms;

pub use crate::ops::fused_linear::cpu::fused_linear_grpo_loss;
pub(crate) use crate::ops::fused_linear::cpu::fused_linear_grpo_loss_out;
pub use crate::ops::grpo::cpu::grpo_loss;
pub(crate) use crate::ops::grpo::cpu::grpo_loss_out;
pub use crate::ops::kl::cpu::kl;
pub(crate) use crate::ops::logits::cpu::grpo_loss_from_logits_out;
pub use crate::ops::logits::cpu::{
    grpo_loss_from_logits, logprob_backward, logprob_forward, sum_pi_squared,
};
pub use crate::ops::reduce::cpu::weighted_reduce;
pub use crate::ops::rejection::cpu::rollout_rejection;
pub use crate::ops::rollout_is::cpu::rollout_is_weights;
pub use crate::ops::tensor_parallel::cpu::{tp_backward, tp_combine, tp_partials};
pub use math::{
    agg_weight, geo_mean_ratio, gspo_ratio, kl_is_corrected, kl_token, policy_token, ratio,
    KlToken, PolicyToken, Ratio,
};
pub use norms::count_normalizers;
pub(crate) use norms::seq_tokens;
