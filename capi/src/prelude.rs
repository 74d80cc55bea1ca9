//! What every part of the C ABI uses: the crate's types, std's FFI types and the shared machinery.

pub(crate) use recap::advantages::{AdvantageConfig, AdvantageMode};
pub(crate) use recap::config::{
    AggMode, GrpoConfig, IsLevel, IsMode, KlEstimator, Normalizers, ObjectiveKind, PolicyLoss,
    RolloutCorrection,
};
pub(crate) use recap::error::{Error, Result};
pub(crate) use recap::layout::{Advantages, GrpoInputs, Mask, ReduceInputs};
pub(crate) use recap::logits::{Logits, LogitsLossInputs, LogprobConfig};
pub(crate) use recap::output::GrpoOutput;
pub(crate) use recap::raw::{self, In, Out, Place};
pub(crate) use recap::recap::{Orientation, RecapConfig, RecapScheduler};
pub(crate) use recap::rejection::RejectionCriterion;
pub(crate) use std::cell::RefCell;
pub(crate) use std::ffi::{c_char, c_void, CStr, CString};
pub(crate) use std::panic::{catch_unwind, AssertUnwindSafe};
pub(crate) use std::sync::OnceLock;

pub(crate) use crate::batch::*;
pub(crate) use crate::common::*;
pub(crate) use crate::config::*;
pub(crate) use crate::logits::{backward, by_dtype, LogitsArg, RecapLogits, RecapLogprobGrads};
pub(crate) use crate::{
    RECAP_ERR_ARGUMENT, RECAP_ERR_DEVICE, RECAP_ERR_INTERNAL, RECAP_ERR_NONFINITE, RECAP_OK,
};
