//! Property tests (proptest) over input validation and the CPU reference: random shapes, off-by-one
//! lengths, malformed cu_seqlens, out-of-range options, NaN/Inf and extreme values. Every call must
//! return (no panic); a success must be finite where its inputs were, with log-probs <= 0 and
//! entropy >= 0. A failure is shrunk to a small case and its seed kept in
//! `tests/fuzz.proptest-regressions` (replayed first on the next run).
//!
//!   PROPTEST_CASES=100000 cargo test --release --test fuzz   # a long local run
//!
//! CI runs the default number of cases (256 per property).

use proptest::collection::vec;
use proptest::prelude::*;
use recap_kernels::{
    cpu, group_advantages, AdvantageConfig, AdvantageMode, AggMode, Groups, GrpoConfig,
    HostGrpoInputs, KlEstimator, Logits, LogprobConfig, Mask, ObjectiveKind, PolicyLoss,
    Singletons,
};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Mostly ordinary values, sometimes NaN, +-Inf or +-1e4.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        35 => -10.0f32..8.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e4f32),
        1 => Just(-1e4f32),
    ]
}

/// `n`, sometimes one more or one less (a length the op must reject).
fn about(n: usize) -> impl Strategy<Value = usize> {
    prop_oneof![10 => Just(n), 1 => Just(n + 1), 1 => Just(n.saturating_sub(1))]
}

fn values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    about(n).prop_flat_map(|m| vec(value(), m))
}

/// A good value, or rarely a bad one.
fn mostly<T: Clone + std::fmt::Debug + 'static>(good: T, bad: T) -> impl Strategy<Value = T> {
    prop_oneof![14 => Just(good), 1 => Just(bad)]
}

fn config() -> impl Strategy<Value = GrpoConfig> {
    let clips = (
        prop_oneof![14 => Just(0.2f32), 1 => Just(1.5), 1 => Just(-0.1), 1 => Just(f32::NAN)],
        mostly(0.28f32, -1.0),
        prop::option::of(mostly(3.0f32, 0.5)),
        prop::option::weighted(0.15, mostly(1.8f32, 0.9)),
    );
    let loss = (
        prop_oneof![
            Just(PolicyLoss::Vanilla),
            Just(PolicyLoss::Cispo),
            Just(PolicyLoss::sapo()),
            Just(PolicyLoss::Gspo),
            Just(PolicyLoss::Gpg),
            Just(PolicyLoss::DppoTv),
            Just(PolicyLoss::DppoKl),
            Just(PolicyLoss::Dro { beta: 0.1 }),
            Just(PolicyLoss::GeoMean)
        ],
        any::<bool>(),
        prop::sample::select(AggMode::ALL.to_vec()),
        prop::option::weighted(0.67, mostly(64.0f32, 0.0)),
    );
    let kl = (
        mostly(0.05f32, -1.0),
        prop::sample::select(KlEstimator::ALL.to_vec()),
        any::<bool>(),
    );
    (clips, loss, kl).prop_map(
        |(
            (clip_low, clip_high, dual_clip, delta),
            (policy_loss, kl_is_correction, agg_mode, norm_constant),
            (kl_coef, kl_estimator, allow_nonfinite),
        )| {
            GrpoConfig::default()
                .with_clip_low(clip_low)
                .with_clip_high(clip_high)
                .with_dual_clip(dual_clip)
                .with_delta(delta)
                .with_policy_loss(policy_loss)
                .with_kl_is_correction(kl_is_correction)
                .with_agg_mode(agg_mode)
                .with_norm_constant(norm_constant)
                .with_kl_coef(kl_coef)
                .with_kl_estimator(kl_estimator)
                .with_allow_nonfinite(allow_nonfinite)
        },
    )
}

/// One fused-loss call's arguments.
#[derive(Debug, Clone)]
struct LossCase {
    cu: Vec<i32>,
    k: usize,
    logp: Vec<f32>,
    old: Vec<f32>,
    refp: Option<Vec<f32>>,
    per_token: bool,
    adv: Vec<f32>,
    mask: Vec<u8>,
    lambda: Vec<f32>,
    kinds: Vec<ObjectiveKind>,
    grad_len: usize,
    cfg: GrpoConfig,
}

fn loss_case() -> impl Strategy<Value = LossCase> {
    let shape = (
        vec(0usize..40, 0..6),
        // 0 none, 1 non-monotone, 2 not ending at T
        prop_oneof![13 => Just(0u8), 1 => Just(1), 1 => Just(2)],
        prop_oneof![18 => 1usize..5, 1 => Just(0), 1 => Just(17)],
        any::<bool>(),
        prop::bool::weighted(0.33),
    );
    shape.prop_flat_map(|(lens, tweak, k, with_ref, per_token)| {
        let t: usize = lens.iter().sum();
        let mut cu: Vec<i32> = std::iter::once(0)
            .chain(lens.iter().scan(0, |a, l| {
                *a += *l as i32;
                Some(*a)
            }))
            .collect();
        match tweak {
            1 if cu.len() > 2 => cu.swap(1, 2),
            2 => cu.push(t as i32 + 3),
            _ => {}
        }
        let rows = if per_token { t } else { lens.len() };
        let arrays = (
            vec(value(), t),
            values(t),
            values(t),
            values(rows * k),
            about(t).prop_flat_map(|m| vec(prop::bool::weighted(0.75).prop_map(u8::from), m)),
        );
        let rest = (vec(mostly(1.0f32, -1.0), k), about(k), about(t), config());
        (
            Just(cu),
            Just(k),
            Just(with_ref),
            Just(per_token),
            arrays,
            rest,
        )
            .prop_map(
                |(cu, k, with_ref, per_token, (logp, old, refp, adv, mask), rest)| {
                    let (lambda, kinds_len, grad_len, cfg) = rest;
                    let kinds = (0..kinds_len)
                        .map(|j| {
                            if j == 1 {
                                ObjectiveKind::Nll
                            } else {
                                ObjectiveKind::Policy
                            }
                        })
                        .collect();
                    LossCase {
                        cu,
                        k,
                        logp,
                        old,
                        refp: with_ref.then_some(refp),
                        per_token,
                        adv,
                        mask,
                        lambda,
                        kinds,
                        grad_len,
                        cfg,
                    }
                },
            )
    })
}

/// One log-prob forward call's arguments.
#[derive(Debug, Clone)]
struct LogitsCase {
    rows: usize,
    vocab: usize,
    ld: usize,
    z: Vec<f32>,
    labels: Vec<i32>,
    temperature: f32,
}

fn logits_case() -> impl Strategy<Value = LogitsCase> {
    (0usize..6, 0usize..9, 0usize..3).prop_flat_map(|(rows, vocab, pad)| {
        let ld = vocab + pad;
        let label = prop_oneof![9 => 0..vocab as i32 + 1, 1 => Just(-100)];
        (
            values(rows * ld),
            about(rows).prop_flat_map(move |n| vec(label.clone(), n)),
            prop_oneof![
                12 => Just(1.0f32),
                1 => Just(0.5),
                1 => Just(0.0),
                1 => Just(-1.0),
                1 => Just(f32::NAN)
            ],
        )
            .prop_map(move |(z, labels, temperature)| LogitsCase {
                rows,
                vocab,
                ld,
                z,
                labels,
                temperature,
            })
    })
}

/// One group-advantages call's arguments.
#[derive(Debug, Clone)]
struct AdvantageCase {
    rewards: Vec<f32>,
    out_len: usize,
    group: usize,
    k: usize,
    eps: f64,
    /// `[B]` response lengths (some negative, the length sometimes wrong), or none
    lengths: Option<Vec<i32>>,
    /// first of the K modes in `AdvantageMode::ALL`
    mode0: usize,
}

fn advantage_case() -> impl Strategy<Value = AdvantageCase> {
    (0usize..12, prop_oneof![14 => 1usize..4, 1 => Just(0)]).prop_flat_map(|(b, k)| {
        let reward = prop_oneof![24 => (0u8..3).prop_map(|r| r as f32 / 2.0), 1 => Just(f32::NAN)];
        (
            about(b * k).prop_flat_map(move |n| vec(reward.clone(), n)),
            about(b * k),
            0usize..4,
            mostly(1e-6f64, -1.0),
            prop_oneof![4 => about(b).prop_flat_map(|n| vec(prop_oneof![12 => 0i32..5, 1 => Just(-1)], n)).prop_map(Some), 1 => Just(None)],
            0usize..AdvantageMode::ALL.len(),
        )
            .prop_map(move |(rewards, out_len, group, eps, lengths, mode0)| AdvantageCase {
                rewards,
                out_len,
                group,
                k,
                eps,
                lengths,
                mode0,
            })
    })
}

proptest! {
    #[test]
    fn the_fused_loss_never_panics(c in loss_case()) {
        let inputs = HostGrpoInputs {
            logp: &c.logp,
            old_logp: &c.old,
            ref_logp: c.refp.as_deref(),
            rollout_logp: None,
            policy_weight: None,
            advantages: if c.per_token {
                recap_kernels::Advantages::PerToken(&c.adv[..])
            } else {
                recap_kernels::Advantages::PerSequence(&c.adv[..])
            },
            mask: Mask::U8(&c.mask[..]),
            cu_seqlens: &c.cu,
            lambda: &c.lambda,
            objectives: &c.kinds,
            membership: None,
            normalizers: None,
        };
        let mut grad = vec![0f32; c.grad_len];
        let r = catch_unwind(AssertUnwindSafe(|| cpu::grpo_loss(&inputs, &c.cfg, &mut grad)));
        prop_assert!(r.is_ok(), "grpo_loss panicked (K = {})", c.k);
        // TRL's unclamped k3 (exp(ref - logp) - (ref - logp) - 1) overflows by design once an
        // unmasked token's log-ratio to the reference passes ~88 (f32): finite inputs may then
        // give an infinite KL
        let overflows = c.cfg.kl_estimator == recap_kernels::KlEstimator::K3Unclamped
            && c.refp.as_ref().is_some_and(|r| {
                r.iter()
                    .zip(&c.logp)
                    .zip(&c.mask)
                    .any(|((a, b), m)| *m != 0 && (a - b).abs() > 80.0)
            });
        if let Ok(Ok(out)) = r {
            if out.metrics.nonfinite == 0 && !overflows {
                prop_assert!(out.loss.is_finite(), "finite inputs, loss {}", out.loss);
                prop_assert!(grad.iter().all(|g| g.is_finite()), "finite inputs, grad {grad:?}");
            }
        }
    }

    #[test]
    fn logprobs_never_panic_and_stay_in_range(c in logits_case()) {
        let (mut lp, mut h, mut lse) = (vec![0f32; c.rows], vec![0f32; c.rows], vec![0f32; c.rows]);
        let r = catch_unwind(AssertUnwindSafe(|| {
            cpu::logprob_forward(
                &Logits { data: &c.z[..], rows: c.rows, vocab: c.vocab, ld: c.ld },
                &c.labels,
                &LogprobConfig { temperature: c.temperature, ..LogprobConfig::default() },
                &mut lp,
                Some(&mut h),
                &mut lse,
            )
        }));
        prop_assert!(r.is_ok(), "logprob_forward panicked");
        if let Ok(Ok(())) = r {
            for i in 0..c.rows {
                let row = &c.z[i * c.ld..i * c.ld + c.vocab];
                if row.iter().all(|x| x.is_finite()) {
                    prop_assert!(
                        lp[i] <= 0.0 && h[i] >= -1e-5,
                        "row {row:?}: logp {} entropy {}", lp[i], h[i]
                    );
                }
            }
        }
    }

    #[test]
    fn group_advantages_never_panic(c in advantage_case()) {
        let all = AdvantageMode::ALL;
        let ac = AdvantageConfig {
            modes: (0..c.k).map(|j| all[(c.mode0 + j) % all.len()]).collect(),
            eps: c.eps,
            lead: None,
            reward_weights: None,
            singletons: if c.group % 2 == 0 { Singletons::Zero } else { Singletons::Verl },
        };
        let mut out = vec![0f32; c.out_len];
        let r = catch_unwind(AssertUnwindSafe(|| {
            group_advantages(&c.rewards, Groups::Consecutive(c.group), c.lengths.as_deref(), None, &ac, &mut out)
        }));
        prop_assert!(r.is_ok(), "group_advantages panicked");
        if let Ok(Ok(())) = r {
            prop_assert!(out.iter().all(|x| x.is_finite()), "advantages {out:?}");
        }
    }
}
