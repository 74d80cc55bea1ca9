//! The fused GRPO loss (kernel 1, `kernels/grpo_loss.cu`): the reference and the launches; its
//! types are the crate's core (`config`, `layout`, `output`).

pub(crate) mod cpu;
pub(crate) mod cuda;
