//! What every part of the binding uses: pyo3, the crate's types and the shared machinery.

pub(crate) use pyo3::exceptions::PyValueError;
pub(crate) use pyo3::prelude::*;
pub(crate) use pyo3::types::PyAny;
pub(crate) use recap_kernels::advantages::{AdvantageConfig, AdvantageMode, Groups};
pub(crate) use recap_kernels::cuda::FusedLinearConfig;
pub(crate) use recap_kernels::raw::{self, In, Out, Place, RawGroups};
pub(crate) use recap_kernels::rollout_is;
pub(crate) use recap_kernels::{
    Advantages, GrpoConfig, GrpoInputs, KlEstimator, Logits, LogitsLossInputs, LogprobConfig, Mask,
    Normalizers, Orientation, RecapConfig, RecapScheduler, ReduceInputs, RejectionCriterion,
};

pub(crate) use crate::convert::*;
pub(crate) use crate::logits::{
    backward, by_dtype, logits_in, logits_layout, logits_out, spp_pair,
};
pub(crate) use crate::logits_loss::Batch;
