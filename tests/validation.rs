//! Bad input gets an `Err` naming the argument, before any launch, on every backend.

mod common;

use recap_kernels::{
    Advantages, AggMode, Error, GrpoConfig, HostGrpoInputs, HostReduceInputs, KlEstimator, Mask,
    Normalizers, ObjectiveKind,
};

const LOGP: [f32; 4] = [-1.0, -1.0, -1.0, -1.0];
const MASK: [f32; 4] = [1.0; 4];
const ADV: [f32; 2] = [1.0, -1.0];

fn good() -> HostGrpoInputs<'static> {
    HostGrpoInputs {
        logp: &LOGP,
        old_logp: &LOGP,
        ref_logp: Some(&LOGP),
        rollout_logp: None,
        policy_weight: None,
        advantages: Advantages::PerSequence(&ADV),
        mask: Mask::F32(&MASK),
        cu_seqlens: &[0, 1, 4],
        lambda: &[1.0],
        objectives: &[ObjectiveKind::Policy],
        membership: None,
        normalizers: None,
    }
}

fn expect_arg(what: &str, r: recap_kernels::Result<impl std::fmt::Debug>, arg: &str) {
    match r {
        Err(Error::InvalidArgument { arg: a, message }) => {
            assert_eq!(a, arg, "{what}: wrong argument named ({message})");
            assert!(!message.is_empty());
        }
        other => panic!("{what}: expected InvalidArgument({arg}), got {other:?}"),
    }
}

on_every_backend! {
    fn malformed_fused_loss_inputs_are_rejected(be) {
        static NORM_SHORT: std::sync::LazyLock<Normalizers> =
            std::sync::LazyLock::new(|| Normalizers {
                tokens: vec![4.0],
                seqs: vec![2.0],
                seq_tokens: None,
            });
        static NORM_NEG: std::sync::LazyLock<Normalizers> = std::sync::LazyLock::new(|| Normalizers {
            tokens: vec![4.0, -1.0],
            seqs: vec![2.0, 2.0],
            seq_tokens: None,
        });
        let cfg = GrpoConfig::default();
        let cases: Vec<(&str, HostGrpoInputs<'static>, GrpoConfig, &str)> = vec![
            (
                "cu_seqlens empty",
                HostGrpoInputs {
                    cu_seqlens: &[],
                    ..good()
                },
                cfg.clone(),
                "cu_seqlens",
            ),
            (
                "cu_seqlens not from 0",
                HostGrpoInputs {
                    cu_seqlens: &[1, 4],
                    ..good()
                },
                cfg.clone(),
                "cu_seqlens",
            ),
            (
                "cu_seqlens decreasing",
                HostGrpoInputs {
                    cu_seqlens: &[0, 3, 2, 4],
                    ..good()
                },
                cfg.clone(),
                "cu_seqlens",
            ),
            (
                "cu_seqlens short of T",
                HostGrpoInputs {
                    cu_seqlens: &[0, 1, 3],
                    ..good()
                },
                cfg.clone(),
                "cu_seqlens",
            ),
            (
                "cu_seqlens past T",
                HostGrpoInputs {
                    cu_seqlens: &[0, 1, 5],
                    ..good()
                },
                cfg.clone(),
                "cu_seqlens",
            ),
            (
                "old_logp length",
                HostGrpoInputs {
                    old_logp: &LOGP[..3],
                    ..good()
                },
                cfg.clone(),
                "old_logp",
            ),
            (
                "ref_logp length",
                HostGrpoInputs {
                    ref_logp: Some(&LOGP[..1]),
                    ..good()
                },
                cfg.clone(),
                "ref_logp",
            ),
            (
                "mask length",
                HostGrpoInputs {
                    mask: Mask::U8(&[1, 1]),
                    ..good()
                },
                cfg.clone(),
                "mask",
            ),
            (
                "advantages [B,K]",
                HostGrpoInputs {
                    advantages: Advantages::PerSequence(&ADV[..1]),
                    ..good()
                },
                cfg.clone(),
                "advantages",
            ),
            (
                "advantages [T,K]",
                HostGrpoInputs {
                    advantages: Advantages::PerToken(&ADV),
                    ..good()
                },
                cfg.clone(),
                "advantages",
            ),
            (
                "K = 0",
                HostGrpoInputs {
                    lambda: &[],
                    objectives: &[],
                    ..good()
                },
                cfg.clone(),
                "lambda",
            ),
            (
                "K = 17",
                HostGrpoInputs {
                    lambda: &[1.0; 17],
                    objectives: &[ObjectiveKind::Policy; 17],
                    ..good()
                },
                cfg.clone(),
                "lambda",
            ),
            (
                "objectives length",
                HostGrpoInputs {
                    objectives: &[ObjectiveKind::Policy; 2],
                    ..good()
                },
                cfg.clone(),
                "objectives",
            ),
            (
                "lambda NaN",
                HostGrpoInputs {
                    lambda: &[f32::NAN],
                    ..good()
                },
                cfg.clone(),
                "lambda",
            ),
            (
                "lambda negative",
                HostGrpoInputs {
                    lambda: &[-1.0],
                    ..good()
                },
                cfg.clone(),
                "lambda",
            ),
            (
                "membership length",
                HostGrpoInputs {
                    membership: Some(&[1]),
                    ..good()
                },
                cfg.clone(),
                "membership",
            ),
            (
                "membership bit >= K",
                HostGrpoInputs {
                    membership: Some(&[1, 2]),
                    ..good()
                },
                cfg.clone(),
                "membership",
            ),
            (
                "normalizers length",
                HostGrpoInputs {
                    normalizers: Some(&NORM_SHORT),
                    ..good()
                },
                cfg.clone(),
                "normalizers",
            ),
            (
                "normalizers negative",
                HostGrpoInputs {
                    normalizers: Some(&NORM_NEG),
                    ..good()
                },
                cfg.clone(),
                "normalizers",
            ),
            (
                "clip_low > 1",
                good(),
                cfg.clone().with_clip_low(1.5),
                "config.clip_low",
            ),
            (
                "clip_low < 0",
                good(),
                cfg.clone().with_clip_low(-0.1),
                "config.clip_low",
            ),
            (
                "clip_high NaN",
                good(),
                cfg.clone().with_clip_high(f32::NAN),
                "config.clip_high",
            ),
            (
                "clip_high < 0",
                good(),
                cfg.clone().with_clip_high(-0.2),
                "config.clip_high",
            ),
            (
                "dual clip c = 1",
                good(),
                cfg.clone().with_dual_clip(Some(1.0)),
                "config.dual_clip",
            ),
            (
                "dual clip c = 0.5",
                good(),
                cfg.clone().with_dual_clip(Some(0.5)),
                "config.dual_clip",
            ),
            (
                "log ratio clamp 0",
                good(),
                cfg.clone().with_log_ratio_clamp(0.0),
                "config.log_ratio_clamp",
            ),
            (
                "kl_coef negative",
                good(),
                cfg.clone().with_kl_coef(-1.0),
                "config.kl_coef",
            ),
            (
                "token-sum-norm without C",
                good(),
                cfg.clone().with_agg_mode(AggMode::TokenSumNorm),
                "config.norm_constant",
            ),
            (
                "token-sum-norm C = 0",
                good(),
                cfg.clone().with_agg_mode(AggMode::TokenSumNorm).with_norm_constant(Some(0.0)),
                "config.norm_constant",
            ),
        ];
        let mut tried = 0;
        for (what, inputs, c, arg) in &cases {
            let mut grad = vec![0f32; inputs.logp.len()];
            expect_arg(
                &format!("{} {what}", be.name()),
                be.grpo_loss(inputs, c, &mut grad),
                arg,
            );
            tried += 1;
        }
        let mut short = vec![0f32; 3];
        expect_arg(
            "grad length",
            be.grpo_loss(&good(), &cfg, &mut short),
            "grad",
        );
        // and the good inputs pass, so the table above tests validation, not a broken fixture
        let mut grad = vec![0f32; 4];
        be.grpo_loss(&good(), &cfg, &mut grad).unwrap();
        assert!(tried >= cases.len());
    }
}

on_every_backend! {
    fn malformed_kl_and_reduce_inputs_are_rejected(be) {
        let cfg = GrpoConfig::default();
        let (mut v, mut g) = (vec![0f32; 4], vec![0f32; 4]);
        expect_arg(
            "kl ref",
            be.kl(&LOGP, &LOGP[..2], None, KlEstimator::K3, &mut v, &mut g),
            "ref_logp",
        );
        expect_arg(
            "kl mask",
            be.kl(
                &LOGP,
                &LOGP,
                Some(Mask::U8(&[1])),
                KlEstimator::K3,
                &mut v,
                &mut g,
            ),
            "mask",
        );
        expect_arg(
            "kl out",
            be.kl(&LOGP, &LOGP, None, KlEstimator::K3, &mut v[..1], &mut g),
            "kl_out",
        );
        let good = HostReduceInputs {
            losses: &[1.0; 8],
            mask: Mask::F32(&MASK),
            cu_seqlens: &[0, 2, 4],
            lambda: &[1.0, 1.0],
            membership: None,
            normalizers: None,
        };
        let mut grad = vec![0f32; 8];
        be.weighted_reduce(&good, &cfg, &mut grad).unwrap();
        expect_arg(
            "losses",
            be.weighted_reduce(
                &HostReduceInputs {
                    losses: &[1.0; 4],
                    ..good
                },
                &cfg,
                &mut grad,
            ),
            "losses",
        );
        expect_arg(
            "reduce cu",
            be.weighted_reduce(
                &HostReduceInputs {
                    cu_seqlens: &[0, 5],
                    ..good
                },
                &cfg,
                &mut grad,
            ),
            "cu_seqlens",
        );
        expect_arg(
            "reduce grad",
            be.weighted_reduce(&good, &cfg, &mut grad[..3]),
            "grad",
        );
    }
}

#[test]
fn names_parse_as_verl_spells_them() {
    for (s, m) in [
        ("token-mean", AggMode::TokenMean),
        ("seq-mean-token-mean", AggMode::SeqMeanTokenMean),
        ("seq-mean-token-sum", AggMode::SeqMeanTokenSum),
        ("seq-mean-token-sum-norm", AggMode::TokenSumNorm),
    ] {
        assert_eq!(s.parse::<AggMode>().unwrap(), m);
    }
    for (s, e) in [
        ("kl", KlEstimator::K1),
        ("abs", KlEstimator::Abs),
        ("mse", KlEstimator::K2),
        ("low_var_kl", KlEstimator::K3),
        ("k3+", KlEstimator::K3Plus),
        ("k1+", KlEstimator::K1Plus),
    ] {
        assert_eq!(s.parse::<KlEstimator>().unwrap(), e);
    }
    assert!(matches!(
        "mean".parse::<AggMode>(),
        Err(Error::InvalidArgument {
            arg: "agg_mode",
            ..
        })
    ));
    assert!(matches!(
        "k4".parse::<KlEstimator>(),
        Err(Error::InvalidArgument {
            arg: "kl_estimator",
            ..
        })
    ));
}
