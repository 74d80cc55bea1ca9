//! Hand-computed cases for every op, run on every backend (the CPU reference always, the GPU when
//! one is usable), and finite-difference checks of the reference gradient.

#![allow(clippy::needless_range_loop)] // token loops index several arrays

mod common;

use common::{assert_all_close, assert_close, Batch};
use recap_kernels::{
    cpu, Advantages, AggMode, Backend, Error, GrpoConfig, HostGrpoInputs, HostReduceInputs,
    IsLevel, IsMode, KlEstimator, Mask, ObjectiveKind, PolicyLoss, RolloutCorrection,
};

const TOL: f64 = 1e-6;

/// Two sequences, K = 1 policy objective; tokens chosen to hit every branch:
/// t0 A=+1 r=1.1 (unclipped), t1 A=+1 r=1.5 (clipped high), t2 A=-0.5 r=0.5 (clipped low),
/// t3 masked (NaN inputs: must change nothing), t4 A=-0.5 r=4 (dual-clip at c=3).
#[derive(Clone)]
struct Branches {
    logp: Vec<f32>,
    old: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<f32>,
    cu: Vec<i32>,
}

/// A batch whose tokens have the given old log-probs and ratios (every token unmasked).
fn with_ratios(old: Vec<f32>, ratios: &[f64], adv: Vec<f32>, cu: Vec<i32>) -> Branches {
    let logp = old
        .iter()
        .zip(ratios)
        .map(|(o, r)| (*o as f64 + r.ln()) as f32)
        .collect();
    let mask = vec![1.0; old.len()];
    Branches {
        logp,
        old,
        adv,
        mask,
        cu,
    }
}

fn branches() -> Branches {
    let old = vec![-1.0f32, -2.0, -0.5, -1.0, -3.0];
    let mut b = with_ratios(
        old,
        &[1.1, 1.5, 0.5, 1.0, 4.0],
        vec![1.0, -0.5],
        vec![0, 2, 5],
    );
    b.logp[3] = f32::NAN;
    b.mask[3] = 0.0;
    b
}

fn branch_inputs<'a>(b: &'a Branches, lambda: &'a [f32]) -> HostGrpoInputs<'a> {
    HostGrpoInputs {
        logp: &b.logp,
        old_logp: &b.old,
        ref_logp: None,
        rollout_logp: None,
        policy_weight: None,
        advantages: Advantages::PerSequence(&b.adv),
        mask: Mask::F32(&b.mask),
        cu_seqlens: &b.cu,
        lambda,
        objectives: &[ObjectiveKind::Policy],
        membership: None,
        normalizers: None,
    }
}

fn actual_ratio(b: &Branches, t: usize) -> f64 {
    (b.logp[t] as f64 - b.old[t] as f64).exp()
}

on_every_backend! {
    fn every_clip_branch_by_hand(be) {
        let b = branches();
        // per-token losses by hand: -1.1, -1.2, 0.4, (masked), 1.5 (dual-clip: -c A = 1.5)
        let r0 = actual_ratio(&b, 0);
        let losses = [-r0, -1.2, 0.5 * 0.8, 1.5];
        let sum: f64 = losses.iter().sum();
        let cases = [
            (AggMode::TokenMean, None, sum / 4.0, -r0 / 4.0),
            (
                AggMode::SeqMeanTokenMean,
                None,
                ((losses[0] + losses[1]) / 2.0 + (losses[2] + losses[3]) / 2.0) / 2.0,
                -r0 / 4.0,
            ),
            (AggMode::SeqMeanTokenSum, None, sum / 2.0, -r0 / 2.0),
            (AggMode::TokenSumNorm, Some(10.0), sum / 10.0, -r0 / 10.0),
        ];
        for (mode, c, want_loss, want_g0) in cases {
            let cfg = GrpoConfig::default().with_agg_mode(mode).with_norm_constant(c);
            let mut grad = vec![f32::NAN; 5];
            let out = be
                .grpo_loss(&branch_inputs(&b, &[1.0]), &cfg, &mut grad)
                .unwrap();
            let what = format!("{} {mode}", be.name());
            assert_close(&format!("{what} loss"), out.loss, want_loss, TOL, 1e-5);
            assert_close(
                &format!("{what} objective_loss"),
                out.objective_loss[0],
                want_loss,
                TOL,
                1e-5,
            );
            assert_all_close(
                &format!("{what} grad"),
                &grad,
                &[want_g0 as f32, 0.0, 0.0, 0.0, 0.0],
                TOL,
                1e-5,
            );
            let m = &out.metrics;
            assert_close("pg_clipfrac", m.pg_clipfrac[0], 0.5, TOL, 0.0);
            assert_close("pg_clipfrac_lower", m.pg_clipfrac_lower[0], 0.25, TOL, 0.0);
            let ratios: Vec<f64> = [0, 1, 2, 4].iter().map(|&t| actual_ratio(&b, t)).collect();
            assert_close(
                "ratio_mean",
                m.ratio_mean,
                ratios.iter().sum::<f64>() / 4.0,
                TOL,
                1e-5,
            );
            assert_close("ratio_min", m.ratio_min, ratios[2], TOL, 1e-5);
            assert_close("ratio_max", m.ratio_max, ratios[3], TOL, 1e-5);
            assert_close(
                "ppo_kl",
                m.ppo_kl,
                -ratios.iter().map(|r| r.ln()).sum::<f64>() / 4.0,
                TOL,
                1e-5,
            );
            assert_eq!(m.num_seqs, 2);
            assert_close("num_tokens", m.num_tokens, 4.0, 0.0, 0.0);
            assert_eq!(m.nonfinite, 0, "masked NaN must not count");
        }
    }
}

on_every_backend! {
    /// `clip_low = 1` with an upper clip beyond any ratio and no dual-clip: no clip band at all, the
    /// plain `-A r` (verl's KL-Cov policy term), value and gradient at every token.
    fn no_clip_band_by_hand(be) {
        let b = branches();
        let cfg = GrpoConfig::default()
            .with_clip_low(1.0)
            .with_clip_high(1e30)
            .with_dual_clip(None);
        let toks = [0usize, 1, 2, 4];
        let adv = [1.0f64, 1.0, -0.5, -0.5];
        let mut grad = vec![f32::NAN; 5];
        let out = be.grpo_loss(&branch_inputs(&b, &[1.0]), &cfg, &mut grad).unwrap();
        let per: Vec<f64> = toks.iter().zip(adv).map(|(&t, a)| -a * actual_ratio(&b, t)).collect();
        let what = be.name();
        assert_close(&format!("{what} loss"), out.loss, per.iter().sum::<f64>() / 4.0, TOL, 1e-5);
        let mut want = [0.0f32; 5];
        for (&t, l) in toks.iter().zip(&per) {
            want[t] = (l / 4.0) as f32;
        }
        assert_all_close(&format!("{what} grad"), &grad, &want, TOL, 1e-5);
        assert_eq!(out.metrics.pg_clipfrac[0], 0.0);
        assert_eq!(out.metrics.pg_clipfrac_lower[0], 0.0);
    }
}

on_every_backend! {
    /// Per-term aggregation (`policy_agg_mode`): the policy term in one mode, the KL term in
    /// `agg_mode`, as verl before 0.9 aggregates GSPO and SAPO. Seq 0 [t0], seq 1 [t1, t2, (t3
    /// masked), t4]; no clip band, so l_t = -A r_t; KL k1 (value logp - ref, gradient 1), beta 0.5.
    fn per_term_aggregation_by_hand(be) {
        let b = Branches { cu: vec![0, 1, 5], ..branches() };
        let refp = [-1.2f32, -2.5, -0.25, 0.0, -2.0];
        let adv_of = [1.0f64, -0.5, -0.5, -0.5, -0.5];
        let toks = [0usize, 1, 2, 4];
        let l: Vec<f64> = toks.iter().map(|&t| -adv_of[t] * actual_ratio(&b, t)).collect();
        let diff: Vec<f64> = toks.iter().map(|&t| b.logp[t] as f64 - refp[t] as f64).collect();
        // smtm weights: seq 0 has 1 token, seq 1 has 3: 1/2 and 1/6; token-mean: 1/4
        let smtm = [0.5f64, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0];
        let tm = [0.25f64; 4];
        let beta = 0.5f64;
        for (pol_mode, kl_mode, wp, wk) in [
            (AggMode::SeqMeanTokenMean, AggMode::TokenMean, smtm, tm),
            (AggMode::TokenMean, AggMode::SeqMeanTokenMean, tm, smtm),
        ] {
            let cfg = GrpoConfig::default()
                .with_clip_low(1.0)
                .with_clip_high(1e30)
                .with_dual_clip(None)
                .with_agg_mode(kl_mode)
                .with_policy_agg_mode(Some(pol_mode))
                .with_kl_coef(beta as f32)
                .with_kl_estimator(KlEstimator::K1);
            let mut inputs = branch_inputs(&b, &[1.0]);
            inputs.ref_logp = Some(&refp);
            let mut grad = vec![f32::NAN; 5];
            let out = be.grpo_loss(&inputs, &cfg, &mut grad).unwrap();
            let what = format!("{} policy {pol_mode} kl {kl_mode}", be.name());
            let pol: f64 = (0..4).map(|i| wp[i] * l[i]).sum();
            let kl: f64 = (0..4).map(|i| wk[i] * diff[i]).sum();
            assert_close(&format!("{what} policy"), out.objective_loss[0], pol, TOL, 1e-5);
            assert_close(&format!("{what} kl_loss"), out.kl_loss, kl, TOL, 1e-5);
            assert_close(&format!("{what} loss"), out.loss, pol + beta * kl, TOL, 1e-5);
            let mut want = [0.0f32; 5];
            for (i, &t) in toks.iter().enumerate() {
                want[t] = (wp[i] * l[i] + beta * wk[i]) as f32;
            }
            assert_all_close(&format!("{what} grad"), &grad, &want, TOL, 1e-5);
            // the same mode twice is the plain configuration, bit for bit
            let same = cfg.clone().with_policy_agg_mode(Some(kl_mode));
            let plain = cfg.clone().with_policy_agg_mode(None);
            let (mut g1, mut g2) = (vec![0f32; 5], vec![0f32; 5]);
            let o1 = be.grpo_loss(&inputs, &same, &mut g1).unwrap();
            let o2 = be.grpo_loss(&inputs, &plain, &mut g2).unwrap();
            assert_eq!((o1.loss.to_bits(), g1), (o2.loss.to_bits(), g2), "{what}");
        }
        // the objectives' mode is validated like agg_mode
        let bad = GrpoConfig::default().with_policy_agg_mode(Some(AggMode::TokenSumNorm));
        let mut grad = vec![0f32; 5];
        let e = be.grpo_loss(&branch_inputs(&b, &[1.0]), &bad, &mut grad).unwrap_err();
        assert!(e.to_string().contains("norm_constant"), "{e}");
    }
}

on_every_backend! {
    /// CISPO, SAPO and two-sided clipping on the branch batch, against the formulas of verl's
    /// `compute_policy_loss_cispo` / `compute_policy_loss_sapo` and TRL's `delta`, written out per token
    /// (token-mean over the 4 unmasked tokens, K = 1).
    fn policy_loss_variants_by_hand(be) {
        let b = branches();
        let toks = [0usize, 1, 2, 4];
        let adv = [1.0f64, 1.0, -0.5, -0.5];
        let r: Vec<f64> = toks.iter().map(|&t| actual_ratio(&b, t)).collect();
        let lp: Vec<f64> = toks.iter().map(|&t| b.logp[t] as f64).collect();
        // (config, per-token loss, per-token dl/dlogp, clipped tokens)
        let cispo: Vec<(f64, f64)> = (0..4)
            .map(|i| {
                let rc = r[i].clamp(0.8, 1.2);
                (-rc * adv[i] * lp[i], -rc * adv[i])
            })
            .collect();
        let sapo: Vec<(f64, f64)> = (0..4)
            .map(|i| {
                let tau = if adv[i] > 0.0 { 1.0 } else { 1.05 };
                let s = 1.0 / (1.0 + (-tau * (r[i] - 1.0)).exp());
                (
                    -adv[i] * 4.0 / tau * s,
                    -4.0 * adv[i] * s * (1.0 - s) * r[i],
                )
            })
            .collect();
        // delta = 1.3, no dual-clip: t0 unclipped; t1 l1 = -1.3 < l2 = -1.2 (clipped); t2 clipped low;
        // t4 r = 4 > delta: l1 = 0.5 * 1.3 = 0.65 > l2 = 0.6, so l = 0.65 with no gradient
        let two_sided = vec![(-r[0], -r[0]), (-1.2, 0.0), (0.4, 0.0), (0.65, 0.0)];
        let cases = [
            (
                GrpoConfig::default().with_policy_loss(PolicyLoss::Cispo),
                cispo,
                0.75,
            ),
            (
                GrpoConfig::default().with_policy_loss(PolicyLoss::sapo()),
                sapo,
                0.75,
            ),
            (
                GrpoConfig::default().with_delta(Some(1.3)).with_dual_clip(None),
                two_sided,
                0.5,
            ),
        ];
        for (cfg, per_token, clipfrac) in &cases {
            let what = format!("{} {:?} delta {:?}", be.name(), cfg.policy_loss, cfg.delta);
            let mut grad = vec![f32::NAN; 5];
            let out = be
                .grpo_loss(&branch_inputs(&b, &[1.0]), cfg, &mut grad)
                .unwrap();
            let want_loss = per_token.iter().map(|x| x.0).sum::<f64>() / 4.0;
            assert_close(&format!("{what} loss"), out.loss, want_loss, TOL, 1e-5);
            let mut want_grad = [0f32; 5];
            for (i, &t) in toks.iter().enumerate() {
                want_grad[t] = (per_token[i].1 / 4.0) as f32;
            }
            assert_all_close(&format!("{what} grad"), &grad, &want_grad, TOL, 1e-5);
            assert_close(
                &format!("{what} pg_clipfrac"),
                out.metrics.pg_clipfrac[0],
                *clipfrac,
                TOL,
                0.0,
            );
            assert_close(
                &format!("{what} pg_clipfrac_lower"),
                out.metrics.pg_clipfrac_lower[0],
                0.0,
                0.0,
                0.0,
            );
        }
    }
}

on_every_backend! {
    /// TRL's `delta` below `1 + epsilon_high`: `max(-A min(r, delta), -A clip(r))` keeps the clipped
    /// term's gradient for a negative advantage with `delta < r < 1 + eh` (TRL 1.16's torch.min).
    fn delta_below_the_clip_range_by_hand(be) {
        let b = with_ratios(vec![-1.0; 4], &[1.15, 1.05, 1.15, 1.3], vec![-0.5, 1.0, -0.5], vec![0, 2, 3, 4]);
        let r: Vec<f64> = (0..4).map(|t| actual_ratio(&b, t)).collect();
        let inputs = branch_inputs(&b, &[1.0]);
        // t0 (A = -0.5, r = 1.15): l1 = 0.55 < l2 = 0.5 r, the clipped term with its gradient;
        // t1 (A = -0.5, r = 1.05): l1 = l2 = 0.5 r; t2 (A = 1, r = 1.15 > delta): l1 = -1.1, no
        // gradient; t3 (A = -0.5, r = 1.3): l2 = 0.6 clipped, no gradient
        let per_token = [
            (0.5 * r[0], 0.5 * r[0]),
            (0.5 * r[1], 0.5 * r[1]),
            (-1.1, 0.0),
            (0.6, 0.0),
        ];
        let cfg = GrpoConfig::default()
            .with_delta(Some(1.1))
            .with_dual_clip(None);
        let mut grad = vec![f32::NAN; 4];
        let out = be.grpo_loss(&inputs, &cfg, &mut grad).unwrap();
        let want_loss = per_token.iter().map(|x| x.0).sum::<f64>() / 4.0;
        assert_close("delta loss", out.loss, want_loss, TOL, 1e-5);
        let want_grad: Vec<f32> = per_token.iter().map(|x| (x.1 / 4.0) as f32).collect();
        assert_all_close("delta grad", &grad, &want_grad, TOL, 1e-5);
        assert_close("delta pg_clipfrac", out.metrics.pg_clipfrac[0], 0.25, TOL, 0.0);
    }
}

on_every_backend! {
    /// verl's GPG, DRO, DPPO-TV and DPPO-KL on the branch batch, per token from the formulas of
    /// verl's `compute_policy_loss_gpg` / `_dro` / `_dppo_tv` / `_dppo_kl` (token-mean over the 4
    /// unmasked tokens; DPPO truncates the ratio at the dual-clip constant 3).
    fn verl_policy_losses_by_hand(be) {
        let b = branches();
        let toks = [0usize, 1, 2, 4];
        let adv = [1.0f64, 1.0, -0.5, -0.5];
        let lp: Vec<f64> = toks.iter().map(|&t| b.logp[t] as f64).collect();
        let old: Vec<f64> = toks.iter().map(|&t| b.old[t] as f64).collect();
        let r: Vec<f64> = toks.iter().map(|&t| actual_ratio(&b, t)).collect();
        let gpg: Vec<(f64, f64)> = (0..4).map(|i| (-adv[i] * lp[i], -adv[i])).collect();
        let beta = 0.1;
        let dro: Vec<(f64, f64)> = (0..4)
            .map(|i| {
                let d = lp[i] - old[i];
                (-(adv[i] * lp[i] - 0.5 * beta * d * d), -(adv[i] - beta * d))
            })
            .collect();
        // DPPO: -A sg(min(r, 3)) logp on the valid tokens
        let dppo = |valid: [bool; 4]| -> Vec<(f64, f64)> {
            (0..4)
                .map(|i| {
                    let tr = r[i].min(3.0);
                    if valid[i] {
                        (-adv[i] * tr * lp[i], -adv[i] * tr)
                    } else {
                        (0.0, 0.0)
                    }
                })
                .collect()
        };
        let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
        let po: Vec<f64> = old.iter().map(|x| x.exp()).collect();
        // TV, thresholds 0.2: t2 (A < 0) has p - po = 0.303 - 0.607 < -0.2, the others are inside
        let tv_valid: [bool; 4] = std::array::from_fn(|i| {
            if adv[i] > 0.0 { p[i] - po[i] <= 0.2 } else { p[i] - po[i] >= -0.2 }
        });
        assert_eq!(tv_valid, [true, true, false, true]);
        // binary KL with clip_low 0.1: t2's is 0.196 > 0.1 while p < po; t4 has p > po
        let bkl = |i: usize| {
            po[i] * (old[i] - lp[i]) + (1.0 - po[i]) * ((1.0 - po[i] + 1e-8) / (1.0 - p[i] + 1e-8)).ln()
        };
        let kl_valid: [bool; 4] = std::array::from_fn(|i| {
            if adv[i] > 0.0 { bkl(i) <= 0.2 || p[i] <= po[i] } else { bkl(i) <= 0.1 || p[i] >= po[i] }
        });
        assert_eq!(kl_valid, [true, true, false, true]);
        // (config, per token (loss, grad), pg_clipfrac, pg_clipfrac_lower)
        let cases = [
            (GrpoConfig::default().with_policy_loss(PolicyLoss::Gpg), gpg, 0.0, 0.0),
            (GrpoConfig::default().with_policy_loss(PolicyLoss::Dro { beta: 0.1 }), dro, 0.0, 0.0),
            (GrpoConfig::default().with_policy_loss(PolicyLoss::DppoTv), dppo(tv_valid), 0.25, 0.25),
            (
                GrpoConfig::default().with_policy_loss(PolicyLoss::DppoKl).with_clip_low(0.1),
                dppo(kl_valid),
                0.25,
                0.25,
            ),
        ];
        for (cfg, per_token, clipfrac, lower) in &cases {
            let what = format!("{} {:?}", be.name(), cfg.policy_loss);
            let mut grad = vec![f32::NAN; 5];
            let out = be.grpo_loss(&branch_inputs(&b, &[1.0]), cfg, &mut grad).unwrap();
            let want_loss = per_token.iter().map(|x| x.0).sum::<f64>() / 4.0;
            assert_close(&format!("{what} loss"), out.loss, want_loss, TOL, 1e-5);
            let mut want_grad = [0f32; 5];
            for (i, &t) in toks.iter().enumerate() {
                want_grad[t] = (per_token[i].1 / 4.0) as f32;
            }
            assert_all_close(&format!("{what} grad"), &grad, &want_grad, TOL, 1e-5);
            assert_close(&format!("{what} pg_clipfrac"), out.metrics.pg_clipfrac[0], *clipfrac, TOL, 0.0);
            assert_close(&format!("{what} pg_clipfrac_lower"), out.metrics.pg_clipfrac_lower[0], *lower, TOL, 0.0);
        }
        // DRO needs a positive beta; a bare "dro" names what is missing
        let bad = GrpoConfig::default().with_policy_loss(PolicyLoss::Dro { beta: 0.0 });
        let err = be.grpo_loss(&branch_inputs(&b, &[1.0]), &bad, &mut [0f32; 5]).unwrap_err();
        assert!(err.to_string().contains("beta"), "{err}");
        let err = "dro".parse::<PolicyLoss>().unwrap_err();
        assert!(err.to_string().contains("beta"), "{err}");
    }
}

on_every_backend! {
    /// GSPO (verl `compute_policy_loss_gspo`) on the branch batch with the paper's clip range: sequence
    /// ratios s_0 = sqrt(1.1 * 1.5), s_1 = sqrt(0.5 * 4) (the masked NaN token is not read);
    /// seq-mean-token-mean over 2 sequences of 2 tokens.
    fn gspo_by_hand(be) {
        let b = branches();
        let (s0, s1) = ((1.1f64 * 1.5).sqrt(), 2.0f64.sqrt());
        let cfg = GrpoConfig::gspo();
        // seq 0, A = +1: -A s0 < -A (1 + 4e-4): clipped, no gradient; seq 1, A = -0.5: -A s1 = 0.707 >
        // -A (1 + 4e-4) = 0.5002: unclipped, dl/dlogp_t = -A s1 at each of its tokens
        let l0 = -(1.0 + 4e-4);
        let l1 = 0.5 * s1;
        let want_loss = (l0 + l1) / 2.0;
        let g = (0.5 * s1 / 4.0) as f32;
        let what = be.name();
        let mut grad = vec![f32::NAN; 5];
        let out = be
            .grpo_loss(&branch_inputs(&b, &[1.0]), &cfg, &mut grad)
            .unwrap();
        assert_close(&format!("{what} loss"), out.loss, want_loss, TOL, 1e-5);
        assert_all_close(
            &format!("{what} grad"),
            &grad,
            &[0.0, 0.0, g, 0.0, g],
            TOL,
            1e-5,
        );
        let m = &out.metrics;
        assert_close(
            &format!("{what} pg_clipfrac"),
            m.pg_clipfrac[0],
            0.5,
            TOL,
            0.0,
        );
        assert_close(
            &format!("{what} pg_clipfrac_lower"),
            m.pg_clipfrac_lower[0],
            0.0,
            0.0,
            0.0,
        );
        assert_close(
            &format!("{what} ratio_mean"),
            m.ratio_mean,
            (s0 + s1) / 2.0,
            TOL,
            1e-5,
        );
        // ppo_kl stays the token-level -mean(logp - old)
        let token_lr: f64 = [0usize, 1, 2, 4]
            .iter()
            .map(|&t| actual_ratio(&b, t).ln())
            .sum();
        assert_close(
            &format!("{what} ppo_kl"),
            m.ppo_kl,
            -token_lr / 4.0,
            TOL,
            1e-5,
        );
    }
}

on_every_backend! {
    /// GMPO (verl `compute_policy_loss_geo_mean`) on the branch batch with the paper's clip range
    /// 0.4: sequence 0 (A = +1) has log-ratios ln 1.1, ln 1.5 and clips the second above (0.405 >
    /// 0.4): M0 = (ln 1.1 + 0.4) / 2; sequence 1 (A = -0.5) has ln 0.5, ln 4 and clips the first
    /// below: M1 = (-0.4 + ln 4) / 2. The loss is the mean of -A exp(M) over the 2 sequences, the
    /// gradient -A exp(M) / (2 * 2) at the unclipped tokens, and central differences agree.
    fn geo_mean_by_hand(be) {
        let b = branches();
        let cfg = GrpoConfig::geo_mean();
        let m0 = (1.1f64.ln() + 0.4) / 2.0;
        let m1 = (-0.4 + 4.0f64.ln()) / 2.0;
        let (r0, r1) = (m0.exp(), m1.exp());
        let want_loss = (-r0 + 0.5 * r1) / 2.0;
        let what = be.name();
        let mut grad = vec![f32::NAN; 5];
        let out = be
            .grpo_loss(&branch_inputs(&b, &[1.0]), &cfg, &mut grad)
            .unwrap();
        assert_close(&format!("{what} loss"), out.loss, want_loss, TOL, 1e-5);
        let g = [(-r0 / 4.0) as f32, 0.0, 0.0, 0.0, (0.5 * r1 / 4.0) as f32];
        assert_all_close(&format!("{what} grad"), &grad, &g, TOL, 1e-5);
        // verl's clip fractions: log-ratios outside [-0.4, 0.4], with A > 0 (token 1) and with
        // A < 0 (tokens 2 and 4; token 4 lies above 0.4 though A < 0 clips only below)
        let m = &out.metrics;
        assert_close(&format!("{what} pg_clipfrac"), m.pg_clipfrac[0], 0.25, TOL, 0.0);
        assert_close(
            &format!("{what} pg_clipfrac_lower"),
            m.pg_clipfrac_lower[0],
            0.5,
            TOL,
            0.0,
        );
        // central differences of the loss at the two unclipped tokens
        let h = 1e-3f32;
        for t in [0usize, 4] {
            let eval = |x: f32| {
                let mut bb = b.clone();
                bb.logp[t] = x;
                be.grpo_loss(&branch_inputs(&bb, &[1.0]), &cfg, &mut [0f32; 5])
                    .unwrap()
                    .loss
            };
            let (xp, xm) = (b.logp[t] + h, b.logp[t] - h);
            let fd = (eval(xp) - eval(xm)) / (xp as f64 - xm as f64);
            assert_close(&format!("{what} fd token {t}"), grad[t] as f64, fd, 1e-4, 2e-3);
        }
        assert_eq!("geo_mean".parse::<PolicyLoss>().unwrap(), PolicyLoss::GeoMean);
    }
}

on_every_backend! {
    /// Rollout importance-sampling correction on the branch batch (verl's TIS / MIS): the inference
    /// engine's log-probs give IS ratios w = [1, 3, 0.25, -, 1.5] at the unmasked tokens; the policy
    /// loss of each token is multiplied by its weight (clipped surrogate with dual-clip, as in
    /// every_clip_branch_by_hand: per-token losses -r0, -1.2, 0.4, 1.5, only t0 with a gradient -r0).
    fn rollout_correction_by_hand(be) {
        let b = branches();
        let w = [1.0f64, 3.0, 0.25, 1.0, 1.5];
        let rollout: Vec<f32> = (0..5)
            .map(|t| (b.old[t] as f64 - w[t].ln()) as f32)
            .collect();
        let r0 = actual_ratio(&b, 0);
        let base = [-r0, -1.2, 0.4, 1.5];
        let (s0, s1) = (1.0f64 * 3.0, 0.25f64 * 1.5); // sequence level: products over the unmasked tokens
        let (g0, g1) = (s0.sqrt(), s1.sqrt()); // geometric means
        let rc = |level, mode| RolloutCorrection {
            level,
            mode,
            upper: 2.0,
            lower: None,
        };
        // (correction, IS ratio per token, weight per token)
        type Case = (RolloutCorrection, [f64; 4], [f64; 4]);
        let tok_ratio = [1.0, 3.0, 0.25, 1.5];
        let cases: Vec<Case> = vec![
            (
                rc(IsLevel::Token, IsMode::Truncate),
                tok_ratio,
                [1.0, 2.0, 0.25, 1.5],
            ),
            (
                rc(IsLevel::Token, IsMode::Mask),
                tok_ratio,
                [1.0, 0.0, 0.0, 1.5],
            ),
            (rc(IsLevel::Token, IsMode::MetricsOnly), tok_ratio, [1.0; 4]),
            (
                rc(IsLevel::Sequence, IsMode::Truncate),
                [s0, s0, s1, s1],
                [2.0, 2.0, s1, s1],
            ),
            (
                rc(IsLevel::Sequence, IsMode::Mask),
                [s0, s0, s1, s1],
                [0.0, 0.0, 0.0, 0.0],
            ),
            (
                rc(IsLevel::Geometric, IsMode::Mask),
                [g0, g0, g1, g1],
                [g0, g0, g1, g1],
            ),
        ];
        for (corr, ratio, weight) in &cases {
            let what = format!("{} {:?} {:?}", be.name(), corr.level, corr.mode);
            let cfg = GrpoConfig::default().with_rollout_correction(Some(*corr));
            let mut inputs = branch_inputs(&b, &[1.0]);
            inputs.rollout_logp = Some(&rollout);
            let mut grad = vec![f32::NAN; 5];
            let out = be.grpo_loss(&inputs, &cfg, &mut grad).unwrap();
            let want: f64 = (0..4).map(|i| base[i] * weight[i]).sum::<f64>() / 4.0;
            assert_close(&format!("{what} loss"), out.loss, want, TOL, 1e-5);
            let g = (-r0 * weight[0] / 4.0) as f32;
            assert_all_close(
                &format!("{what} grad"),
                &grad,
                &[g, 0.0, 0.0, 0.0, 0.0],
                TOL,
                1e-5,
            );
            let m = &out.metrics;
            let mean = ratio.iter().sum::<f64>() / 4.0;
            let lo = ratio.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = ratio.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let corrected = (0..4)
                .filter(|&i| match corr.mode {
                    IsMode::Truncate => ratio[i] > 2.0,
                    IsMode::Mask => !(0.5..=2.0).contains(&ratio[i]),
                    IsMode::MetricsOnly => false,
                })
                .count() as f64
                / 4.0;
            assert_close(
                &format!("{what} is mean"),
                m.rollout_is_mean,
                mean,
                TOL,
                1e-5,
            );
            assert_close(&format!("{what} is min"), m.rollout_is_min, lo, TOL, 1e-5);
            assert_close(&format!("{what} is max"), m.rollout_is_max, hi, TOL, 1e-5);
            assert_close(
                &format!("{what} corrected"),
                m.rollout_is_corrected_fraction,
                corrected,
                TOL,
                0.0,
            );
        }
        // a NaN rollout log-prob at an unmasked token is a counted non-finite input at every level
        let mut bad = rollout.clone();
        bad[1] = f32::NAN;
        for level in [IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric] {
            let cfg = GrpoConfig::default().with_rollout_correction(Some(rc(level, IsMode::Truncate)));
            let mut inputs = branch_inputs(&b, &[1.0]);
            inputs.rollout_logp = Some(&bad);
            let err = Backend::Cpu
                .grpo_loss(&inputs, &cfg, &mut [0f32; 5])
                .unwrap_err();
            assert!(
                matches!(err, recap_kernels::Error::NonFinite { .. }),
                "{level:?}: {err}"
            );
        }
        // the correction without rollout log-probs is an error naming them
        let cfg = GrpoConfig::default().with_rollout_correction(Some(RolloutCorrection::default()));
        let err = Backend::Cpu
            .grpo_loss(&branch_inputs(&b, &[1.0]), &cfg, &mut [0f32; 5])
            .unwrap_err();
        assert!(err.to_string().contains("rollout_logp"), "{err}");
    }
}

on_every_backend! {
    /// Per-token policy weights (e.g. TRL's entropy mask) multiply the policy terms only.
    fn policy_weight_by_hand(be) {
        let b = branches();
        let weights = [0.5f32, 0.0, 2.0, 7.0, 1.0];
        let r0 = actual_ratio(&b, 0);
        let base = [-r0, -1.2, 0.4, 1.5];
        let want = (base[0] * 0.5 + base[2] * 2.0 + base[3]) / 4.0;
        let mut inputs = branch_inputs(&b, &[1.0]);
        inputs.policy_weight = Some(&weights);
        let mut grad = vec![f32::NAN; 5];
        let out = be
            .grpo_loss(&inputs, &GrpoConfig::default(), &mut grad)
            .unwrap();
        let what = be.name();
        assert_close(&format!("{what} loss"), out.loss, want, TOL, 1e-5);
        assert_all_close(
            &format!("{what} grad"),
            &grad,
            &[(-r0 * 0.5 / 4.0) as f32, 0.0, 0.0, 0.0, 0.0],
            TOL,
            1e-5,
        );
        assert_close(
            &format!("{what} tokens"),
            out.metrics.num_tokens,
            4.0,
            0.0,
            0.0,
        );
    }
}

on_every_backend! {
    /// TRL's `use_bias_correction_kl`: the KL term is `kl * r` at policy tokens, gradient through both.
    fn kl_is_correction_by_hand(be) {
        let b = branches();
        let reference: Vec<f32> = b.logp.iter().map(|x| x - 0.3).collect();
        let cfg = GrpoConfig::default().with_kl_coef(0.5).with_kl_is_correction(true).with_kl_estimator(KlEstimator::K3);
        let plain = cfg.clone().with_kl_is_correction(false);
        // k3 at diff = logp - ref = 0.3: x = -0.3, kl = e^x - x - 1, dkl/dlogp = 1 - e^x
        let x = -0.3f64;
        let (kl, dkl) = (x.exp() - x - 1.0, 1.0 - x.exp());
        let mut inputs = branch_inputs(&b, &[1.0]);
        inputs.ref_logp = Some(&reference);
        let (mut g1, mut g0) = (vec![0f32; 5], vec![0f32; 5]);
        let with = be.grpo_loss(&inputs, &cfg, &mut g1).unwrap();
        let without = be.grpo_loss(&inputs, &plain, &mut g0).unwrap();
        let r: Vec<f64> = [0usize, 1, 2, 4]
            .iter()
            .map(|&t| actual_ratio(&b, t))
            .collect();
        let what = be.name();
        assert_close(
            &format!("{what} kl term"),
            with.loss - without.loss,
            0.5 * kl * (r.iter().sum::<f64>() - 4.0) / 4.0,
            TOL,
            1e-5,
        );
        assert_close(
            &format!("{what} kl_mean"),
            with.metrics.kl_mean,
            kl * r.iter().sum::<f64>() / 4.0,
            TOL,
            1e-5,
        );
        for (i, t) in [0usize, 1, 2, 4].into_iter().enumerate() {
            let extra = 0.5 * (dkl * r[i] + kl * r[i] - dkl) / 4.0;
            assert_close(
                &format!("{what} grad[{t}]"),
                (g1[t] - g0[t]) as f64,
                extra,
                1e-6,
                1e-4,
            );
        }
    }
}

on_every_backend! {
    /// Bad variant options are errors naming the field.
    fn policy_loss_options_are_validated(be) {
        let b = branches();
        let bad = [
            (
                GrpoConfig::default().with_delta(Some(0.9)),
                "config.delta",
            ),
            (
                GrpoConfig::default().with_delta(Some(2.0)).with_policy_loss(PolicyLoss::Cispo),
                "config.delta",
            ),
            (
                GrpoConfig::default().with_policy_loss(PolicyLoss::Sapo {
                        tau_pos: 0.0,
                        tau_neg: 1.0,
                    }),
                "config.policy_loss",
            ),
        ];
        for (cfg, arg) in &bad {
            let mut grad = vec![0f32; 5];
            let err = be
                .grpo_loss(&branch_inputs(&b, &[1.0]), cfg, &mut grad)
                .unwrap_err();
            assert!(err.to_string().contains(arg), "{}: {err}", be.name());
        }
    }
}

on_every_backend! {
    fn dual_clip_off_and_lambda_scale(be) {
        let b = branches();
        let cfg = GrpoConfig::default().with_dual_clip(None);
        let mut grad = vec![0f32; 5];
        let out = be
            .grpo_loss(&branch_inputs(&b, &[2.0]), &cfg, &mut grad)
            .unwrap();
        // without dual-clip, t4 keeps l1 = -A r = 0.5 * 4 = 2 and its gradient -A r = 2
        let r0 = actual_ratio(&b, 0);
        let r4 = actual_ratio(&b, 4);
        let agg = (-r0 - 1.2 + 0.4 + 0.5 * r4) / 4.0;
        assert_close("objective_loss", out.objective_loss[0], agg, TOL, 1e-5);
        assert_close("loss = lambda * agg", out.loss, 2.0 * agg, TOL, 1e-5);
        assert_all_close(
            "grad",
            &grad,
            &[
                (2.0 * -r0 / 4.0) as f32,
                0.0,
                0.0,
                0.0,
                (2.0 * 0.5 * r4 / 4.0) as f32,
            ],
            TOL,
            1e-5,
        );
        assert_eq!(out.metrics.pg_clipfrac_lower[0], 0.0);
    }
}

on_every_backend! {
    fn log_ratio_clamp_saturates_gradient(be) {
        // d = +25 -> clamped to 20; A = -1e-9 keeps the loss finite, A<0 and r = e^20 > 3 -> dual
        // clip; A = +1: r = e^20 clipped high. d = -25: r = e^-20, A = +1 -> unclipped but saturated.
        let logp = [0.0f32, 0.0, -25.0];
        let old = [-25.0f32, -25.0, 0.0];
        let adv = [-1e-9f32, 1.0, 1.0];
        let inputs = HostGrpoInputs {
            logp: &logp,
            old_logp: &old,
            ref_logp: None,
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerToken(&adv),
            mask: Mask::U8(&[1, 1, 1]),
            cu_seqlens: &[0, 3],
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        let mut grad = vec![1f32; 3];
        let out = be
            .grpo_loss(&inputs, &GrpoConfig::default(), &mut grad)
            .unwrap();
        assert_eq!(
            grad,
            vec![0.0, 0.0, 0.0],
            "{}: clamped or clipped tokens have zero gradient",
            be.name()
        );
        let e20 = 20f64.exp();
        let e_20 = (-20f64).exp();
        let want = (3.0 * 1e-9 - 1.2 - e_20) / 3.0;
        assert_close("loss", out.loss, want, TOL, 1e-5);
        assert_close("ratio_max", out.metrics.ratio_max, e20, 0.0, 1e-5);
        assert_close(
            "ppo_kl",
            out.metrics.ppo_kl,
            -(20.0 + 20.0 - 20.0) / 3.0,
            TOL,
            1e-5,
        );
    }
}

on_every_backend! {
    fn kl_estimators_by_hand(be) {
        // diff = logp - ref = 0.5 and -30 (k3 clamps: x = 30 -> 20, value clamps at 10)
        let logp = [0.0f32, -30.0, 1.0];
        let refp = [-0.5f32, 0.0, 1.0];
        let e = (-0.5f64).exp();
        let e30 = 30f64.exp();
        let cases: [(KlEstimator, [f64; 3], [f64; 3]); 7] = [
            (KlEstimator::K1, [0.5, -30.0, 0.0], [1.0, 1.0, 1.0]),
            (KlEstimator::Abs, [0.5, 30.0, 0.0], [1.0, -1.0, 0.0]),
            (KlEstimator::K2, [0.125, 450.0, 0.0], [0.5, -30.0, 0.0]),
            (
                KlEstimator::K3,
                [e + 0.5 - 1.0, 10.0, 0.0],
                [1.0 - e, 0.0, 0.0],
            ),
            (KlEstimator::K1Plus, [0.5, -30.0, 0.0], [0.5, -30.0, 0.0]),
            (
                KlEstimator::K3Plus,
                [e + 0.5 - 1.0, 10.0, 0.0],
                [0.5, -30.0, 0.0],
            ),
            // TRL's k3: no clamp of x = 30 or of the value
            (
                KlEstimator::K3Unclamped,
                [e + 0.5 - 1.0, e30 - 31.0, 0.0],
                [1.0 - e, 1.0 - e30, 0.0],
            ),
        ];
        for (est, want_v, want_g) in cases {
            let mut v = vec![f32::NAN; 3];
            let mut g = vec![f32::NAN; 3];
            be.kl(&logp, &refp, None, est, &mut v, &mut g).unwrap();
            let f = |x: [f64; 3]| x.map(|y| y as f32).to_vec();
            assert_all_close(
                &format!("{} {est} value", be.name()),
                &v,
                &f(want_v),
                TOL,
                1e-5,
            );
            assert_all_close(
                &format!("{} {est} grad", be.name()),
                &g,
                &f(want_g),
                TOL,
                1e-5,
            );
        }
        // masked tokens give 0 even with NaN inputs
        let mut v = vec![1f32; 2];
        let mut g = vec![1f32; 2];
        be.kl(
            &[f32::NAN, 0.5],
            &[0.0, 0.0],
            Some(Mask::U8(&[0, 1])),
            KlEstimator::K2,
            &mut v,
            &mut g,
        )
        .unwrap();
        assert_eq!(v, vec![0.0, 0.125]);
        assert_eq!(g, vec![0.0, 0.5]);
    }
}

on_every_backend! {
    /// Losses [T, 2]: seq0 [1,2,3], seq1 [4], seq2 empty, seq3 [5,6] fully masked; objective 1 is 10x
    /// objective 0 and only seq1..seq3 are its members.
    fn every_aggregation_mode_by_hand(be) {
        let l0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let losses: Vec<f32> = l0.iter().flat_map(|x| [*x, 10.0 * x]).collect();
        let mask = [1.0f32, 1.0, 1.0, 1.0, 0.0, 0.0];
        let cu = [0, 3, 4, 4, 6];
        let membership = [0b01u32, 0b11, 0b11, 0b11];
        let lambda = [1.0f32, 3.0];
        // (mode, C, agg0, agg1, grad of token 0 for objective 0, grad of token 3 for objective 1)
        let cases = [
            (
                AggMode::TokenMean,
                None,
                10.0 / 4.0,
                40.0,
                0.25 / 2.0,
                3.0 / 2.0,
            ),
            (
                AggMode::SeqMeanTokenMean,
                None,
                3.0,
                40.0,
                1.0 / 6.0 / 2.0,
                3.0 / 2.0,
            ),
            (
                AggMode::SeqMeanTokenSum,
                None,
                5.0,
                40.0,
                0.5 / 2.0,
                3.0 / 2.0,
            ),
            (
                AggMode::TokenSumNorm,
                Some(4.0f32),
                2.5,
                10.0,
                0.25 / 2.0,
                3.0 * 0.25 / 2.0,
            ),
        ];
        for (mode, c, a0, a1, g0, g3) in cases {
            let cfg = GrpoConfig::default().with_agg_mode(mode).with_norm_constant(c);
            let inputs = HostReduceInputs {
                losses: &losses,
                mask: Mask::F32(&mask),
                cu_seqlens: &cu,
                lambda: &lambda,
                membership: Some(&membership),
                normalizers: None,
            };
            let mut grad = vec![f32::NAN; 12];
            let out = be.weighted_reduce(&inputs, &cfg, &mut grad).unwrap();
            let what = format!("{} {mode}", be.name());
            assert_close(
                &format!("{what} agg0"),
                out.objective_loss[0],
                a0,
                TOL,
                1e-6,
            );
            assert_close(
                &format!("{what} agg1"),
                out.objective_loss[1],
                a1,
                TOL,
                1e-6,
            );
            assert_close(
                &format!("{what} total"),
                out.total,
                (a0 + 3.0 * a1) / 2.0,
                TOL,
                1e-6,
            );
            assert_close(&format!("{what} grad[0,0]"), grad[0] as f64, g0, TOL, 1e-6);
            assert_close(&format!("{what} grad[3,1]"), grad[7] as f64, g3, TOL, 1e-6);
            assert_eq!(grad[1], 0.0, "non-member token has no gradient");
            assert_eq!(&grad[8..], &[0.0; 4], "masked tokens have no gradient");
            assert_eq!(out.objective_seqs, vec![2, 1]);
            assert_eq!(out.objective_tokens, vec![4.0, 1.0]);
        }
    }
}

on_every_backend! {
    /// RL rollouts and replay sequences in one batch: objective 0 policy (seq 0), objective 1 nll (seq 1).
    fn policy_and_replay_objectives_share_a_batch(be) {
        let logp = [-0.5f32, -0.7, -1.0, -2.0, -3.0];
        let old = [-0.5f32, -0.7, f32::NAN, f32::NAN, f32::NAN]; // old_logp is never read for replay
        let adv = [2.0f32, f32::NAN, f32::NAN, f32::NAN]; // [B, K]: only (seq 0, obj 0) is read
        let inputs = HostGrpoInputs {
            logp: &logp,
            old_logp: &old,
            ref_logp: None,
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::F32(&[1.0, 1.0, 1.0, 0.0, 1.0]),
            cu_seqlens: &[0, 2, 5],
            lambda: &[1.0, 0.5],
            objectives: &[ObjectiveKind::Policy, ObjectiveKind::Nll],
            membership: Some(&[0b01, 0b10]),
            normalizers: None,
        };
        let mut grad = vec![f32::NAN; 5];
        let out = be
            .grpo_loss(&inputs, &GrpoConfig::default(), &mut grad)
            .unwrap();
        assert_close("policy agg", out.objective_loss[0], -2.0, TOL, 1e-6);
        assert_close(
            "nll agg",
            out.objective_loss[1],
            (1.0 + 3.0) / 2.0,
            TOL,
            1e-6,
        );
        assert_close("loss", out.loss, (-2.0 + 0.5 * 2.0) / 2.0, TOL, 1e-6);
        assert_all_close(
            &format!("{} grad", be.name()),
            &grad,
            &[-0.5, -0.5, -0.125, 0.0, -0.125],
            TOL,
            1e-6,
        );
        assert_eq!(out.metrics.objective_tokens, vec![2.0, 2.0]);
        assert_eq!(out.metrics.objective_seqs, vec![1, 1]);
        assert_close("policy_tokens", out.metrics.policy_tokens, 2.0, 0.0, 0.0);
        assert_close(
            "ratio_mean over policy tokens only",
            out.metrics.ratio_mean,
            1.0,
            TOL,
            0.0,
        );
    }
}

on_every_backend! {
    fn empty_and_fully_masked_batches_are_defined(be) {
        let cfg = GrpoConfig::default();
        // T = 0, B = 0
        let empty = HostGrpoInputs {
            logp: &[],
            old_logp: &[],
            ref_logp: Some(&[]),
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerSequence(&[]),
            mask: Mask::F32(&[]),
            cu_seqlens: &[0],
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        let out = be.grpo_loss(&empty, &cfg, &mut []).unwrap();
        assert_eq!(
            (out.loss, out.metrics.num_seqs, out.metrics.ratio_min),
            (0.0, 0, 0.0)
        );
        // every token masked, with garbage inputs
        let nan = [f32::NAN; 3];
        let all_masked = HostGrpoInputs {
            logp: &nan,
            old_logp: &nan,
            ref_logp: Some(&nan),
            advantages: Advantages::PerToken(&nan),
            mask: Mask::U8(&[0, 0, 0]),
            cu_seqlens: &[0, 0, 3, 3],
            ..empty
        };
        let mut grad = vec![f32::NAN; 3];
        let out = be.grpo_loss(&all_masked, &cfg, &mut grad).unwrap();
        assert_eq!(out.loss, 0.0);
        assert_eq!(grad, vec![0.0; 3]);
        assert_eq!(out.metrics.num_tokens, 0.0);
        assert_eq!(out.metrics.nonfinite, 0);
    }
}

on_every_backend! {
    fn nonfinite_unmasked_input_is_an_error_unless_allowed(be) {
        let logp = [-1.0f32, f32::NAN, -1.0];
        let inputs = HostGrpoInputs {
            logp: &logp,
            old_logp: &[-1.0, -1.0, f32::NAN],
            ref_logp: None,
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerSequence(&[1.0]),
            mask: Mask::F32(&[1.0, 1.0, 0.0]),
            cu_seqlens: &[0, 3],
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        let mut grad = vec![0f32; 3];
        match be.grpo_loss(&inputs, &GrpoConfig::default(), &mut grad) {
            Err(Error::NonFinite { count, .. }) => assert_eq!(count, 1),
            other => panic!("{}: expected NonFinite, got {other:?}", be.name()),
        }
        let cfg = GrpoConfig::default().with_allow_nonfinite(true);
        let out = be.grpo_loss(&inputs, &cfg, &mut grad).unwrap();
        assert_eq!(out.metrics.nonfinite, 1);
        assert!(
            !out.loss.is_finite(),
            "the non-finite input is reported, not hidden"
        );
    }
}

/// Micro-batches normalized by the whole batch's counts have gradients that concatenate to the
/// whole batch's gradient, and losses that sum to its loss.
#[test]
fn micro_batches_with_global_normalizers_match_the_whole_batch() {
    let lens = [5usize, 0, 17, 1, 9, 12, 3, 8];
    for seed in 0..8u64 {
        let whole = Batch::random(seed, &lens, 3);
        for mode in AggMode::ALL {
            let cfg = common::config_for(seed, mode);
            let k = 3;
            let mut g_whole = vec![0f32; whole.t()];
            let out_whole = cpu::grpo_loss(&whole.inputs(None), &cfg, &mut g_whole).unwrap();
            let split = 3; // sequences [0, 3) and [3, 8)
            let parts = [(0usize, split), (split, lens.len())];
            let mut global = recap_kernels::Normalizers::default();
            let subs: Vec<Batch> = parts
                .iter()
                .map(|&(a, b)| common::sub_batch(&whole, a, b, k))
                .collect();
            for s in &subs {
                let n = recap_kernels::count_normalizers(
                    s.inputs(None).mask,
                    &s.cu,
                    s.membership.as_deref(),
                    k,
                )
                .unwrap();
                global.add(&n).unwrap();
            }
            let mut loss = 0.0;
            let mut g_cat = Vec::new();
            for s in &subs {
                let mut g = vec![0f32; s.t()];
                loss += cpu::grpo_loss(&s.inputs(Some(&global)), &cfg, &mut g)
                    .unwrap()
                    .loss;
                g_cat.extend(g);
            }
            assert_close(
                &format!("seed {seed} {mode} loss"),
                loss,
                out_whole.loss,
                1e-9,
                1e-9,
            );
            assert_all_close(
                &format!("seed {seed} {mode} grad"),
                &g_cat,
                &g_whole,
                1e-9,
                1e-6,
            );
        }
    }
}

/// Central differences of the f64 reference loss against its analytic gradient, for every mode,
/// KL estimator (with beta > 0) and both objective kinds. Tokens near a kink are skipped.
#[test]
fn reference_gradient_matches_finite_differences() {
    for seed in 0..12u64 {
        let mut b = Batch::random(seed, &[7, 3, 0, 11, 6], 2);
        b.with_ref = true;
        for mode in AggMode::ALL {
            let mut cfg = common::config_for(seed, mode);
            cfg.kl_coef = 0.3;
            if cfg.policy_loss == PolicyLoss::Cispo
                || (matches!(cfg.policy_loss, PolicyLoss::Gspo | PolicyLoss::GeoMean)
                    && b.adv_per_token)
            {
                // stop-gradient losses: the gradient is not the derivative of the value (CISPO;
                // GSPO-token with per-token advantages); policy_loss_variants_by_hand checks them.
                // GSPO (GMPO) with per-sequence advantages is sequence-level GSPO (GMPO): checked here.
                continue;
            }
            let seq_of = |t: usize| b.cu.iter().rposition(|&c| c as usize <= t).unwrap();
            let seq_ratio = |t: usize, x: f32| {
                let s = seq_of(t);
                let (mut d, mut n) = (0.0, 0.0);
                for u in b.cu[s] as usize..b.cu[s + 1] as usize {
                    let lp = if u == t { x } else { b.logp[u] };
                    let m = if b.use_u8 {
                        b.mask_u8[u] as f64
                    } else {
                        b.mask_f32[u] as f64
                    };
                    if m != 0.0 {
                        d += m * (lp - b.old_logp[u]) as f64;
                        n += m;
                    }
                }
                (d / n).exp()
            };
            let mut grad = vec![0f32; b.t()];
            cpu::grpo_loss(&b.inputs(None), &cfg, &mut grad).unwrap();
            // the straight-through estimators carry k2's gradient: differentiate the k2 loss
            let mut fd_cfg = cfg.clone();
            if matches!(cfg.kl_estimator, KlEstimator::K1Plus | KlEstimator::K3Plus) {
                fd_cfg.kl_estimator = KlEstimator::K2;
            }
            let h = 1e-3f32;
            let mut checked = 0;
            for t in 0..b.t() {
                let near_kink = |x: f32| {
                    let r = if cfg.policy_loss == PolicyLoss::Gspo {
                        seq_ratio(t, x)
                    } else {
                        ((x - b.old_logp[t]) as f64).exp()
                    };
                    let d = (x - b.ref_logp[t]) as f64;
                    [
                        1.0 - cfg.clip_low as f64,
                        1.0 + cfg.clip_high as f64,
                        cfg.dual_clip.unwrap_or(0.0) as f64,
                        cfg.delta.unwrap_or(0.0) as f64,
                    ]
                    .iter()
                    .any(|k| (r - k).abs() < 0.02)
                        // GMPO's sign-aware clip acts on the log-ratio
                        || (cfg.policy_loss == PolicyLoss::GeoMean
                            && (((x - b.old_logp[t]) as f64 - cfg.clip_high as f64).abs() < 0.02
                                || ((x - b.old_logp[t]) as f64 + cfg.clip_low as f64).abs() < 0.02))
                        || (x - b.old_logp[t]).abs() > 19.0
                        || d.abs() < 0.01
                };
                if near_kink(b.logp[t]) {
                    continue;
                }
                let eval = |x: f32| {
                    let mut bb = b.clone();
                    bb.logp[t] = x;
                    let mut g = vec![0f32; bb.t()];
                    cpu::grpo_loss(&bb.inputs(None), &fd_cfg, &mut g)
                        .unwrap()
                        .loss
                };
                let (xp, xm) = (b.logp[t] + h, b.logp[t] - h);
                let fd = (eval(xp) - eval(xm)) / (xp as f64 - xm as f64);
                assert!(
                    common::close(grad[t] as f64, fd, 2e-5, 2e-3),
                    "seed {seed} {mode} {} token {t}: analytic {} vs finite difference {fd}",
                    cfg.kl_estimator,
                    grad[t]
                );
                checked += 1;
            }
            assert!(
                checked * 2 > b.t(),
                "seed {seed} {mode}: only {checked} of {} tokens checked",
                b.t()
            );
        }
    }
}

/// The KL gradient of every estimator against central differences of its value (away from clamps).
#[test]
fn kl_gradient_matches_finite_differences() {
    let h = 1e-3f64;
    for est in [
        KlEstimator::K1,
        KlEstimator::Abs,
        KlEstimator::K2,
        KlEstimator::K3,
    ] {
        for &(lp, rf) in &[(-1.0f32, -1.7f32), (-2.0, -0.4), (0.0, -3.0), (-5.0, -4.5)] {
            let v = |x: f64| cpu::kl_token(x as f32, rf, est).value;
            let x = lp as f64;
            let fd = (v(x + h) - v(x - h)) / (2.0 * h);
            let g = cpu::kl_token(lp, rf, est).grad;
            assert_close(&format!("{est} at ({lp}, {rf})"), g, fd, 1e-5, 1e-3);
        }
    }
}

#[test]
fn backend_auto_never_panics() {
    let (b, why) = Backend::auto_with_reason();
    match b {
        Backend::Cpu => assert!(why.is_some(), "the CPU choice comes with a reason"),
        Backend::Cuda(_) => assert!(why.is_none()),
    }
    if !recap_kernels::cuda::driver_present() {
        let e = Backend::cuda(0).unwrap_err();
        assert!(matches!(e, Error::NoDevice(_) | Error::NoKernels), "{e}");
    }
}

/// Parts that cut a sequence in two, normalized by the whole batch's counts and per-sequence token
/// weights, have gradients that concatenate to the whole batch's and losses that sum to its loss,
/// in every aggregation mode.
#[test]
fn parts_splitting_a_sequence_match_the_whole_batch() {
    common::check_split_parts(
        &Backend::Cpu,
        &[5, 40, 9, 12],
        2,
        0..6,
        &[7, 20, 44],
        1e-9,
        1e-9,
    );
}
