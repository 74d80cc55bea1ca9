//! The fused GRPO loss (kernel 1): the reference and the launches; its types are the crate's core (`config`, `layout`, `output`).

pub(crate) mod cpu;
pub(crate) mod cuda;
