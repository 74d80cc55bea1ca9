//! The chunked fused-linear loss: the reference and the cuBLAS path.

pub(crate) mod cpu;
pub(crate) mod cuda;
