//! # recap-kernels
//!
//! Handwritten CUDA kernels for RL post-training of language models, with a CPU reference backend:
//!
//! - **kernel 1** the fused GRPO policy loss for K objectives (ratio clipping, dual-clip, KL to a
//!   reference, per-objective weights), forward and gradient in one pass: [`cpu::grpo_loss`],
//!   [`cuda::grpo_loss`], [`Backend::grpo_loss`];
//! - **kernel 2** per-token KL estimators: [`cpu::kl`], [`cuda::kl`];
//! - **kernel 3** per-objective weighted loss reduction in every verl aggregation mode, with global
//!   normalizers for micro-batches: [`cpu::weighted_reduce`], [`cuda::weighted_reduce`].
//!
//! Data layout: packed variable-length tokens (see [`layout`]). Formulas: `kernels/grpo_math.cuh`
//! and `docs/formulas.md`; the reference manual is `docs/` (the README links each part).

#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod cpu;
pub mod cuda;
#[doc(hidden)]
pub mod device_math;
pub mod error;
/// The slot and normalizer layout of `kernels/recap_params.h`, generated from it by build.rs.
#[allow(dead_code)]
pub(crate) mod kernel_layout {
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}
pub mod layout;
pub mod ops;
pub use ops::{advantages, logits, rejection, rollout_is, tensor_parallel, token_baseline};
pub mod output;
pub mod place;
pub mod raw;
pub mod recap;
#[cfg(feature = "tools")]
pub mod tools;

pub use advantages::{
    group_advantages, AdvantageConfig, AdvantageMode, DifficultyWeights, Groups, LeadOptions,
    Singletons,
};
pub use backend::Backend;
pub use config::{
    AggMode, GrpoConfig, IsLevel, IsMode, KlEstimator, Normalizers, ObjectiveKind, PolicyLoss,
    RolloutCorrection, MAX_OBJECTIVES,
};
pub use cpu::count_normalizers;
pub use error::{Error, Result};
pub use layout::{
    Advantages, GrpoInputs, HostGrpoInputs, HostMask, HostReduceInputs, Mask, ReduceInputs,
};
pub use logits::{
    top_entropy_mask, HostLogitsLossInputs, LogitElem, Logits, LogitsLossInputs, LogitsLossOutput,
    LogprobConfig,
};
pub use output::{
    grpo_stat_layout, logits_stat_layout, GrpoMetrics, GrpoOutput, ReduceOutput, StatField,
};
pub use recap::{Orientation, RecapConfig, RecapScheduler};
pub use rejection::{RejectionCriterion, RsLevel, RsStatistic};
pub use rollout_is::RolloutIsStats;
pub use token_baseline::{
    optimal_token_baseline, HostTokenBaselineInputs, TokenBaselineConfig, TokenBaselineInputs,
};

/// The README's Rust examples, compiled and run as doctests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The Rust examples of the reference in `docs/`, compiled and run as doctests.
#[cfg(doctest)]
pub mod docs_doctests {
    #[doc = include_str!("../docs/rust.md")]
    pub struct Rust;
    #[doc = include_str!("../docs/formulas.md")]
    pub struct Formulas;
    #[doc = include_str!("../docs/advantages.md")]
    pub struct Advantages;
    #[doc = include_str!("../docs/tensor-parallel.md")]
    pub struct TensorParallel;
    #[doc = include_str!("../docs/recap.md")]
    pub struct Recap;
    #[doc = include_str!("../docs/train.md")]
    pub struct Train;
    #[doc = include_str!("../docs/c.md")]
    pub struct C;
    #[doc = include_str!("../docs/layout.md")]
    pub struct Layout;
    #[doc = include_str!("../docs/reliability.md")]
    pub struct Reliability;
    #[doc = include_str!("../docs/performance.md")]
    pub struct Performance;
    #[doc = include_str!("../docs/pytorch.md")]
    pub struct PyTorch;
    #[doc = include_str!("../docs/peers.md")]
    pub struct Peers;
}
