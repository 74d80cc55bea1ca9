//! `#[repr(C)]` mirrors of the kernel-parameter structs of `kernels/recap_params.h`, generated from
//! that header by `build.rs` (`build/mirrors.rs`), which also asserts, at compile time, that each
//! mirror and its C struct have the same size and field offsets.

// The fields are documented once, in the header.
#![allow(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/params.rs"));
