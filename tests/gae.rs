//! Generalized advantage estimation (`ops::gae`): the host reference against hand-computed cases
//! and the closed form, the backend (on a GPU, or the emulated device: the kernel) against the
//! reference on the edge layouts, and bad inputs.

mod common;

use common::{assert_all_close, edge_layouts, Rng};
use recap_kernels::ops::gae::{gae, gae_at, GaeConfig, GaeInputs, HostGaeInputs};
use recap_kernels::raw::{In, Out};
use recap_kernels::{Backend, HostMask, Mask};

fn host(
    r: &[f32],
    v: &[f32],
    mask: HostMask<'_>,
    cu: &[i32],
    config: &GaeConfig,
) -> (Vec<f32>, Vec<f32>) {
    let x = HostGaeInputs {
        token_rewards: r,
        values: v,
        mask,
        cu_seqlens: cu,
    };
    let (mut adv, mut ret) = (vec![f32::NAN; r.len()], vec![f32::NAN; r.len()]);
    gae(&x, config, &mut adv, &mut ret).unwrap();
    (adv, ret)
}

fn no_whiten(gamma: f64, lam: f64) -> GaeConfig {
    GaeConfig {
        gamma,
        lam,
        whiten: false,
    }
}

/// gamma 0.9, lam 0.8, rewards 0, 0, 1, values 0.5, 0.2, 0.1:
/// t2: delta = 1 - 0.1 = 0.9, A = 0.9; t1: delta = 0.9 * 0.1 - 0.2 = -0.11, A = -0.11 + 0.72 * 0.9
/// = 0.538; t0: delta = 0.9 * 0.2 - 0.5 = -0.32, A = -0.32 + 0.72 * 0.538 = 0.06736. With the middle
/// token masked it carries A = 0.9 and the next value 0.1: t0: delta = 0.09 - 0.5 = -0.41,
/// A = -0.41 + 0.648 = 0.238.
#[test]
fn by_hand() {
    let (r, v) = ([0.0, 0.0, 1.0], [0.5, 0.2, 0.1]);
    let (adv, ret) = host(
        &r,
        &v,
        HostMask::U8(&[1, 1, 1]),
        &[0, 3],
        &no_whiten(0.9, 0.8),
    );
    assert_all_close("advantages", &adv, &[0.06736, 0.538, 0.9], 1e-7, 1e-6);
    assert_all_close("returns", &ret, &[0.56736, 0.738, 1.0], 1e-7, 1e-6);
    let (adv, ret) = host(
        &r,
        &v,
        HostMask::U8(&[1, 0, 1]),
        &[0, 3],
        &no_whiten(0.9, 0.8),
    );
    assert_all_close("masked: advantages", &adv, &[0.238, 0.9, 0.9], 1e-7, 1e-6);
    assert_all_close("masked: returns", &ret, &[0.738, 1.1, 1.0], 1e-7, 1e-6);
    // gamma 0: A = r - v = 1, 2, 3 (two sequences); whitened: mean 2, unbiased var 1 -> -1, 0, 1
    let (adv, _) = host(
        &[1.0, 2.0, 3.0],
        &[0.0; 3],
        HostMask::F32(&[1.0; 3]),
        &[0, 1, 3],
        &GaeConfig {
            gamma: 0.0,
            ..GaeConfig::default()
        },
    );
    assert_all_close("whitened", &adv, &[-1.0, 0.0, 1.0], 1e-6, 0.0);
    // a batch whose mask sums to 1 cannot be whitened: 0 (verl raises)
    let (adv, _) = host(
        &[1.0, 2.0],
        &[0.0; 2],
        HostMask::U8(&[0, 1]),
        &[0, 2],
        &GaeConfig::default(),
    );
    assert_eq!(adv, [0.0, 0.0]);
}

/// Unmasked, A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma v_{t+1} - v_t (v_L = 0).
#[test]
fn matches_the_closed_form() {
    let mut rng = Rng::new(5);
    let lens = [1usize, 7, 40];
    let mut cu = vec![0i32];
    for n in lens {
        cu.push(cu.last().unwrap() + n as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let r: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
    let v: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
    let (gamma, lam) = (0.97, 0.9);
    let (adv, ret) = host(
        &r,
        &v,
        HostMask::U8(&vec![1; t]),
        &cu,
        &no_whiten(gamma, lam),
    );
    let mut want = vec![0f32; t];
    for s in 0..lens.len() {
        let (a, b) = (cu[s] as usize, cu[s + 1] as usize);
        let next = |i: usize| if i + 1 < b { v[i + 1] as f64 } else { 0.0 };
        for (i, w) in want.iter_mut().enumerate().take(b).skip(a) {
            *w = (i..b)
                .map(|j| {
                    let delta = r[j] as f64 + gamma * next(j) - v[j] as f64;
                    (gamma * lam).powi((j - i) as i32) * delta
                })
                .sum::<f64>() as f32;
        }
    }
    assert_all_close("advantages", &adv, &want, 1e-5, 1e-5);
    let want_ret: Vec<f32> = want.iter().zip(&v).map(|(a, v)| a + v).collect();
    assert_all_close("returns", &ret, &want_ret, 1e-5, 1e-5);
}

/// `gae_at` on host arrays at the backend's place.
fn run(
    be: &Backend,
    x: &HostGaeInputs<'_>,
    config: &GaeConfig,
) -> recap_kernels::Result<(Vec<f32>, Vec<f32>)> {
    let t = x.token_rewards.len();
    let (mut adv, mut ret) = (vec![f32::NAN; t], vec![f32::NAN; t]);
    // SAFETY: each array is the slice's memory, alive and unaliased for the call.
    unsafe {
        let a = |s: &[f32]| In::new(s.as_ptr() as usize, s.len());
        let y = GaeInputs {
            token_rewards: a(x.token_rewards),
            values: a(x.values),
            mask: match x.mask {
                Mask::F32(m) => Mask::F32(a(m)),
                Mask::U8(m) => Mask::U8(In::new(m.as_ptr() as usize, m.len())),
            },
            cu_seqlens: x.cu_seqlens,
        };
        let out = |s: &mut Vec<f32>| Out::new(s.as_mut_ptr() as usize, s.len());
        gae_at(be.place(), &y, config, out(&mut adv), out(&mut ret))?;
    }
    Ok((adv, ret))
}

on_every_backend! {
    /// The backend (on a GPU: the kernel) against the host reference on the edge layouts (lengths
    /// 0, 1, 31, 32, 33, 4097, many sequences), with u8 masks holding fully masked sequences and
    /// tool spans, f32 masks with weights, whitened or not; a second run gives the same bits; a NaN
    /// at a masked token's reward is never read, a non-finite value at an unmasked token is an error
    /// naming its argument and token.
    fn backend_matches_the_reference(be) {
        let mut rng = Rng::new(11);
        for (case, (cu, t)) in edge_layouts().into_iter().enumerate() {
            let b = cu.len() - 1;
            let r: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
            let v: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
            let mut m8: Vec<u8> = (0..t).map(|_| (rng.uniform() < 0.8) as u8).collect();
            if b > 1 {
                // sequence 1 fully masked
                m8[cu[1] as usize..cu[2] as usize].fill(0);
            }
            let mf: Vec<f32> = m8.iter().map(|&m| m as f32 * [0.5, 1.0, 2.0][rng.below(3)]).collect();
            for (mask, whiten) in [
                (Mask::U8(&m8[..]), true),
                (Mask::U8(&m8[..]), false),
                (Mask::F32(&mf[..]), true),
            ] {
                let config = GaeConfig { gamma: 0.99, lam: 0.95, whiten };
                let x = HostGaeInputs { token_rewards: &r, values: &v, mask, cu_seqlens: &cu };
                let what = format!("case {case} t {t} whiten {whiten} f32 mask {}", matches!(mask, Mask::F32(_)));
                let (adv, ret) = run(&be, &x, &config).unwrap();
                let (mut want_a, mut want_r) = (vec![0f32; t], vec![0f32; t]);
                gae(&x, &config, &mut want_a, &mut want_r).unwrap();
                assert_all_close(&format!("{what}: advantages"), &adv, &want_a, 1e-5, 1e-5);
                assert_all_close(&format!("{what}: returns"), &ret, &want_r, 1e-5, 1e-5);
                let (again, _) = run(&be, &x, &config).unwrap();
                let same = adv.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: same bits");
                if let Some(tok) = m8.iter().position(|&m| m == 0) {
                    let mut poisoned = r.clone();
                    poisoned[tok] = f32::NAN;
                    let (masked, _) = run(&be, &HostGaeInputs { token_rewards: &poisoned, ..x }, &config).unwrap();
                    assert_all_close(&format!("{what}: masked NaN"), &masked, &adv, 0.0, 0.0);
                }
                if let Some(tok) = m8.iter().position(|&m| m != 0) {
                    let mut poisoned = v.clone();
                    poisoned[tok] = f32::INFINITY;
                    let e = run(&be, &HostGaeInputs { values: &poisoned, ..x }, &config).unwrap_err().to_string();
                    assert!(e.contains("values") && e.contains(&format!("token {tok}")), "{what}: {e}");
                }
            }
        }
    }
}

on_every_backend! {
    /// Bad input is an error naming the argument and the expected shape, before any launch.
    fn bad_inputs_name_the_argument(be) {
        let (r, v, m) = ([0f32; 4], [0f32; 3], [1u8; 4]);
        let ok = HostGaeInputs { token_rewards: &r, values: &r, mask: HostMask::U8(&m), cu_seqlens: &[0, 4] };
        let config = GaeConfig::default();
        let err = |x: &HostGaeInputs<'_>, c: &GaeConfig| run(&be, x, c).unwrap_err().to_string();
        let e = err(&HostGaeInputs { values: &v, ..ok }, &config);
        assert!(e.contains("values") && e.contains("[T]"), "{e}");
        let e = err(&HostGaeInputs { mask: HostMask::U8(&m[..2]), ..ok }, &config);
        assert!(e.contains("mask") && e.contains("[T]"), "{e}");
        let e = err(&HostGaeInputs { cu_seqlens: &[0, 3], ..ok }, &config);
        assert!(e.contains("cu_seqlens"), "{e}");
        let e = err(&ok, &GaeConfig { lam: f64::NAN, ..config });
        assert!(e.contains("lam"), "{e}");
        let e = err(&ok, &GaeConfig { gamma: -1.0, ..config });
        assert!(e.contains("gamma"), "{e}");
        assert!(run(&be, &ok, &config).is_ok());
    }
}
