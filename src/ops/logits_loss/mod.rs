//! The GRPO loss from logits and from the last layer on a device (kernels 4 and 5 with the fused loss).

pub(crate) mod cuda;
