//! What each public call costs in CUDA driver calls, read from the emulated device's per-thread
//! counters (`cuda::count_calls`; `scripts/emulated-gpu.sh` runs these): kernel launches (GEMMs
//! included), host synchronizations, device allocations and copies, against the numbers docs/reliability.md
//! documents ("Driver calls per call"). A change that adds or removes a launch or a sync changes
//! these numbers and has to say so there. On a real driver there are no counters: the tests say so
//! and pass.

mod common;

use common::{config_for, Batch};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use recap_kernels::cuda::{self, count_calls, DeviceCalls, FusedLinearConfig, LinearHead};
use recap_kernels::{
    Advantages, AggMode, GrpoConfig, KlEstimator, Logits, LogitsLossInputs, LogprobConfig, Mask,
    ObjectiveKind,
};
use std::sync::Arc;

/// The calls `f` made, or `None` (with a note) on a real driver.
fn calls<R>(test: &str, f: impl FnOnce() -> R) -> Option<(R, DeviceCalls)> {
    let (r, c) = count_calls(f);
    if c.is_none() {
        eprintln!("{test}: the driver is not the emulated one: no call counters, nothing checked");
    }
    c.map(|c| (r, c))
}

/// `(launches, syncs, allocations, host-to-device copies, device-to-host copies)`.
fn summary(c: &DeviceCalls) -> (u64, u64, u64, u64, u64) {
    let (h, d) = c.copies();
    (c.launches(), c.syncs(), c.allocs(), h, d)
}

/// The fused loss on device inputs: recap_seq_stats (whose last block writes the normalizers) and
/// the token pass (whose last block reduces the statistics and computes the loss): 2 launches; the
/// layout (`cu_seqlens`, membership) uploaded, and one read-back of the output into pageable
/// memory followed by a stream synchronization (2 host synchronizations, the convenience call's
/// read; `cuda::grpo_loss_async` makes none, tests/async_loss.rs). The stream's workspace is
/// allocated by its first call (an f64 scratch, an i32 layout and the zeroed tickets: 3
/// allocations, 1 memset) and kept: a call of that size or smaller allocates nothing.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_loss_device_path() {
    let gpu = common::require_cuda("fused_loss_device_path");
    let s = gpu.stream().clone();
    for (seed, k, mode) in [
        (3u64, 1usize, AggMode::TokenMean),
        (6, 3, AggMode::SeqMeanTokenMean),
    ] {
        let b = Batch::random(seed, &[300, 33, 0, 4097], k);
        let cfg = config_for(seed, mode);
        let h = b.inputs(None);
        let up = |x: &[f32]| s.clone_htod(x).unwrap();
        let (lp, old, rf, adv) = (up(h.logp), up(h.old_logp), h.ref_logp.map(up), {
            match h.advantages {
                Advantages::PerSequence(a) | Advantages::PerToken(a) => up(a),
            }
        });
        let mask8: Vec<u8> = b.mask_u8.clone();
        let m = s.clone_htod(&mask8).unwrap();
        let mut grad = s.alloc_zeros::<f32>(b.t()).unwrap();
        let dev = cuda::DeviceGrpoInputs {
            logp: lp.as_view(),
            old_logp: old.as_view(),
            ref_logp: rf.as_ref().map(|r| r.as_view()),
            rollout_logp: None,
            policy_weight: None,
            advantages: match h.advantages {
                Advantages::PerSequence(_) => Advantages::PerSequence(adv.as_view()),
                Advantages::PerToken(_) => Advantages::PerToken(adv.as_view()),
            },
            mask: Mask::U8(m.as_view()),
            cu_seqlens: h.cu_seqlens,
            lambda: h.lambda,
            objectives: h.objectives,
            membership: h.membership,
            normalizers: None,
        };
        let cold = seed == 3; // the first call on this Gpu's stream
        for warm in [false, true] {
            let Some((out, c)) = calls("fused_loss_device_path", || {
                cuda::grpo_loss(&gpu, &s, &dev, &cfg, &mut grad.as_view_mut())
            }) else {
                return;
            };
            out.unwrap();
            eprintln!("fused loss K={k} (warm {warm}): {c:?}");
            let first = cold && !warm;
            let (allocs, memsets) = if first { (3, 1) } else { (0, 0) };
            if warm || first {
                assert_eq!(summary(&c), (2, 2, allocs, 1, 1), "fused loss K={k}: {c:?}");
                assert_eq!(c.get("memsets"), memsets, "fused loss K={k}: {c:?}");
            } else {
                // a larger batch than the first grows the scratch (frees and allocates again)
                assert_eq!(
                    (c.launches(), c.syncs(), c.get("memsets")),
                    (2, 2, 0),
                    "{c:?}"
                );
            }
        }
    }
}

/// The host-array convenience call (`Backend`, i.e. `raw` at `Place::CudaStaged`) adds the uploads
/// of its arrays and the read-back of the gradient; on a fresh backend its first call also
/// allocates the stream's workspace (3 allocations).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_loss_host_arrays() {
    let be = common::require_gpu("fused_loss_host_arrays");
    let b = Batch::random(5, &[64, 1, 31], 2);
    let cfg = config_for(5, AggMode::TokenMean);
    let mut g = vec![0f32; b.t()];
    let Some((out, c)) = calls("fused_loss_host_arrays", || {
        be.grpo_loss(&b.inputs(None), &cfg, &mut g)
    }) else {
        return;
    };
    out.unwrap();
    eprintln!("fused loss (host arrays): {c:?}");
    assert_eq!((c.launches(), c.syncs(), c.allocs()), (2, 4, 9), "{c:?}");
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn other_ops_host_arrays() {
    let be = common::require_gpu("other_ops_host_arrays");
    let b = Batch::random(6, &[64, 1, 31], 2);
    let t = b.t();
    let (mut kl, mut g) = (vec![0f32; t], vec![0f32; t]);
    if let Some((r, c)) = calls("kl", || {
        be.kl(&b.logp, &b.ref_logp, None, KlEstimator::K3, &mut kl, &mut g)
    }) {
        r.unwrap();
        eprintln!("kl: {c:?}");
        // the staged call copies each array up (the outputs too: a writable array is in-out) and
        // reads the two outputs back with one synchronization after the last
        assert_eq!((c.launches(), c.syncs()), (1, 3), "kl: {c:?}");
    }
    let (v, rows) = (100usize, 7usize);
    let z: Vec<f32> = (0..rows * v)
        .map(|i| ((i * 37) % 101) as f32 / 50.0)
        .collect();
    let labels: Vec<i32> = (0..rows as i32).map(|r| r * 13 % v as i32).collect();
    let (mut lp, mut h, mut lse) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
    if let Some((r, c)) = calls("logprob_forward", || {
        be.logprob_forward(
            &Logits::dense(&z[..], rows, v),
            &labels,
            &LogprobConfig::default(),
            &mut lp,
            &mut h,
            &mut lse,
        )
    }) {
        r.unwrap();
        eprintln!("logprob_forward: {c:?}");
        // the op's own read-back of the bad-label count, then one synchronous read-back per staged
        // output (logp, entropy, LSE: pageable host memory) and the final synchronization
        assert_eq!((c.launches(), c.syncs()), (1, 5), "logprob_forward: {c:?}");
    }
}

/// A small loss-from-logits batch of `t` rows, in two sequences, on the device.
struct DeviceBatch {
    labels: CudaSlice<i32>,
    old: CudaSlice<f32>,
    adv: CudaSlice<f32>,
    mask: CudaSlice<u8>,
    cu: Vec<i32>,
}

impl DeviceBatch {
    fn new(s: &Arc<CudaStream>, t: usize, v: usize) -> DeviceBatch {
        let labels: Vec<i32> = (0..t)
            .map(|r| {
                if r % 7 == 3 {
                    -100
                } else {
                    (r * 31 % v) as i32
                }
            })
            .collect();
        let old: Vec<f32> = (0..t)
            .map(|r| -(v as f32).ln() + 0.01 * (r % 5) as f32)
            .collect();
        let mask: Vec<u8> = (0..t).map(|r| (r % 5 != 0) as u8).collect();
        DeviceBatch {
            labels: s.clone_htod(&labels).unwrap(),
            old: s.clone_htod(&old).unwrap(),
            adv: s.clone_htod(&[0.5f32, -1.0]).unwrap(),
            mask: s.clone_htod(&mask).unwrap(),
            cu: vec![0, (t / 2) as i32, t as i32],
        }
    }

    /// One policy objective, no reference.
    fn inputs(&self) -> cuda::DeviceLogitsLossInputs<'_> {
        LogitsLossInputs {
            labels: self.labels.as_view(),
            old_logp: self.old.as_view(),
            ref_logp: None,
            rollout_logp: None,
            advantages: Advantages::PerSequence(self.adv.as_view()),
            mask: Mask::U8(self.mask.as_view()),
            cu_seqlens: &self.cu,
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        }
    }
}

/// The GRPO loss from logits on the device (no ref_logp, one objective): 8 launches (kernel 4,
/// the fused loss's 2, the entropy term's reduction 3, recap_logits_finish, kernel 5 in place) and
/// 2 host synchronizations, the convenience call's one read-back (a pageable copy and a stream
/// sync); the asynchronous call makes none (tests/async_logits.rs).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn loss_from_logits_device_path() {
    let gpu = common::require_cuda("loss_from_logits_device_path");
    let s = gpu.stream().clone();
    let (t, v) = (40usize, 96usize);
    let batch = DeviceBatch::new(&s, t, v);
    let inputs = batch.inputs();
    let z: Vec<f32> = (0..t * v)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut zd = s.clone_htod(&z).unwrap();
    let cfg = GrpoConfig::default();
    let Some((out, c)) = calls("loss_from_logits_device_path", || {
        cuda::grpo_loss_from_logits(
            &gpu,
            &s,
            &mut Logits::dense(zd.as_view_mut(), t, v),
            &inputs,
            &cfg,
            &LogprobConfig::default(),
        )
    }) else {
        return;
    };
    out.unwrap();
    eprintln!("loss from logits: {c:?}");
    assert_eq!((c.launches(), c.syncs()), (8, 2), "{c:?}");
}

/// The fused-linear loss on the device, 13 of its 40 rows without loss (8 masked, 6 ignored labels,
/// one both): the synchronous call computes the valid mask (1 launch) and reads it back (1 host
/// synchronization), gathers the 27 kept rows' hidden states, labels, old log-probs and mask (4
/// launches), runs the
/// call on them in 2 chunks (20 and 7 rows; 23 launches, 17 kernels and 6 GEMMs: the valid mask
/// and the batch's count; per chunk the logits GEMM, kernel 4, the fused loss's 2, kernel 5 and
/// the two gradient GEMMs; the entropy term and mean, 3 each; the finish), scatters the kept rows' hidden gradient back (1 launch) and reads the
/// result (2 host synchronizations): 29 launches, 3 synchronizations (the asynchronous call: 23
/// and none, tests/async_logits.rs).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_linear_device_path() {
    let gpu = common::require_cuda("fused_linear_device_path");
    let s = gpu.stream().clone();
    let (t, v, h) = (40usize, 96usize, 16usize);
    let batch = DeviceBatch::new(&s, t, v);
    let inputs = batch.inputs();
    let q = |i: usize| bf16::from_f32(((i * 29) % 65) as f32 / 64.0 - 0.5);
    let x: Vec<bf16> = (0..t * h).map(q).collect();
    let w: Vec<bf16> = (0..v * h).map(|i| q(i + 7)).collect();
    let (xd, wd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
    let head = LinearHead {
        hidden: xd.as_view(),
        weight: wd.as_view(),
        hidden_size: h,
        vocab: v,
    };
    let mut dh = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut dw = s.alloc_zeros::<f32>(v * h).unwrap();
    let opt = FusedLinearConfig {
        chunk_tokens: Some(20),
        ..FusedLinearConfig::default()
    };
    let cfg = GrpoConfig::default();
    let Some((out, c)) = calls("fused_linear_device_path", || {
        cuda::fused_linear_grpo_loss(
            &gpu,
            &s,
            &head,
            &inputs,
            &cfg,
            &LogprobConfig::default(),
            &opt,
            &mut dh.as_view_mut(),
            &mut dw.as_view_mut(),
        )
    }) else {
        return;
    };
    out.unwrap();
    eprintln!("fused linear: {c:?}");
    assert_eq!((c.launches(), c.syncs()), (29, 3), "{c:?}");
    assert_eq!(c.get("gemms"), 6, "{c:?}");
    assert_eq!(c.get("gemm_macs"), 3 * 27 * (v * h) as u64, "{c:?}");
}

/// GAE on device arrays (`ops::gae::gae_cuda`), whitened: 3 launches (the scan, the batch
/// statistics, the whitening) and one read-back of the non-finite check (a pageable copy and a
/// stream synchronization: 2 host synchronizations); `cu_seqlens` and the check's slots uploaded,
/// the sequences' statistics allocated (3 allocations). Without whitening: the scan alone.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gae_device_path() {
    use recap_kernels::ops::gae::{gae_cuda, GaeConfig, GaeInputs};
    let gpu = common::require_cuda("gae_device_path");
    let s = gpu.stream().clone();
    let cu = vec![0i32, 40, 41, 140];
    let t = 140;
    let r: Vec<f32> = (0..t).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    let m: Vec<u8> = (0..t).map(|i| (i % 9 != 4) as u8).collect();
    let (r, v, m) = (
        s.clone_htod(&r).unwrap(),
        s.clone_htod(&r).unwrap(),
        s.clone_htod(&m).unwrap(),
    );
    let (mut adv, mut ret) = (
        s.alloc_zeros::<f32>(t).unwrap(),
        s.alloc_zeros::<f32>(t).unwrap(),
    );
    let x = GaeInputs {
        token_rewards: r.as_view(),
        values: v.as_view(),
        mask: Mask::U8(m.as_view()),
        cu_seqlens: &cu,
    };
    for (whiten, launches) in [(true, 3), (false, 1)] {
        let config = GaeConfig {
            whiten,
            ..GaeConfig::default()
        };
        if let Some((res, c)) = calls("gae", || {
            gae_cuda(
                &gpu,
                &s,
                &x,
                &config,
                &mut adv.as_view_mut(),
                &mut ret.as_view_mut(),
            )
        }) {
            res.unwrap();
            eprintln!("gae (whiten {whiten}): {c:?}");
            assert_eq!(
                summary(&c),
                (launches, 2, 3, 2, 1),
                "gae (whiten {whiten}): {c:?}"
            );
        }
    }
}
