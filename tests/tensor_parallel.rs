//! Vocabulary-parallel log-probabilities: the three steps (partials of each shard, their combine,
//! the backward on a shard) on simulated shards against the whole-vocabulary reference, for V not
//! divisible by the shards, labels in every shard and ignored, a temperature, with Σπ² (verl's
//! `sum_pi_squared`, 4 planes) and its gradient; the combine gives the same bits for every order
//! of arrival once sorted by vocab_start; the GPU kernels against the CPU reference.

mod common;

use common::{assert_close, Rng};
use recap_kernels::tensor_parallel::{shard_order, shard_range};
use recap_kernels::{cpu, Logits, LogprobConfig};

struct Case {
    t: usize,
    v: usize,
    z: Vec<f32>,
    labels: Vec<i32>,
    g_logp: Vec<f32>,
    g_ent: Vec<f32>,
    g_spp: Vec<f32>,
}

fn case(seed: u64, t: usize, v: usize) -> Case {
    let mut rng = Rng::new(seed);
    let z = (0..t * v).map(|_| (3.0 * rng.normal()) as f32).collect();
    let labels = (0..t)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                rng.below(v) as i32
            }
        })
        .collect();
    let g_logp = (0..t).map(|_| rng.normal() as f32).collect();
    let g_ent = (0..t).map(|_| rng.normal() as f32).collect();
    let g_spp = (0..t).map(|_| rng.normal() as f32).collect();
    Case {
        t,
        v,
        z,
        labels,
        g_logp,
        g_ent,
        g_spp,
    }
}

/// Shard `r` of `p`: its columns of every row.
fn shard(c: &Case, p: usize, r: usize) -> (usize, Vec<f32>) {
    let range = shard_range(c.v, p, r);
    let data = (0..c.t)
        .flat_map(|row| c.z[row * c.v + range.start..row * c.v + range.end].to_vec())
        .collect();
    (range.start, data)
}

/// The three steps on the host for `p` shards combined in the order `arrival` (then sorted), with
/// 4 planes: (logp, entropy, lse, Σπ², the shards' gradients joined back into [T, V], Σπ² with its
/// upstream gradient).
type Sharded = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn sharded(c: &Case, p: usize, arrival: &[usize], cfg: &LogprobConfig) -> Sharded {
    let shards: Vec<(usize, Vec<f32>)> = (0..p).map(|r| shard(c, p, r)).collect();
    let mut gathered = Vec::new();
    for &r in arrival {
        let (start, data) = &shards[r];
        let vr = data.len() / c.t.max(1);
        let mut part = vec![0f32; 4 * c.t];
        cpu::tp_partials(
            &Logits::dense(&data[..], c.t, vr),
            &c.labels,
            *start,
            cfg,
            &mut part,
        )
        .unwrap();
        gathered.push((*start as i64, part));
    }
    let starts: Vec<i64> = gathered.iter().map(|g| g.0).collect();
    let sorted: Vec<f32> = shard_order(&starts)
        .into_iter()
        .flat_map(|i| gathered[i].1.clone())
        .collect();
    let (mut logp, mut ent, mut lse) = (vec![0f32; c.t], vec![0f32; c.t], vec![0f32; c.t]);
    let mut spp = vec![0f32; c.t];
    cpu::tp_combine(
        &sorted,
        p,
        &c.labels,
        cfg,
        &mut logp,
        &mut ent,
        &mut lse,
        Some(&mut spp),
    )
    .unwrap();
    let mut grad = vec![0f32; c.t * c.v];
    for (start, data) in &shards {
        let vr = data.len() / c.t.max(1);
        let mut d = vec![0f32; data.len()];
        cpu::tp_backward(
            &Logits::dense(&data[..], c.t, vr),
            &c.labels,
            *start,
            &lse,
            &ent,
            &c.g_logp,
            Some(&c.g_ent),
            Some((&spp, &c.g_spp)),
            cfg,
            &mut Logits::dense(&mut d[..], c.t, vr),
        )
        .unwrap();
        for row in 0..c.t {
            grad[row * c.v + start..row * c.v + start + vr]
                .copy_from_slice(&d[row * vr..(row + 1) * vr]);
        }
    }
    (logp, ent, lse, spp, grad)
}

#[test]
fn shards_reproduce_the_whole_vocabulary() {
    let cfg = LogprobConfig {
        temperature: 0.7,
        ignore_index: -100,
    };
    for (seed, t, v) in [
        (1u64, 1usize, 37usize),
        (2, 31, 37),
        (3, 33, 101),
        (4, 32, 8),
    ] {
        let c = case(seed, t, v);
        let (mut lp, mut h, mut l) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
        cpu::logprob_forward(
            &Logits::dense(&c.z[..], t, v),
            &c.labels,
            &cfg,
            &mut lp,
            Some(&mut h),
            &mut l,
        )
        .unwrap();
        let mut q = vec![0f32; t];
        cpu::sum_pi_squared(&Logits::dense(&c.z[..], t, v), &cfg, &mut q).unwrap();
        let mut whole_grad = vec![0f32; t * v];
        cpu::logprob_backward(
            &Logits::dense(&c.z[..], t, v),
            &c.labels,
            &cfg,
            &c.g_logp,
            Some(&c.g_ent),
            Some(&c.g_spp),
            &mut Logits::dense(&mut whole_grad[..], t, v),
        )
        .unwrap();
        for p in [1usize, 2, 3, 4, 7] {
            let (logp, ent, lse, spp, grad) = sharded(&c, p, &(0..p).collect::<Vec<_>>(), &cfg);
            for row in 0..t {
                let what = format!("T={t} V={v} P={p} row {row}");
                assert_close(
                    &format!("{what} logp"),
                    logp[row] as f64,
                    lp[row] as f64,
                    1e-5,
                    1e-5,
                );
                assert_close(
                    &format!("{what} entropy"),
                    ent[row] as f64,
                    h[row] as f64,
                    1e-5,
                    1e-5,
                );
                assert_close(
                    &format!("{what} lse"),
                    lse[row] as f64,
                    l[row] as f64,
                    1e-5,
                    1e-6,
                );
                assert_close(
                    &format!("{what} sum_pi_squared"),
                    spp[row] as f64,
                    q[row] as f64,
                    1e-7,
                    1e-5,
                );
            }
            common::assert_all_close(
                &format!("T={t} V={v} P={p} gradient"),
                &grad,
                &whole_grad,
                1e-6,
                1e-4,
            );
        }
    }
}

/// Every order of arrival of four shards' partials gives the same bits once sorted by vocab_start.
#[test]
fn the_combine_is_the_same_for_every_order_of_arrival() {
    let cfg = LogprobConfig::default();
    let c = case(9, 33, 37);
    let first = sharded(&c, 4, &[0, 1, 2, 3], &cfg);
    let mut perms = Vec::new();
    permute(&mut vec![0, 1, 2, 3], 0, &mut perms);
    assert_eq!(perms.len(), 24);
    for perm in perms {
        let got = sharded(&c, 4, &perm, &cfg);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.0), bits(&first.0), "logp, arrival {perm:?}");
        assert_eq!(bits(&got.1), bits(&first.1), "entropy, arrival {perm:?}");
        assert_eq!(
            bits(&got.3),
            bits(&first.3),
            "sum_pi_squared, arrival {perm:?}"
        );
    }
}

fn permute(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
    if k == v.len() {
        out.push(v.clone());
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, out);
        v.swap(k, i);
    }
}

#[test]
fn a_label_in_no_shard_is_an_error() {
    let cfg = LogprobConfig::default();
    let c = case(5, 4, 10);
    let (start, data) = shard(&c, 2, 0);
    let mut part = vec![0f32; 12];
    cpu::tp_partials(
        &Logits::dense(&data[..], 4, 5),
        &[1, 2, 300, 3],
        start,
        &cfg,
        &mut part,
    )
    .unwrap();
    let (mut a, mut b, mut d) = (vec![0f32; 4], vec![0f32; 4], vec![0f32; 4]);
    let y = [1, 2, 300, 3];
    let e = cpu::tp_combine(&part, 1, &y, &cfg, &mut a, &mut b, &mut d, None).unwrap_err();
    assert!(e.to_string().contains("no shard"), "{e}");
    let e = cpu::tp_combine(&part[..11], 1, &y, &cfg, &mut a, &mut b, &mut d, None).unwrap_err();
    assert!(e.to_string().contains("partials"), "{e}");
    // Σπ² needs the 4-plane partials
    let mut q = vec![0f32; 4];
    let e = cpu::tp_combine(&part, 1, &y, &cfg, &mut a, &mut b, &mut d, Some(&mut q)).unwrap_err();
    assert!(e.to_string().contains("sum_pi_squared"), "{e}");
    let mut five = vec![0f32; 20];
    let e = cpu::tp_partials(&Logits::dense(&data[..], 4, 5), &y, start, &cfg, &mut five);
    assert!(e.unwrap_err().to_string().contains("partials"));
}

/// The kernels (partials, combine, backward on a shard) on simulated shards against the CPU
/// reference, f32 and bf16.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gpu_tensor_parallel_matches_the_reference() {
    let gpu = common::require_cuda("gpu_tensor_parallel_matches_the_reference");
    use recap_kernels::cuda;
    let s = gpu.stream().clone();
    let cfg = LogprobConfig {
        temperature: 0.9,
        ignore_index: -100,
    };
    for (seed, t, v, p) in [
        (11u64, 33usize, 151usize, 4usize),
        (12, 1, 37, 3),
        (13, 4097, 64, 2),
    ] {
        let c = case(seed, t, v);
        let (want_lp, want_h, want_lse, want_spp, want_grad) =
            sharded(&c, p, &(0..p).collect::<Vec<_>>(), &cfg);
        let labels = s.clone_htod(&c.labels).unwrap();
        let mut parts = s.alloc_zeros::<f32>(p * 4 * t).unwrap();
        let mut shards = Vec::new();
        for r in 0..p {
            let (start, data) = shard(&c, p, r);
            let vr = data.len() / t;
            let z = s.clone_htod(&data).unwrap();
            cuda::tp_partials(
                &gpu,
                &s,
                &Logits::dense(z.slice(..), t, vr),
                &labels.slice(..),
                start,
                &cfg,
                &mut parts.slice_mut(r * 4 * t..(r + 1) * 4 * t),
            )
            .unwrap();
            shards.push((start, vr, z));
        }
        let (mut lp, mut h, mut lse, mut spp) = (
            s.alloc_zeros::<f32>(t).unwrap(),
            s.alloc_zeros::<f32>(t).unwrap(),
            s.alloc_zeros::<f32>(t).unwrap(),
            s.alloc_zeros::<f32>(t).unwrap(),
        );
        cuda::tp_combine(
            &gpu,
            &s,
            &parts.slice(..),
            p,
            &labels.slice(..),
            &cfg,
            &mut lp.slice_mut(..),
            &mut h.slice_mut(..),
            &mut lse.slice_mut(..),
            Some(&mut spp.slice_mut(..)),
        )
        .unwrap();
        let what = format!("GPU T={t} V={v} P={p}");
        common::assert_all_close(
            &format!("{what} logp"),
            &s.clone_dtoh(&lp).unwrap(),
            &want_lp,
            1e-5,
            1e-5,
        );
        common::assert_all_close(
            &format!("{what} entropy"),
            &s.clone_dtoh(&h).unwrap(),
            &want_h,
            1e-5,
            1e-5,
        );
        common::assert_all_close(
            &format!("{what} lse"),
            &s.clone_dtoh(&lse).unwrap(),
            &want_lse,
            1e-5,
            1e-6,
        );
        common::assert_all_close(
            &format!("{what} sum_pi_squared"),
            &s.clone_dtoh(&spp).unwrap(),
            &want_spp,
            1e-7,
            1e-5,
        );
        // the backward from the reference's combined statistics (the same inputs as the
        // reference's backward: its sum_pi_squared term moves with S, 2 g p dS / tau)
        let (gl, ge, gs) = (
            s.clone_htod(&c.g_logp).unwrap(),
            s.clone_htod(&c.g_ent).unwrap(),
            s.clone_htod(&c.g_spp).unwrap(),
        );
        let (lse, h, spp) = (
            s.clone_htod(&want_lse).unwrap(),
            s.clone_htod(&want_h).unwrap(),
            s.clone_htod(&want_spp).unwrap(),
        );
        let mut grad = vec![0f32; t * v];
        for (start, vr, z) in shards.iter_mut() {
            let (yv, lv, hv, glv, gev, qv, gsv) = (
                labels.slice(..),
                lse.slice(..),
                h.slice(..),
                gl.slice(..),
                ge.slice(..),
                spp.slice(..),
                gs.slice(..),
            );
            let grads = cuda::LogprobGrads {
                labels: &yv,
                lse: &lv,
                entropy: &hv,
                g_logp: &glv,
                g_entropy: Some(&gev),
                sum_pi_squared: Some((&qv, &gsv)),
            };
            cuda::tp_backward_inplace(
                &gpu,
                &s,
                &mut Logits::dense(z.slice_mut(..), t, *vr),
                &grads,
                *start,
                &cfg,
            )
            .unwrap();
            let d = s.clone_dtoh(z).unwrap();
            for row in 0..t {
                grad[row * v + *start..row * v + *start + *vr]
                    .copy_from_slice(&d[row * *vr..(row + 1) * *vr]);
            }
        }
        common::assert_all_close(&format!("{what} gradient"), &grad, &want_grad, 1e-6, 1e-4);
    }
}
