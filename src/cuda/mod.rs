//! The CUDA backend: a load-once module cache per device and the launch machinery; each op's safe
//! wrappers (which validate every argument on the host before any launch) live with the op
//! (`ops/<op>/cuda.rs`) and are re-exported here.
//!
//! Inputs are `CudaView`s, outputs `&mut CudaViewMut`, and every op takes the stream it runs on.
//! `unsafe` appears only around the launches. On a build without kernels (no nvcc at build time)
//! every entry point returns [`crate::Error::NoKernels`].

mod counters;
pub(crate) mod device;
#[doc(hidden)]
pub mod params;

pub use crate::ops::advantages::cuda::{group_advantages, AdvAddrs, AdvShape, DeviceGroups};
pub use crate::ops::fused_linear::cuda::{FusedLinearConfig, LinearHead};
pub use crate::ops::grpo::cuda::{
    grpo_loss, grpo_loss_async, grpo_output_len, DeviceGrpoInputs, DeviceLayout, PendingGrpo,
    GRPO_OUTPUT_LOSS,
};
pub use crate::ops::kl::cuda::{kl, rejection_grid, rejection_params, rollout_rejection};
pub use crate::ops::logits::cuda::{
    logprob_backward, logprob_backward_inplace, logprob_forward, DeviceLogitsLossInputs,
    LogprobGrads,
};
pub use crate::ops::logits_loss::cuda::{
    fused_linear_grpo_loss, fused_linear_grpo_loss_async, fused_linear_workspace_len,
    grpo_loss_from_logits, grpo_loss_from_logits_async, logits_output_len, logits_workspace_len,
    PendingLogitsLoss,
};
pub use crate::ops::reduce::cuda::{weighted_reduce, DeviceReduceInputs};
pub use crate::ops::rollout_is::cuda::{
    is_finalize_params, is_params, is_plan, rollout_is_weights, IsPlan,
};
pub use crate::ops::tensor_parallel::cuda::{tp_backward_inplace, tp_combine, tp_partials};
pub use crate::ops::token_baseline::cuda::{
    group_table, optimal_token_baseline, otb_launches, otb_params,
};
pub use counters::{count_calls, emulated_counters, DeviceCalls};

pub(crate) use device::device_normalizers;
pub use device::{driver_present, Gpu, CUDA_ARCHS, KERNELS_COMPILED, NVCC_VERSION};
