//! Every op in one place: `ops/<op>/` holds its types (`mod.rs`), its CPU reference (`cpu.rs`) and
//! its CUDA launches (`cuda.rs`), next to `kernels/<op>.cu`. The crate's public paths are kept:
//! `cpu::` and `cuda::` re-export each op's functions, and the op modules with public types are
//! re-exported at the crate root (`recap_kernels::logits`, `recap_kernels::rollout_is`, ...).

pub mod advantages;
pub(crate) mod fused_linear;
pub(crate) mod grpo;
pub(crate) mod kl;
pub mod logits;
pub(crate) mod logits_loss;
pub(crate) mod reduce;
pub mod rejection;
pub mod rollout_is;
pub mod tensor_parallel;
pub mod token_baseline;
