//! Group advantages, the optimal token baseline and GAE.

#[allow(unused_imports)]
use crate::prelude::*;

/// Group advantages of `rewards` [B, K] into `out` [B, K]: groups of `group_size` consecutive
/// rollouts, or `group_ids` [B] (any ids on the CPU; dense ids in [0, num_groups) on a GPU); one
/// mode per objective (the crate's `AdvantageMode` names); `lengths` [B] int32 response lengths
/// (opo, reinforce_plus_plus*); `baselines` [B, K] float32 (as `out`; remax);
/// `reward_weights` [K]: one advantage of the weighted columns
/// (sum-then-normalize, or normalize-then-sum with gdpo), `out` [B, 1].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (rewards, group_ids, lengths, baselines, group_size, num_groups, modes, eps, singletons, reward_weights, out))]
pub(crate) fn group_advantages(
    py: Python<'_>,
    rewards: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    lengths: Option<&Bound<'_, PyAny>>,
    baselines: Option<&Bound<'_, PyAny>>,
    group_size: usize,
    num_groups: usize,
    modes: Vec<String>,
    eps: f64,
    singletons: &str,
    reward_weights: Option<Vec<f64>>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("rewards", rewards)?;
    let call = Call::new(py, &first)?;
    let modes = modes
        .iter()
        .map(|m| m.parse::<AdvantageMode>())
        .collect::<recap_kernels::Result<Vec<_>>>()
        .map_err(err)?;
    let r = call.f32("rewards", rewards)?;
    let groups = match group_ids {
        Some(g) => RawGroups::Ids {
            ids: call.i32("group_ids", g)?,
            num_groups,
        },
        None => RawGroups::Consecutive(group_size),
    };
    let lengths = lengths.map(|l| call.i32("lengths", l)).transpose()?;
    let baselines = baselines.map(|b| call.f32("baselines", b)).transpose()?;
    let o = call.out_f32("out", out)?;
    let cfg = AdvantageConfig {
        modes,
        eps,
        lead: None,
        reward_weights,
        singletons: singletons.parse().map_err(err)?,
    };
    py.detach(|| raw::group_advantages(call.place, r, groups, lengths, baselines, &cfg, o))
        .map_err(err)
}

/// verl's optimal token baseline into `advantages` and `returns` ([T] float32 each) of packed
/// per-token inputs; groups of `group_size` consecutive sequences, or `group_ids` [B] (a CPU
/// tensor of any int ids, read on the host like `cu_seqlens`).
#[pyfunction]
#[pyo3(signature = (token_rewards, old_logp, sum_pi_squared, rollout_is_weights, mask, cu_seqlens, group_ids, group_size, multi_turn, handle_zero_tail, eps, advantages, returns))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimal_token_baseline(
    py: Python<'_>,
    token_rewards: &Bound<'_, PyAny>,
    old_logp: &Bound<'_, PyAny>,
    sum_pi_squared: &Bound<'_, PyAny>,
    rollout_is_weights: Option<&Bound<'_, PyAny>>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    group_size: usize,
    multi_turn: bool,
    handle_zero_tail: bool,
    eps: f64,
    advantages: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("token_rewards", token_rewards)?;
    let call = Call::new(py, &first)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let ids = group_ids.map(|g| host_i32("group_ids", g)).transpose()?;
    let groups = match &ids {
        Some(ids) => Groups::Ids(ids),
        None => Groups::Consecutive(group_size),
    };
    let x = recap_kernels::TokenBaselineInputs {
        token_rewards: call.f32("token_rewards", token_rewards)?,
        old_logp: call.f32("old_logp", old_logp)?,
        sum_pi_squared: call.f32("sum_pi_squared", sum_pi_squared)?,
        rollout_is_weights: call.opt_f32("rollout_is_weights", rollout_is_weights)?,
        mask: call.mask("mask", mask)?,
        cu_seqlens: &cu,
        groups,
    };
    let config = recap_kernels::TokenBaselineConfig {
        multi_turn,
        handle_zero_tail,
        eps,
    };
    let (a, r) = (
        call.out_f32("advantages", advantages)?,
        call.out_f32("returns", returns)?,
    );
    py.detach(|| raw::optimal_token_baseline(call.place, &x, &config, a, r))
        .map_err(err)
}

/// GAE (verl's `compute_gae_advantage_return`) of the packed `[T]` tokens into `advantages` and
/// `returns` (`[T]` float32); `cu_seqlens` [B + 1] int32 (read on the host).
#[pyfunction]
#[pyo3(signature = (token_rewards, values, mask, cu_seqlens, gamma, lam, whiten, advantages, returns))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gae(
    py: Python<'_>,
    token_rewards: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    cu_seqlens: &Bound<'_, PyAny>,
    gamma: f64,
    lam: f64,
    whiten: bool,
    advantages: &Bound<'_, PyAny>,
    returns: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let first = Tensor::of("token_rewards", token_rewards)?;
    let call = Call::new(py, &first)?;
    let cu = host_i32("cu_seqlens", cu_seqlens)?;
    let x = recap_kernels::ops::gae::GaeInputs {
        token_rewards: call.f32("token_rewards", token_rewards)?,
        values: call.f32("values", values)?,
        mask: call.mask("mask", mask)?,
        cu_seqlens: &cu,
    };
    let config = recap_kernels::ops::gae::GaeConfig { gamma, lam, whiten };
    let (a, r) = (
        call.out_f32("advantages", advantages)?,
        call.out_f32("returns", returns)?,
    );
    py.detach(|| recap_kernels::ops::gae::gae_at(call.place, &x, &config, a, r))
        .map_err(err)
}

/// Registers this family's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_advantages, m)?)?;
    m.add_function(wrap_pyfunction!(optimal_token_baseline, m)?)?;
    m.add_function(wrap_pyfunction!(gae, m)?)?;
    Ok(())
}
