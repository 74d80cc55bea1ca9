//! The fused loss's asynchronous path (`cuda::grpo_loss_async`): the same bits as the synchronous
//! call, with the layout on the host or on the device; checks made on the device reported by the
//! read; zero host synchronizations, two launches and no allocation in steady state (counted on
//! the emulated device); and a CUDA-graph capture of one call replayed 10 times giving the eager
//! call's bits. GPU-only tests: on the emulated device in CI (`scripts/emulated-gpu.sh`), on a
//! GPU when one is present.

mod common;

use common::{config_for, Batch};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use recap_kernels::cuda::{self, count_calls, DeviceLayout, Gpu};
use recap_kernels::{Advantages, AggMode, GrpoConfig, Mask};
use std::sync::Arc;

/// A batch's arrays on the device, its layout among them.
struct Dev {
    logp: CudaSlice<f32>,
    old: CudaSlice<f32>,
    rf: Option<CudaSlice<f32>>,
    roll: Option<CudaSlice<f32>>,
    adv: CudaSlice<f32>,
    mask: CudaSlice<u8>,
    cu: CudaSlice<i32>,
    membership: Option<CudaSlice<u32>>,
    lambda: CudaSlice<f32>,
}

impl Dev {
    fn new(s: &Arc<CudaStream>, b: &Batch) -> Dev {
        let h = b.inputs(None);
        let up = |x: &[f32]| s.clone_htod(x).unwrap();
        Dev {
            logp: up(h.logp),
            old: up(h.old_logp),
            rf: h.ref_logp.map(up),
            roll: h.rollout_logp.map(up),
            adv: match h.advantages {
                Advantages::PerSequence(a) | Advantages::PerToken(a) => up(a),
            },
            mask: s.clone_htod(&b.mask_u8).unwrap(),
            cu: s.clone_htod(&b.cu).unwrap(),
            membership: b.membership.as_ref().map(|m| s.clone_htod(m).unwrap()),
            lambda: up(&b.lambda),
        }
    }

    /// The device inputs; `host_layout`: `cu_seqlens`, `membership` and `lambda` from the host.
    fn inputs<'a>(&'a self, b: &'a Batch, host_layout: bool) -> cuda::DeviceGrpoInputs<'a> {
        cuda::DeviceGrpoInputs {
            logp: self.logp.as_view(),
            old_logp: self.old.as_view(),
            ref_logp: self.rf.as_ref().map(|r| r.as_view()),
            rollout_logp: self.roll.as_ref().map(|r| r.as_view()),
            policy_weight: None,
            advantages: if b.adv_per_token {
                Advantages::PerToken(self.adv.as_view())
            } else {
                Advantages::PerSequence(self.adv.as_view())
            },
            mask: Mask::U8(self.mask.as_view()),
            cu_seqlens: if host_layout { &b.cu } else { &[] },
            lambda: if host_layout { &b.lambda } else { &[] },
            objectives: &b.objectives,
            membership: if host_layout {
                b.membership.as_deref()
            } else {
                None
            },
            normalizers: None,
        }
    }
}

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bits32(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The batches: several lengths (0, 1, 31..33, 4097), K = 1, 3 and 8, u8 masks, configs varying
/// with the seed (plain and extended kernels).
fn batches() -> Vec<(Batch, GrpoConfig)> {
    [
        (11u64, vec![300usize, 1, 0, 33], 1usize, AggMode::TokenMean),
        (4, vec![31, 32, 4097], 3, AggMode::SeqMeanTokenMean),
        (7, vec![64; 12], 8, AggMode::SeqMeanTokenSum),
    ]
    .into_iter()
    .map(|(seed, lens, k, agg)| {
        let mut b = Batch::random(seed, &lens, k);
        b.use_u8 = true;
        (b, config_for(seed, agg))
    })
    .collect()
}

/// The asynchronous call with the layout on the host or on the device gives the synchronous
/// call's bits: gradient, loss, aggregates and metrics.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn async_matches_sync_bits() {
    let gpu = common::require_cuda("async_matches_sync_bits");
    let s = gpu.stream().clone();
    for (b, cfg) in batches() {
        let d = Dev::new(&s, &b);
        let k = b.lambda.len();
        let mut g0 = s.alloc_zeros::<f32>(b.t()).unwrap();
        let want =
            cuda::grpo_loss(&gpu, &s, &d.inputs(&b, true), &cfg, &mut g0.as_view_mut()).unwrap();
        let g0 = s.clone_dtoh(&g0).unwrap();
        for host_layout in [true, false] {
            let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
            let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(k)).unwrap();
            let (cu, mem, lam) = (
                d.cu.as_view(),
                d.membership.as_ref().map(|m| m.as_view()),
                d.lambda.as_view(),
            );
            let layout = DeviceLayout {
                cu_seqlens: &cu,
                membership: mem.as_ref(),
                lambda: Some(&lam),
            };
            let pending = cuda::grpo_loss_async(
                &gpu,
                &s,
                &d.inputs(&b, host_layout),
                (!host_layout).then_some(&layout),
                &cfg,
                &mut g.as_view_mut(),
                &mut out.as_view_mut(),
            )
            .unwrap();
            let got = pending.read(&s, &out.as_view()).unwrap();
            assert_eq!(got, want, "host_layout {host_layout}");
            assert_eq!(got.loss.to_bits(), want.loss.to_bits());
            assert_eq!(bits32(&s.clone_dtoh(&g).unwrap()), bits32(&g0));
            let raw = s.clone_dtoh(&out).unwrap();
            assert_eq!(raw[cuda::GRPO_OUTPUT_LOSS].to_bits(), want.loss.to_bits());
        }
    }
}

/// On the emulated device: the asynchronous call makes 2 launches and no host synchronization, no
/// allocation and no memset once the stream's workspace is warm; with the layout on the device it
/// copies nothing from the host either. The synchronous call adds one read-back (2 syncs).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn async_calls_counted() {
    let gpu = common::require_cuda("async_calls_counted");
    let s = gpu.stream().clone();
    for (b, cfg) in batches() {
        let d = Dev::new(&s, &b);
        let k = b.lambda.len();
        let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(k)).unwrap();
        let (cu, mem) = (d.cu.as_view(), d.membership.as_ref().map(|m| m.as_view()));
        let layout = DeviceLayout {
            cu_seqlens: &cu,
            membership: mem.as_ref(),
            lambda: None,
        };
        let mut dev_inputs = d.inputs(&b, false);
        dev_inputs.lambda = &b.lambda;
        // warm the workspace at this size
        cuda::grpo_loss(&gpu, &s, &d.inputs(&b, true), &cfg, &mut g.as_view_mut()).unwrap();
        let (r, c) = count_calls(|| {
            cuda::grpo_loss(&gpu, &s, &d.inputs(&b, true), &cfg, &mut g.as_view_mut())
        });
        r.unwrap();
        let Some(c) = c else {
            eprintln!("async_calls_counted: not the emulated driver: no counters, nothing checked");
            return;
        };
        let summary = |c: &cuda::DeviceCalls| {
            let (h, dh) = c.copies();
            (c.launches(), c.syncs(), c.allocs(), c.get("memsets"), h, dh)
        };
        assert_eq!(summary(&c), (2, 2, 0, 0, 1, 1), "sync call, K={k}: {c:?}");
        let host_inputs = d.inputs(&b, true);
        for (host_layout, htod) in [(true, 1), (false, 0)] {
            let (r, c) = count_calls(|| {
                cuda::grpo_loss_async(
                    &gpu,
                    &s,
                    if host_layout {
                        &host_inputs
                    } else {
                        &dev_inputs
                    },
                    (!host_layout).then_some(&layout),
                    &cfg,
                    &mut g.as_view_mut(),
                    &mut out.as_view_mut(),
                )
            });
            let pending = r.unwrap();
            let c = c.unwrap();
            assert_eq!(
                summary(&c),
                (2, 0, 0, 0, htod, 0),
                "async call, host layout {host_layout}, K={k}: {c:?}"
            );
            let (r, c) = count_calls(|| pending.read(&s, &out.as_view()));
            r.unwrap();
            let c = c.unwrap();
            assert_eq!(summary(&c), (0, 2, 0, 0, 0, 1), "read, K={k}: {c:?}");
        }
    }
}

/// A layout passed on the device is checked there: a bad `cu_seqlens`, `membership` or `lambda`
/// makes the device loss NaN and the read an error naming the argument (and nothing is read or
/// written out of bounds, which the emulated device's red zones would catch).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn device_layout_checked_on_device() {
    let gpu = common::require_cuda("device_layout_checked_on_device");
    let s = gpu.stream().clone();
    let mut b = Batch::random(4, &[31, 32, 40], 3);
    b.use_u8 = true;
    b.membership = Some(vec![0b011, 0b110, 0b101]);
    let cfg = config_for(4, AggMode::TokenMean);
    let t = b.t() as i32;
    // (the argument named, cu_seqlens, membership, lambda)
    type Case = (&'static str, Vec<i32>, Vec<u32>, Vec<f32>);
    let cases: Vec<Case> = vec![
        (
            "cu_seqlens",
            vec![0, 40, 30, t],
            vec![1, 2, 4],
            vec![1.0; 3],
        ),
        (
            "cu_seqlens",
            vec![0, 31, 63, t - 1],
            vec![1, 2, 4],
            vec![1.0; 3],
        ),
        (
            "cu_seqlens",
            vec![-5, 31, 63, t + 7],
            vec![1, 2, 4],
            vec![1.0; 3],
        ),
        (
            "membership",
            vec![0, 31, 63, t],
            vec![1, 8, 4],
            vec![1.0; 3],
        ),
        (
            "lambda",
            vec![0, 31, 63, t],
            vec![1, 2, 4],
            vec![1.0, -1.0, 1.0],
        ),
        (
            "lambda",
            vec![0, 31, 63, t],
            vec![1, 2, 4],
            vec![1.0, f32::NAN, 1.0],
        ),
    ];
    let d = Dev::new(&s, &b);
    let mut inputs = d.inputs(&b, false);
    inputs.lambda = &[];
    for (arg, cu, mem, lam) in cases {
        let (cu_d, mem_d, lam_d) = (
            s.clone_htod(&cu).unwrap(),
            s.clone_htod(&mem).unwrap(),
            s.clone_htod(&lam).unwrap(),
        );
        let (cu_v, mem_v, lam_v) = (cu_d.as_view(), mem_d.as_view(), lam_d.as_view());
        let layout = DeviceLayout {
            cu_seqlens: &cu_v,
            membership: Some(&mem_v),
            lambda: Some(&lam_v),
        };
        let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(3)).unwrap();
        let pending = cuda::grpo_loss_async(
            &gpu,
            &s,
            &inputs,
            Some(&layout),
            &cfg,
            &mut g.as_view_mut(),
            &mut out.as_view_mut(),
        )
        .unwrap();
        let err = pending.read(&s, &out.as_view()).unwrap_err().to_string();
        assert!(err.contains(arg), "{arg} {cu:?} {mem:?} {lam:?}: {err}");
        assert!(s.clone_dtoh(&out).unwrap()[cuda::GRPO_OUTPUT_LOSS].is_nan());
    }
    // a host layout and a device layout at once is refused on the host, before any launch
    let (cu_v, lam_v) = (d.cu.as_view(), d.lambda.as_view());
    let layout = DeviceLayout {
        cu_seqlens: &cu_v,
        membership: None,
        lambda: Some(&lam_v),
    };
    let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
    let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(3)).unwrap();
    let err = cuda::grpo_loss_async(
        &gpu,
        &s,
        &d.inputs(&b, true),
        Some(&layout),
        &cfg,
        &mut g.as_view_mut(),
        &mut out.as_view_mut(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cu_seqlens"), "{err}");
}

/// One asynchronous call (layout on the device) captured in a CUDA graph and replayed 10 times
/// gives the eager call's bits each time, with new inputs written between replays read by the
/// graph (it holds addresses, not values). The synchronous call cannot be captured: the driver
/// refuses its read-back (the emulated driver refuses synchronizations, allocations and host
/// copies while a stream captures, as a GPU's driver does).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn capture_replays_bits() {
    let gpu = common::require_cuda("capture_replays_bits");
    // as PyTorch users do: the caller keeps stream order itself (no cudarc events to wait on
    // inside the capture)
    // SAFETY: every buffer of this test is used on `s` only.
    unsafe { gpu.context().disable_event_tracking() };
    let s = gpu.context().new_stream().unwrap();
    for (b, cfg) in batches() {
        let k = b.lambda.len();
        let d = Dev::new(&s, &b);
        let (cu, mem, lam) = (
            d.cu.as_view(),
            d.membership.as_ref().map(|m| m.as_view()),
            d.lambda.as_view(),
        );
        let layout = DeviceLayout {
            cu_seqlens: &cu,
            membership: mem.as_ref(),
            lambda: Some(&lam),
        };
        let inputs = d.inputs(&b, false);
        let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(k)).unwrap();
        let call = |g: &mut CudaSlice<f32>, out: &mut CudaSlice<f64>| {
            cuda::grpo_loss_async(
                &gpu,
                &s,
                &inputs,
                Some(&layout),
                &cfg,
                &mut g.as_view_mut(),
                &mut out.as_view_mut(),
            )
        };
        // eager: the reference bits (and the workspace warmed at this size)
        let pending = call(&mut g, &mut out).unwrap();
        let want = pending.read(&s, &out.as_view()).unwrap();
        let (want_g, want_out) = (s.clone_dtoh(&g).unwrap(), s.clone_dtoh(&out).unwrap());

        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = call(&mut g, &mut out);
        let graph = s
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        captured.unwrap();
        for replay in 0..10 {
            s.memset_zeros(&mut g).unwrap();
            s.memset_zeros(&mut out).unwrap();
            graph.launch().unwrap();
            let got = pending.read(&s, &out.as_view()).unwrap();
            assert_eq!(got, want, "K={k} replay {replay}");
            assert_eq!(
                bits32(&s.clone_dtoh(&g).unwrap()),
                bits32(&want_g),
                "replay {replay}"
            );
            assert_eq!(
                bits(&s.clone_dtoh(&out).unwrap()),
                bits(&want_out),
                "replay {replay}"
            );
        }
        drop(graph);
    }
    capture_refuses_sync_call(&gpu, &s);
}

fn capture_refuses_sync_call(gpu: &Arc<Gpu>, s: &Arc<CudaStream>) {
    let (b, cfg) = batches().remove(0);
    let d = Dev::new(s, &b);
    let mut g = s.alloc_zeros::<f32>(b.t()).unwrap();
    cuda::grpo_loss(gpu, s, &d.inputs(&b, true), &cfg, &mut g.as_view_mut()).unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let r = cuda::grpo_loss(gpu, s, &d.inputs(&b, true), &cfg, &mut g.as_view_mut());
    let end = s.end_capture(CUgraphInstantiate_flags(0));
    assert!(r.is_err(), "the synchronous call was captured");
    assert!(end.is_err(), "the capture survived a refused call");
}
