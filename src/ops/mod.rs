//! Every op in one place: `ops/<op>/` holds its types (`mod.rs`), its CPU reference (`cpu.rs`) and
//! its CUDA launches (`cuda.rs`), next to `kernels/<op>.cu`; a small op is one file `ops/<op>.rs`
//! with all of these and its pointer-level entry point for the bindings ([`gae`]).
//!
//! An op's home is `recap_kernels::ops::<op>`. The ops that predate this layout keep their older
//! public paths too: `cpu::` and `cuda::` re-export their functions, [`crate::raw`] holds their
//! entry points, and their modules are re-exported at the crate root (`recap_kernels::logits`,
//! `recap_kernels::rollout_is`, ...).

pub mod advantages;
pub(crate) mod fused_linear;
pub mod gae;
pub(crate) mod grpo;
pub(crate) mod kl;
pub mod logits;
pub(crate) mod logits_loss;
pub(crate) mod reduce;
pub mod rejection;
pub mod rollout_is;
pub mod tensor_parallel;
pub mod token_baseline;
