//! A bounded random pass (a fuzz loop without extra dependencies) over input validation and the CPU
//! reference: random shapes, off-by-one lengths, malformed cu_seqlens, out-of-range options, NaN/Inf
//! and extreme values. Every call must return (no panic); a success must be finite where its inputs
//! were, with log-probs <= 0 and entropy >= 0.
//!
//!   RECAP_FUZZ_SECS=600 cargo test --release --test fuzz -- --nocapture   # a long local run
//!
//! CI runs the default 2 seconds.

mod common;

use common::Rng;
use recap_kernels::{
    cpu, group_advantages, AdvantageConfig, AdvantageMode, AggMode, Groups, GrpoConfig,
    HostGrpoInputs, KlEstimator, Logits, LogprobConfig, Mask, ObjectiveKind, PolicyLoss,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

fn value(rng: &mut Rng) -> f32 {
    match rng.below(40) {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => 1e4,
        4 => -1e4,
        _ => (rng.normal() * 3.0) as f32 - 1.0,
    }
}

fn maybe_off(rng: &mut Rng, n: usize) -> usize {
    match rng.below(12) {
        0 => n + 1,
        1 => n.saturating_sub(1),
        _ => n,
    }
}

fn config(rng: &mut Rng) -> GrpoConfig {
    let pick = |rng: &mut Rng, good: f32, bad: f32| if rng.below(15) == 0 { bad } else { good };
    let bad_low = [1.5, -0.1, f32::NAN][rng.below(3)];
    GrpoConfig {
        clip_low: pick(rng, 0.2, bad_low),
        clip_high: pick(rng, 0.28, -1.0),
        dual_clip: if rng.below(2) == 0 {
            Some(pick(rng, 3.0, 0.5))
        } else {
            None
        },
        policy_loss: match rng.below(5) {
            0 => PolicyLoss::Cispo,
            1 => PolicyLoss::sapo(),
            2 => PolicyLoss::Gspo,
            _ => PolicyLoss::Vanilla,
        },
        delta: (rng.below(6) == 0).then(|| pick(rng, 1.8, 0.9)),
        kl_is_correction: rng.below(4) == 0,
        agg_mode: AggMode::ALL[rng.below(4)],
        norm_constant: (rng.below(3) != 0).then(|| pick(rng, 64.0, 0.0)),
        kl_coef: pick(rng, 0.05, -1.0),
        kl_estimator: KlEstimator::ALL[rng.below(6)],
        allow_nonfinite: rng.below(2) == 0,
        ..GrpoConfig::default()
    }
}

#[test]
fn random_inputs_never_panic() {
    let secs: f64 = std::env::var("RECAP_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut rng = Rng::new(0xF022);
    let (mut calls, mut ok) = (0u64, 0u64);
    while Instant::now() < deadline {
        // the fused loss
        let b = rng.below(6);
        let lens: Vec<usize> = (0..b).map(|_| rng.below(40)).collect();
        let t: usize = lens.iter().sum();
        let mut cu: Vec<i32> = std::iter::once(0)
            .chain(lens.iter().scan(0, |a, l| {
                *a += *l as i32;
                Some(*a)
            }))
            .collect();
        if rng.below(15) == 0 && cu.len() > 2 {
            cu.swap(1, 2); // non-monotone
        }
        if rng.below(20) == 0 {
            cu.push(t as i32 + 3); // not ending at T
        }
        let k = if rng.below(20) == 0 {
            [0, 17][rng.below(2)]
        } else {
            1 + rng.below(4)
        };
        let logp: Vec<f32> = (0..t).map(|_| value(&mut rng)).collect();
        let old: Vec<f32> = (0..maybe_off(&mut rng, t))
            .map(|_| value(&mut rng))
            .collect();
        let refp: Vec<f32> = (0..maybe_off(&mut rng, t))
            .map(|_| value(&mut rng))
            .collect();
        let per_token = rng.below(3) == 0;
        let rows = if per_token { t } else { b };
        let adv: Vec<f32> = (0..maybe_off(&mut rng, rows * k))
            .map(|_| value(&mut rng))
            .collect();
        let mask: Vec<u8> = (0..maybe_off(&mut rng, t))
            .map(|_| (rng.below(4) != 0) as u8)
            .collect();
        let lambda: Vec<f32> = (0..k)
            .map(|_| if rng.below(30) == 0 { -1.0 } else { 1.0 })
            .collect();
        let kinds: Vec<ObjectiveKind> = (0..maybe_off(&mut rng, k))
            .map(|j| {
                if j == 1 {
                    ObjectiveKind::Nll
                } else {
                    ObjectiveKind::Policy
                }
            })
            .collect();
        let cfg = config(&mut rng);
        let with_ref = rng.below(2) == 0;
        let inputs = HostGrpoInputs {
            logp: &logp,
            old_logp: &old,
            ref_logp: with_ref.then_some(&refp[..]),
            rollout_logp: None,
            policy_weight: None,
            advantages: if per_token {
                recap_kernels::Advantages::PerToken(&adv)
            } else {
                recap_kernels::Advantages::PerSequence(&adv)
            },
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &lambda,
            objectives: &kinds,
            membership: None,
            normalizers: None,
        };
        let mut grad = vec![0f32; maybe_off(&mut rng, t)];
        let r = catch_unwind(AssertUnwindSafe(|| {
            cpu::grpo_loss(&inputs, &cfg, &mut grad)
        }));
        let r = r.unwrap_or_else(|_| panic!("grpo_loss panicked on T={t} cu={cu:?} K={k} {cfg:?}"));
        calls += 1;
        if let Ok(out) = r {
            ok += 1;
            if out.metrics.nonfinite == 0 {
                assert!(
                    out.loss.is_finite(),
                    "finite inputs, loss {}: cu={cu:?} {cfg:?}",
                    out.loss
                );
                assert!(
                    grad.iter().all(|g| g.is_finite()),
                    "finite inputs, grad {grad:?}"
                );
            }
        }

        // log-probs and entropy from logits
        let (rows, v) = (rng.below(6), rng.below(9));
        let ld = v + rng.below(3);
        let z: Vec<f32> = (0..maybe_off(&mut rng, rows * ld))
            .map(|_| value(&mut rng))
            .collect();
        let labels: Vec<i32> = (0..maybe_off(&mut rng, rows))
            .map(|_| {
                if rng.below(10) == 0 {
                    -100
                } else {
                    rng.below(v + 1) as i32
                }
            })
            .collect();
        let temperature =
            [1.0f32, 0.5, 0.0, -1.0, f32::NAN][rng.below(5).min(4) * (rng.below(4) == 0) as usize];
        let (mut lp, mut h, mut lse) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
        let r = catch_unwind(AssertUnwindSafe(|| {
            cpu::logprob_forward(
                &Logits {
                    data: &z[..],
                    rows,
                    vocab: v,
                    ld,
                },
                &labels,
                &LogprobConfig {
                    temperature,
                    ..LogprobConfig::default()
                },
                &mut lp,
                &mut h,
                &mut lse,
            )
        }))
        .unwrap_or_else(|_| {
            panic!(
                "logprob_forward panicked: rows {rows} V {v} ld {ld} len {}",
                z.len()
            )
        });
        calls += 1;
        if r.is_ok() {
            ok += 1;
            for i in 0..rows {
                let row = &z[i * ld..i * ld + v];
                if row.iter().all(|x| x.is_finite()) {
                    assert!(
                        lp[i] <= 0.0 && h[i] >= -1e-5,
                        "row {row:?}: logp {} entropy {}",
                        lp[i],
                        h[i]
                    );
                }
            }
        }

        // group advantages
        let bb = rng.below(12);
        let kk = if rng.below(15) == 0 {
            0
        } else {
            1 + rng.below(3)
        };
        let rewards: Vec<f32> = (0..maybe_off(&mut rng, bb * kk))
            .map(|_| {
                if rng.below(25) == 0 {
                    f32::NAN
                } else {
                    rng.below(3) as f32 / 2.0
                }
            })
            .collect();
        let mut out = vec![0f32; maybe_off(&mut rng, bb * kk)];
        let g = rng.below(4);
        let ac = AdvantageConfig {
            modes: (0..kk)
                .map(|j| {
                    [
                        AdvantageMode::Grpo,
                        AdvantageMode::DrGrpo,
                        AdvantageMode::Rloo,
                        AdvantageMode::BatchStd,
                    ][j % 4]
                })
                .collect(),
            eps: if rng.below(20) == 0 { -1.0 } else { 1e-6 },
            lead: None,
            reward_weights: None,
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            group_advantages(&rewards, Groups::Consecutive(g), None, &ac, &mut out)
        }))
        .unwrap_or_else(|_| panic!("group_advantages panicked: B {bb} K {kk} G {g}"));
        calls += 1;
        if r.is_ok() {
            ok += 1;
            assert!(out.iter().all(|x| x.is_finite()), "advantages {out:?}");
        }
    }
    eprintln!("fuzz: {calls} calls in {secs} s, {ok} succeeded, none panicked");
    assert!(calls > 100);
}
