//! Rollout IS weights as their own op (verl's `compute_rollout_correction_weights`, with
//! `rollout_is_batch_normalize`): hand-computed weights and batch means on every backend, verl's
//! option syntax, the parts of a batch normalized by the whole batch's mean, the kernel source
//! emulated on the host and the GPU against the CPU reference on random batches.

mod common;
mod emulator;

use recap_kernels::rollout_is::{batch_factor, parse_verl, STAT_SLOTS};
use recap_kernels::{
    device_math, Backend, Error, HostMask, IsLevel, IsMode, Mask, RolloutCorrection, RolloutIsStats,
};

fn rc(level: IsLevel, mode: IsMode, lower: Option<f32>, upper: f32) -> RolloutCorrection {
    RolloutCorrection {
        level,
        mode,
        upper,
        lower,
    }
}

/// Three sequences: [ln 1.5, ln 0.5, (masked NaN)], [ln 3, ln 1], and a fully masked one.
fn hand_batch() -> (Vec<f32>, Vec<f32>, Vec<i32>) {
    let lr = vec![
        1.5f32.ln(),
        0.5f32.ln(),
        f32::NAN,
        3.0f32.ln(),
        0.0,
        7.0,
        -7.0,
    ];
    let mask = vec![1.0f32, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0];
    (lr, mask, vec![0, 3, 5, 7])
}

fn run(be: &Backend, c: RolloutCorrection, normalize: bool) -> (Vec<f32>, RolloutIsStats) {
    let (lr, mask, cu) = hand_batch();
    let mut w = vec![-1.0f32; lr.len()];
    let s = be
        .rollout_is_weights(&lr, Mask::F32(&mask), &cu, &c, normalize, &mut w)
        .unwrap();
    (w, s)
}

on_every_backend! {
    /// Token level, truncated at 2: weights [1.5, 0.5, 0 | 2, 1 | 0, 0], mean 5 / (4 + 1e-8).
    fn token_weights_by_hand(be) {
        let c = rc(IsLevel::Token, IsMode::Truncate, None, 2.0);
        let (w, s) = run(&be, c, false);
        common::assert_all_close("weights", &w, &[1.5, 0.5, 0.0, 2.0, 1.0, 0.0, 0.0], 1e-6, 1e-6);
        common::assert_close("weight_sum", s.weight_sum, 5.0, 1e-6, 1e-6);
        assert_eq!(s.units, 4.0);
        common::assert_close("ratio_min", s.ratio_min, 0.5, 1e-6, 1e-6);
        common::assert_close("ratio_max", s.ratio_max, 3.0, 1e-6, 1e-6);
        assert_eq!(s.corrected, 1.0, "the ratio 3 is truncated");
        common::assert_close("mean", s.mean, 5.0 / (4.0 + 1e-8), 1e-12, 1e-7);
        assert_eq!(s.factor, 1.0, "no normalization");
        let (wn, sn) = run(&be, c, true);
        common::assert_close("factor", sn.factor, 1.25, 1e-12, 1e-7);
        let want: Vec<f32> = w.iter().map(|x| x / 1.25f32).collect();
        common::assert_all_close("normalized", &wn, &want, 1e-7, 1e-6);
        let mean: f32 = wn.iter().sum::<f32>() / 4.0;
        common::assert_close("normalized mean", mean as f64, 1.0, 1e-6, 0.0);
    }
}

on_every_backend! {
    /// Sequence level: exp(ln 1.5 + ln 0.5) = 0.75 and min(3, 2) = 2; the masked sequence 0;
    /// mean (0.75 + 2) / 2 (each times n / (n + 1e-8), n = 2). Geometric: sqrt(0.75), sqrt(3).
    fn sequence_weights_by_hand(be) {
        let c = rc(IsLevel::Sequence, IsMode::Truncate, None, 2.0);
        let (w, s) = run(&be, c, true);
        let f = 2.75 / 2.0 * (2.0 / (2.0 + 1e-8));
        common::assert_close("factor", s.factor, f, 1e-12, 1e-7);
        assert_eq!((s.units, s.corrected), (2.0, 1.0));
        let (a, b) = (0.75 / f as f32, 2.0 / f as f32);
        common::assert_all_close("weights", &w, &[a, a, 0.0, b, b, 0.0, 0.0], 1e-6, 1e-6);
        let g = rc(IsLevel::Geometric, IsMode::Truncate, None, 2.0);
        let (w, s) = run(&be, g, false);
        let (a, b) = (0.75f32.sqrt(), 3.0f32.sqrt());
        common::assert_all_close("geometric", &w, &[a, a, 0.0, b, b, 0.0, 0.0], 1e-6, 1e-6);
        assert_eq!(s.corrected, 0.0);
    }
}

on_every_backend! {
    /// Mask mode (verl's IcePop, "0.6_2.5"): ratios 0.5 and 3 leave the band and get 0.
    fn mask_mode_by_hand(be) {
        let c = parse_verl("token", "0.6_2.5").unwrap();
        assert_eq!(c, rc(IsLevel::Token, IsMode::Mask, Some(0.6), 2.5));
        let (w, s) = run(&be, c, true);
        let f = 2.5 / (4.0 + 1e-8);
        common::assert_close("factor", s.factor, f, 1e-12, 1e-7);
        let want = [1.5 / f as f32, 0.0, 0.0, 0.0, 1.0 / f as f32, 0.0, 0.0];
        common::assert_all_close("weights", &w, &want, 1e-6, 1e-6);
        assert_eq!(s.corrected, 2.0);
        // metrics only: weights 1, and normalizing them changes nothing (mean 4 / (4 + 1e-8))
        let (w, _) = run(&be, rc(IsLevel::Token, IsMode::MetricsOnly, None, 2.0), true);
        assert_eq!(w, [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }
}

on_every_backend! {
    /// A NaN log-ratio at an unmasked token is an error naming `log_ratio`; so are bad shapes and
    /// bounds, before anything runs. An empty batch has factor 1.
    fn bad_inputs_are_errors(be) {
        let (mut lr, mask, cu) = hand_batch();
        lr[1] = f32::NAN;
        let mut w = vec![0.0f32; lr.len()];
        let c = RolloutCorrection::default();
        for level in [IsLevel::Token, IsLevel::Sequence] {
            let c = RolloutCorrection { level, ..c };
            let e = be.rollout_is_weights(&lr, Mask::F32(&mask), &cu, &c, true, &mut w).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { arg: "log_ratio", .. }), "{e}");
        }
        let e = be
            .rollout_is_weights(&lr, Mask::F32(&mask[..3]), &cu, &c, true, &mut w)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { arg: "mask", .. }), "{e}");
        let e = be
            .rollout_is_weights(&lr, Mask::F32(&mask), &[0, 3, 6], &c, true, &mut w)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { arg: "cu_seqlens", .. }), "{e}");
        let bad = RolloutCorrection { upper: -1.0, ..c };
        let e = be
            .rollout_is_weights(&lr, Mask::F32(&mask), &cu, &bad, true, &mut w)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { arg: "correction.upper", .. }), "{e}");
        let s = be.rollout_is_weights(&[], Mask::F32(&[]), &[0], &c, true, &mut []).unwrap();
        assert_eq!((s.units, s.factor), (0.0, 1.0));
    }
}

/// verl's option strings, and their errors.
#[test]
fn verl_option_syntax() {
    assert_eq!(
        parse_verl("sequence", "2.0").unwrap(),
        rc(IsLevel::Sequence, IsMode::Truncate, None, 2.0)
    );
    assert_eq!(
        parse_verl(" token ", "5").unwrap(),
        rc(IsLevel::Token, IsMode::Truncate, None, 5.0)
    );
    for (level, threshold, arg) in [
        ("tokens", "2.0", "rollout_is"),
        ("token", "", "rollout_is_threshold"),
        ("token", "two", "rollout_is_threshold"),
        ("token", "0", "rollout_is_threshold"),
        ("token", "3_2", "rollout_is_threshold"),
        ("token", "0.5_x", "rollout_is_threshold"),
        ("token", "inf", "rollout_is_threshold"),
    ] {
        let e = parse_verl(level, threshold).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: a, .. } if a == arg),
            "{level} {threshold}: {e}"
        );
    }
}

/// The batch mean's two forms and the factor's guard, as the device computes them.
#[test]
fn batch_mean_and_factor() {
    assert_eq!(
        device_math::is_batch_mean(5.0, 4.0, IsLevel::Token),
        5.0 / (4.0 + 1e-8)
    );
    assert_eq!(device_math::is_batch_mean(3.0, 2.0, IsLevel::Sequence), 1.5);
    assert_eq!(
        device_math::is_batch_mean(3.0, 0.0, IsLevel::Geometric),
        3.0 / 1e-8
    );
    assert_eq!(device_math::is_batch_factor(2.5), 2.5);
    assert_eq!(device_math::is_batch_factor(1e-9), 1.0);
    assert_eq!(device_math::is_batch_factor(0.0), 1.0);
    assert_eq!(batch_factor(0.0, 0.0, IsLevel::Token), 1.0);
}

/// Random batches: lengths 0, 1, 31, 32, 33 and 4097, a fully masked sequence, NaN at masked
/// tokens, f32 (fractional) and u8 masks, every level and mode, with and without normalization.
fn matches_the_reference(
    run: impl Fn(&[f32], HostMask<'_>, &[i32], &RolloutCorrection, bool, &mut [f32]) -> RolloutIsStats,
) {
    let mut rng = common::Rng::new(11);
    let mut corrected = 0.0;
    for (cu, t) in common::edge_layouts() {
        let mut mask: Vec<f32> = (0..t)
            .map(|_| match rng.below(6) {
                0 => 0.0,
                1 => 0.5,
                _ => 1.0,
            })
            .collect();
        if cu.len() > 3 {
            let (a, b) = (cu[1] as usize, cu[2] as usize);
            mask[a..b].iter_mut().for_each(|m| *m = 0.0); // a fully masked sequence
        }
        let lr: Vec<f32> = (0..t)
            .map(|i| {
                if mask[i] == 0.0 && rng.below(4) == 0 {
                    f32::NAN // never read
                } else {
                    (rng.normal() * 0.4 * if rng.below(50) == 0 { 40.0 } else { 1.0 }) as f32
                }
            })
            .collect();
        let mask_u8: Vec<u8> = mask.iter().map(|m| (*m != 0.0) as u8).collect();
        for level in [IsLevel::Token, IsLevel::Sequence, IsLevel::Geometric] {
            for (mode, lower, upper) in [
                (IsMode::Truncate, None, 1.6),
                (IsMode::Mask, Some(0.7), 1.4),
                (IsMode::MetricsOnly, None, 2.0),
            ] {
                let c = rc(level, mode, lower, upper);
                for normalize in [false, true] {
                    for m in [Mask::F32(&mask[..]), Mask::U8(&mask_u8[..])] {
                        let mut want = vec![0f32; t];
                        let mut got = vec![-1f32; t];
                        let ws = Backend::Cpu
                            .rollout_is_weights(&lr, m, &cu, &c, normalize, &mut want)
                            .unwrap();
                        let gs = run(&lr, m, &cu, &c, normalize, &mut got);
                        let what = format!("cu_seqlens {cu:?} {c:?} normalize {normalize}");
                        common::assert_all_close(&what, &got, &want, 1e-6, 4e-6);
                        for (name, g, w) in [
                            ("weight_sum", gs.weight_sum, ws.weight_sum),
                            ("units", gs.units, ws.units),
                            ("ratio_min", gs.ratio_min, ws.ratio_min),
                            ("ratio_max", gs.ratio_max, ws.ratio_max),
                            ("corrected", gs.corrected, ws.corrected),
                            ("mean", gs.mean, ws.mean),
                            ("factor", gs.factor, ws.factor),
                        ] {
                            common::assert_close(&format!("{what}: {name}"), g, w, 1e-9, 2e-6);
                        }
                        corrected += ws.corrected;
                    }
                }
            }
        }
    }
    assert!(
        corrected > 0.0,
        "the batches exercise the truncation and the band"
    );
}

/// Two parts of a batch (data-parallel ranks or micro-batches), each without normalization, then
/// divided by the factor of their summed stats: the whole batch's normalized weights.
#[test]
fn parts_normalized_by_the_whole_batch() {
    let mut rng = common::Rng::new(3);
    let lens = [7usize, 0, 33, 12, 64, 1];
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let lr: Vec<f32> = (0..t).map(|_| (rng.normal() * 0.5) as f32).collect();
    let mask: Vec<f32> = (0..t).map(|_| (rng.below(4) != 0) as u8 as f32).collect();
    for level in [IsLevel::Token, IsLevel::Sequence] {
        let c = rc(level, IsMode::Truncate, None, 1.5);
        let mut whole = vec![0f32; t];
        let ws = Backend::Cpu
            .rollout_is_weights(&lr, Mask::F32(&mask), &cu, &c, true, &mut whole)
            .unwrap();
        assert!(
            (ws.factor - 1.0).abs() > 1e-3,
            "the factor is not 1: {}",
            ws.factor
        );
        let cut = 3; // sequences [0, 3) and [3, 6)
        let split = cu[cut] as usize;
        let mut parts = vec![0f32; t];
        let (mut sum, mut units) = (0.0, 0.0);
        for (range, cu_part) in [
            (0..split, cu[..=cut].to_vec()),
            (
                split..t,
                cu[cut..].iter().map(|x| x - split as i32).collect(),
            ),
        ] {
            let s = Backend::Cpu
                .rollout_is_weights(
                    &lr[range.clone()],
                    Mask::F32(&mask[range.clone()]),
                    &cu_part,
                    &c,
                    false,
                    &mut parts[range],
                )
                .unwrap();
            sum += s.weight_sum;
            units += s.units;
        }
        let f = batch_factor(sum, units, level);
        common::assert_close("factor", f, ws.factor, 0.0, 1e-12);
        parts.iter_mut().for_each(|w| *w /= f as f32);
        common::assert_all_close("parts", &parts, &whole, 0.0, 1e-6);
    }
}

/// The kernel source (`kernels/rollout_is.cu`, and `recap_partials_finalize` of `reduce.cu`) on
/// the host under the SIMT emulator, launched with the parameters and plan
/// `cuda::rollout_is_weights` uses, against the CPU reference.
#[test]
fn kernel_source_emulated_on_the_host_matches_the_reference() {
    use recap_kernels::cuda::{is_finalize_params, is_params, is_plan};
    let emu = emulator::Emulated::build("rollout_is");
    let reduce = emulator::Emulated::build("reduce");
    matches_the_reference(|lr, m, cu, c, normalize, out| {
        let (mask, suffix) = match m {
            Mask::U8(m) => (m.as_ptr() as u64, "u8"),
            Mask::F32(m) => (m.as_ptr() as u64, "f32"),
        };
        let (t, b) = (lr.len(), cu.len() - 1);
        if t == 0 {
            return Backend::Cpu
                .rollout_is_weights(lr, m, cu, c, normalize, out)
                .unwrap();
        }
        let mut partials = vec![0f64; STAT_SLOTS * b];
        let mut stats = [0f64; STAT_SLOTS];
        let addrs = [
            lr.as_ptr() as u64,
            mask,
            cu.as_ptr() as u64,
            out.as_mut_ptr() as u64,
            partials.as_mut_ptr() as u64,
            stats.as_mut_ptr() as u64,
        ];
        let p = is_params(addrs, t, b, c);
        let plan = is_plan(t, b, normalize, 4);
        emu.launch(
            &format!("recap_rollout_is_{suffix}"),
            plan.seq_grid,
            256,
            &p,
        );
        let f = is_finalize_params(addrs[4], addrs[5], b);
        reduce.launch("recap_partials_finalize", STAT_SLOTS, 256, &f);
        if let Some(grid) = plan.scale_grid {
            emu.launch("recap_rollout_is_scale", grid, 256, &p);
        }
        RolloutIsStats::from_slots(&stats, c.level, normalize).unwrap()
    });
}

/// Random batches on the GPU against the CPU reference (see [`matches_the_reference`]).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gpu_matches_the_cpu_reference() {
    let gpu = common::require_gpu("gpu_matches_the_cpu_reference");
    matches_the_reference(|lr, m, cu, c, normalize, out| {
        gpu.rollout_is_weights(lr, m, cu, c, normalize, out)
            .unwrap()
    });
}
