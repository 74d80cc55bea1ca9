//! The standalone KL (kernel 2) and the rollout rejection launches.

pub(crate) mod cpu;
pub(crate) mod cuda;
