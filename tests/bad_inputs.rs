//! Malformed and extreme inputs across the public API beyond the fused loss's table
//! (tests/validation.rs): logits, group advantages, the scheduler and the loss variants (the C
//! ABI's in `capi/src/tests.rs`, the training driver's in `cli/tests/train.rs`). Each case must give
//! a defined error naming the argument, or a defined finite result, and never panic (each runs under
//! `catch_unwind`). Extreme values: log-probs never above 0, entropy never below 0, no NaN from exp
//! overflow.

mod common;

use recap_kernels::{
    AdvantageConfig, AdvantageMode, Backend, Error, Groups, GrpoConfig, HostGrpoInputs, IsLevel,
    LeadOptions, Logits, LogprobConfig, Mask, ObjectiveKind, Orientation, PolicyLoss, RecapConfig,
    RecapScheduler, RolloutCorrection,
};
use std::panic::{catch_unwind, AssertUnwindSafe};

type Case<'a> = (
    &'static str,
    &'static str,
    Box<dyn Fn() -> recap_kernels::Result<()> + 'a>,
);

fn expect(what: &str, arg: &str, f: &dyn Fn() -> recap_kernels::Result<()>) {
    let r = catch_unwind(AssertUnwindSafe(f));
    match r {
        Err(_) => panic!("{what}: panicked"),
        Ok(Err(Error::InvalidArgument { arg: a, message })) => {
            assert!(
                a.contains(arg),
                "{what}: named `{a}`, expected `{arg}` ({message})"
            )
        }
        Ok(other) => panic!("{what}: expected an error naming `{arg}`, got {other:?}"),
    }
}

fn cases(be: &Backend) -> Vec<Case<'_>> {
    fn logits(rows: usize, vocab: usize, ld: usize) -> Logits<Vec<f32>> {
        Logits {
            data: vec![0.5f32; 2 * 8],
            rows,
            vocab,
            ld,
        }
    }
    let lp = |be: &Backend, l: Logits<Vec<f32>>, labels: Vec<i32>, cfg: LogprobConfig, n: usize| {
        let (mut a, mut b, mut c) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        be.logprob_forward(
            &Logits {
                data: &l.data[..],
                rows: l.rows,
                vocab: l.vocab,
                ld: l.ld,
            },
            &labels,
            &cfg,
            &mut a,
            &mut b,
            &mut c,
        )
    };
    let adv = |rewards: Vec<f32>,
               groups: usize,
               modes: Vec<AdvantageMode>,
               lead: Option<LeadOptions>,
               eps: f64| {
        let mut out = vec![0f32; rewards.len()];
        be.group_advantages(
            &rewards,
            Groups::Consecutive(groups),
            None,
            None,
            &AdvantageConfig {
                modes,
                eps,
                lead,
                reward_weights: None,
                singletons: recap_kernels::Singletons::Zero,
            },
            &mut out,
        )
    };
    let loss = |cfg: GrpoConfig, rollout: Option<Vec<f32>>| {
        let x = [-1.0f32; 4];
        let r = rollout.unwrap_or_default();
        let inputs = HostGrpoInputs {
            logp: &x,
            old_logp: &x,
            ref_logp: None,
            rollout_logp: (!r.is_empty()).then_some(&r[..]),
            policy_weight: None,
            advantages: recap_kernels::Advantages::PerSequence(&[1.0, -1.0]),
            mask: Mask::U8(&[1, 1, 1, 1]),
            cu_seqlens: &[0, 2, 4],
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        be.grpo_loss(&inputs, &cfg, &mut [0f32; 4]).map(|_| ())
    };
    let g = GrpoConfig::default;
    let lc = LogprobConfig::default;
    vec![
        (
            "logits V = 0",
            "logits",
            Box::new(move || lp(be, logits(2, 0, 8), vec![0, 0], lc(), 2)),
        ),
        (
            "logits ld < V",
            "logits",
            Box::new(move || lp(be, logits(2, 8, 4), vec![0, 0], lc(), 2)),
        ),
        (
            "logits buffer short",
            "logits",
            Box::new(move || lp(be, logits(3, 8, 8), vec![0, 0, 0], lc(), 3)),
        ),
        (
            "labels length",
            "labels",
            Box::new(move || lp(be, logits(2, 8, 8), vec![0], lc(), 2)),
        ),
        (
            "label out of range",
            "labels",
            Box::new(move || lp(be, logits(2, 8, 8), vec![0, 8], lc(), 2)),
        ),
        (
            "negative label",
            "labels",
            Box::new(move || lp(be, logits(2, 8, 8), vec![-3, 1], lc(), 2)),
        ),
        (
            "temperature 0",
            "temperature",
            Box::new(move || {
                lp(
                    be,
                    logits(2, 8, 8),
                    vec![0, 1],
                    LogprobConfig {
                        temperature: 0.0,
                        ..lc()
                    },
                    2,
                )
            }),
        ),
        (
            "temperature NaN",
            "temperature",
            Box::new(move || {
                lp(
                    be,
                    logits(2, 8, 8),
                    vec![0, 1],
                    LogprobConfig {
                        temperature: f32::NAN,
                        ..lc()
                    },
                    2,
                )
            }),
        ),
        (
            "temperature negative",
            "temperature",
            Box::new(move || {
                lp(
                    be,
                    logits(2, 8, 8),
                    vec![0, 1],
                    LogprobConfig {
                        temperature: -1.0,
                        ..lc()
                    },
                    2,
                )
            }),
        ),
        (
            "logp output length",
            "logp",
            Box::new(move || {
                let (mut a, mut b, mut c) = (vec![0f32; 1], vec![0f32; 2], vec![0f32; 2]);
                be.logprob_forward(
                    &Logits::dense(&[0.0f32; 16][..], 2, 8),
                    &[0, 1],
                    &lc(),
                    &mut a,
                    &mut b,
                    &mut c,
                )
            }),
        ),
        (
            "advantages K = 0",
            "config.modes",
            Box::new(move || adv(vec![1.0; 4], 2, vec![], None, 1e-6)),
        ),
        (
            "advantages K = 17",
            "config.modes",
            Box::new(move || adv(vec![1.0; 17], 1, vec![AdvantageMode::Grpo; 17], None, 1e-6)),
        ),
        (
            "rewards not [B, K]",
            "rewards",
            Box::new(move || adv(vec![1.0; 5], 1, vec![AdvantageMode::Grpo; 2], None, 1e-6)),
        ),
        (
            "reward NaN",
            "rewards",
            Box::new(move || {
                adv(
                    vec![1.0, f32::NAN, 0.0, 1.0],
                    2,
                    vec![AdvantageMode::Grpo],
                    None,
                    1e-6,
                )
            }),
        ),
        (
            "reward Inf",
            "rewards",
            Box::new(move || {
                adv(
                    vec![1.0, f32::INFINITY, 0.0, 1.0],
                    2,
                    vec![AdvantageMode::Grpo],
                    None,
                    1e-6,
                )
            }),
        ),
        (
            "groups do not divide B",
            "groups",
            Box::new(move || adv(vec![1.0; 5], 2, vec![AdvantageMode::Grpo], None, 1e-6)),
        ),
        (
            "group size 0",
            "groups",
            Box::new(move || adv(vec![1.0; 4], 0, vec![AdvantageMode::Grpo], None, 1e-6)),
        ),
        (
            "eps negative",
            "config.eps",
            Box::new(move || adv(vec![1.0; 4], 2, vec![AdvantageMode::Grpo], None, -1.0)),
        ),
        (
            "correctness objective >= K",
            "config.lead",
            Box::new(move || {
                adv(
                    vec![1.0; 4],
                    2,
                    vec![AdvantageMode::Grpo],
                    Some(LeadOptions {
                        correctness: 3,
                        difficulty: None,
                        length_alpha: None,
                    }),
                    1e-6,
                )
            }),
        ),
        (
            "length reward without lengths",
            "lengths",
            Box::new(move || {
                adv(
                    vec![1.0; 4],
                    2,
                    vec![AdvantageMode::Grpo],
                    Some(LeadOptions {
                        correctness: 0,
                        difficulty: None,
                        length_alpha: Some(0.05),
                    }),
                    1e-6,
                )
            }),
        ),
        (
            "delta <= 1",
            "config.delta",
            Box::new(move || loss(g().with_delta(Some(1.0)), None)),
        ),
        (
            "delta with SAPO",
            "config.delta",
            Box::new(move || {
                loss(
                    g().with_delta(Some(2.0))
                        .with_policy_loss(PolicyLoss::sapo()),
                    None,
                )
            }),
        ),
        (
            "SAPO tau negative",
            "config.policy_loss",
            Box::new(move || {
                loss(
                    g().with_policy_loss(PolicyLoss::Sapo {
                        tau_pos: 1.0,
                        tau_neg: -1.0,
                    }),
                    None,
                )
            }),
        ),
        (
            "rollout correction without rollout_logp",
            "rollout_logp",
            Box::new(move || {
                loss(
                    g().with_rollout_correction(Some(RolloutCorrection::default())),
                    None,
                )
            }),
        ),
        (
            "rollout_logp length",
            "rollout_logp",
            Box::new(move || loss(g(), Some(vec![-1.0; 3]))),
        ),
        (
            "rollout upper 0",
            "config.rollout_correction.upper",
            Box::new(move || {
                loss(
                    g().with_rollout_correction(Some(RolloutCorrection {
                        upper: 0.0,
                        ..Default::default()
                    })),
                    Some(vec![-1.0; 4]),
                )
            }),
        ),
        (
            "rollout lower > upper",
            "config.rollout_correction.lower",
            Box::new(move || {
                loss(
                    g().with_rollout_correction(Some(RolloutCorrection {
                        lower: Some(3.0),
                        level: IsLevel::Sequence,
                        ..Default::default()
                    })),
                    Some(vec![-1.0; 4]),
                )
            }),
        ),
        (
            "top entropy quantile 0",
            "config.top_entropy_quantile",
            Box::new(move || loss(g().with_top_entropy_quantile(0.0), None)),
        ),
        (
            "top entropy quantile > 1",
            "config.top_entropy_quantile",
            Box::new(move || loss(g().with_top_entropy_quantile(1.5), None)),
        ),
        (
            "dual-clip c = 1",
            "config.dual_clip",
            Box::new(move || loss(g().with_dual_clip(Some(1.0)), None)),
        ),
        (
            "clip_high NaN",
            "config.clip_high",
            Box::new(move || loss(g().with_clip_high(f32::NAN), None)),
        ),
        (
            "log-ratio clamp Inf",
            "config.log_ratio_clamp",
            Box::new(move || loss(g().with_log_ratio_clamp(f32::INFINITY), None)),
        ),
    ]
}

on_every_backend! {
    fn malformed_inputs_name_the_argument_and_never_panic(be) {
        let mut tried = 0;
        for (what, arg, f) in cases(&be) {
            expect(&format!("{} {what}", be.name()), arg, &*f);
            tried += 1;
        }
        // host-only APIs: the scheduler
        let host: Vec<Case<'static>> = vec![
            (
                "scheduler without objectives",
                "orientations",
                Box::new(|| RecapScheduler::new(&[], RecapConfig::default()).map(|_| ())),
            ),
            (
                "scheduler window 0",
                "config.window",
                Box::new(|| {
                    RecapScheduler::new(
                        &[Orientation::Loss],
                        RecapConfig {
                            window: 0,
                            ..RecapConfig::default()
                        },
                    )
                    .map(|_| ())
                }),
            ),
            (
                "observe wrong length",
                "values",
                Box::new(|| {
                    RecapScheduler::new(&[Orientation::Loss], RecapConfig::default())?
                        .observe(&[1.0, 2.0])
                }),
            ),
            (
                "observe NaN",
                "values",
                Box::new(|| {
                    RecapScheduler::new(&[Orientation::Loss], RecapConfig::default())?
                        .observe(&[f64::NAN])
                }),
            ),
            (
                "state not JSON",
                "json",
                Box::new(|| RecapScheduler::from_json("{").map(|_| ())),
            ),
        ];
        for (what, arg, f) in &host {
            expect(what, arg, &**f);
            tried += 1;
        }
        eprintln!(
            "bad inputs: {tried} malformed calls, each an error naming its argument, none panicked"
        );
        assert!(tried >= 34);
    }
}

on_every_backend! {
    /// Extreme values: logits of +-1e4, rows of -inf but one, one-hot rows, V = 1; log-ratios of
    /// +-1e4 at unmasked tokens: finite, log-probs <= 0, entropy >= 0.
    fn extreme_values_stay_finite_and_in_range(be) {
        let v = 6;
        let ninf = f32::NEG_INFINITY;
        let rows: Vec<Vec<f32>> = vec![
            vec![1e4, -1e4, 0.0, 1e4, -1e4, 5.0],
            vec![ninf, ninf, 3.0, ninf, ninf, ninf],
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            vec![-1e4; 6],
            vec![1e4, 1e4 - 1.0, 0.0, 0.0, 0.0, 0.0],
        ];
        let t = rows.len();
        let z: Vec<f32> = rows.concat();
        let labels = [0, 2, 5, 3, 1];
        for temperature in [1.0f32, 0.3, 7.0] {
            let (mut lp, mut h, mut lse) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
            be.logprob_forward(
                &Logits::dense(&z[..], t, v),
                &labels,
                &LogprobConfig {
                    temperature,
                    ..LogprobConfig::default()
                },
                &mut lp,
                &mut h,
                &mut lse,
            )
            .unwrap();
            for r in 0..t {
                let what = format!("{} row {r} tau {temperature}", be.name());
                assert!(lp[r].is_finite() && lp[r] <= 0.0, "{what}: logp {}", lp[r]);
                assert!(
                    h[r].is_finite() && h[r] >= -1e-6,
                    "{what}: entropy {}",
                    h[r]
                );
            }
            assert_eq!(lp[1], 0.0, "the only finite logit has probability 1");
            assert!(h[1].abs() < 1e-6);
        }
        // V = 1: log-prob 0, entropy 0
        let (mut lp, mut h, mut lse) = (vec![1f32; 3], vec![1f32; 3], vec![0f32; 3]);
        be.logprob_forward(
            &Logits::dense(&[4.0f32, -7.0, 1e4][..], 3, 1),
            &[0, 0, 0],
            &LogprobConfig::default(),
            &mut lp,
            &mut h,
            &mut lse,
        )
        .unwrap();
        assert!(
            lp.iter().all(|x| *x == 0.0) && h.iter().all(|x| x.abs() < 1e-6),
            "{lp:?} {h:?}"
        );
        // log-ratios of +-1e4: the clamp keeps the ratio finite, the gradient 0 where it saturates
        let logp = [-1.0f32, -1e4, -1.0, 5e3];
        let old = [-1e4f32, -1.0, -1.0, -1.0];
        for cfg in [
            GrpoConfig::default(),
            GrpoConfig::default().with_policy_loss(PolicyLoss::sapo()),
            GrpoConfig::default().with_policy_loss(PolicyLoss::Cispo),
            GrpoConfig::default().with_kl_coef(0.1).with_kl_is_correction(true),
        ] {
            let mut grad = vec![f32::NAN; 4];
            let out = be
                .grpo_loss(
                    &HostGrpoInputs {
                        logp: &logp,
                        old_logp: &old,
                        ref_logp: Some(&old),
                        rollout_logp: Some(&logp),
                        policy_weight: None,
                        advantages: recap_kernels::Advantages::PerSequence(&[1.0, -1.0]),
                        mask: Mask::U8(&[1, 1, 1, 1]),
                        cu_seqlens: &[0, 2, 4],
                        lambda: &[1.0],
                        objectives: &[ObjectiveKind::Policy],
                        membership: None,
                        normalizers: None,
                    },
                    &cfg,
                    &mut grad,
                )
                .unwrap();
            let what = format!("{} {:?}", be.name(), cfg.policy_loss);
            assert!(out.loss.is_finite(), "{what}: loss {}", out.loss);
            assert!(grad.iter().all(|g| g.is_finite()), "{what}: grad {grad:?}");
            assert!(
                out.metrics.ratio_max.is_finite() && out.metrics.rollout_is_max.is_finite(),
                "{what}"
            );
        }
    }
}
