//! Σπ² per token (`sum_j p_j^2` of `softmax(z / tau)`, verl's `sum_pi_squared`, what its optimal
//! token baseline needs) from the logits forward's same read of each row: the reference against
//! hand-computed rows and against the formula from `log_softmax` in f64 (tiny and large
//! temperatures), its gradient against finite differences, the device math on the host, and the
//! kernels against the reference on odd shapes (lengths 0, 1, 31, 32, 33, 4097), every dtype, strided
//! rows and ignored labels, with the other outputs' bits unchanged by asking for it.

mod common;

use common::{assert_close, close, Rng};
use half::{bf16, f16};
use recap_kernels::{cpu, cuda, device_math, LogitElem, Logits, LogprobConfig};

/// `log_softmax(x)` of a row in f64, written out.
fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// Σπ² of `z / tau` two ways from `log_softmax` in f64: `sum exp(2 logp)` and
/// `exp(LSE(2x) - 2 LSE(x))` (the formula); they must agree.
fn formula(z: &[f64], tau: f64) -> f64 {
    let x: Vec<f64> = z.iter().map(|v| v / tau).collect();
    let direct: f64 = log_softmax(&x).iter().map(|lp| (2.0 * lp).exp()).sum();
    let lse = |y: &[f64]| {
        let m = y.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + y.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    let two: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
    let by_lse = (lse(&two) - 2.0 * lse(&x)).exp();
    assert!(close(direct, by_lse, 1e-15, 1e-12), "{direct} vs {by_lse}");
    direct
}

fn reference<E: LogitElem>(z: &Logits<&[E]>, tau: f32) -> Vec<f32> {
    let mut out = vec![f32::NAN; z.rows];
    let cfg = LogprobConfig {
        temperature: tau,
        ..LogprobConfig::default()
    };
    cpu::sum_pi_squared(z, &cfg, &mut out).unwrap();
    out
}

#[test]
fn reference_by_hand() {
    let ln3 = 3f32.ln();
    // rows of two: equal logits 1/2; p = (1/4, 3/4): 1/16 + 9/16; one finite logit and -inf: 1
    let z = [0.0f32, 0.0, 0.0, ln3, 0.0, f32::NEG_INFINITY];
    let got = reference(&Logits::dense(&z[..], 3, 2), 1.0);
    assert_close("(1/2, 1/2)", got[0] as f64, 0.5, 1e-7, 1e-7);
    assert_close("(1/4, 3/4)", got[1] as f64, 0.625, 1e-7, 1e-7);
    assert_eq!(got[2], 1.0, "one-hot");
    // uniform over 4: 1/4, whatever the temperature
    for tau in [0.3f32, 1.0, 4.0] {
        let got = reference(&Logits::dense(&[2.5f32; 4][..], 1, 4), tau);
        assert_close("uniform", got[0] as f64, 0.25, 1e-7, 1e-7);
    }
    // the temperature divides first: z = (0, 2 ln 3) at tau 2 is (1/4, 3/4) again
    let z = [0.0f32, 2.0 * ln3];
    assert_close(
        "tau 2",
        reference(&Logits::dense(&z[..], 1, 2), 2.0)[0] as f64,
        0.625,
        1e-7,
        1e-7,
    );
    // a single logit: 1
    assert_eq!(reference(&Logits::dense(&[3.5f32][..], 1, 1), 0.3)[0], 1.0);
}

#[test]
fn reference_matches_log_softmax_formula() {
    let mut rng = Rng::new(31);
    for &v in &[1usize, 2, 31, 32, 33, 4097] {
        for &tau in &[1e-3f32, 0.05, 0.7, 1.0, 20.0, 1e3] {
            let t = 3;
            let z: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 2.0) as f32).collect();
            let got = reference(&Logits::dense(&z[..], t, v), tau);
            for r in 0..t {
                let row: Vec<f64> = z[r * v..(r + 1) * v].iter().map(|x| *x as f64).collect();
                let want = formula(&row, tau as f64);
                assert_close(
                    &format!("V {v} tau {tau} row {r}"),
                    got[r] as f64,
                    want,
                    1e-12,
                    1e-6,
                );
                // tiny tau: the largest logit's mass; large tau: towards uniform 1/V
                if tau == 1e-3 && v > 1 {
                    assert!(got[r] > 0.5, "tiny tau: {}", got[r]);
                }
                if tau == 1e3 {
                    assert_close("large tau", got[r] as f64, 1.0 / v as f64, 0.0, 0.05);
                }
            }
        }
    }
}

/// The gradient of `g . logp + ge . H + gs . Σπ²` (the reference backward with `g_sum_pi_squared`)
/// against central differences of the reference forward, at three temperatures; an ignored label
/// keeps its Σπ² gradient.
#[test]
fn reference_gradient_matches_finite_differences() {
    let mut rng = Rng::new(32);
    let (t, v) = (3usize, 9usize);
    for tau in [1.0f32, 0.6, 1.7] {
        let z: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 1.5) as f32).collect();
        let y = [4, -100, 8];
        let g = [0.7f32, -1.3, 0.4];
        let ge = [0.5f32, 0.0, -0.8];
        let gs = [1.1f32, -2.0, 0.0];
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
            Some(&gs),
            &mut Logits::dense(&mut dz[..], t, v),
        )
        .unwrap();
        let loss = |zz: &[f32]| {
            let (mut lp, mut h, mut l, mut q) =
                (vec![0f32; t], vec![0f32; t], vec![0f32; t], vec![0f32; t]);
            let logits = Logits::dense(zz, t, v);
            cpu::logprob_forward(&logits, &y, &cfg, &mut lp, Some(&mut h), &mut l).unwrap();
            cpu::sum_pi_squared(&logits, &cfg, &mut q).unwrap();
            (0..t)
                .map(|r| {
                    g[r] as f64 * lp[r] as f64
                        + ge[r] as f64 * h[r] as f64
                        + gs[r] as f64 * q[r] as f64
                })
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
        // row 1 (ignored label, no entropy gradient) carries only the Σπ² term: not zero
        assert!(dz[v..2 * v].iter().any(|d| *d != 0.0));
    }
}

#[test]
fn device_math_matches_reference() {
    let mut rng = Rng::new(33);
    for &v in &[1usize, 2, 31, 32, 33, 4097] {
        for scale in [0.1f64, 3.0, 30.0] {
            let x: Vec<f32> = (0..v).map(|_| (rng.normal() * scale) as f32).collect();
            let xd: Vec<f64> = x.iter().map(|a| *a as f64).collect();
            let want = formula(&xd, 1.0);
            let sq = want;
            for split in [None, Some(v / 3)] {
                let got = device_math::softmax_sum_sq(&x, split);
                assert!(
                    close(got as f64, want, 1e-7, 1e-5),
                    "V {v} scale {scale} split {split:?}: {got} vs {want}"
                );
            }
            let lse = xd[0] - log_softmax(&xd)[0];
            let j = v / 2;
            let p = (xd[j] - lse).exp();
            for inv_tau in [1.0f32, 2.5] {
                let want = inv_tau as f64 * 2.0 * 0.7 * p * (p - sq);
                let got = device_math::logit_grad_sum_sq(
                    x[j],
                    lse as f32,
                    formula(&xd, 1.0) as f32,
                    0.7,
                    inv_tau,
                );
                // p - S cancels when p is near S: f32 rounding of both, scaled
                let slack = 1e-6 * inv_tau as f64 * 1.4 * p * (p + sq) + 1e-44;
                assert!(
                    close(got as f64, want, slack, 1e-4),
                    "V {v}: grad {got} vs {want}"
                );
            }
            // no upstream gradient: exactly 0, whatever the logit holds
            assert_eq!(
                device_math::logit_grad_sum_sq(f32::NAN, 0.0, 0.5, 0.0, 1.0).to_bits(),
                0
            );
        }
    }
}

fn random_logits<E: LogitElem>(rng: &mut Rng, t: usize, v: usize, ld: usize) -> Vec<E> {
    (0..t.saturating_sub(1) * ld + if t > 0 { v } else { 0 })
        .map(|_| E::from_f32((rng.normal() * 2.0) as f32))
        .collect()
}

type Dev<T> = cudarc::driver::CudaSlice<T>;

/// Kernel 4 on the device: `(logp, entropy, lse, Σπ² if asked)` read back.
fn device_forward<E: LogitElem>(
    g: &cuda::Gpu,
    zd: &Dev<E>,
    shape: (usize, usize, usize),
    yd: &Dev<i32>,
    cfg: &LogprobConfig,
    want_spp: bool,
) -> [Vec<f32>; 4] {
    let s = g.stream();
    let (t, v, ld) = shape;
    let n = t.max(1);
    let mut bufs: Vec<Dev<f32>> = (0..4).map(|_| s.alloc_zeros::<f32>(n).unwrap()).collect();
    let [lp, h, l, q] = &mut bufs[..] else {
        unreachable!()
    };
    let mut qv = q.slice_mut(..t);
    cuda::logprob_forward(
        g,
        s,
        &Logits {
            data: zd.as_view(),
            rows: t,
            vocab: v,
            ld,
        },
        &yd.slice(..t),
        cfg,
        &mut lp.slice_mut(..t),
        Some(&mut h.slice_mut(..t)),
        &mut l.slice_mut(..t),
        if want_spp { Some(&mut qv) } else { None },
    )
    .unwrap();
    let out: Vec<Vec<f32>> = bufs
        .iter()
        .map(|b| s.clone_dtoh(b).unwrap()[..t].to_vec())
        .collect();
    out.try_into().unwrap()
}

fn bits<E: LogitElem>(x: &[E]) -> Vec<u32> {
    x.iter().map(|e| e.to_f32().to_bits()).collect()
}

fn device_vs_reference<E: LogitElem>(g: &cuda::Gpu) {
    let s = g.stream();
    let mut rng = Rng::new(34);
    let shapes = [
        (0usize, 7usize),
        (1, 1),
        (31, 32),
        (32, 33),
        (33, 31),
        (4097, 7),
        (3, 4097),
        (5, 50_257),
    ];
    let (abs, rel) = match E::SUFFIX {
        "bf16" => (1e-6, 8e-3),
        "f16" => (1e-7, 1.1e-3),
        _ => (1e-7, 1e-4),
    };
    for (i, &(t, v)) in shapes.iter().enumerate() {
        let ld = if i % 2 == 0 { v } else { v + 3 };
        let z = random_logits::<E>(&mut rng, t, v, ld);
        let all_ignored = i == 3;
        let y: Vec<i32> = (0..t)
            .map(|r| {
                if all_ignored || r % 11 == 5 {
                    -100
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let tau = [1.0f32, 0.05, 20.0][i % 3];
        let cfg = LogprobConfig {
            temperature: tau,
            ..LogprobConfig::default()
        };
        let what = format!("{} T={t} V={v} ld={ld} tau {tau}", E::SUFFIX);
        let logits = Logits {
            data: &z[..],
            rows: t,
            vocab: v,
            ld,
        };
        // (an empty upload is one zeroed element: a device buffer has at least one)
        let zd = if z.is_empty() {
            s.alloc_zeros::<E>(1).unwrap()
        } else {
            s.clone_htod(&z).unwrap()
        };
        let yd = if y.is_empty() {
            s.alloc_zeros::<i32>(1).unwrap()
        } else {
            s.clone_htod(&y).unwrap()
        };
        let [lp0, h0, l0, _] = device_forward(g, &zd, (t, v, ld), &yd, &cfg, false);
        let [lp, h, l, q] = device_forward(g, &zd, (t, v, ld), &yd, &cfg, true);
        // asking for Σπ² leaves the other outputs' bits as they were
        for (name, a, b) in [("logp", &lp0, &lp), ("entropy", &h0, &h), ("lse", &l0, &l)] {
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{what}: {name} changed"
            );
        }
        let want = reference(&logits, tau);
        for r in 0..t {
            assert!(
                close(q[r] as f64, want[r] as f64, 1e-7, 2e-5),
                "{what} row {r} (label {}): Σπ² {} vs {}",
                y[r],
                q[r],
                want[r]
            );
        }
        // the backward with a Σπ² gradient against the reference; with none, and with a zero one,
        // the same bits as before
        let gl: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
        let ge: Vec<f32> = (0..t).map(|_| rng.normal() as f32 * 0.3).collect();
        let gs: Vec<f32> = (0..t)
            .map(|r| if r % 7 == 2 { 0.0 } else { rng.normal() as f32 })
            .collect();
        let zeros = vec![0f32; t];
        let up = |x: &[f32]| {
            if x.is_empty() {
                s.alloc_zeros::<f32>(1).unwrap()
            } else {
                s.clone_htod(x).unwrap()
            }
        };
        let (gld, ged, gsd, zsd, ld_, hd, qd) = (
            up(&gl),
            up(&ge),
            up(&gs),
            up(&zeros),
            up(&l),
            up(&h),
            up(&q),
        );
        let run = |g_spp: Option<&Dev<f32>>| -> Vec<E> {
            let (yv, lv, hv, gv, gev, qv) = (
                yd.slice(..t),
                ld_.slice(..t),
                hd.slice(..t),
                gld.slice(..t),
                ged.slice(..t),
                qd.slice(..t),
            );
            let gsv = g_spp.map(|x| x.slice(..t));
            let grads = cuda::LogprobGrads {
                labels: &yv,
                lse: &lv,
                entropy: &hv,
                g_logp: &gv,
                g_entropy: Some(&gev),
                sum_pi_squared: gsv.as_ref().map(|x| (&qv, x)),
            };
            let mut out = s.alloc_zeros::<E>(z.len().max(1)).unwrap();
            cuda::logprob_backward(
                g,
                s,
                &Logits {
                    data: zd.slice(..z.len()),
                    rows: t,
                    vocab: v,
                    ld,
                },
                &grads,
                &cfg,
                &mut Logits {
                    data: out.slice_mut(..z.len()),
                    rows: t,
                    vocab: v,
                    ld,
                },
            )
            .unwrap();
            s.clone_dtoh(&out).unwrap()[..z.len()].to_vec()
        };
        let (none, zero, with) = (run(None), run(Some(&zsd)), run(Some(&gsd)));
        // the gaps between rows are not written: compare the rows only
        let rows =
            |x: &[E]| -> Vec<u32> { (0..t).flat_map(|r| bits(&x[r * ld..r * ld + v])).collect() };
        assert_eq!(
            rows(&none),
            rows(&zero),
            "{what}: a zero Σπ² gradient changed bits"
        );
        let mut dc = vec![E::default(); z.len()];
        cpu::logprob_backward(
            &logits,
            &y,
            &cfg,
            &gl,
            Some(&ge),
            Some(&gs),
            &mut Logits {
                data: &mut dc[..],
                rows: t,
                vocab: v,
                ld,
            },
        )
        .unwrap();
        // the Σπ² term moved the gradient (somewhere: a near-uniform row's term can round away)
        if t > 0 && v > 1 {
            assert_ne!(
                rows(&with),
                rows(&none),
                "{what}: the Σπ² gradient changed nothing"
            );
        }
        let inv_tau = 1.0 / tau as f64;
        for r in 0..t {
            for j in 0..v {
                let (a, b) = (
                    with[r * ld + j].to_f32() as f64,
                    dc[r * ld + j].to_f32() as f64,
                );
                let lpj = z[r * ld + j].to_f32() as f64 * inv_tau - l[r] as f64;
                let p = lpj.exp();
                let terms = p
                    * (gl[r].abs() as f64
                        + ge[r].abs() as f64 * (1.0 + lpj.abs() + h[r].abs() as f64)
                        + 2.0 * gs[r].abs() as f64 * (p + q[r] as f64));
                let slack = 1e-6 * terms * (1.0 + l[r].abs() as f64) * inv_tau;
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
fn sum_pi_squared_matches_reference_on_gpu() {
    let g = common::require_cuda("sum_pi_squared_matches_reference_on_gpu");
    device_vs_reference::<f32>(&g);
    device_vs_reference::<f16>(&g);
    device_vs_reference::<bf16>(&g);
}
