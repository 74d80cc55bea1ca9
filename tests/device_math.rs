//! The device's per-token math, compiled for the host from `kernels/grpo_math.cuh`, against the f64
//! reference. Runs on machines without a GPU. (The kernel-parameter structs' Rust mirrors are
//! generated from `kernels/recap_params.h` and their layout asserted at compile time, in Rust and C.)

mod common;

use common::{close, Rng};
use recap_kernels::{cpu, device_math, AggMode, GrpoConfig, KlEstimator, PolicyLoss};

/// The policy configurations the device math is checked under: vanilla with and without dual-clip,
/// DAPO's asymmetric clip, two-sided clipping, CISPO, SAPO, GSPO, GPG, DRO, DPPO-TV and DPPO-KL.
fn policy_configs() -> Vec<GrpoConfig> {
    let base = GrpoConfig::default();
    vec![
        base.clone(),
        base.clone().with_clip_high(0.28).with_dual_clip(None),
        base.clone()
            .with_clip_low(0.1)
            .with_clip_high(0.3)
            .with_dual_clip(Some(1.5)),
        base.clone().with_delta(Some(1.6)).with_dual_clip(None),
        base.clone().with_policy_loss(PolicyLoss::Cispo),
        base.clone().with_policy_loss(PolicyLoss::sapo()),
        base.clone().with_policy_loss(PolicyLoss::Gspo),
        base.clone().with_policy_loss(PolicyLoss::Gpg),
        base.clone().with_policy_loss(PolicyLoss::Dro { beta: 0.1 }),
        base.clone().with_policy_loss(PolicyLoss::DppoTv),
        base.clone().with_policy_loss(PolicyLoss::GeoMean),
        base.clone()
            .with_policy_loss(PolicyLoss::DppoKl)
            .with_clip_low(0.05),
    ]
}

/// GSPO's sequence ratio: the clamp at 10 (saturating the gradient) and NaN propagation.
#[test]
fn device_gspo_ratio_matches_reference() {
    for lr in [-30.0f32, -2.5, -1e-4, 0.0, 0.3, 9.99, 10.0, 10.01, 50.0] {
        let (d, r, sat) = device_math::gspo_ratio(lr);
        let want = cpu::gspo_ratio(lr as f64);
        assert!(
            close(d as f64, want.log_ratio, 1e-7, 1e-7),
            "{lr}: {d} vs {want:?}"
        );
        assert!(
            close(r as f64, want.ratio, 0.0, 1e-6),
            "{lr}: {r} vs {want:?}"
        );
        assert_eq!(sat, want.saturated, "{lr}");
    }
    assert!(device_math::gspo_ratio(f32::NAN).1.is_nan());
    assert!(device_math::gspo_ratio(10.5).2 && !device_math::gspo_ratio(9.5).2);
}

/// GMPO's sequence ratio: the token's log-ratio kept for its clip test, the mean clamped at 10.
#[test]
fn device_geo_mean_ratio_matches_reference() {
    for (d, mean) in [
        (0.3f32, -2.5f32),
        (-1.0, 0.0),
        (5.0, 9.99),
        (0.1, 10.01),
        (-0.2, 50.0),
    ] {
        let (ld, r, sat) = device_math::geo_mean_ratio(d, mean);
        let want = cpu::geo_mean_ratio(d as f64, mean as f64);
        assert_eq!(ld as f64, want.log_ratio, "{d} {mean}");
        assert!(
            close(r as f64, want.ratio, 0.0, 1e-6),
            "{d} {mean}: {r} vs {want:?}"
        );
        assert_eq!(sat, want.saturated, "{d} {mean}");
    }
    assert!(device_math::geo_mean_ratio(0.0, f32::NAN).1.is_nan());
}

#[test]
fn device_policy_math_matches_reference() {
    let mut rng = Rng::new(7);
    let configs = policy_configs();
    let mut flags = [0usize; 4];
    for i in 0..300_000 {
        let old = -(rng.uniform() * 6.0) as f32;
        let spread = if i % 100 == 0 { 30.0 } else { 1.0 };
        let logp = old + (rng.normal() * spread) as f32;
        let adv = (rng.normal() * 2.0) as f32;
        let cfg = &configs[i % configs.len()];
        let d = device_math::policy_token(logp, old, adv, cfg);
        let q = cpu::ratio(logp, old, 20.0);
        let r = cpu::policy_token(q, adv, logp, old, cfg);
        let what = format!("logp {logp} old {old} adv {adv} {cfg:?}");
        assert!(
            close(d.log_ratio as f64, q.log_ratio, 1e-6, 1e-6),
            "{what}: log-ratio {} vs {}",
            d.log_ratio,
            q.log_ratio
        );
        // float rounding of logp - old (up to half an ulp of |d| <= 20, ~1e-6) scales r
        assert!(
            close(d.ratio as f64, q.ratio, 0.0, 4e-6),
            "{what}: ratio {} vs {}",
            d.ratio,
            q.ratio
        );
        assert_eq!(d.saturated, q.saturated, "{what}: saturation");
        // Branch decisions agree except within float rounding of a kink.
        let near = |k: f64| (q.ratio - k).abs() <= 1e-6 * k;
        // DPPO's trust-region tests: p - po (TV) or the binary KL (rounded in f32) near a threshold
        let (p, po) = ((logp as f64).exp(), (old as f64).exp());
        let bkl = po * (old as f64 - logp as f64)
            + (1.0 - po) * ((1.0 - po + 1e-8) / (1.0 - p + 1e-8)).ln();
        let (el, eh) = (cfg.clip_low as f64, cfg.clip_high as f64);
        // (probabilities above 1, from the wide draws' logp > 0, are outside DPPO's domain: there
        // 1 - p < 0 and the binary KL is NaN in f64 but -inf once p overflows f32)
        let region_edge = match cfg.policy_loss {
            PolicyLoss::DppoTv => (p - po - eh).abs() < 1e-6 || (p - po + el).abs() < 1e-6,
            PolicyLoss::DppoKl => {
                logp > 0.0
                    || (bkl - eh).abs() < 1e-5
                    || (bkl - el).abs() < 1e-5
                    || (p - po).abs() < 1e-6
            }
            // GMPO's clip test is on the log-ratio (here the token's own: q as the device gets it)
            PolicyLoss::GeoMean => {
                (q.log_ratio - eh).abs() < 1e-6 || (q.log_ratio + el).abs() < 1e-6
            }
            _ => false,
        };
        let kinked = near(1.0 - cfg.clip_low as f64)
            || near(1.0 + cfg.clip_high as f64)
            || cfg.dual_clip.is_some_and(|c| near(c as f64))
            || cfg.delta.is_some_and(|c| near(c as f64))
            || region_edge;
        // DRO's loss is a difference of two terms (A logp, beta d^2 / 2): f32 keeps their scale's
        // digits, not the difference's
        let terms = match cfg.policy_loss {
            PolicyLoss::Dro { beta } => {
                let d = logp as f64 - old as f64;
                (adv as f64 * logp as f64).abs() + 0.5 * beta as f64 * d * d
            }
            _ => 0.0,
        };
        if !kinked {
            assert_eq!((d.clipped, d.dual), (r.clipped, r.dual), "{what}: branch");
            assert!(
                close(d.loss as f64, r.loss, 1e-6 + 1e-6 * terms, 1e-5),
                "{what}: loss {} vs {}",
                d.loss,
                r.loss
            );
            assert!(
                close(d.grad as f64, r.grad, 1e-6, 1e-5),
                "{what}: grad {} vs {}",
                d.grad,
                r.grad
            );
        }
        flags[0] += d.clipped as usize;
        flags[1] += d.dual as usize;
        flags[2] += d.saturated as usize;
        flags[3] += (cfg.delta.is_some_and(|x| q.ratio > x as f64) && !d.clipped) as usize;
    }
    assert!(
        flags.iter().all(|&n| n > 100),
        "every branch exercised (clipped, dual, saturated, delta-capped): {flags:?}"
    );
}

/// TRL's KL bias correction on the device math against the reference.
#[test]
fn device_kl_is_correction_matches_reference() {
    let mut rng = Rng::new(13);
    for i in 0..50_000 {
        let old = -(rng.uniform() * 6.0) as f32;
        let spread = if i % 50 == 0 { 30.0 } else { 0.5 };
        let lp = old + (rng.normal() * spread) as f32;
        let rf = old + (rng.normal() * spread) as f32;
        // log-ratios up to the clamp (20) in the wide draws: the f32 gradient of k3+ is a
        // difference of terms near e^20, so it keeps about 5 digits there
        let rel = if spread > 1.0 { 1e-4 } else { 1e-5 };
        for est in KlEstimator::ALL {
            // without k3's clamps the corrected gradient r (1 - e^x) + r (e^x - x - 1) cancels terms
            // of size r e^x to -x r: f32 (TRL's as much as ours) keeps no digits of it for large |x|
            if est == KlEstimator::K3Unclamped && (rf - lp).abs() > 5.0 {
                continue;
            }
            let (v, g) = device_math::kl_token_is_corrected(lp, old, rf, est);
            let want = cpu::kl_is_corrected(cpu::kl_token(lp, rf, est), cpu::ratio(lp, old, 20.0));
            assert!(
                close(v as f64, want.value, 1e-6, rel) && close(g as f64, want.grad, 1e-6, rel),
                "{est} ({lp}, {old}, {rf}): ({v}, {g}) vs {want:?}"
            );
        }
    }
}

#[test]
fn device_kl_math_matches_reference() {
    let mut rng = Rng::new(11);
    for i in 0..100_000 {
        let r = -(rng.uniform() * 8.0) as f32;
        let spread = if i % 50 == 0 { 40.0 } else { 1.0 };
        let lp = r + (rng.normal() * spread) as f32;
        for est in KlEstimator::ALL {
            // beyond x = 20 TRL's unclamped k3 loses digits to e^x in f32 and overflows past 88
            if est == KlEstimator::K3Unclamped && (r - lp).abs() > 20.0 {
                continue;
            }
            let (v, g) = device_math::kl_token(lp, r, est);
            let want = cpu::kl_token(lp, r, est);
            assert!(
                close(v as f64, want.value, 1e-6, 1e-5),
                "{est} ({lp}, {r}): value {v} vs {}",
                want.value
            );
            assert!(
                close(g as f64, want.grad, 1e-6, 1e-5),
                "{est} ({lp}, {r}): grad {g} vs {}",
                want.grad
            );
        }
    }
    // NaN propagates (torch.clamp keeps NaN; no silent clamp to a bound)
    for est in KlEstimator::ALL {
        assert!(
            device_math::kl_token(f32::NAN, 0.0, est).0.is_nan(),
            "{est}"
        );
    }
    assert!(
        device_math::policy_token(f32::NAN, 0.0, 1.0, &GrpoConfig::default())
            .loss
            .is_nan()
    );
}

#[test]
fn division_by_k_without_a_divide_is_the_division() {
    // the fused loss's last block computes (sum_k lambda_k agg_k) / K by Markstein's correction of a
    // product with the rounded reciprocal: the same bits as the division, for every K
    let mut rng = Rng::new(7);
    let mut cases: Vec<f64> = vec![
        1.0,
        -1.0,
        3.0,
        1e300,
        -7.25e-300,
        f64::MAX,
        f64::MIN_POSITIVE * 16.0,
        0.1,
        2.0f64.powi(52) + 1.0,
    ];
    for _ in 0..200_000 {
        let m = rng.uniform() * 2.0 - 1.0;
        let e = (rng.uniform() * 80.0 - 40.0).round() as i32;
        cases.push(m * 2f64.powi(e));
    }
    for k in 1..=16 {
        for &a in &cases {
            let (got, want) = (device_math::div_small(a, k), a / k as f64);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{a:e} / {k}: {got:e} vs {want:e}"
            );
        }
        // zero keeps its sign, infinities and NaN pass through
        assert_eq!(
            device_math::div_small(-0.0, k).to_bits(),
            (-0.0f64).to_bits()
        );
        assert_eq!(device_math::div_small(f64::INFINITY, k), f64::INFINITY);
        assert!(device_math::div_small(f64::NAN, k).is_nan());
        // the token pass's 1/K from the same table: the f32 reciprocal
        assert_eq!((1.0 / k as f64) as f32, 1.0f32 / k as f32, "1/{k}");
    }
}

#[test]
fn normalizer_reciprocals_are_f32_reciprocals() {
    for x in [1.0, 3.0, 37.0, 0.375, 1e-3, 16_777_217.0, 1e30] {
        assert_eq!(device_math::inv_norm(x), 1.0 / x as f32, "1/{x}");
    }
    for x in [0.0, -1.0, -0.0] {
        assert_eq!(device_math::inv_norm(x), 0.0, "nothing to normalize: {x}");
    }
}

#[test]
fn device_agg_weight_matches_reference() {
    let (tokens, seqs, n_b, c) = (37.0f64, 5.0f64, 8.0f64, 64.0f64);
    for mode in AggMode::ALL {
        let d = device_math::agg_weight(
            mode,
            (1.0 / tokens) as f32,
            (1.0 / seqs) as f32,
            (1.0 / n_b) as f32,
            (1.0 / c) as f32,
        );
        let want = cpu::agg_weight(mode, tokens, seqs, n_b, c);
        assert!(close(d as f64, want, 0.0, 1e-6), "{mode}: {d} vs {want}");
    }
    assert_eq!(
        cpu::agg_weight(AggMode::TokenMean, 0.0, 0.0, 0.0, 1.0),
        0.0,
        "empty objective: weight 0"
    );
}
