//! `recap_kernels._native`: the Python extension of recap-kernels.
//!
//! Each function takes PyTorch tensors (read through their `data_ptr`, `shape`, `stride`, `dtype`
//! and `device`, without linking libtorch), checks them (dtype, device, contiguity; the error names
//! the argument) and calls the crate's pointer-level layer [`recap_kernels::raw`]: CPU tensors run
//! the f64 CPU reference, CUDA tensors the kernels on PyTorch's current stream of their device.
//! Outputs are tensors the caller allocated (the Python package's `torch.library` custom ops do,
//! with the same shapes as their fake implementations); loss and statistics are written into them
//! on the tensors' device. Options arrive as the JSON form of [`GrpoConfig`]: one definition, in
//! Rust. The GIL is released while an op runs.
//!
//! This file only registers the module; each op family lives in its own file.

mod advantages;
mod convert;
mod grpo;
mod logits;
mod logits_loss;
mod prelude;
mod recap;
mod tensor_parallel;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KERNELS_COMPILED", recap_kernels::cuda::KERNELS_COMPILED)?;
    m.add("CUDA_ARCHS", recap_kernels::cuda::CUDA_ARCHS)?;
    m.add("NVCC_VERSION", recap_kernels::cuda::NVCC_VERSION)?;
    m.add("RecapError", m.py().get_type::<convert::RecapError>())?;
    m.add("ROLLOUT_IS_STATS", recap_kernels::RolloutIsStats::LEN)?;
    m.add_class::<recap::PyRecapScheduler>()?;
    m.add_function(wrap_pyfunction!(grpo::grpo_config, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::grpo_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(logits_loss::logits_stat_layout, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::grpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::grpo_loss_async, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::grpo_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::grpo_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(logits_loss::logits_output_len, m)?)?;
    m.add_function(wrap_pyfunction!(logits_loss::logits_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(
        logits_loss::fused_linear_workspace_len,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(
        logits_loss::grpo_loss_from_logits_async_,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(
        logits_loss::fused_linear_grpo_loss_async,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(logits_loss::logits_output_read, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::kl, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::rollout_rejection, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::rollout_is_weights, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::rollout_is_batch_factor, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::weighted_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(grpo::count_normalizers, m)?)?;
    m.add_function(wrap_pyfunction!(logits::logprob_forward, m)?)?;
    m.add_function(wrap_pyfunction!(logits::logprob_backward_, m)?)?;
    m.add_function(wrap_pyfunction!(logits_loss::grpo_loss_from_logits_, m)?)?;
    m.add_function(wrap_pyfunction!(logits_loss::fused_linear_grpo_loss, m)?)?;
    m.add_function(wrap_pyfunction!(advantages::group_advantages, m)?)?;
    m.add_function(wrap_pyfunction!(advantages::optimal_token_baseline, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_parallel::tp_partials, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_parallel::tp_combine, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_parallel::tp_backward_, m)?)?;
    Ok(())
}
