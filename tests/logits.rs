//! Kernels 4 and 5 (log-probabilities, entropy and their gradient from logits): hand-computed cases
//! on every backend, the device math on the host, finite differences of the reference gradient, and
//! GPU against CPU on odd shapes, every dtype, strided rows, in place and out of place, and T * V
//! beyond 2^31 elements.

mod common;

use common::{assert_close, close, Rng};
use half::{bf16, f16};
use recap_kernels::{cpu, cuda, device_math, Backend, Error, LogitElem, Logits, LogprobConfig};

fn forward<E: LogitElem>(
    be: &Backend,
    z: &Logits<&[E]>,
    y: &[i32],
    cfg: &LogprobConfig,
) -> recap_kernels::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let t = z.rows;
    let (mut lp, mut h, mut l) = (vec![f32::NAN; t], vec![f32::NAN; t], vec![f32::NAN; t]);
    be.logprob_forward(z, y, cfg, &mut lp, &mut h, &mut l)?;
    Ok((lp, h, l))
}

/// f64 LSE and entropy of a small row, written out.
fn by_hand(x: &[f64]) -> (f64, f64) {
    let lse = x.iter().map(|v| v.exp()).sum::<f64>().ln();
    let h = -x.iter().map(|v| (v - lse).exp() * (v - lse)).sum::<f64>();
    (lse, h)
}

on_every_backend! {
    fn logprob_and_entropy_by_hand(be) {
        let z = [1.0f32, 2.0, 3.0, -1.0, 0.5, 0.5, 0.5, 0.5];
        for tau in [1.0f32, 2.0, 0.7] {
            let cfg = LogprobConfig {
                temperature: tau,
                ..LogprobConfig::default()
            };
            let (lp, h, l) = forward(&be, &Logits::dense(&z[..], 2, 4), &[2, 0], &cfg).unwrap();
            for (r, y) in [(0usize, 2usize), (1, 0)] {
                let x: Vec<f64> = z[r * 4..r * 4 + 4]
                    .iter()
                    .map(|v| *v as f64 / tau as f64)
                    .collect();
                let (lse, ent) = by_hand(&x);
                let what = format!("{} tau {tau} row {r}", be.name());
                assert_close(&format!("{what} lse"), l[r] as f64, lse, 1e-6, 1e-6);
                assert_close(
                    &format!("{what} logp"),
                    lp[r] as f64,
                    x[y] - lse,
                    1e-6,
                    1e-6,
                );
                assert_close(&format!("{what} entropy"), h[r] as f64, ent, 1e-6, 1e-6);
            }
            // the uniform row: entropy log 4
            assert_close("uniform entropy", h[1] as f64, 4f64.ln(), 1e-6, 1e-6);
        }
        // one-hot limit: a finite logit among -inf has logp 0 and entropy 0
        let z = [f32::NEG_INFINITY, 5.0, f32::NEG_INFINITY];
        let (lp, h, _) = forward(
            &be,
            &Logits::dense(&z[..], 1, 3),
            &[1],
            &LogprobConfig::default(),
        )
        .unwrap();
        assert_eq!((lp[0], h[0]), (0.0, 0.0), "{}", be.name());
    }
}

on_every_backend! {
    fn gradient_by_hand_and_ignore_index(be) {
        // V = 3, z = [0, ln 2, ln 5] -> p = [1/8, 2/8, 5/8]; label 1; g_logp = 2, no entropy term:
        // dz = 2 (1[j = 1] - p) = [-0.25, 1.5, -1.25]
        let z = [0.0f32, 2f32.ln(), 5f32.ln(), 1.0, 2.0, 3.0];
        let cfg = LogprobConfig::default();
        let mut dz = [f32::NAN; 6];
        be.logprob_backward(
            &Logits::dense(&z[..], 2, 3),
            &[1, -100],
            &cfg,
            &[2.0, 7.0],
            None,
            &mut Logits::dense(&mut dz[..], 2, 3),
        )
        .unwrap();
        for (j, want) in [-0.25, 1.5, -1.25].iter().enumerate() {
            assert_close(
                &format!("{} dz[{j}]", be.name()),
                dz[j] as f64,
                *want,
                1e-6,
                1e-6,
            );
        }
        assert_eq!(
            &dz[3..],
            &[0.0, 0.0, 0.0],
            "{}: an ignored label takes no logp gradient",
            be.name()
        );
        let (lp, _, _) = forward(&be, &Logits::dense(&z[..], 2, 3), &[1, -100], &cfg).unwrap();
        assert_eq!(lp[1], 0.0, "ignored label: logp = 0");
        // a label outside [0, V) is an error naming `labels`
        let e = forward(&be, &Logits::dense(&z[..], 2, 3), &[1, 3], &cfg).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "labels", .. }),
            "{}: {e}",
            be.name()
        );
        let e = forward(
            &be,
            &Logits::dense(&z[..], 2, 3),
            &[1, 0],
            &LogprobConfig {
                temperature: 0.0,
                ..cfg
            },
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidArgument {
                arg: "config.temperature",
                ..
            }
        ));
        let e = forward(
            &be,
            &Logits {
                data: &z[..],
                rows: 2,
                vocab: 3,
                ld: 4,
            },
            &[1, 0],
            &cfg,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "logits", .. }),
            "short buffer for the stride: {e}"
        );
    }
}

/// Central differences of L = sum_t g_t logp_t + ge_t H_t (f64 reference) against the reference
/// gradient, with a temperature and the entropy term.
#[test]
fn reference_gradient_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let (t, v) = (3usize, 9usize);
    for tau in [1.0f32, 0.6, 1.7] {
        let z: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 1.5) as f32).collect();
        let y = [4, 0, 8];
        let g = [0.7f32, -1.3, 0.4];
        let ge = [0.5f32, 0.9, -0.8];
        let cfg = LogprobConfig {
            temperature: tau,
            ..LogprobConfig::default()
        };
        let mut dz = vec![0f32; t * v];
        cpu::logprob_backward(
            &Logits::dense(&z[..], t, v),
            &y,
            &cfg,
            &g,
            Some(&ge),
            None,
            &mut Logits::dense(&mut dz[..], t, v),
        )
        .unwrap();
        let loss = |zz: &[f32]| {
            let (mut lp, mut h, mut l) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
            cpu::logprob_forward(
                &Logits::dense(zz, t, v),
                &y,
                &cfg,
                &mut lp,
                Some(&mut h),
                &mut l,
            )
            .unwrap();
            (0..t)
                .map(|r| g[r] as f64 * lp[r] as f64 + ge[r] as f64 * h[r] as f64)
                .sum::<f64>()
        };
        for i in 0..t * v {
            let h = 1e-2f32;
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h;
            zm[i] -= h;
            let fd = (loss(&zp) - loss(&zm)) / (zp[i] as f64 - zm[i] as f64);
            assert!(
                close(dz[i] as f64, fd, 2e-4, 2e-3),
                "tau {tau} element {i}: analytic {} vs fd {fd}",
                dz[i]
            );
        }
    }
}

#[test]
fn device_softmax_math_matches_reference() {
    let mut rng = Rng::new(8);
    for &v in &[1usize, 2, 7, 100, 5000] {
        for scale in [0.1f64, 3.0, 30.0] {
            let x: Vec<f32> = (0..v).map(|_| (rng.normal() * scale) as f32).collect();
            let xd: Vec<f64> = x.iter().map(|a| *a as f64).collect();
            let m = xd.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = xd.iter().map(|a| (a - m).exp()).sum();
            let lse = m + s.ln();
            let ent = -xd.iter().map(|a| (a - lse).exp() * (a - lse)).sum::<f64>();
            for split in [None, Some(v / 3)] {
                let (l, h) = device_math::softmax_row(&x, split);
                assert!(
                    close(l as f64, lse, 1e-5, 1e-6),
                    "V {v} scale {scale}: lse {l} vs {lse}"
                );
                assert!(
                    close(h as f64, ent, 1e-5, 1e-5),
                    "V {v} scale {scale} split {split:?}: entropy {h} vs {ent}"
                );
            }
            // the gradient of one element
            let j = v / 2;
            let lp = xd[j] - lse;
            let want = 0.5 * (1.0 - lp.exp()) - 0.3 * lp.exp() * (lp + ent);
            let got = device_math::logit_grad(x[j], true, lse as f32, ent as f32, 0.5, 0.3, 1.0);
            assert!(
                close(got as f64, want, 1e-6, 1e-4),
                "V {v}: grad {got} vs {want}"
            );
        }
    }
}

fn tolerance<E: LogitElem>() -> (f64, f64) {
    match E::SUFFIX {
        "bf16" => (1e-6, 8e-3), // two bf16 ulps: both sides round their own f32 value
        "f16" => (1e-7, 1.1e-3),
        _ => (1e-7, 1e-4),
    }
}

fn random_logits<E: LogitElem>(rng: &mut Rng, t: usize, v: usize, ld: usize) -> Vec<E> {
    (0..t.saturating_sub(1) * ld + if t > 0 { v } else { 0 })
        .map(|_| E::from_f32((rng.normal() * 2.0) as f32))
        .collect()
}

fn gpu_vs_cpu<E: LogitElem>(be: &Backend) {
    let mut rng = Rng::new(21);
    let shapes = [
        (0usize, 7usize),
        (1, 1),
        (33, 1),
        (1, 50_257),
        (33, 50_257),
        (4097, 7),
        (4097, 1000),
        (33, 1000),
        (5, 262_144),
    ];
    let (abs, rel) = tolerance::<E>();
    for (i, &(t, v)) in shapes.iter().enumerate() {
        let ld = if i % 2 == 0 { v } else { v + 3 }; // odd strides take the scalar path
        let z = random_logits::<E>(&mut rng, t, v, ld);
        let logits = Logits {
            data: &z[..],
            rows: t,
            vocab: v,
            ld,
        };
        let y: Vec<i32> = (0..t)
            .map(|r| {
                if r % 11 == 5 {
                    -100
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let cfg = LogprobConfig {
            temperature: if i % 3 == 0 { 1.0 } else { 0.8 },
            ..LogprobConfig::default()
        };
        let what = format!("{} T={t} V={v} ld={ld}", E::SUFFIX);
        let (gl, gh, gs) = forward(be, &logits, &y, &cfg).unwrap();
        let (cl, ch, cs) = forward(&Backend::Cpu, &logits, &y, &cfg).unwrap();
        for r in 0..t {
            assert!(
                close(gl[r] as f64, cl[r] as f64, 2e-5, 1e-5),
                "{what} row {r}: logp {} vs {}",
                gl[r],
                cl[r]
            );
            assert!(
                close(gh[r] as f64, ch[r] as f64, 2e-5, 1e-5),
                "{what} row {r}: entropy {} vs {}",
                gh[r],
                ch[r]
            );
            assert!(
                close(gs[r] as f64, cs[r] as f64, 2e-5, 1e-5),
                "{what} row {r}: lse {} vs {}",
                gs[r],
                cs[r]
            );
        }
        let g: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
        let ge: Vec<f32> = (0..t).map(|_| rng.normal() as f32 * 0.3).collect();
        let n = z.len();
        let (mut dg, mut dc) = (vec![E::default(); n], vec![E::default(); n]);
        be.logprob_backward(
            &logits,
            &y,
            &cfg,
            &g,
            Some(&ge),
            &mut Logits {
                data: &mut dg[..],
                rows: t,
                vocab: v,
                ld,
            },
        )
        .unwrap();
        cpu::logprob_backward(
            &logits,
            &y,
            &cfg,
            &g,
            Some(&ge),
            None,
            &mut Logits {
                data: &mut dc[..],
                rows: t,
                vocab: v,
                ld,
            },
        )
        .unwrap();
        let inv_tau = 1.0 / cfg.temperature as f64;
        for r in 0..t {
            for j in 0..v {
                let (a, b) = (
                    dg[r * ld + j].to_f32() as f64,
                    dc[r * ld + j].to_f32() as f64,
                );
                // dz is a difference of terms of size p |g| and p |ge| (|log p| + |H|); f32 row
                // statistics (LSE rounded at about 1e-7 |LSE|) move p by that much relatively
                let lp = z[r * ld + j].to_f32() as f64 * inv_tau - cs[r] as f64;
                let terms = lp.exp()
                    * (g[r].abs() as f64
                        + ge[r].abs() as f64 * (1.0 + lp.abs() + ch[r].abs() as f64));
                let slack = 1e-6 * terms * (1.0 + cs[r].abs() as f64) * inv_tau;
                assert!(
                    close(a, b, abs + slack, rel),
                    "{what} dz[{r}, {j}]: {a:e} vs {b:e}"
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn logits_ops_match_reference_on_gpu() {
    let be = common::require_gpu("logits_ops_match_reference_on_gpu");
    gpu_vs_cpu::<f32>(&be);
    gpu_vs_cpu::<f16>(&be);
    gpu_vs_cpu::<bf16>(&be);
}

/// Kernel 4 on device data: (logp, entropy, LSE) device buffers.
fn device_forward<E: LogitElem>(
    g: &cuda::Gpu,
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    z: &Logits<cudarc::driver::CudaView<'_, E>>,
    labels: &cudarc::driver::CudaSlice<i32>,
    cfg: &LogprobConfig,
) -> (
    cudarc::driver::CudaSlice<f32>,
    cudarc::driver::CudaSlice<f32>,
    cudarc::driver::CudaSlice<f32>,
) {
    let t = z.rows;
    let (mut lp, mut h, mut l) = (
        s.alloc_zeros::<f32>(t).unwrap(),
        s.alloc_zeros::<f32>(t).unwrap(),
        s.alloc_zeros::<f32>(t).unwrap(),
    );
    cuda::logprob_forward(
        g,
        s,
        z,
        &labels.as_view(),
        cfg,
        &mut lp.as_view_mut(),
        Some(&mut h.as_view_mut()),
        &mut l.as_view_mut(),
        None,
    )
    .unwrap();
    (lp, h, l)
}

/// In-place and out-of-place backward give the same bits, and two runs give the same bits.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn inplace_backward_equals_out_of_place_bitwise() {
    let g = common::require_cuda("inplace_backward_equals_out_of_place_bitwise");
    let s = g.stream().clone();
    let (t, v) = (37usize, 50_257usize);
    let mut rng = Rng::new(5);
    let z: Vec<bf16> = random_logits(&mut rng, t, v, v);
    let y: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let gl: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
    let ge: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
    let cfg = LogprobConfig {
        temperature: 0.9,
        ..LogprobConfig::default()
    };
    let zd = s.clone_htod(&z).unwrap();
    let yd = s.clone_htod(&y).unwrap();
    let gd = s.clone_htod(&gl).unwrap();
    let ged = s.clone_htod(&ge).unwrap();
    let zl = Logits::dense(zd.as_view(), t, v);
    let (_logp, h, l) = device_forward(&g, &s, &zl, &yd, &cfg);
    let (yv, lv, hv, gv, gev) = (
        yd.as_view(),
        l.as_view(),
        h.as_view(),
        gd.as_view(),
        ged.as_view(),
    );
    let grads = cuda::LogprobGrads {
        labels: &yv,
        lse: &lv,
        entropy: &hv,
        g_logp: &gv,
        g_entropy: Some(&gev),
        sum_pi_squared: None,
    };
    let mut out = s.alloc_zeros::<bf16>(t * v).unwrap();
    cuda::logprob_backward(
        &g,
        &s,
        &zl,
        &grads,
        &cfg,
        &mut Logits::dense(out.as_view_mut(), t, v),
    )
    .unwrap();
    let mut inplace = s.clone_htod(&z).unwrap();
    cuda::logprob_backward_inplace(
        &g,
        &s,
        &mut Logits::dense(inplace.as_view_mut(), t, v),
        &grads,
        &cfg,
    )
    .unwrap();
    let a: Vec<u16> = s
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let b: Vec<u16> = s
        .clone_dtoh(&inplace)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(a, b, "in place vs out of place");
    let mut again = s.alloc_zeros::<bf16>(t * v).unwrap();
    cuda::logprob_backward(
        &g,
        &s,
        &zl,
        &grads,
        &cfg,
        &mut Logits::dense(again.as_view_mut(), t, v),
    )
    .unwrap();
    let c: Vec<u16> = s
        .clone_dtoh(&again)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(a, c, "two runs");
    assert!(a.iter().any(|x| *x != 0));
}

/// T * V beyond 2^31 elements (64-bit indexing): rows sampled against the CPU reference. Skipped
/// under the sanitizer (RECAP_SANITIZE).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn huge_logits_rows_match_reference() {
    let g = common::require_cuda("huge_logits_rows_match_reference");
    if std::env::var("RECAP_SANITIZE").is_ok() {
        eprintln!("huge_logits_rows_match_reference: skipped under the sanitizer (too slow)");
        return;
    }
    let s = g.stream().clone();
    let (t, v) = (14_200usize, 151_936usize);
    assert!(t * v > 1usize << 31);
    let mut rng = common::Rng::new(0x1234);
    let z: Vec<bf16> = (0..t * v)
        .map(|_| bf16::from_f32(((rng.uniform() - 0.5) * 8.0) as f32))
        .collect();
    let y: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
    let cfg = LogprobConfig::default();
    let zd = s.clone_htod(&z).unwrap();
    let yd = s.clone_htod(&y).unwrap();
    let zl = Logits::dense(zd.as_view(), t, v);
    let (lp, h, _lse) = device_forward(&g, &s, &zl, &yd, &cfg);
    let (lp, h) = (s.clone_dtoh(&lp).unwrap(), s.clone_dtoh(&h).unwrap());
    for r in [0usize, 1, 7_000, 14_123, 14_124, t - 2, t - 1] {
        let row = &z[r * v..(r + 1) * v];
        let (mut cl, mut ch, mut cs) = ([0f32], [0f32], [0f32]);
        cpu::logprob_forward(
            &Logits::dense(row, 1, v),
            &y[r..r + 1],
            &cfg,
            &mut cl,
            Some(&mut ch),
            &mut cs,
        )
        .unwrap();
        assert!(
            close(lp[r] as f64, cl[0] as f64, 2e-5, 1e-5),
            "row {r}: logp {} vs {}",
            lp[r],
            cl[0]
        );
        assert!(
            close(h[r] as f64, ch[0] as f64, 2e-5, 1e-5),
            "row {r}: entropy {} vs {}",
            h[r],
            ch[0]
        );
    }
}

/// The loss straight from logits, end to end in f64: its gradient with respect to the logits (through
/// the log-probabilities, the clipped surrogate, the KL term and the entropy bonus, at a temperature)
/// against central differences of its loss.
#[test]
fn loss_from_logits_gradient_matches_finite_differences() {
    use recap_kernels::{
        Advantages, AggMode, GrpoConfig, HostLogitsLossInputs, Mask, ObjectiveKind,
    };
    let mut rng = Rng::new(17);
    let (t, v) = (7usize, 6usize);
    let z: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 1.2) as f32).collect();
    let labels = [0, 3, 5, -100, 2, 1, 4];
    let old: Vec<f32> = (0..t).map(|_| -1.0 - rng.uniform() as f32).collect();
    let refp: Vec<f32> = (0..t).map(|_| -1.5 - rng.uniform() as f32).collect();
    let adv = [0.8f32, -0.6];
    let mask = [1u8, 1, 1, 1, 0, 1, 1];
    for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
        let cfg = GrpoConfig::default()
            .with_agg_mode(mode)
            .with_kl_coef(0.2)
            .with_kl_estimator(recap_kernels::KlEstimator::K2)
            .with_entropy_coef(0.05)
            .with_dual_clip(None)
            .with_clip_low(0.9)
            .with_clip_high(5.0);
        let lcfg = LogprobConfig {
            temperature: 0.8,
            ..LogprobConfig::default()
        };
        let inputs = HostLogitsLossInputs {
            labels: &labels,
            old_logp: &old,
            ref_logp: Some(&refp),
            rollout_logp: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::U8(&mask),
            cu_seqlens: &[0, 3, 7],
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        let run = |zz: &[f32]| {
            let mut dz = vec![0f32; t * v];
            let out = cpu::grpo_loss_from_logits(
                &Logits::dense(zz, t, v),
                &inputs,
                &cfg,
                &lcfg,
                &mut Logits::dense(&mut dz[..], t, v),
            )
            .unwrap();
            (out, dz)
        };
        let (out, dz) = run(&z);
        assert!(
            out.entropy_mean > 0.0 && out.grpo.metrics.num_tokens == 5.0,
            "ignored label and masked token excluded"
        );
        for i in 0..t * v {
            let h = 1e-2f32;
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h;
            zm[i] -= h;
            let fd = (run(&zp).0.loss - run(&zm).0.loss) / (zp[i] as f64 - zm[i] as f64);
            assert!(
                close(dz[i] as f64, fd, 2e-4, 3e-3),
                "{mode} element {i}: analytic {} vs fd {fd}",
                dz[i]
            );
        }
    }
}

/// The loss from logits on the GPU (gradient written over the logits) against the CPU reference.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn loss_from_logits_matches_reference_on_gpu() {
    use recap_kernels::{
        Advantages, AggMode, GrpoConfig, HostLogitsLossInputs, LogitsLossInputs, Mask,
        ObjectiveKind,
    };
    let g = common::require_cuda("loss_from_logits_matches_reference_on_gpu");
    let s = g.stream().clone();
    let mut rng = Rng::new(31);
    for (t_lens, v, mode, q) in [
        (
            vec![5usize, 0, 40, 33, 1],
            1000usize,
            AggMode::TokenMean,
            1.0f32,
        ),
        (vec![300, 17, 4097], 50_257, AggMode::SeqMeanTokenMean, 1.0),
        (vec![31, 32, 33, 200], 4000, AggMode::TokenMean, 0.4),
    ] {
        let t: usize = t_lens.iter().sum();
        let cu: Vec<i32> = std::iter::once(0)
            .chain(t_lens.iter().scan(0, |a, l| {
                *a += *l as i32;
                Some(*a)
            }))
            .collect();
        let b = t_lens.len();
        let z: Vec<bf16> = random_logits(&mut rng, t, v, v);
        let labels: Vec<i32> = (0..t)
            .map(|r| {
                if r % 13 == 4 {
                    -100
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let old: Vec<f32> = (0..t).map(|_| -8.0 - 4.0 * rng.uniform() as f32).collect();
        let refp: Vec<f32> = old.iter().map(|o| o + 0.1 * rng.normal() as f32).collect();
        let adv: Vec<f32> = (0..b * 2).map(|_| rng.normal() as f32).collect();
        let mask: Vec<f32> = (0..t).map(|_| (rng.below(8) != 0) as u8 as f32).collect();
        let cfg = GrpoConfig::default()
            .with_agg_mode(mode)
            .with_kl_coef(0.1)
            .with_entropy_coef(0.01)
            .with_top_entropy_quantile(q);
        let lcfg = LogprobConfig {
            temperature: 0.9,
            ..LogprobConfig::default()
        };
        let objectives = [ObjectiveKind::Policy, ObjectiveKind::Nll];
        let host_inputs = HostLogitsLossInputs {
            labels: &labels,
            old_logp: &old,
            ref_logp: Some(&refp),
            rollout_logp: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::F32(&mask),
            cu_seqlens: &cu,
            lambda: &[1.0, 0.5],
            objectives: &objectives,
            membership: None,
            normalizers: None,
        };
        let mut dz_cpu = vec![bf16::ZERO; t * v];
        let want = cpu::grpo_loss_from_logits(
            &Logits::dense(&z[..], t, v),
            &host_inputs,
            &cfg,
            &lcfg,
            &mut Logits::dense(&mut dz_cpu[..], t, v),
        )
        .unwrap();
        let mut zd = s.clone_htod(&z).unwrap();
        let (yd, od, rd, ad, md) = (
            s.clone_htod(&labels).unwrap(),
            s.clone_htod(&old).unwrap(),
            s.clone_htod(&refp).unwrap(),
            s.clone_htod(&adv).unwrap(),
            s.clone_htod(&mask).unwrap(),
        );
        let dev_inputs = LogitsLossInputs {
            labels: yd.as_view(),
            old_logp: od.as_view(),
            ref_logp: Some(rd.as_view()),
            rollout_logp: None,
            advantages: Advantages::PerSequence(ad.as_view()),
            mask: Mask::F32(md.as_view()),
            cu_seqlens: &cu,
            lambda: &[1.0, 0.5],
            objectives: &objectives,
            membership: None,
            normalizers: None,
        };
        let got = cuda::grpo_loss_from_logits(
            &g,
            &s,
            &mut Logits::dense(zd.as_view_mut(), t, v),
            &dev_inputs,
            &cfg,
            &lcfg,
        )
        .unwrap();
        let what = format!("T={t} V={v} {mode}");
        assert_close(&format!("{what} loss"), got.loss, want.loss, 2e-5, 1e-4);
        assert_close(
            &format!("{what} entropy_loss"),
            got.entropy_loss,
            want.entropy_loss,
            2e-5,
            1e-4,
        );
        assert_close(
            &format!("{what} entropy_mean"),
            got.entropy_mean,
            want.entropy_mean,
            2e-5,
            1e-4,
        );
        assert_close(
            &format!("{what} kl_loss"),
            got.grpo.kl_loss,
            want.grpo.kl_loss,
            2e-5,
            1e-4,
        );
        assert_eq!(got.grpo.metrics.num_tokens, want.grpo.metrics.num_tokens);
        let dz_gpu = s.clone_dtoh(&zd).unwrap();
        let (abs, rel) = tolerance::<bf16>();
        for i in 0..t * v {
            let (a, b) = (dz_gpu[i].to_f32() as f64, dz_cpu[i].to_f32() as f64);
            assert!(
                close(a, b, abs.max(1e-9), rel),
                "{what} dz[{i}]: {a:e} vs {b:e}"
            );
        }
    }
}

/// TRL's top-entropy-quantile mask: the `1 - q` quantile by linear interpolation (as
/// `torch.quantile`), over valid tokens only.
#[test]
fn top_entropy_mask_by_hand() {
    let ent = [0.1f32, 0.5, 0.3, 0.9, 0.7];
    let valid = [1.0f32, 1.0, 0.0, 1.0, 1.0];
    // valid entropies sorted: 0.1 0.5 0.7 0.9; q = 0.5: position 1.5, threshold 0.6
    assert_eq!(
        recap_kernels::top_entropy_mask(&ent, &valid, 0.5),
        vec![0.0, 0.0, 0.0, 1.0, 1.0]
    );
    // q = 1 keeps every valid token (threshold = the minimum); q = 0.25: position 2.25 -> 0.745
    assert_eq!(
        recap_kernels::top_entropy_mask(&ent, &valid, 1.0),
        vec![1.0, 1.0, 0.0, 1.0, 1.0]
    );
    assert_eq!(
        recap_kernels::top_entropy_mask(&ent, &valid, 0.25),
        vec![0.0, 0.0, 0.0, 1.0, 0.0]
    );
    assert_eq!(
        recap_kernels::top_entropy_mask(&ent, &[0.0; 5], 0.5),
        vec![0.0; 5]
    );
}

/// The loss from logits with `top_entropy_quantile < 1` is the loss on its log-probabilities with
/// the policy terms weighted by the entropy mask (nll and KL terms and the normalizers unchanged).
#[test]
fn top_entropy_quantile_weights_only_the_policy_terms() {
    use recap_kernels::{
        Advantages, GrpoConfig, HostGrpoInputs, HostLogitsLossInputs, Mask, ObjectiveKind,
    };
    let mut rng = Rng::new(5);
    let (t, v) = (40usize, 30usize);
    let z: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 2.0) as f32).collect();
    let labels: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let old: Vec<f32> = (0..t).map(|_| -3.0 - rng.uniform() as f32).collect();
    let refp: Vec<f32> = old.iter().map(|o| o - 0.2).collect();
    let adv = [0.7f32, 1.0, -0.4, 1.0];
    let mask = vec![1u8; t];
    let cu = [0, 25, 40];
    let objectives = [ObjectiveKind::Policy, ObjectiveKind::Nll];
    let cfg = GrpoConfig::default()
        .with_kl_coef(0.1)
        .with_top_entropy_quantile(0.3);
    let inputs = HostLogitsLossInputs {
        labels: &labels,
        old_logp: &old,
        ref_logp: Some(&refp),
        rollout_logp: None,
        advantages: Advantages::PerSequence(&adv),
        mask: Mask::U8(&mask),
        cu_seqlens: &cu,
        lambda: &[1.0, 0.5],
        objectives: &objectives,
        membership: None,
        normalizers: None,
    };
    let mut dz = vec![0f32; t * v];
    let out = cpu::grpo_loss_from_logits(
        &Logits::dense(&z[..], t, v),
        &inputs,
        &cfg,
        &LogprobConfig::default(),
        &mut Logits::dense(&mut dz[..], t, v),
    )
    .unwrap();
    let (mut lp, mut ent, mut lse) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
    cpu::logprob_forward(
        &Logits::dense(&z[..], t, v),
        &labels,
        &LogprobConfig::default(),
        &mut lp,
        Some(&mut ent),
        &mut lse,
    )
    .unwrap();
    let weights = recap_kernels::top_entropy_mask(&ent, &vec![1.0; t], 0.3);
    let kept = weights.iter().sum::<f32>();
    assert!(
        (11.0..=13.0).contains(&kept),
        "about 30 % of 40 tokens kept: {kept}"
    );
    let plain = cfg.clone().with_top_entropy_quantile(1.0);
    let manual = cpu::grpo_loss(
        &HostGrpoInputs {
            logp: &lp,
            old_logp: &old,
            ref_logp: Some(&refp),
            rollout_logp: None,
            policy_weight: Some(&weights),
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &[1.0, 0.5],
            objectives: &objectives,
            membership: None,
            normalizers: None,
        },
        &plain,
        &mut vec![0f32; t],
    )
    .unwrap();
    assert!(
        close(out.grpo.loss, manual.loss, 1e-12, 1e-9),
        "{} vs {}",
        out.grpo.loss,
        manual.loss
    );
    let unmasked = cpu::grpo_loss_from_logits(
        &Logits::dense(&z[..], t, v),
        &inputs,
        &plain,
        &LogprobConfig::default(),
        &mut Logits::dense(&mut dz[..], t, v),
    )
    .unwrap();
    assert!(
        (out.loss - unmasked.loss).abs() > 1e-6,
        "the mask changes the loss"
    );
    // the nll objective and the KL term are not masked
    assert!(close(
        out.grpo.objective_loss[1],
        unmasked.grpo.objective_loss[1],
        1e-12,
        1e-9
    ));
    assert!(close(out.grpo.kl_loss, unmasked.grpo.kl_loss, 1e-12, 1e-9));
}
