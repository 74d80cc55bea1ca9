//! Group advantages against hand-computed cases, every mode, explicit group ids, and the GRPO-LEAD
//! options.

mod common;
mod emulator;

use common::assert_close;
use recap_kernels::{
    group_advantages, AdvantageConfig, AdvantageMode, DifficultyWeights, Error, Groups,
    LeadOptions, Singletons,
};

fn adv(
    rewards: &[f32],
    groups: Groups<'_>,
    modes: &[AdvantageMode],
    lead: Option<LeadOptions>,
    lengths: Option<&[i32]>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; rewards.len()];
    let cfg = AdvantageConfig {
        modes: modes.to_vec(),
        eps: 1e-6,
        lead,
        reward_weights: None,
        singletons: recap_kernels::Singletons::Zero,
    };
    group_advantages(rewards, groups, lengths, None, &cfg, &mut out).unwrap();
    out
}

/// Groups of one rollout: 0 in every mode by default; verl's convention (mean 0, std 1) on request,
/// as verl's compute_grpo_outcome_advantage / rloo give it. Groups of several are unchanged.
#[test]
fn groups_of_one_by_hand() {
    // ids: rollout 0 alone in group 7, rollouts 1..4 in group 3 (rewards 1, 0, 1)
    let rewards = [2.0f32, 1.0, 0.0, 1.0];
    let ids = [7, 3, 3, 3];
    let modes = [
        AdvantageMode::Grpo,
        AdvantageMode::DrGrpo,
        AdvantageMode::Rloo,
        AdvantageMode::BatchStd,
    ];
    // batch std of [2, 1, 0, 1]: mean 1, unbiased var 2/3
    let batch_sd = (2.0f64 / 3.0).sqrt();
    let verl_one = [2.0 / (1.0 + 1e-6), 2.0, 2.0, 2.0 / (batch_sd + 1e-6)];
    for (mode, want) in modes.into_iter().zip(verl_one) {
        for singletons in [
            recap_kernels::Singletons::Zero,
            recap_kernels::Singletons::Verl,
        ] {
            let cfg = AdvantageConfig {
                modes: vec![mode],
                eps: 1e-6,
                lead: None,
                reward_weights: None,
                singletons,
            };
            let mut out = vec![f32::NAN; 4];
            group_advantages(&rewards, Groups::Ids(&ids), None, None, &cfg, &mut out).unwrap();
            let lone = if singletons == recap_kernels::Singletons::Verl {
                want
            } else {
                0.0
            };
            assert_close(
                &format!("{mode:?} {singletons:?} lone"),
                out[0] as f64,
                lone,
                1e-6,
                1e-6,
            );
            let rest = adv(&rewards, Groups::Ids(&ids), &[mode], None, None);
            assert_eq!(
                &out[1..],
                &rest[1..],
                "{mode:?}: the group of three is unchanged"
            );
        }
    }
    assert_eq!(
        "verl".parse::<recap_kernels::Singletons>().unwrap(),
        recap_kernels::Singletons::Verl
    );
    assert!("one"
        .parse::<recap_kernels::Singletons>()
        .unwrap_err()
        .to_string()
        .contains("singletons"));
}

/// TRL's sum-then-normalize (RECAP's weights on the rewards): the advantage of `sum_k w_k r_k`.
#[test]
fn reward_weights_combine_before_the_advantage() {
    // one group of four, two rewards, weights [2, 1]: combined [2, 1, 3, 0], mean 1.5,
    // unbiased std sqrt((0.25 + 0.25 + 2.25 + 2.25) / 3)
    let rewards = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    let cfg = AdvantageConfig {
        reward_weights: Some(vec![2.0, 1.0]),
        ..AdvantageConfig::default()
    };
    let mut out = vec![f32::NAN; 4];
    group_advantages(&rewards, Groups::Consecutive(4), None, None, &cfg, &mut out).unwrap();
    let sd = (5.0f64 / 3.0).sqrt() + 1e-6;
    for (got, x) in out.iter().zip([2.0, 1.0, 3.0, 0.0]) {
        assert_close("weighted advantage", *got as f64, (x - 1.5) / sd, 1e-6, 0.0);
    }
    // weights [1, 1] are the plain sum; Dr. GRPO of it is the sum minus the group mean
    let sum = AdvantageConfig {
        modes: vec![AdvantageMode::DrGrpo],
        reward_weights: Some(vec![1.0, 1.0]),
        ..AdvantageConfig::default()
    };
    group_advantages(&rewards, Groups::Consecutive(2), None, None, &sum, &mut out).unwrap();
    assert_eq!(out, vec![0.0, 0.0, 1.0, -1.0]);
    // one mode for the combined column, an output of [B, 1], finite weights
    let two_modes = AdvantageConfig {
        modes: vec![AdvantageMode::Grpo; 2],
        ..cfg.clone()
    };
    let e = group_advantages(
        &rewards,
        Groups::Consecutive(4),
        None,
        None,
        &two_modes,
        &mut out,
    )
    .unwrap_err();
    assert!(e.to_string().contains("config.modes"), "{e}");
    let mut wide = vec![0f32; 8];
    let e = group_advantages(
        &rewards,
        Groups::Consecutive(4),
        None,
        None,
        &cfg,
        &mut wide,
    )
    .unwrap_err();
    assert!(e.to_string().contains("[B, 1]"), "{e}");
    let nan = AdvantageConfig {
        reward_weights: Some(vec![1.0, f64::NAN]),
        ..cfg
    };
    let e =
        group_advantages(&rewards, Groups::Consecutive(4), None, None, &nan, &mut out).unwrap_err();
    assert!(e.to_string().contains("reward_weights"), "{e}");
}

#[test]
fn every_mode_by_hand() {
    // one group of four: [1, 0, 1, 0]: mean 0.5, unbiased std sqrt(1/3)
    let r = [1.0f32, 0.0, 1.0, 0.0];
    let g = adv(
        &r,
        Groups::Consecutive(4),
        &[AdvantageMode::Grpo],
        None,
        None,
    );
    let s = (1.0f64 / 3.0).sqrt();
    for (i, want) in [
        0.5 / (s + 1e-6),
        -0.5 / (s + 1e-6),
        0.5 / (s + 1e-6),
        -0.5 / (s + 1e-6),
    ]
    .iter()
    .enumerate()
    {
        assert_close(&format!("grpo[{i}]"), g[i] as f64, *want, 1e-6, 1e-6);
    }
    assert_eq!(
        adv(
            &r,
            Groups::Consecutive(4),
            &[AdvantageMode::DrGrpo],
            None,
            None
        ),
        vec![0.5, -0.5, 0.5, -0.5]
    );
    // rloo on [1, 0, 0]: 1 - 0, 0 - 0.5, 0 - 0.5
    assert_eq!(
        adv(
            &[1.0, 0.0, 0.0],
            Groups::Consecutive(3),
            &[AdvantageMode::Rloo],
            None,
            None
        ),
        vec![1.0, -0.5, -0.5]
    );
    // batch std: groups [1, 0] and [1, 1]; batch rewards [1, 0, 1, 1] have unbiased std 0.5
    let b = adv(
        &[1.0, 0.0, 1.0, 1.0],
        Groups::Consecutive(2),
        &[AdvantageMode::BatchStd],
        None,
        None,
    );
    for (i, want) in [1.0, -1.0, 0.0, 0.0].iter().enumerate() {
        assert_close(&format!("batch[{i}]"), b[i] as f64, *want, 1e-5, 0.0);
    }
    // a group of one rollout: 0 in every mode
    for m in [
        AdvantageMode::Grpo,
        AdvantageMode::DrGrpo,
        AdvantageMode::Rloo,
    ] {
        assert_eq!(
            adv(&[0.7, 0.2, 0.9], Groups::Ids(&[0, 1, 1]), &[m], None, None)[0],
            0.0,
            "{m:?}"
        );
    }
}

/// verl's further estimators, from their formulas: Pass@k, OPO, GPG, REINFORCE++ and its baseline.
#[test]
fn verl_estimators_by_hand() {
    use AdvantageMode::*;
    // Pass@k: group [0.2, 0.9, 0.5] has a unique best 0.9 over 0.5; group [1, 1, 0] a tie (all 0)
    let r = [0.2f32, 0.9, 0.5, 1.0, 1.0, 0.0];
    let x = [0.2f32 as f64, 0.9f32 as f64, 0.5f32 as f64];
    let m = (x[0] + x[1] + x[2]) / 3.0;
    let sd = (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 2.0).sqrt();
    let p = adv(&r, Groups::Consecutive(3), &[PassK], None, None);
    assert_close(
        "passk best",
        p[1] as f64,
        (x[1] - x[2]) / (sd + 1e-6),
        1e-6,
        1e-6,
    );
    for i in [0, 2, 3, 4, 5] {
        assert_eq!(p[i], 0.0, "passk[{i}]");
    }
    let p = adv(&r, Groups::Consecutive(3), &[PassKDr], None, None);
    assert_close("passk_dr best", p[1] as f64, x[1] - x[2], 1e-7, 1e-6);
    // OPO: group [1, 0, 1] of lengths [10, 20, 30]: baseline (10 + 30) / 60 = 2/3
    let o = adv(
        &[1.0, 0.0, 1.0],
        Groups::Consecutive(3),
        &[Opo],
        None,
        Some(&[10, 20, 30]),
    );
    for (i, want) in [1.0 / 3.0, -2.0 / 3.0, 1.0 / 3.0].iter().enumerate() {
        assert_close(&format!("opo[{i}]"), o[i] as f64, *want, 1e-7, 1e-6);
    }
    // GPG: one non-zero reward of four, alpha = 4; groups [1, 0] (mean 0.5) and [0, 0]
    assert_eq!(
        adv(
            &[1.0, 0.0, 0.0, 0.0],
            Groups::Consecutive(2),
            &[Gpg],
            None,
            None
        ),
        vec![2.0, -2.0, 0.0, 0.0]
    );
    // REINFORCE++: rewards [1, 0] over 1 and 3 tokens: token mean 1/4, unbiased token variance
    // (0.75^2 + 3 * 0.25^2) / 3 = 0.25, so (1 - 1/4) / 0.5 and (0 - 1/4) / 0.5
    let w = adv(
        &[1.0, 0.0],
        Groups::Consecutive(1),
        &[ReinforcePlusPlus],
        None,
        Some(&[1, 3]),
    );
    assert_close("rf++[0]", w[0] as f64, 1.5, 1e-6, 1e-6);
    assert_close("rf++[1]", w[1] as f64, -0.5, 1e-6, 1e-6);
    // its baseline form: groups [1, 0] and [1, 1] centred, [0.5, -0.5, 0, 0], over 1, 3, 2, 2
    // tokens: token mean -1/8, variance 0.875 / 7 = 0.125
    let w = adv(
        &[1.0, 0.0, 1.0, 1.0],
        Groups::Consecutive(2),
        &[ReinforcePlusPlusBaseline],
        None,
        Some(&[1, 3, 2, 2]),
    );
    let s = 0.125f64.sqrt();
    for (i, want) in [0.625 / s, -0.375 / s, 0.125 / s, 0.125 / s]
        .iter()
        .enumerate()
    {
        assert_close(
            &format!("rf++ baseline[{i}]"),
            w[i] as f64,
            *want,
            1e-6,
            1e-6,
        );
    }
    // rollouts of length 0 weigh nothing in the statistics; fewer than two tokens give 0
    let w = adv(
        &[1.0, 0.0, 5.0],
        Groups::Consecutive(1),
        &[ReinforcePlusPlus],
        None,
        Some(&[1, 3, 0]),
    );
    assert_close(
        "rf++ weightless",
        w[2] as f64,
        (5.0 - 0.25) / 0.5,
        1e-5,
        1e-6,
    );
    assert_eq!(
        adv(
            &[1.0, 0.0],
            Groups::Consecutive(1),
            &[ReinforcePlusPlus],
            None,
            Some(&[1, 0])
        ),
        vec![0.0, 0.0]
    );
    // GDPO, rewards [B = 4, K = 2] in groups of 2, weights [1, 2]: group 0's columns [1, 0] and [0, 1]
    // normalize to [a, -a] and [-a, a] (a = 0.5 / (sqrt(0.5) + eps)), summed [-a, a]; group 1's
    // [1, 1] gives 0 (no spread), [1, 0] gives [a, -a], summed [2a, -2a]; over the batch the mean is
    // 0 and the unbiased std a sqrt(10/3), so [-1, 1, 2, -2] / sqrt(10/3)
    let cfg = AdvantageConfig {
        modes: vec![Gdpo],
        reward_weights: Some(vec![1.0, 2.0]),
        ..AdvantageConfig::default()
    };
    let mut o = [0.0f32; 4];
    group_advantages(
        &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        Groups::Consecutive(2),
        None,
        None,
        &cfg,
        &mut o,
    )
    .unwrap();
    let z = (10.0f64 / 3.0).sqrt();
    for (i, want) in [-1.0 / z, 1.0 / z, 2.0 / z, -2.0 / z].iter().enumerate() {
        assert_close(&format!("gdpo[{i}]"), o[i] as f64, *want, 1e-5, 1e-5);
    }
    // without weights, one column: its GRPO values normalized over the batch
    let g = adv(
        &[1.0, 0.0, 1.0, 1.0],
        Groups::Consecutive(2),
        &[Gdpo],
        None,
        None,
    );
    let a = 0.5 / (0.5f64.sqrt() + 1e-6);
    let sd = (2.0 * a * a / 3.0).sqrt();
    for (i, want) in [a / sd, -a / sd, 0.0, 0.0].iter().enumerate() {
        assert_close(
            &format!("gdpo one column[{i}]"),
            g[i] as f64,
            *want,
            1e-5,
            1e-5,
        );
    }
    // every mode's name reads back
    for m in AdvantageMode::ALL {
        assert_eq!(m.name().parse::<AdvantageMode>().unwrap(), m);
    }
}

/// The modes that read the lengths refuse to run without them, and negative lengths are an error.
#[test]
fn lengths_are_required_and_checked() {
    for m in [
        AdvantageMode::Opo,
        AdvantageMode::ReinforcePlusPlus,
        AdvantageMode::ReinforcePlusPlusBaseline,
    ] {
        let cfg = AdvantageConfig {
            modes: vec![m],
            ..AdvantageConfig::default()
        };
        let mut out = [0.0f32; 2];
        let e = group_advantages(
            &[1.0, 0.0],
            Groups::Consecutive(2),
            None,
            None,
            &cfg,
            &mut out,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("lengths") && e.to_string().contains(m.name()),
            "{e}"
        );
        let e = group_advantages(
            &[1.0, 0.0],
            Groups::Consecutive(2),
            Some(&[3, -1]),
            None,
            &cfg,
            &mut out,
        )
        .unwrap_err();
        assert!(e.to_string().contains("lengths[1] = -1"), "{e}");
        let e = group_advantages(
            &[1.0, 0.0],
            Groups::Consecutive(2),
            Some(&[3]),
            None,
            &cfg,
            &mut out,
        )
        .unwrap_err();
        assert!(e.to_string().contains("lengths"), "{e}");
    }
    // the difficulty weights do not combine with a whitened mode
    let cfg = AdvantageConfig {
        modes: vec![AdvantageMode::ReinforcePlusPlus],
        lead: Some(LeadOptions {
            correctness: 0,
            difficulty: Some(DifficultyWeights::default()),
            length_alpha: None,
        }),
        ..AdvantageConfig::default()
    };
    let e = group_advantages(
        &[1.0, 0.0],
        Groups::Consecutive(2),
        Some(&[1, 1]),
        None,
        &cfg,
        &mut [0.0; 2],
    )
    .unwrap_err();
    assert!(e.to_string().contains("config.lead.difficulty"), "{e}");
}

#[test]
fn objectives_are_independent_and_ids_match_consecutive_groups() {
    // K = 2 objectives with different modes; rewards [B = 6, K = 2] in groups of 3
    let r = [
        1.0f32, 0.2, 0.0, 0.9, 1.0, 0.1, 0.0, 0.5, 0.0, 0.4, 1.0, 0.3,
    ];
    let modes = [AdvantageMode::Grpo, AdvantageMode::DrGrpo];
    let consecutive = adv(&r, Groups::Consecutive(3), &modes, None, None);
    // the same rollouts in another order with explicit ids give the permuted advantages
    let perm = [4usize, 0, 5, 2, 1, 3];
    let rp: Vec<f32> = perm
        .iter()
        .flat_map(|&i| [r[2 * i], r[2 * i + 1]])
        .collect();
    let ids: Vec<i32> = perm.iter().map(|&i| (i / 3) as i32 + 7).collect();
    let by_id = adv(&rp, Groups::Ids(&ids), &modes, None, None);
    for (p, &i) in perm.iter().enumerate() {
        assert_eq!(
            [by_id[2 * p], by_id[2 * p + 1]],
            [consecutive[2 * i], consecutive[2 * i + 1]],
            "rollout {i}"
        );
    }
    // dr_grpo of objective 1, group 0: [0.2, 0.9, 0.1] - 0.4
    for (i, want) in [-0.2f64, 0.5, -0.3].iter().enumerate() {
        assert_close(
            &format!("dr_grpo[{i}]"),
            consecutive[2 * i + 1] as f64,
            *want,
            1e-6,
            0.0,
        );
    }
}

#[test]
fn grpo_lead_difficulty_weights() {
    let dw = DifficultyWeights::default();
    assert_close("w(0.75)", dw.weight(0.75), 0.95, 1e-12, 0.0);
    assert_close(
        "w(0.25)",
        dw.weight(0.25),
        0.4 + 1.1 / (1.0 + (-5f64).exp()),
        1e-12,
        0.0,
    );
    // group accuracy 0.75: positive advantages x w(0.75), negative x w(0.25)
    let r = [1.0f32, 1.0, 1.0, 0.0];
    let lead = LeadOptions {
        correctness: 0,
        difficulty: Some(dw),
        length_alpha: None,
    };
    let plain = adv(
        &r,
        Groups::Consecutive(4),
        &[AdvantageMode::Grpo],
        None,
        None,
    );
    let lead_adv = adv(
        &r,
        Groups::Consecutive(4),
        &[AdvantageMode::Grpo],
        Some(lead),
        None,
    );
    for i in 0..4 {
        let w = if plain[i] > 0.0 {
            dw.weight(0.75)
        } else {
            dw.weight(0.25)
        };
        assert_close(
            &format!("lead[{i}]"),
            lead_adv[i] as f64,
            plain[i] as f64 * w,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn grpo_lead_length_reward() {
    // correct responses of lengths 10, 20, 30 (z = -1, 0, 1) and one incorrect: rewards
    // e^0.05, 1, e^-0.05 and -1, then dr_grpo
    let r = [1.0f32, 1.0, 1.0, 0.0];
    let lead = LeadOptions {
        correctness: 0,
        difficulty: None,
        length_alpha: Some(0.05),
    };
    let a = adv(
        &r,
        Groups::Consecutive(4),
        &[AdvantageMode::DrGrpo],
        Some(lead),
        Some(&[10, 20, 30, 5]),
    );
    let shaped = [0.05f64.exp(), 1.0, (-0.05f64).exp(), -1.0];
    let m = shaped.iter().sum::<f64>() / 4.0;
    for i in 0..4 {
        assert_close(
            &format!("length reward adv[{i}]"),
            a[i] as f64,
            shaped[i] - m,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn bad_inputs_name_the_argument() {
    let cfg = AdvantageConfig {
        modes: vec![AdvantageMode::Grpo],
        eps: 1e-6,
        lead: None,
        reward_weights: None,
        singletons: recap_kernels::Singletons::Zero,
    };
    let mut out = vec![0f32; 5];
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("{other}"),
    };
    assert_eq!(
        arg(group_advantages(
            &[0.0; 5],
            Groups::Consecutive(2),
            None,
            None,
            &cfg,
            &mut out
        )
        .unwrap_err()),
        "groups"
    );
    assert_eq!(
        arg(group_advantages(
            &[0.0, f32::NAN, 0.0, 0.0, 0.0],
            Groups::Consecutive(5),
            None,
            None,
            &cfg,
            &mut out
        )
        .unwrap_err()),
        "rewards"
    );
    assert_eq!(
        arg(
            group_advantages(&[0.0; 5], Groups::Ids(&[0, 1]), None, None, &cfg, &mut out)
                .unwrap_err()
        ),
        "groups"
    );
    assert_eq!(
        arg(group_advantages(
            &[0.0; 5],
            Groups::Consecutive(5),
            None,
            None,
            &cfg,
            &mut out[..4]
        )
        .unwrap_err()),
        "out"
    );
    let lead = AdvantageConfig {
        lead: Some(LeadOptions {
            correctness: 0,
            difficulty: None,
            length_alpha: Some(0.05),
        }),
        ..cfg.clone()
    };
    assert_eq!(
        arg(group_advantages(
            &[0.0; 5],
            Groups::Consecutive(5),
            None,
            None,
            &lead,
            &mut out
        )
        .unwrap_err()),
        "lengths"
    );
    let none = AdvantageConfig {
        modes: vec![],
        ..cfg
    };
    assert_eq!(
        arg(group_advantages(
            &[0.0; 5],
            Groups::Consecutive(5),
            None,
            None,
            &none,
            &mut out
        )
        .unwrap_err()),
        "config.modes"
    );
}

/// ReMax (verl's compute_remax_outcome_advantage from an outcome reward): `r - b` per rollout and
/// objective, whatever the groups, beside a GRPO column the baselines do not touch; the baselines
/// are required, shaped `[B, K]` and finite.
#[test]
fn remax_by_hand() {
    let rewards = [1.0f32, 1.0, 0.0, 0.0, 2.0, 1.0, 0.5, 0.0]; // [B = 4, K = 2]
    let baselines = [0.25f32, 9.0, 0.5, 9.0, 2.0, 9.0, -1.0, 9.0];
    let cfg = AdvantageConfig {
        modes: vec![AdvantageMode::Remax, AdvantageMode::DrGrpo],
        eps: 1e-6,
        lead: None,
        reward_weights: None,
        singletons: Singletons::Zero,
    };
    for groups in [Groups::Consecutive(2), Groups::Ids(&[4, 4, 1, 9])] {
        let mut out = vec![f32::NAN; 8];
        group_advantages(&rewards, groups, None, Some(&baselines), &cfg, &mut out).unwrap();
        let remax: Vec<f32> = (0..4).map(|i| out[2 * i]).collect();
        assert_eq!(remax, [0.75, -0.5, 0.0, 1.5], "{groups:?}");
        if let Groups::Consecutive(_) = groups {
            // Dr. GRPO in groups of two: r - the pair's mean
            let dr: Vec<f32> = (0..4).map(|i| out[2 * i + 1]).collect();
            assert_eq!(dr, [0.5, -0.5, 0.5, -0.5]);
        }
    }
    let mut out = vec![0f32; 8];
    let err = |b: Option<&[f32]>, out: &mut [f32]| {
        group_advantages(&rewards, Groups::Consecutive(2), None, b, &cfg, out)
            .unwrap_err()
            .to_string()
    };
    assert!(err(None, &mut out).contains("baselines"));
    assert!(err(Some(&baselines[..4]), &mut out).contains("baselines"));
    let mut bad = baselines;
    bad[3] = f32::NAN;
    assert!(err(Some(&bad), &mut out).contains("baselines[3]"));
}

/// A group-advantages implementation under test: `(rewards, groups, lengths, baselines, config,
/// out)`, as `Backend::group_advantages`.
type AdvantagesFn<'f> =
    &'f dyn Fn(&[f32], Groups<'_>, Option<&[i32]>, Option<&[f32]>, &AdvantageConfig, &mut [f32]);

/// `run` against the CPU reference on random batches: every mode, explicit shuffled group ids and
/// consecutive groups, the GRPO-LEAD options, group sizes 1, 31, 32, 33 and B up to `max_b`
/// (4097 on a GPU), an empty batch.
fn matches_the_reference(run: AdvantagesFn<'_>, max_b: usize) {
    let mut rng = common::Rng::new(11);
    // every mode; GRPO-LEAD's difficulty weights do not combine with the whitened ones
    let all = AdvantageMode::ALL;
    let unwhitened: Vec<AdvantageMode> = all.into_iter().filter(|m| !m.whitened()).collect();
    let mut cases = 0;
    for (b, g) in [
        (0, 4),
        (1, 1),
        (31, 31),
        (64, 32),
        (99, 33),
        (4097, 17),
        (256, 8),
    ]
    .into_iter()
    .filter(|&(b, _)| b <= max_b)
    {
        for lead in [false, true] {
            let k = 1 + rng.below(5);
            let mut rewards: Vec<f32> = (0..b * k)
                .map(|_| {
                    if rng.below(2) == 0 {
                        rng.below(2) as f32
                    } else {
                        rng.normal() as f32
                    }
                })
                .collect();
            // some of length 0 (they weigh nothing in OPO's and REINFORCE++'s statistics)
            let lengths: Vec<i32> = (0..b).map(|_| rng.below(500) as i32).collect();
            // ReMax's baselines (read by remax columns only)
            let baselines: Vec<f32> = (0..b * k).map(|_| rng.normal() as f32).collect();
            let pool: &[AdvantageMode] = if lead { &unwhitened } else { &all };
            let cfg = AdvantageConfig {
                modes: (0..k)
                    .map(|j| pool[(3 * j + b + cases) % pool.len()])
                    .collect(),
                eps: 1e-6,
                lead: lead.then(|| LeadOptions {
                    correctness: 0,
                    difficulty: Some(DifficultyWeights::default()),
                    length_alpha: Some(0.05),
                }),
                reward_weights: None,
                singletons: if b % 2 == 0 {
                    Singletons::Verl
                } else {
                    Singletons::Zero
                },
            };
            if lead {
                for i in 0..b {
                    rewards[i * k] = rng.below(2) as f32; // 0/1 correctness
                }
            }
            // shuffled explicit ids (b / g groups, sizes uneven) and consecutive groups
            let ids: Vec<i32> = (0..b).map(|_| (rng.below(b / g + 1) * 7) as i32).collect();
            let by_ids = (b > 0).then_some(Groups::Ids(&ids));
            // and the same rewards combined with weights into one column (sum-then-normalize)
            let weighted = AdvantageConfig {
                modes: vec![cfg.modes[0]],
                reward_weights: Some((0..k).map(|j| 0.5 + j as f64).collect()),
                ..cfg.clone()
            };
            for groups in [Some(Groups::Consecutive(g)), by_ids].into_iter().flatten() {
                for c in [&cfg, &weighted] {
                    let n = b * c.num_outputs();
                    let mut want = vec![0f32; n];
                    let mut got = vec![f32::NAN; n];
                    recap_kernels::Backend::Cpu
                        .group_advantages(
                            &rewards,
                            groups,
                            Some(&lengths),
                            Some(&baselines[..n]),
                            c,
                            &mut want,
                        )
                        .unwrap();
                    run(
                        &rewards,
                        groups,
                        Some(&lengths),
                        Some(&baselines[..n]),
                        c,
                        &mut got,
                    );
                    common::assert_all_close(
                        &format!(
                            "advantages B={b} G={g} K={k} lead={lead} {groups:?} weights {:?}",
                            c.reward_weights
                        ),
                        &got,
                        &want,
                        1e-5,
                        1e-5,
                    );
                    cases += 1;
                }
            }
        }
    }
    assert!(cases >= 20);
}

/// The device kernels (`kernels/advantages.cu`) against the CPU reference on random batches (see
/// [`matches_the_reference`]); then invalid ids and non-finite rewards.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gpu_matches_the_cpu_reference() {
    let gpu = common::require_gpu("gpu_matches_the_cpu_reference");
    matches_the_reference(
        &|r, g, l, base, c, out| gpu.group_advantages(r, g, l, base, c, out).unwrap(),
        4097,
    );
    // errors: a non-finite reward, and (device ids) a group id outside [0, num_groups)
    let cfg = AdvantageConfig {
        modes: vec![AdvantageMode::Grpo],
        eps: 1e-6,
        lead: None,
        reward_weights: None,
        singletons: recap_kernels::Singletons::Zero,
    };
    let mut out = vec![0f32; 4];
    let err = gpu
        .group_advantages(
            &[1.0, f32::NAN, 0.0, 1.0],
            Groups::Consecutive(2),
            None,
            None,
            &cfg,
            &mut out,
        )
        .unwrap_err();
    assert!(err.to_string().contains("rewards"), "{err}");
    let opo = AdvantageConfig {
        modes: vec![AdvantageMode::Opo],
        ..cfg.clone()
    };
    let err = gpu
        .group_advantages(
            &[1.0, 0.0, 0.0, 1.0],
            Groups::Consecutive(2),
            Some(&[3, -2, 1, 1]),
            None,
            &opo,
            &mut out,
        )
        .unwrap_err();
    assert!(err.to_string().contains("lengths"), "{err}");
    let remax = AdvantageConfig {
        modes: vec![AdvantageMode::Remax],
        ..cfg.clone()
    };
    let err = gpu
        .group_advantages(
            &[1.0, 0.0, 0.0, 1.0],
            Groups::Consecutive(2),
            None,
            Some(&[0.5, f32::INFINITY, 0.0, 0.0]),
            &remax,
            &mut out,
        )
        .unwrap_err();
    assert!(err.to_string().contains("baselines"), "{err}");
    if let recap_kernels::Backend::Cuda(dev) = &gpu {
        let s = dev.stream();
        let r = s.clone_htod(&[1.0f32, 0.0, 1.0, 0.0]).unwrap();
        let ids = s.clone_htod(&[0i32, 0, 1, 5]).unwrap();
        let mut o = s.alloc_zeros::<f32>(4).unwrap();
        let err = recap_kernels::cuda::group_advantages(
            dev,
            s,
            &r.slice(..),
            recap_kernels::cuda::DeviceGroups::Ids {
                ids: ids.slice(..),
                num_groups: 2,
            },
            None,
            None,
            &cfg,
            &mut o.slice_mut(..),
        )
        .unwrap_err();
        assert!(err.to_string().contains("1 of B = 4"), "{err}");
    }
}

/// The kernel source (`kernels/advantages.cu`) on the host under the SIMT emulator, launched by the
/// plan `cuda::group_advantages` uses (`cuda::AdvShape`: its parameters, scratch and launches;
/// dense group ids as the host gives them), against the CPU reference on the random batches of
/// [`matches_the_reference`] up to B = 256: every mode, ReMax's baselines included, checked without
/// a GPU.
#[test]
fn kernel_source_emulated_on_the_host_matches_the_reference() {
    let emu = emulator::Emulated::build("advantages");
    let run = |rewards: &[f32],
               groups: Groups<'_>,
               lengths: Option<&[i32]>,
               baselines: Option<&[f32]>,
               cfg: &AdvantageConfig,
               out: &mut [f32]| {
        let b = lengths.map_or(0, |l| l.len());
        let k = rewards.len() / b.max(1);
        // dense ids in order of the sorted distinct ids, as the host gives the device
        let (ids, num_groups, group_size) = match groups {
            Groups::Consecutive(g) => (None, b / g, g),
            Groups::Ids(ids) => {
                let mut order = ids.to_vec();
                order.sort_unstable();
                order.dedup();
                let dense: Vec<i32> = ids
                    .iter()
                    .map(|id| order.binary_search(id).unwrap() as i32)
                    .collect();
                (Some(dense), order.len(), 0)
            }
        };
        if b == 0 || num_groups == 0 {
            return;
        }
        let shape = recap_kernels::cuda::AdvShape {
            b,
            k,
            num_groups,
            group_size,
        };
        let mut scratch = vec![0f64; shape.scratch_len(cfg)];
        let mut counts = vec![0i32; num_groups + 3];
        let addrs = recap_kernels::cuda::AdvAddrs {
            rewards: rewards.as_ptr() as u64,
            group_ids: ids.as_ref().map_or(0, |i| i.as_ptr() as u64),
            lengths: lengths.map_or(0, |l| l.as_ptr() as u64),
            scratch: scratch.as_mut_ptr() as u64,
            out: out.as_mut_ptr() as u64,
            counts: counts.as_mut_ptr() as u64,
            baselines: baselines.map_or(0, |x| x.as_ptr() as u64),
        };
        let p = shape.params(&addrs, cfg);
        for (kernel, grid) in shape.launches(cfg) {
            emu.launch(kernel, grid, 256, &p);
        }
        let members: i32 = counts[..num_groups].iter().sum();
        assert_eq!(members as usize, b, "every rollout in one group");
        assert_eq!(&counts[num_groups..], &[0, 0, 0], "no bad input");
    };
    matches_the_reference(&run, 256);
}

/// The advantage and difficulty formulas the kernels inline (`kernels/train_math.cuh`, compiled
/// for the host) against hand-computed values.
#[test]
fn device_formulas_by_hand() {
    use recap_kernels::device_math::{
        advantage, batch_normalize, difficulty_weight, whiten, GroupStats,
    };
    // group [1, 0, 1, 0]: mean 0.5, unbiased std sqrt(1/3), sum 2, best 1 held twice
    let sd = (1.0f64 / 3.0).sqrt();
    let g4 = GroupStats {
        mu: 0.5,
        sd,
        sum: 2.0,
        n: 4,
        vmax: 1.0,
        v2nd: 1.0,
        n_max: 2,
        len_mean: 0.25,
        batch_sd: 2.0,
        batch_alpha: 1.5,
        baseline: 0.4,
    };
    let one = GroupStats {
        mu: 3.0,
        sum: 3.0,
        n: 1,
        vmax: 3.0,
        v2nd: f64::NEG_INFINITY,
        n_max: 1,
        len_mean: 3.0,
        batch_sd: 2.5,
        batch_alpha: 2.0,
        ..GroupStats::default()
    };
    let code = |m: AdvantageMode| m.code() as i32;
    use AdvantageMode::*;
    for (m, v, want) in [
        (Grpo, 1.0, 0.5 / (sd + 1e-6)),
        (DrGrpo, 0.0, -0.5),
        (Rloo, 1.0, 1.0 - 1.0 / 3.0),
        (BatchStd, 1.0, 0.5 / (2.0 + 1e-6)),
        (PassK, 1.0, 0.0), // a tie for the best: 0
        (Opo, 1.0, 0.75),
        (Gpg, 0.0, -0.75),
        (ReinforcePlusPlus, 0.3, 0.3),
        (ReinforcePlusPlusBaseline, 0.0, -0.5),
        (Gdpo, 1.0, 0.5 / (sd + 1e-6)), // the GRPO value, before the batch step
        (Remax, 1.0, 0.6),              // r - b, the group's statistics unread
    ] {
        assert_close(
            &format!("{m:?}"),
            advantage(code(m), v, &g4, 1e-6, false),
            want,
            0.0,
            1e-15,
        );
        // larger groups are not affected by the convention for groups of one
        assert_eq!(
            advantage(code(m), v, &g4, 1e-6, true),
            advantage(code(m), v, &g4, 1e-6, false)
        );
    }
    // Pass@k with a unique best 2 over a runner-up 0.5: (2 - 0.5) / (sd + eps), others 0
    let pk = GroupStats {
        vmax: 2.0,
        v2nd: 0.5,
        n_max: 1,
        ..g4
    };
    assert_close(
        "passk",
        advantage(code(PassK), 2.0, &pk, 1e-6, false),
        1.5 / (sd + 1e-6),
        0.0,
        1e-15,
    );
    assert_eq!(advantage(code(PassKDr), 2.0, &pk, 1e-6, false), 1.5);
    assert_eq!(advantage(code(PassK), 0.5, &pk, 1e-6, false), 0.0);
    // a group of one: 0 in the group-relative modes (REINFORCE++ and ReMax, with baseline 0 here,
    // are not group-relative) ...
    for m in AdvantageMode::ALL {
        let want = if matches!(m, ReinforcePlusPlus | Remax) {
            3.0
        } else {
            0.0
        };
        assert_eq!(advantage(code(m), 3.0, &one, 1e-6, false), want, "{m:?}");
    }
    // ... and verl's convention on request: mean 0, std 1 (Pass@k: 0, where verl raises)
    for (m, want) in [
        (Grpo, 3.0 / (1.0 + 1e-6)),
        (DrGrpo, 3.0),
        (Rloo, 3.0),
        (BatchStd, 3.0 / (2.5 + 1e-6)),
        (PassK, 0.0),
        (PassKDr, 0.0),
        (Opo, 3.0),
        (Gpg, 6.0),
        (ReinforcePlusPlus, 3.0),
        (ReinforcePlusPlusBaseline, 3.0),
        (Gdpo, 3.0 / (1.0 + 1e-6)),
        (Remax, 3.0),
    ] {
        assert_close(
            &format!("{m:?} n=1 (verl)"),
            advantage(code(m), 3.0, &one, 1e-6, true),
            want,
            0.0,
            1e-15,
        );
    }
    // whitening: (x - m) / sqrt(var + 1e-8); fewer than two tokens give 0
    assert_close(
        "whiten",
        whiten(3.0, 1.0, 4.0, 10.0),
        2.0 / (4.0f64 + 1e-8).sqrt(),
        0.0,
        1e-15,
    );
    assert_eq!(whiten(3.0, 1.0, 4.0, 1.0), 0.0);
    assert_eq!(batch_normalize(3.0, 1.0, 1.0, 0.0), 2.0);
    // w(rho0) = (A + B) / 2; w(0) ~ B; w(1) ~ A + (B - A) / (1 + e^2.5)
    let d = DifficultyWeights::default();
    assert_close(
        "w(rho0)",
        difficulty_weight(0.75, d.a, d.b, d.rho0, d.k),
        0.95,
        0.0,
        1e-15,
    );
    assert_close(
        "w(1)",
        difficulty_weight(1.0, d.a, d.b, d.rho0, d.k),
        0.4 + 1.1 / (1.0 + 2.5f64.exp()),
        0.0,
        1e-15,
    );
    assert_close(
        "rust w",
        d.weight(0.3),
        difficulty_weight(0.3, d.a, d.b, d.rho0, d.k),
        0.0,
        0.0,
    );
}
