//! The per-objective weighted reduction (kernel 3).

pub(crate) mod cpu;
pub(crate) mod cuda;
