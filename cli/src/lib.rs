//! The `recap` command's modules: the RECAP training driver (`recap train`, `recap experiment`) and
//! the benchmark of every op (`recap bench`), on the library `recap-kernels` (its public ops, and
//! its `tools` module for the driver's kernels).

#![warn(missing_docs)]

pub mod bench;
pub mod train;
