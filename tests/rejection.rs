//! Rollout rejection sampling (verl's `rollout_rs`): hand-computed flags on every backend, verl's
//! option syntax, the device formulas against the reference's, and the GPU against the CPU
//! reference on random batches.

mod common;
mod emulator;

use recap_kernels::{
    device_math, Backend, HostMask, Mask, RejectionCriterion, RsLevel, RsStatistic,
};

fn crit(level: RsLevel, statistic: RsStatistic, lower: f64, upper: f64) -> RejectionCriterion {
    RejectionCriterion {
        level,
        statistic,
        lower,
        upper,
    }
}

on_every_backend! {
    /// Three sequences; the log-ratios chosen so each criterion rejects something different:
    /// seq 0 [0.1, -0.3, (masked NaN), 0.05], seq 1 [1.2, 0.0], seq 2 fully masked, seq 3 [0.2, NaN].
    fn flags_by_hand(be) {
        let lr = [0.1f32, -0.3, f32::NAN, 0.05, 1.2, 0.0, 9.0, 0.2, f32::NAN];
        let mask = [1.0f32, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        let cu = [0, 4, 6, 7, 9];
        let criteria = [
            // token k1 = -lr inside [-0.5, 0.25]: rejects lr = 1.2 (k1 = -1.2) and lr = -0.3 (k1 = 0.3)
            crit(RsLevel::Token, RsStatistic::K1, -0.5, 0.25),
            // seq mean k3: seq 0 mean of exp(x) - 1 - x over 0.1, -0.3, 0.05 is about 0.0158, seq 1 about
            // 0.560 (rejected), seq 3 NaN (rejected)
            crit(RsLevel::SeqMean, RsStatistic::K3, 0.0, 0.1),
            // seq max k2: seq 0's max is 0.045 (kept at 0.05)
            crit(RsLevel::SeqMax, RsStatistic::K2, 0.0, 0.05),
            // seq sum k1: seq 0's sum of -lr is 0.15, outside [0.2, 1] (rejected)
            crit(RsLevel::SeqSum, RsStatistic::K1, 0.2, 1.0),
        ];
        let mut flags = vec![-1i32; lr.len()];
        be.rollout_rejection(&lr, Mask::F32(&mask), &cu, &criteria, &mut flags)
            .unwrap();
        // seq 0: token bits (t1 has k1 = 0.3 > 0.25), plus seq-sum (bit 3)
        // seq 1: t4 rejected by token k1; seq mean k3 (bit 1) and seq max k2 (0.72 > 0.05, bit 2); seq
        //        sum k1 = -1.2 outside [0.2, 1] (bit 3)
        // seq 3: the NaN rejects every sequence criterion; the token criterion rejects the NaN token only
        let want = [8, 1 | 8, 0, 8, 1 | 2 | 4 | 8, 2 | 4 | 8, 0, 2 | 4 | 8, 1 | 2 | 4 | 8];
        assert_eq!(flags, want, "{}", be.name());
        // u8 mask: the same flags
        let mask_u8: Vec<u8> = mask.iter().map(|m| (*m != 0.0) as u8).collect();
        let mut again = vec![-1i32; lr.len()];
        be.rollout_rejection(&lr, Mask::U8(&mask_u8), &cu, &criteria, &mut again)
            .unwrap();
        assert_eq!(again, want);
        // an empty batch
        let mut none: Vec<i32> = vec![];
        be.rollout_rejection(&[], Mask::F32(&[]), &[0], &criteria, &mut none).unwrap();
    }
}

on_every_backend! {
    /// Bad input is refused with the argument's name, before any launch.
    fn bad_inputs_are_named(be) {
        let lr = [0.0f32; 4];
        let mask = [1.0f32; 4];
        let ok = [crit(RsLevel::Token, RsStatistic::K2, 0.0, 1.0)];
        let mut flags = [0i32; 4];
        type Case = (&'static str, Vec<f32>, Vec<i32>, Vec<RejectionCriterion>, usize);
        let cases: Vec<Case> = vec![
            ("mask", mask[..3].to_vec(), vec![0, 4], ok.to_vec(), 4),
            ("cu_seqlens", mask.to_vec(), vec![0, 3], ok.to_vec(), 4),
            ("flags", mask.to_vec(), vec![0, 4], ok.to_vec(), 3),
            ("criteria", mask.to_vec(), vec![0, 4], vec![], 4),
            ("criteria", mask.to_vec(), vec![0, 4], vec![ok[0]; 17], 4),
            (
                "criteria",
                mask.to_vec(),
                vec![0, 4],
                vec![crit(RsLevel::Token, RsStatistic::K1, 1.0, 0.5)],
                4,
            ),
        ];
        for (arg, m, cu, c, nf) in cases {
            let e = be
                .rollout_rejection(&lr, Mask::F32(&m), &cu, &c, &mut flags[..nf])
                .unwrap_err();
            assert!(e.to_string().contains(arg), "{arg}: {e}");
        }
    }
}

on_every_backend! {
    /// The older verl API's veto (`rollout_token_veto_threshold`), alone and after a verl option:
    /// seq 0 [0.1, -2.0 (masked), 0.3] keeps (the low ratio is masked), seq 1 [0.0, -1.5] is vetoed
    /// at t = 0.25 (ln 0.25 = -1.386), seq 2 [-1.3, 0.2] is not, seq 3 is empty.
    fn veto_by_hand(be) {
        let lr = [0.1f32, -2.0, 0.3, 0.0, -1.5, -1.3, 0.2];
        let mask = [1.0f32, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let cu = [0, 3, 5, 7, 7];
        let veto = RejectionCriterion::token_veto(0.25).unwrap();
        assert_eq!((veto.level, veto.statistic), (RsLevel::SeqMax, RsStatistic::K1));
        let mut flags = vec![-1i32; lr.len()];
        be.rollout_rejection(&lr, Mask::F32(&mask), &cu, &[veto], &mut flags).unwrap();
        assert_eq!(flags, [0, 0, 0, 1, 1, 0, 0], "{}", be.name());
        // after token_k2 <= 1 (rejects only lr = -1.5, k2 = 1.125; -1.3 gives 0.845): the veto is bit 1
        let c = RejectionCriterion::parse_verl_with_veto("token_k2", "1.0", Some(0.25)).unwrap();
        assert_eq!(c.len(), 2);
        be.rollout_rejection(&lr, Mask::F32(&mask), &cu, &c, &mut flags).unwrap();
        assert_eq!(flags, [0, 0, 0, 2, 1 | 2, 0, 0], "{}", be.name());
        // a looser veto (t = 0.2, ln = -1.609) keeps seq 1
        let loose = RejectionCriterion::token_veto(0.2).unwrap();
        be.rollout_rejection(&lr, Mask::F32(&mask), &cu, &[loose], &mut flags).unwrap();
        assert_eq!(flags, [0; 7]);
    }
}

#[test]
fn veto_arguments() {
    let only = RejectionCriterion::parse_verl_with_veto(" ", "", Some(1e-4)).unwrap();
    assert_eq!(only.len(), 1);
    assert!((only[0].upper - 1e4f64.ln()).abs() < 1e-12 && only[0].lower == f64::NEG_INFINITY);
    let plain = RejectionCriterion::parse_verl_with_veto("seq_mean_k3", "0.01", None).unwrap();
    assert_eq!(
        plain,
        RejectionCriterion::parse_verl("seq_mean_k3", "0.01").unwrap()
    );
    for t in [0.0, -1.0, f64::NAN, 1e-9, 1e9, f64::INFINITY] {
        let e = RejectionCriterion::token_veto(t).unwrap_err();
        assert!(
            e.to_string().contains("rollout_token_veto_threshold"),
            "{t}: {e}"
        );
    }
    let e = RejectionCriterion::parse_verl_with_veto("", "", None).unwrap_err();
    assert!(
        e.to_string().contains("rollout_token_veto_threshold"),
        "{e}"
    );
    let e = RejectionCriterion::parse_verl_with_veto("token_k2", "", Some(0.1)).unwrap_err();
    assert!(e.to_string().contains("rollout_rs_threshold"), "{e}");
}

#[test]
fn verl_option_syntax() {
    let c =
        RejectionCriterion::parse_verl("token_k1, seq_mean_k3,token_k1", "0.5_2.0,0.01").unwrap();
    assert_eq!(c.len(), 2, "repeats are dropped");
    assert_eq!(
        (c[0].level, c[0].statistic),
        (RsLevel::Token, RsStatistic::K1)
    );
    assert!((c[0].lower - 0.5f64.ln()).abs() < 1e-15 && (c[0].upper - 2.0f64.ln()).abs() < 1e-15);
    assert_eq!(
        (c[1].level, c[1].statistic, c[1].upper),
        (RsLevel::SeqMean, RsStatistic::K3, 0.01)
    );
    assert_eq!(c[1].name(), "seq_mean_k3");
    // one threshold for all; a single k1 bound u means [1/u, u]
    let c = RejectionCriterion::parse_verl("seq_sum_k1,seq_max_k2", "4").unwrap();
    assert!((c[0].lower + 4f64.ln()).abs() < 1e-15 && (c[0].upper - 4f64.ln()).abs() < 1e-15);
    assert_eq!(c[1].upper, 4.0);
    for (rs, th, arg) in [
        ("token_k4", "1", "rollout_rs"),
        ("seq_max_k1", "1", "rollout_rs"),
        ("", "1", "rollout_rs"),
        (
            "token_k1,token_k2,seq_sum_k3",
            "1,2",
            "rollout_rs_threshold",
        ),
        ("token_k2", "0.1_2", "rollout_rs_threshold"),
        ("token_k2", "-1", "rollout_rs_threshold"),
        ("token_k1", "0_2", "rollout_rs_threshold"),
        ("token_k3", "x", "rollout_rs_threshold"),
    ] {
        let e = RejectionCriterion::parse_verl(rs, th).unwrap_err();
        assert!(e.to_string().contains(arg), "{rs} / {th}: {e}");
    }
}

/// The device's statistic and bound check (`recap_rs_stat`, `recap_rs_keep`, compiled for the host)
/// against the formulas in f64, the clamp at +-20 and NaN included.
#[test]
fn device_formulas_by_hand() {
    for lr in [-25.0f64, -20.0, -3.0, -0.1, 0.0, 1e-4, 0.7, 19.0, 30.0] {
        let x = lr.clamp(-20.0, 20.0);
        for (s, want) in [
            (RsStatistic::K1, -x),
            (RsStatistic::K2, 0.5 * x * x),
            (RsStatistic::K3, x.exp() - 1.0 - x),
        ] {
            let got = device_math::rs_stat(lr, s);
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{s:?}({lr}) = {got}, want {want}"
            );
        }
    }
    for s in [RsStatistic::K1, RsStatistic::K2, RsStatistic::K3] {
        assert!(device_math::rs_stat(f64::NAN, s).is_nan());
    }
    let k1 = crit(RsLevel::Token, RsStatistic::K1, -0.5, 0.5);
    let k2 = crit(RsLevel::Token, RsStatistic::K2, -0.5, 0.5);
    for (v, in_k1, in_k2) in [
        (-0.6, false, true),
        (-0.5, true, true),
        (0.5, true, true),
        (0.51, false, false),
        (f64::NAN, false, false),
    ] {
        assert_eq!(device_math::rs_keep(v, &k1), in_k1, "k1 {v}");
        assert_eq!(
            device_math::rs_keep(v, &k2),
            in_k2,
            "k2 {v} (no lower bound)"
        );
    }
}

/// Random batches on the GPU against the CPU reference (see [`matches_the_reference`]).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gpu_matches_the_cpu_reference() {
    let gpu = common::require_gpu("gpu_matches_the_cpu_reference");
    matches_the_reference(|lr, m, cu, criteria, out| {
        gpu.rollout_rejection(lr, m, cu, criteria, out).unwrap()
    });
}

/// The kernel source (`kernels/kl.cu`) on the host under the SIMT emulator, launched with the
/// parameters and grid `cuda::rollout_rejection` uses, against the CPU reference on the same random batches:
/// the kernel's warp-per-sequence sums, maxima and flags checked without a GPU.
#[test]
fn kernel_source_emulated_on_the_host_matches_the_reference() {
    let emu = emulator::Emulated::build("kl");
    matches_the_reference(|lr, m, cu, criteria, out| {
        let (mask, suffix) = match m {
            Mask::U8(m) => (m.as_ptr() as u64, "u8"),
            Mask::F32(m) => (m.as_ptr() as u64, "f32"),
        };
        let addrs = [
            lr.as_ptr() as u64,
            mask,
            cu.as_ptr() as u64,
            out.as_mut_ptr() as u64,
        ];
        let b = cu.len() - 1;
        let p = recap_kernels::cuda::rejection_params(addrs, lr.len(), b, criteria);
        if !lr.is_empty() {
            let name = format!("recap_rejection_{suffix}");
            emu.launch(&name, recap_kernels::cuda::rejection_grid(b), 256, &p);
        }
    });
}

/// `run` against the CPU reference: lengths 0, 1, 31, 32, 33 and 4097, a fully masked sequence,
/// NaN log-ratios, f32 and u8 masks, every level and statistic, the older API's veto.
fn matches_the_reference(
    run: impl Fn(&[f32], HostMask<'_>, &[i32], &[RejectionCriterion], &mut [i32]),
) {
    let mut rng = common::Rng::new(5);
    let levels = [
        RsLevel::Token,
        RsLevel::SeqSum,
        RsLevel::SeqMean,
        RsLevel::SeqMax,
    ];
    let stats = [RsStatistic::K1, RsStatistic::K2, RsStatistic::K3];
    let mut rejected = 0usize;
    for (cu, t) in common::edge_layouts() {
        let lr: Vec<f32> = (0..t)
            .map(|_| {
                if rng.below(500) == 0 {
                    f32::NAN
                } else {
                    (rng.normal() * 0.3) as f32
                }
            })
            .collect();
        let mut mask: Vec<f32> = (0..t).map(|_| (rng.below(5) != 0) as u8 as f32).collect();
        if cu.len() > 3 {
            let (a, b) = (cu[1] as usize, cu[2] as usize);
            mask[a..b].iter_mut().for_each(|m| *m = 0.0); // a fully masked sequence
        }
        let mask_u8: Vec<u8> = mask.iter().map(|m| *m as u8).collect();
        let mut criteria: Vec<RejectionCriterion> = (0..1 + rng.below(6))
            .map(|_| {
                let s = stats[rng.below(3)];
                let level = levels[rng.below(4)];
                let u = 0.01 + rng.uniform() * 0.2;
                crit(level, s, -u, u)
            })
            .collect();
        // the older verl API's veto (an open lower bound)
        criteria.push(RejectionCriterion::token_veto((-0.6f64).exp()).unwrap());
        for m in [Mask::F32(&mask[..]), Mask::U8(&mask_u8[..])] {
            let mut want = vec![0i32; t];
            let mut got = vec![-1i32; t];
            Backend::Cpu
                .rollout_rejection(&lr, m, &cu, &criteria, &mut want)
                .unwrap();
            run(&lr, m, &cu, &criteria, &mut got);
            assert_eq!(got, want, "cu_seqlens {cu:?} criteria {criteria:?}");
            rejected += want.iter().filter(|f| **f != 0).count();
        }
    }
    assert!(rejected > 0, "the batches exercise the criteria");
}
