//! Group advantages on the GPU (`kernels/advantages.cu`); the CPU reference is
//! [`crate::advantages::group_advantages`].

use crate::advantages::{validate, AdvantageConfig, Singletons};
use crate::cuda::device::{addr, addr_mut, addr_slice_mut, params::AdvParams, Gpu, Module};
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;

/// Rollout groups of device data.
#[derive(Debug)]
pub enum DeviceGroups<'a> {
    /// Groups of G consecutive rollouts (B must be a multiple of G).
    Consecutive(usize),
    /// `[B]` dense group ids in `[0, num_groups)`: every group id a rollout carries must be in range
    /// (checked after the launch: an error names how many rollouts were outside every group).
    Ids {
        /// `[B]` group id of each rollout.
        ids: CudaView<'a, i32>,
        /// Number of groups (ids are in `[0, num_groups)`).
        num_groups: usize,
    },
}

/// Advantages `[B, K]` of rewards `[B, K]` on `stream` into `out`, as the CPU reference (same
/// modes and GRPO-LEAD options). `lengths` (`[B]`) is needed by the length-dependent reward, opo
/// and REINFORCE++; `baselines` (`[B, K]`, as `out`) by ReMax.
/// Synchronizes the stream once, to read back the group sizes and the count of non-finite rewards
/// (an error when any).
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    rewards: &CudaView<'_, f32>,
    groups: DeviceGroups<'_>,
    lengths: Option<&CudaView<'_, i32>>,
    baselines: Option<&CudaView<'_, f32>>,
    config: &AdvantageConfig,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (b, k) = validate(
        rewards.len(),
        lengths.map(|l| l.len()),
        baselines.map(|l| l.len()),
        config,
        out.len(),
    )?;
    gpu.check_stream(stream)?;
    let (group_size, num_groups, ids) = match &groups {
        DeviceGroups::Consecutive(g) => {
            if *g == 0 || b % g != 0 {
                return Err(Error::invalid_argument(
                    "groups",
                    format!(
                        "B = {b} rollouts do not split into groups of G = {g} consecutive rollouts"
                    ),
                ));
            }
            (*g, b / g, None)
        }
        DeviceGroups::Ids { ids, num_groups } => {
            crate::layout::check_len("groups", ids.len(), b, "[B] group ids")?;
            if *num_groups > b.max(1) {
                return Err(Error::invalid_argument(
                    "groups",
                    format!("num_groups = {num_groups} exceeds B = {b} rollouts"),
                ));
            }
            (0, *num_groups, Some(ids))
        }
    };
    if b == 0 || num_groups == 0 {
        return Ok(());
    }
    // work[B, K], batch statistics [2 K_out], then pre[B, K_out]; zeroed, so rollouts with an
    // invalid group id (reported below) read zeros rather than stale memory
    let shape = AdvShape {
        b,
        k,
        num_groups,
        group_size,
    };
    let mut scratch = stream.alloc_zeros::<f64>(shape.scratch_len(config))?;
    let mut counts = stream.alloc_zeros::<i32>(num_groups + 3)?;
    {
        let (s_a, _gs) = addr_slice_mut(&mut scratch, stream);
        let (c_a, _gc) = addr_slice_mut(&mut counts, stream);
        let (r_a, _gr) = addr(rewards, stream);
        let (o_a, _go) = addr_mut(out, stream);
        let (i_a, _gi) = match ids {
            Some(v) => {
                let (a, g) = addr(v, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let (l_a, _gl) = match lengths {
            Some(v) => {
                let (a, g) = addr(v, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let (b_a, _gb) = match baselines {
            Some(v) => {
                let (a, g) = addr(v, stream);
                (a, Some(g))
            }
            None => (0, None),
        };
        let addrs = AdvAddrs {
            rewards: r_a,
            group_ids: i_a,
            lengths: l_a,
            scratch: s_a,
            out: o_a,
            counts: c_a,
            baselines: b_a,
        };
        let p = shape.params(&addrs, config);
        for (kernel, grid) in shape.launches(config) {
            gpu.launch(stream, Module::Advantages, kernel, grid, &p)?;
        }
    }
    let host = stream.clone_dtoh(&counts)?;
    stream.synchronize()?;
    let members: usize = host[..num_groups].iter().map(|c| *c as usize).sum();
    if members != b {
        return Err(Error::invalid_argument(
            "groups",
            format!(
                "{} of B = {b} rollouts carry a group id outside [0, {num_groups})",
                b - members.min(b)
            ),
        ));
    }
    if host[num_groups] > 0 {
        return Err(Error::invalid_argument(
            "rewards",
            format!("{} rewards are not finite", host[num_groups]),
        ));
    }
    if host[num_groups + 1] > 0 {
        return Err(Error::invalid_argument(
            "lengths",
            format!("{} lengths are negative", host[num_groups + 1]),
        ));
    }
    if host[num_groups + 2] > 0 {
        return Err(Error::invalid_argument(
            "baselines",
            format!("{} baselines are not finite", host[num_groups + 2]),
        ));
    }
    Ok(())
}

/// Device addresses of one group-advantages call (0 for an absent optional array).
#[derive(Clone, Copy, Debug, Default)]
pub struct AdvAddrs {
    /// `const float[B, K]` rewards.
    pub rewards: u64,
    /// `const int32_t[B]` dense group ids, or 0 (consecutive groups).
    pub group_ids: u64,
    /// `const int32_t[B]` lengths, or 0.
    pub lengths: u64,
    /// `double[AdvShape::scratch_len]`, zeroed.
    pub scratch: u64,
    /// `float[B, K_out]` advantages.
    pub out: u64,
    /// `int32_t[num_groups + 3]`, zeroed.
    pub counts: u64,
    /// `const float[B, K_out]` ReMax baselines, or 0.
    pub baselines: u64,
}

/// The shape of one group-advantages call and its launch plan: the one definition of the
/// parameter struct, the scratch layout and the launches, used by [`group_advantages`] (and by
/// the tests that run the kernel source on the host).
#[derive(Clone, Copy, Debug)]
pub struct AdvShape {
    /// Rollouts B.
    pub b: usize,
    /// Reward columns K.
    pub k: usize,
    /// Groups.
    pub num_groups: usize,
    /// G of consecutive groups (0 with ids).
    pub group_size: usize,
}

impl AdvShape {
    /// Doubles of scratch: `work[B, K]`, the batch statistics `[2 K_out]`, `pre[B, K_out]`.
    pub fn scratch_len(&self, config: &AdvantageConfig) -> usize {
        let k_out = config.num_outputs();
        self.b * self.k + 2 * k_out + self.b * k_out
    }

    /// The kernels' parameter struct.
    pub fn params(&self, a: &AdvAddrs, config: &AdvantageConfig) -> AdvParams {
        let (b, k, k_out) = (self.b, self.k, config.num_outputs());
        let lead = config.lead.as_ref();
        let diff = lead.and_then(|l| l.difficulty);
        let length_alpha = lead.and_then(|l| l.length_alpha);
        AdvParams {
            rewards: a.rewards,
            group_ids: a.group_ids,
            lengths: a.lengths,
            work: a.scratch,
            batch_std: a.scratch + (b * k * 8) as u64,
            pre: a.scratch + ((b * k + 2 * k_out) * 8) as u64,
            out: a.out,
            counts: a.counts,
            num_rollouts: b as i32,
            num_objectives: k as i32,
            num_groups: self.num_groups as i32,
            group_size: self.group_size as i32,
            modes: config
                .modes
                .iter()
                .enumerate()
                .fold(0u64, |acc, (j, m)| acc | (u64::from(m.code()) << (4 * j))),
            correctness: lead.map_or(-1, |l| l.correctness as i32),
            has_length: length_alpha.is_some() as i32,
            has_difficulty: diff.is_some() as i32,
            eps: config.eps,
            length_alpha: length_alpha.unwrap_or(0.0),
            diff_a: diff.map_or(0.0, |d| d.a),
            diff_b: diff.map_or(0.0, |d| d.b),
            diff_rho0: diff.map_or(0.0, |d| d.rho0),
            diff_k: diff.map_or(0.0, |d| d.k),
            num_outputs: k_out as i32,
            has_reward_weights: config.reward_weights.is_some() as i32,
            verl_singletons: (config.singletons == Singletons::Verl) as i32,
            reward_weights: {
                let mut w = [0f64; 16];
                if let Some(rw) = &config.reward_weights {
                    w[..rw.len()].copy_from_slice(rw);
                }
                w
            },
            baselines: a.baselines,
        }
    }

    /// The launches in order: `(kernel, grid)`, blocks of 256 threads.
    pub fn launches(&self, config: &AdvantageConfig) -> Vec<(&'static str, usize)> {
        let k_out = config.num_outputs();
        let mut v = vec![
            ("recap_adv_prepare", self.num_groups),
            ("recap_adv_batch_std", k_out),
            ("recap_adv_apply", self.num_groups),
        ];
        if config.modes.iter().any(|m| m.whitened()) {
            v.push(("recap_adv_whiten", k_out));
        }
        v
    }
}
