//! verl's optimal token baseline (host reference) against hand-computed cases and against a dense,
//! padded-batch evaluation of verl's formulas on random batches.

mod common;
mod emulator;

use common::assert_all_close;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recap_kernels::{
    optimal_token_baseline, Error, Groups, HostMask, Mask, TokenBaselineConfig, TokenBaselineInputs,
};

/// `(advantages, returns)` of the packed batch.
#[allow(clippy::too_many_arguments)]
fn otb(
    rewards: &[f32],
    old_logp: &[f32],
    spp: &[f32],
    rho: Option<&[f32]>,
    mask: HostMask<'_>,
    cu: &[i32],
    groups: Groups<'_>,
    config: TokenBaselineConfig,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let t = rewards.len();
    let (mut adv, mut ret) = (vec![f32::NAN; t], vec![f32::NAN; t]);
    let x = TokenBaselineInputs {
        token_rewards: rewards,
        old_logp,
        sum_pi_squared: spp,
        rollout_is_weights: rho,
        mask,
        cu_seqlens: cu,
        groups,
    };
    optimal_token_baseline(&x, &config, &mut adv, &mut ret)?;
    Ok((adv, ret))
}

const HALF_LN: f32 = -std::f32::consts::LN_2; // pi = 0.5; with spp = 0.5, w = 1 - 1 + 0.5 = 0.5

/// Two members of 2 and 3 tokens, rewards at the last token (1 and 2), w = 0.5 everywhere:
/// W = [0.5, 1] and [0.5, 1, 1.5]; B_0 = (1 0.5 + 2 0.5) / 1 = 1.5, B_1 = (1 + 2) / 2 = 1.5,
/// B_2 = 2 1.5 / 1.5 = 2. With the zero tail the longer member's third token has baseline 0.
/// A rollout IS weight of 2 on the first token multiplies its w by 4.
#[test]
fn positions_zero_tail_and_is_weights_by_hand() {
    let rewards = [0.0f32, 1.0, 0.0, 0.0, 2.0];
    let old = [HALF_LN; 5];
    let spp = [0.5f32; 5];
    let mask = [1u8; 5];
    let cu = [0, 2, 5];
    let groups = Groups::Consecutive(2);
    let run = |rho: Option<&[f32]>, config| {
        otb(
            &rewards,
            &old,
            &spp,
            rho,
            Mask::U8(&mask),
            &cu,
            groups,
            config,
        )
        .unwrap()
    };
    let plain = TokenBaselineConfig {
        handle_zero_tail: false,
        ..Default::default()
    };
    let (adv, ret) = run(None, plain);
    assert_all_close("returns", &ret, &[1.0, 1.0, 2.0, 2.0, 2.0], 1e-7, 0.0);
    assert_all_close("advantages", &adv, &[-0.5, -0.5, 0.5, 0.5, 0.0], 1e-6, 1e-6);
    let (adv, _) = run(None, TokenBaselineConfig::default());
    assert_all_close("zero tail", &adv, &[-0.5, -0.5, 0.5, 0.5, 2.0], 1e-6, 1e-6);
    // rho = 2 on token 0: W = [2, 2.5]; B_0 = (2 + 1) / 2.5 = 1.2, B_1 = (2.5 + 2) / 3.5 = 9/7
    let rho = [2.0f32, 1.0, 1.0, 1.0, 1.0];
    let (adv, _) = run(Some(&rho), plain);
    let want = [-0.2, 1.0 - 9.0 / 7.0, 0.8, 2.0 - 9.0 / 7.0, 0.0];
    assert_all_close("is weights", &adv, &want, 1e-6, 1e-6);
}

/// A masked tool output inside the first member (its reward ignored): by position it holds
/// position 1 without weight, so B_1 = 2 1 / 1 = 2 and B_2 = 1 (the first member alone); by turn
/// (multi-turn) its tokens 0 and 2 are positions 0 and 1: B_0 = B_1 = 1.5.
#[test]
fn multi_turn_alignment_by_hand() {
    let rewards = [0.0f32, 5.0, 1.0, 0.0, 2.0];
    let old = [HALF_LN; 5];
    let spp = [0.5f32; 5];
    let mask = [1.0f32, 0.0, 1.0, 1.0, 1.0];
    let cu = [0, 3, 5];
    let run = |config| {
        otb(
            &rewards,
            &old,
            &spp,
            None,
            Mask::F32(&mask),
            &cu,
            Groups::Ids(&[4, 4]),
            config,
        )
        .unwrap()
    };
    let (adv, ret) = run(TokenBaselineConfig::default());
    assert_all_close("returns", &ret, &[1.0, 1.0, 1.0, 2.0, 2.0], 1e-7, 0.0);
    assert_all_close("by position", &adv, &[-0.5, 0.0, 0.0, 0.5, 0.0], 1e-6, 1e-6);
    let (adv, _) = run(TokenBaselineConfig::multi_turn());
    assert_all_close("by turn", &adv, &[-0.5, 0.0, -0.5, 0.5, 0.5], 1e-6, 1e-6);
}

/// A group of one gets baseline 0 (advantages = returns); a fully masked member still counts by
/// position (so its partner's baseline is its own return and its advantage about 0), not by turn.
#[test]
fn groups_of_one_and_empty_members() {
    let rewards = [0.0f32, 1.0, 3.0, 3.0];
    let old = [-0.3f32, -1.2, 0.0, f32::NAN]; // the NaN is masked, never read
    let spp = [0.4f32, 0.2, 0.9, 0.9];
    let mask = [1u8, 1, 0, 0];
    let cu = [0, 2, 4];
    let run = |groups, config| {
        otb(
            &rewards,
            &old,
            &spp,
            None,
            Mask::U8(&mask),
            &cu,
            groups,
            config,
        )
        .unwrap()
    };
    for config in [
        TokenBaselineConfig::default(),
        TokenBaselineConfig::multi_turn(),
    ] {
        let (adv, ret) = run(Groups::Consecutive(1), config);
        assert_all_close("alone", &adv, &[1.0, 1.0, 0.0, 0.0], 0.0, 0.0);
        assert_all_close("returns", &ret, &[1.0, 1.0, 0.0, 0.0], 0.0, 0.0);
    }
    let plain = TokenBaselineConfig {
        handle_zero_tail: false,
        ..Default::default()
    };
    let (adv, _) = run(Groups::Consecutive(2), plain);
    assert_all_close("empty member counts", &adv, &[0.0; 4], 1e-6, 0.0);
    // with the zero tail (verl's default) the longer member's tail starts at the empty one's length 0
    let (adv, _) = run(Groups::Consecutive(2), TokenBaselineConfig::default());
    assert_all_close("zero tail from 0", &adv, &[1.0, 1.0, 0.0, 0.0], 0.0, 0.0);
    let (adv, _) = run(Groups::Consecutive(2), TokenBaselineConfig::multi_turn());
    assert_all_close(
        "empty member skipped",
        &adv,
        &[1.0, 1.0, 0.0, 0.0],
        0.0,
        0.0,
    );
}

#[test]
fn bad_inputs_name_the_argument() {
    let v = [0.5f32; 3];
    let short = [0.5f32; 2];
    let mask = [1u8, 1, 0];
    let cu = [0, 3];
    let g = Groups::Consecutive(1);
    let d = TokenBaselineConfig::default();
    let arg = |r: Result<(Vec<f32>, Vec<f32>), Error>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    };
    let e = arg(otb(&v, &short, &v, None, Mask::U8(&mask), &cu, g, d));
    assert!(e.contains("old_logp") && e.contains("[T]"), "{e}");
    let e = arg(otb(&v, &v, &v, Some(&short), Mask::U8(&mask), &cu, g, d));
    assert!(e.contains("rollout_is_weights"), "{e}");
    let nan = [0.5f32, f32::NAN, 0.5];
    let e = arg(otb(&v, &v, &nan, None, Mask::U8(&mask), &cu, g, d));
    assert!(e.contains("sum_pi_squared") && e.contains("token 1"), "{e}");
    let e = arg(otb(&nan, &v, &v, None, Mask::U8(&mask), &cu, g, d));
    assert!(e.contains("token_rewards"), "{e}");
    // a NaN at the masked token is not read
    let masked_nan = [0.5f32, 0.5, f32::NAN];
    assert!(otb(
        &masked_nan,
        &masked_nan,
        &masked_nan,
        None,
        Mask::U8(&mask),
        &cu,
        g,
        d
    )
    .is_ok());
    let neg = TokenBaselineConfig { eps: -1.0, ..d };
    assert!(arg(otb(&v, &v, &v, None, Mask::U8(&mask), &cu, g, neg)).contains("eps"));
    let e = arg(otb(
        &v,
        &v,
        &v,
        None,
        Mask::U8(&mask),
        &cu,
        Groups::Consecutive(2),
        d,
    ));
    assert!(e.contains("groups"), "{e}");
    let e = arg(otb(&v, &v, &v, None, Mask::U8(&mask), &[0, 2], g, d));
    assert!(e.contains("cu_seqlens"), "{e}");
}

/// verl's two functions evaluated literally on the padded batch `[B, L]` (row-wise cumulative
/// sums, column sums per group in order of first appearance, the zero tail by mask sums), then
/// packed back. Written index by index, as verl's tensor code reads.
#[allow(
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::type_complexity,
    clippy::nonminimal_bool
)]
fn verl_dense(
    rewards: &[f32],
    old: &[f32],
    spp: &[f32],
    rho: Option<&[f32]>,
    mask: &[u8],
    cu: &[i32],
    ids: &[i32],
    multi_turn: bool,
    zero_tail: bool,
) -> Vec<f64> {
    let b = cu.len() - 1;
    let l = (0..b)
        .map(|s| (cu[s + 1] - cu[s]) as usize)
        .max()
        .unwrap_or(0);
    let at = |s: usize, j: usize| cu[s] as usize + j;
    let len = |s: usize| (cu[s + 1] - cu[s]) as usize;
    let m = |s: usize, j: usize| {
        if j < len(s) {
            mask[at(s, j)] as f64
        } else {
            0.0
        }
    };
    let mut ret = vec![vec![0f64; l]; b];
    let mut wcum = vec![vec![0f64; l]; b];
    for s in 0..b {
        let mut acc = 0.0;
        for j in (0..l).rev() {
            if j < len(s) {
                acc += rewards[at(s, j)] as f64 * m(s, j);
            }
            ret[s][j] = acc;
        }
        let mut acc = 0.0;
        for j in 0..l {
            if j < len(s) {
                let t = at(s, j);
                let mut w = 1.0 - 2.0 * (old[t] as f64).exp() + spp[t] as f64;
                if let Some(r) = rho {
                    w *= (r[t] as f64).powi(2);
                }
                acc += w * m(s, j);
            }
            wcum[s][j] = acc;
        }
    }
    // multi-turn: rows compacted to their unmasked tokens
    let lens: Vec<usize> = (0..b)
        .map(|s| (0..l).filter(|&j| m(s, j) != 0.0).count())
        .collect();
    let (vals_r, vals_w, pos): (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<usize>>) = if multi_turn {
        let pos: Vec<Vec<usize>> = (0..b)
            .map(|s| (0..l).filter(|&j| m(s, j) != 0.0).collect())
            .collect();
        let pick = |x: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            (0..b)
                .map(|s| {
                    let mut row = vec![0.0; l];
                    for (k, &j) in pos[s].iter().enumerate() {
                        row[k] = x[s][j];
                    }
                    row
                })
                .collect()
        };
        (pick(&ret), pick(&wcum), pos)
    } else {
        (
            ret.clone(),
            wcum.clone(),
            (0..b).map(|_| (0..l).collect()).collect(),
        )
    };
    let mut order: Vec<i32> = Vec::new();
    for s in 0..b {
        if !(multi_turn && lens[s] == 0) && !order.contains(&ids[s]) {
            order.push(ids[s]);
        }
    }
    let mut base = vec![vec![0f64; l]; b];
    for id in order {
        let traj: Vec<usize> = (0..b)
            .filter(|&s| ids[s] == id && !(multi_turn && lens[s] == 0))
            .collect();
        if traj.len() == 1 {
            continue;
        }
        for k in 0..l {
            let mk = |s: usize| if multi_turn { 1.0 } else { m(s, k) };
            let num: f64 = traj
                .iter()
                .map(|&s| vals_r[s][k] * vals_w[s][k] * mk(s))
                .sum();
            let den: f64 = traj.iter().map(|&s| vals_w[s][k] * mk(s)).sum::<f64>() + 1e-8;
            for &s in &traj {
                base[s][k] = num / den;
            }
        }
        if zero_tail {
            let mut sorted: Vec<usize> = traj.iter().map(|&s| lens[s]).collect();
            sorted.sort_unstable();
            let (max, second) = (sorted[sorted.len() - 1], sorted[sorted.len() - 2]);
            let at_max: Vec<usize> = traj.iter().copied().filter(|&s| lens[s] == max).collect();
            if at_max.len() == 1 && max > second {
                for k in second..l {
                    base[at_max[0]][k] = 0.0;
                }
            }
        }
    }
    let mut out = vec![0f64; rewards.len()];
    for s in 0..b {
        for (k, &j) in pos[s].iter().enumerate() {
            if j < len(s) {
                out[at(s, j)] = (vals_r[s][k] - base[s][k]) * m(s, j);
            }
        }
    }
    out
}

/// A random packed batch: lengths 0, 1, 31, 32, 33, 4097 and others (the special one first for
/// the first cases), one fully masked sequence, holes in the masks, rewards on some tokens,
/// `sum_pi_squared` of a real distribution (in `[pi^2, pi^2 + (1 - pi)^2]`), IS weights, group ids.
struct RandomBatch {
    cu: Vec<i32>,
    mask: Vec<u8>,
    rewards: Vec<f32>,
    old: Vec<f32>,
    spp: Vec<f32>,
    rho: Vec<f32>,
    ids: Vec<i32>,
}

impl RandomBatch {
    /// The batch as the op's inputs, with this mask, IS weights and groups.
    fn inputs<'a>(
        &'a self,
        mask: HostMask<'a>,
        rollout_is_weights: Option<&'a [f32]>,
        groups: Groups<'a>,
    ) -> recap_kernels::HostTokenBaselineInputs<'a> {
        TokenBaselineInputs {
            token_rewards: &self.rewards,
            old_logp: &self.old,
            sum_pi_squared: &self.spp,
            rollout_is_weights,
            mask,
            cu_seqlens: &self.cu,
            groups,
        }
    }
}

fn random_batch(rng: &mut ChaCha8Rng, case: usize) -> RandomBatch {
    let special = [0usize, 1, 31, 32, 33, 4097];
    let b = rng.random_range(1..=9);
    let mut cu = vec![0i32];
    for s in 0..b {
        let n = if s == 0 && case < special.len() {
            special[case]
        } else if rng.random_bool(0.3) {
            special[rng.random_range(0..5)]
        } else {
            rng.random_range(1..60)
        };
        cu.push(cu[s] + n as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let fully_masked = rng.random_range(0..b);
    let mut mask = vec![0u8; t];
    for s in 0..b {
        for v in &mut mask[cu[s] as usize..cu[s + 1] as usize] {
            *v = (s != fully_masked && rng.random_bool(0.85)) as u8;
        }
    }
    let rewards: Vec<f32> = (0..t)
        .map(|_| {
            if rng.random_bool(0.1) {
                rng.random_range(-1.0..2.0)
            } else {
                0.0
            }
        })
        .collect();
    let old: Vec<f32> = (0..t).map(|_| -rng.random_range(0.0f32..4.0)).collect();
    let spp: Vec<f32> = old
        .iter()
        .map(|&o| {
            let pi = o.exp();
            pi * pi + rng.random_range(0.0f32..1.0) * (1.0 - pi) * (1.0 - pi)
        })
        .collect();
    let rho: Vec<f32> = (0..t).map(|_| rng.random_range(0.2f32..2.0)).collect();
    let ids: Vec<i32> = (0..b).map(|_| rng.random_range(0..3) * 7 - 5).collect();
    RandomBatch {
        cu,
        mask,
        rewards,
        old,
        spp,
        rho,
        ids,
    }
}

/// Random batches ([`random_batch`]): both variants, with and without the zero tail and IS
/// weights, against [`verl_dense`].
#[test]
fn random_batches_match_verls_dense_formulas() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for case in 0..24 {
        let x = random_batch(&mut rng, case);
        let (cu, mask, rewards, old, spp, ids) =
            (&x.cu, &x.mask, &x.rewards, &x.old, &x.spp, &x.ids);
        let rho = (case % 2 == 1).then_some(x.rho.as_slice());
        for multi_turn in [false, true] {
            for zero_tail in [false, true] {
                let config = TokenBaselineConfig {
                    multi_turn,
                    handle_zero_tail: zero_tail,
                    eps: 1e-8,
                };
                let (adv, ret) = otb(
                    rewards,
                    old,
                    spp,
                    rho,
                    Mask::U8(mask),
                    cu,
                    Groups::Ids(ids),
                    config,
                )
                .unwrap();
                let want = verl_dense(rewards, old, spp, rho, mask, cu, ids, multi_turn, zero_tail);
                let want: Vec<f32> = want.iter().map(|v| *v as f32).collect();
                let what = format!("case {case} multi_turn {multi_turn} zero_tail {zero_tail}");
                assert_all_close(&what, &adv, &want, 1e-5, 1e-5);
                assert!(ret.iter().all(|v| v.is_finite()), "{what}: returns");
            }
        }
    }
}

on_every_backend! {
    /// The backend (on a GPU: the kernel) against the host reference on [`random_batch`]es: u8
    /// masks and f32 masks with weights other than 1, both variants, the zero tail, IS weights, id
    /// and consecutive groups; a second run gives the same bits; a NaN at a masked token is never
    /// read, one at an unmasked token is an error naming its argument.
    fn backend_matches_the_reference(be) {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        for case in 0..16 {
            let x = random_batch(&mut rng, case);
            let t = x.rewards.len();
            let weights: Vec<f32> = x
                .mask
                .iter()
                .map(|&m| m as f32 * [0.5, 1.0, 2.0][rng.random_range(0..3)])
                .collect();
            let rho = (case % 2 == 1).then_some(x.rho.as_slice());
            let b = x.cu.len() - 1;
            let groups = if case % 3 == 0 && b % 3 == 0 {
                Groups::Consecutive(3)
            } else {
                Groups::Ids(&x.ids)
            };
            for (mask, multi_turn, zero_tail) in [
                (Mask::U8(&x.mask[..]), false, true),
                (Mask::U8(&x.mask[..]), true, true),
                (Mask::F32(&weights[..]), false, false),
                (Mask::F32(&weights[..]), true, false),
            ] {
                let config = TokenBaselineConfig {
                    multi_turn,
                    handle_zero_tail: zero_tail,
                    eps: 1e-8,
                };
                let inputs = x.inputs(mask, rho, groups);
                let run = |inputs: &recap_kernels::HostTokenBaselineInputs<'_>| {
                    let (mut adv, mut ret) = (vec![f32::NAN; t], vec![f32::NAN; t]);
                    be.optimal_token_baseline(inputs, &config, &mut adv, &mut ret)
                        .map(|_| (adv, ret))
                };
                let (adv, ret) = run(&inputs).unwrap();
                let (mut want_a, mut want_r) = (vec![0f32; t], vec![0f32; t]);
                optimal_token_baseline(&inputs, &config, &mut want_a, &mut want_r).unwrap();
                let f32_mask = matches!(mask, Mask::F32(_));
                let what = format!("case {case} t {t} multi_turn {multi_turn} f32 mask {f32_mask}");
                assert_all_close(&format!("{what}: advantages"), &adv, &want_a, 1e-5, 1e-5);
                assert_all_close(&format!("{what}: returns"), &ret, &want_r, 1e-5, 1e-5);
                let (again, _) = run(&inputs).unwrap();
                let same = |a: &[f32], b: &[f32]| {
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
                };
                assert!(same(&adv, &again), "{what}: same bits");
                if let Some(tok) = x.mask.iter().position(|&m| m == 0) {
                    let mut poisoned = x.old.clone();
                    poisoned[tok] = f32::NAN;
                    let (masked, _) =
                        run(&TokenBaselineInputs { old_logp: &poisoned[..], ..inputs }).unwrap();
                    assert!(same(&masked, &adv), "{what}: masked NaN");
                }
                if let Some(tok) = x.mask.iter().position(|&m| m != 0) {
                    let mut poisoned = x.spp.clone();
                    poisoned[tok] = f32::INFINITY;
                    let bad = TokenBaselineInputs { sum_pi_squared: &poisoned[..], ..inputs };
                    let e = run(&bad).unwrap_err().to_string();
                    let named = e.contains("sum_pi_squared") && e.contains(&format!("token {tok}"));
                    assert!(named, "{what}: {e}");
                }
            }
        }
    }
}

/// Runs `kernels/token_baseline.cu` on the host (the SIMT emulator) with the group table,
/// parameters and launches `cuda::optimal_token_baseline` uses: `(advantages, returns, first bad
/// token per argument)`.
fn run_emulated(
    emu: &emulator::Emulated,
    x: &recap_kernels::HostTokenBaselineInputs<'_>,
    config: &TokenBaselineConfig,
) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let (t, b) = (x.token_rewards.len(), x.cu_seqlens.len() - 1);
    let (off, mem) = recap_kernels::cuda::group_table(x.groups, b).unwrap();
    let (mut sums, mut ints) = (vec![0f64; 2 * t], vec![0i32; t + b]);
    let mut bad = vec![i32::MAX; 4];
    let (mut adv, mut ret) = (vec![f32::NAN; t], vec![f32::NAN; t]);
    let (mask, suffix) = match x.mask {
        Mask::U8(m) => (m.as_ptr() as u64, "u8"),
        Mask::F32(m) => (m.as_ptr() as u64, "f32"),
    };
    let arrays = recap_kernels::cuda::params::OtbParams {
        token_rewards: x.token_rewards.as_ptr() as u64,
        old_logp: x.old_logp.as_ptr() as u64,
        sum_pi_squared: x.sum_pi_squared.as_ptr() as u64,
        rollout_is_weights: x.rollout_is_weights.map_or(0, |r| r.as_ptr() as u64),
        mask,
        cu_seqlens: x.cu_seqlens.as_ptr() as u64,
        group_offsets: off.as_ptr() as u64,
        group_members: mem.as_ptr() as u64,
        bad: bad.as_mut_ptr() as u64,
        advantages: adv.as_mut_ptr() as u64,
        returns: ret.as_mut_ptr() as u64,
        ..Default::default()
    };
    let groups = off.len() - 1;
    let (sums_a, ints_a) = (sums.as_mut_ptr() as u64, ints.as_mut_ptr() as u64);
    let p = recap_kernels::cuda::otb_params(arrays, sums_a, ints_a, (t, b, groups), config);
    if t > 0 {
        for (kernel, grid) in recap_kernels::cuda::otb_launches(suffix, b, groups) {
            emu.launch(&kernel, grid, 256, &p);
        }
    }
    (adv, ret, bad)
}

/// The kernel source (`kernels/token_baseline.cu`) run on the host under a SIMT emulator, one
/// std::thread per CUDA thread, against the reference: a check of its scans, carries, aligned
/// positions and group sums on machines without a GPU (the GPU run is
/// `backend_matches_the_reference::gpu`). Random batches of the standard lengths, u8 and weighted
/// f32 masks, both variants, the zero tail, IS weights; the first non-finite token per argument.
#[test]
fn kernel_source_emulated_on_the_host_matches_the_reference() {
    let emu = emulator::Emulated::build("token_baseline");
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for case in 0..6 {
        let x = random_batch(&mut rng, case);
        let t = x.rewards.len();
        let weights: Vec<f32> = x.mask.iter().map(|&m| m as f32 * 1.5).collect();
        let rho = (case % 2 == 0).then_some(x.rho.as_slice());
        for (mask, multi_turn, zero_tail) in [
            (Mask::U8(&x.mask[..]), false, true),
            (Mask::U8(&x.mask[..]), true, true),
            (Mask::F32(&weights[..]), true, false),
        ] {
            let config = TokenBaselineConfig {
                multi_turn,
                handle_zero_tail: zero_tail,
                eps: 1e-8,
            };
            let inputs = x.inputs(mask, rho, Groups::Ids(&x.ids));
            let (adv, ret, bad) = run_emulated(&emu, &inputs, &config);
            let (mut want_a, mut want_r) = (vec![0f32; t], vec![0f32; t]);
            optimal_token_baseline(&inputs, &config, &mut want_a, &mut want_r).unwrap();
            let what = format!("case {case} t {t} multi_turn {multi_turn}");
            assert_all_close(&format!("{what}: advantages"), &adv, &want_a, 1e-6, 1e-6);
            assert_all_close(&format!("{what}: returns"), &ret, &want_r, 1e-6, 1e-6);
            assert!(bad.iter().all(|&b| b == i32::MAX), "{what}: {bad:?}");
        }
    }
    // non-finite values: the first unmasked token per argument; masked ones are not read
    let mask = [1u8, 1, 0, 1, 1, 1, 0, 1, 1, 1];
    let (zero, half) = ([0f32; 10], [-0.7f32; 10]);
    let mut spp = [0.6f32; 10];
    (spp[2], spp[8], spp[4]) = (f32::NAN, f32::INFINITY, f32::NAN);
    let mut rewards = zero;
    rewards[6] = f32::NAN;
    rewards[9] = f32::NEG_INFINITY;
    let inputs = TokenBaselineInputs {
        token_rewards: &rewards[..],
        old_logp: &half[..],
        sum_pi_squared: &spp[..],
        rollout_is_weights: None,
        mask: Mask::U8(&mask[..]),
        cu_seqlens: &[0, 5, 10],
        groups: Groups::Consecutive(2),
    };
    let (_, _, bad) = run_emulated(&emu, &inputs, &TokenBaselineConfig::default());
    assert_eq!(bad, [i32::MAX, 4, i32::MAX, 9]);
}
