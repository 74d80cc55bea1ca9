//! The C ABI of recap-kernels (`capi/include/recap_kernels.h`, generated from this file by
//! cbindgen): raw pointers, sizes and a `CUstream` in the caller's
//! device's primary context (the one PyTorch uses), or host pointers for `device < 0` (the CPU
//! reference computes). Every function returns a status code
//! (`RECAP_OK` = 0) and `recap_last_error()` gives the message of the last failure on the calling
//! thread; no panic crosses the boundary (each body runs under `catch_unwind`). Arguments are
//! checked (null pointers, sizes, options) before anything touches the device.
//!
//! Each entry point translates its arguments into [`recap::raw`]'s arrays, which borrow the
//! caller's buffers for the call (device buffers are never freed here, the caller's stream never
//! destroyed) and check that outputs overlap nothing.
//!
//! This file holds the status codes and declares the parts, one file per op family (cbindgen reads
//! them in this order).

/// Success.
pub const RECAP_OK: i32 = 0;
/// An argument has the wrong shape or value (nothing was launched).
pub const RECAP_ERR_ARGUMENT: i32 = 1;
/// Non-finite inputs at unmasked tokens (and `allow_nonfinite` is off).
pub const RECAP_ERR_NONFINITE: i32 = 2;
/// No kernels, driver or device, or a CUDA error.
pub const RECAP_ERR_DEVICE: i32 = 3;
/// An internal error (a caught panic): please report it.
pub const RECAP_ERR_INTERNAL: i32 = 4;

mod prelude;

mod common;
pub use common::*;
mod config;
pub use config::*;
mod batch;
pub use batch::*;
mod grpo;
pub use grpo::*;
mod logits;
pub use logits::*;
mod tensor_parallel;
pub use tensor_parallel::*;
mod advantages;
pub use advantages::*;
mod logits_loss;
pub use logits_loss::*;
mod recap;
pub use recap::*;

#[cfg(test)]
mod tests;
