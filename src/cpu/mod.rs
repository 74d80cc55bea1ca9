//! The CPU reference backend: every op in plain Rust with f64 arithmetic and accumulation from the
//! f32 inputs. It is the default backend and the reference the GPU kernels are tested against.

mod fused_linear;
mod grpo;
mod kl;
mod logits;
mod math;
mod norms;
mod reduce;
mod rejection;
mod rollout_is;
mod tensor_parallel;

pub use fused_linear::fused_linear_grpo_loss;
pub(crate) use fused_linear::fused_linear_grpo_loss_out;
pub use grpo::grpo_loss;
pub(crate) use grpo::grpo_loss_out;
pub use kl::kl;
pub(crate) use logits::grpo_loss_from_logits_out;
pub use logits::{grpo_loss_from_logits, logprob_backward, logprob_forward, sum_pi_squared};
pub use math::{
    agg_weight, geo_mean_ratio, gspo_ratio, kl_is_corrected, kl_token, policy_token, ratio,
    KlToken, PolicyToken, Ratio,
};
pub use norms::count_normalizers;
pub(crate) use norms::seq_tokens;
pub use reduce::weighted_reduce;
pub use rejection::rollout_rejection;
pub use rollout_is::rollout_is_weights;
pub use tensor_parallel::{tp_backward, tp_combine, tp_partials};
