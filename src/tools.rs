//! What the `recap` command (the `recap-cli` crate: `recap train`, `recap experiment`, `recap bench`)
//! uses of this crate beyond its public ops, behind the feature `tools`: the training driver's
//! kernels (`kernels/train.cu`, compiled only with this feature), the device addresses of owned
//! buffers its parameter structs carry, host-to-device uploads, the cuBLAS GEMM the fused-linear
//! path runs, and the fused loss's slot count (for sizing a benchmark's output buffer). Not a
//! stable API: it moves with the tool.

use crate::cuda::device::{Gpu, Module};
use crate::error::Result;
use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, SyncOnDrop, ValidAsZeroBits};
use std::sync::Arc;

pub use crate::cuda::params::TrainParams;

/// Threads per block of every kernel (`RECAP_BLOCK`).
pub const BLOCK: u32 = crate::cuda::device::BLOCK;

/// Launches the training driver's kernel `name` (`kernels/train.cu`) with `grid` blocks of
/// [`BLOCK`] threads and `params`; a grid of 0 launches nothing.
pub fn launch_train(
    gpu: &Gpu,
    stream: &CudaStream,
    name: &str,
    grid: usize,
    params: &TrainParams,
) -> Result<()> {
    gpu.launch(stream, Module::Train, name, grid, params)
}

/// Device address of an owned buffer, for a parameter struct; the guard must outlive the launch.
pub fn addr_slice<'a, T>(v: &'a CudaSlice<T>, s: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    crate::cuda::device::addr_slice(v, s)
}

/// Device address of an owned buffer, for writing.
pub fn addr_slice_mut<'a, T>(v: &'a mut CudaSlice<T>, s: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    crate::cuda::device::addr_slice_mut(v, s)
}

/// A host slice copied to a new device buffer of at least one element.
pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    x: &[T],
) -> Result<CudaSlice<T>> {
    crate::cuda::device::upload(stream, x)
}

/// `C[m, n] (col-major, ldc) = op(A) op(B) + beta C` with fp32 accumulation on `stream`, with
/// `gpu`'s cuBLAS handle, as the fused-linear path calls it (operands as device address, data type
/// and leading dimension).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    ta: cublasOperation_t,
    tb: cublasOperation_t,
    mnk: (usize, usize, usize),
    a: (u64, cudaDataType, usize),
    b: (u64, cudaDataType, usize),
    c: (u64, cudaDataType, usize),
    beta: f32,
) -> Result<()> {
    gpu.with_blas(stream, |blas| {
        crate::ops::fused_linear::cuda::gemm(blas, ta, tb, mnk, a, b, c, beta)
    })
}

/// Reduction slots of the fused loss for `k` objectives.
pub fn grpo_slots(k: usize) -> usize {
    crate::output::grpo_slots(k)
}
