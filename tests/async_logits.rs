//! The asynchronous losses from logits and from the last layer
//! (`cuda::grpo_loss_from_logits_async`, `cuda::fused_linear_grpo_loss_async`): the synchronous
//! calls' bits (loss, metrics, gradients) with the layout on the host or on the device; zero host
//! synchronizations and no allocation once the stream's scratch is warm (counted on the emulated
//! device); labels out of range reported by the read; and one call of each captured in a CUDA
//! graph and replayed 10 times giving the eager call's bits. GPU-only tests: on the emulated device
//! in CI (`scripts/emulated-gpu.sh`), on a GPU when one is present.

mod common;

use common::{config_for, Batch, Rng};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use recap_kernels::cuda::{
    self, count_calls, DeviceLayout, DeviceLogitsLossInputs, FusedLinearConfig, Gpu, LinearHead,
    PendingLogitsLoss,
};
use recap_kernels::{
    Advantages, AggMode, GrpoConfig, Logits, LogitsLossOutput, LogprobConfig, Mask,
};
use std::sync::Arc;

/// A batch of the loss from logits on the device: the fused loss's arrays (its log-probs unused),
/// labels (some ignored), logits `[T, V]` and a linear head `[T, H] x [V, H]`.
struct Dev {
    b: Batch,
    v: usize,
    h: usize,
    labels: CudaSlice<i32>,
    old: CudaSlice<f32>,
    rf: Option<CudaSlice<f32>>,
    adv: CudaSlice<f32>,
    mask: CudaSlice<u8>,
    cu: CudaSlice<i32>,
    membership: Option<CudaSlice<u32>>,
    lambda: CudaSlice<f32>,
    logits: Vec<f32>,
    hidden: CudaSlice<bf16>,
    weight: CudaSlice<bf16>,
}

impl Dev {
    fn new(s: &Arc<CudaStream>, seed: u64, lens: &[usize], k: usize, v: usize) -> Dev {
        let mut b = Batch::random(seed, lens, k);
        b.use_u8 = true;
        b.with_rollout = false; // the fused-linear path takes no rollout log-probs
        let t = b.t();
        let h = 16;
        let mut rng = Rng::new(seed ^ 0x5eed);
        let labels: Vec<i32> = (0..t)
            .map(|i| {
                if i % 11 == 3 {
                    -100
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let logits: Vec<f32> = (0..t * v).map(|_| (rng.normal() * 2.0) as f32).collect();
        let q = |x: f64| bf16::from_f32((x * 0.5) as f32);
        let hidden: Vec<bf16> = (0..t * h).map(|_| q(rng.normal())).collect();
        let weight: Vec<bf16> = (0..v * h).map(|_| q(rng.normal())).collect();
        let up = |x: &[f32]| s.clone_htod(x).unwrap();
        Dev {
            labels: s.clone_htod(&labels).unwrap(),
            old: up(&b.old_logp),
            rf: b.with_ref.then(|| up(&b.ref_logp)),
            adv: up(&b.adv),
            mask: s.clone_htod(&b.mask_u8).unwrap(),
            cu: s.clone_htod(&b.cu).unwrap(),
            membership: b.membership.as_ref().map(|m| s.clone_htod(m).unwrap()),
            lambda: up(&b.lambda),
            hidden: s.clone_htod(&hidden).unwrap(),
            weight: s.clone_htod(&weight).unwrap(),
            logits,
            b,
            v,
            h,
        }
    }

    /// The inputs; `host_layout`: `cu_seqlens`, `membership` and `lambda` from the host.
    fn inputs(&self, host_layout: bool) -> DeviceLogitsLossInputs<'_> {
        let b = &self.b;
        DeviceLogitsLossInputs {
            labels: self.labels.as_view(),
            old_logp: self.old.as_view(),
            ref_logp: self.rf.as_ref().map(|r| r.as_view()),
            rollout_logp: None,
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

    fn head(&self) -> LinearHead<'_> {
        LinearHead {
            hidden: self.hidden.as_view(),
            weight: self.weight.as_view(),
            hidden_size: self.h,
            vocab: self.v,
        }
    }

    fn t(&self) -> usize {
        self.b.t()
    }
}

/// The batches: lengths 0, 1, 31..33, 300; K = 1 and 3; several configs (entropy bonus on some).
fn batches(s: &Arc<CudaStream>) -> Vec<(Dev, GrpoConfig)> {
    [
        (
            2u64,
            vec![31usize, 1, 0, 33],
            1usize,
            AggMode::TokenMean,
            0.0f32,
        ),
        (6, vec![32, 300], 3, AggMode::SeqMeanTokenMean, 0.01),
        (8, vec![40, 40, 40], 2, AggMode::SeqMeanTokenSum, 0.0),
    ]
    .into_iter()
    .map(|(seed, lens, k, agg, coef)| {
        let mut cfg = config_for(seed, agg).with_entropy_coef(coef);
        cfg.rollout_correction = None;
        (Dev::new(s, seed, &lens, k, 96), cfg)
    })
    .collect()
}

/// GSPO and GMPO take the whole batch in one chunk.
fn whole_batch(cfg: &GrpoConfig) -> bool {
    matches!(
        cfg.policy_loss,
        recap_kernels::PolicyLoss::Gspo | recap_kernels::PolicyLoss::GeoMean
    )
}

fn bits64(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bits<T: Copy + Into<f64>>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| (*v).into().to_bits()).collect()
}

fn same(got: &LogitsLossOutput, want: &LogitsLossOutput, what: &str) {
    assert_eq!(got, want, "{what}");
    assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{what}: loss bits");
}

/// The device layout of a batch (cu_seqlens, membership, lambda on the device).
fn device_layout<'v, 'a>(
    cu: &'v cudarc::driver::CudaView<'a, i32>,
    mem: Option<&'v cudarc::driver::CudaView<'a, u32>>,
    lam: &'v cudarc::driver::CudaView<'a, f32>,
) -> DeviceLayout<'v, 'a> {
    DeviceLayout {
        cu_seqlens: cu,
        membership: mem,
        lambda: Some(lam),
    }
}

/// The asynchronous loss from logits, with the layout on the host or on the device, gives the
/// synchronous call's bits: loss, entropy terms, metrics and the gradient written over the logits.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn from_logits_async_matches_sync_bits() {
    let gpu = common::require_cuda("from_logits_async_matches_sync_bits");
    let s = gpu.stream().clone();
    let lc = LogprobConfig::default();
    for (d, cfg) in batches(&s) {
        let (t, v, k) = (d.t(), d.v, d.b.lambda.len());
        let mut z0 = s.clone_htod(&d.logits).unwrap();
        let want = cuda::grpo_loss_from_logits(
            &gpu,
            &s,
            &mut Logits::dense(z0.as_view_mut(), t, v),
            &d.inputs(true),
            &cfg,
            &lc,
        )
        .unwrap();
        let dz0 = s.clone_dtoh(&z0).unwrap();
        for host_layout in [true, false] {
            let (cu, mem, lam) = (
                d.cu.as_view(),
                d.membership.as_ref().map(|m| m.as_view()),
                d.lambda.as_view(),
            );
            let layout = device_layout(&cu, mem.as_ref(), &lam);
            let mut z = s.clone_htod(&d.logits).unwrap();
            let mut ws = s.alloc_zeros::<u8>(cuda::logits_workspace_len(t)).unwrap();
            let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
            let pending = cuda::grpo_loss_from_logits_async(
                &gpu,
                &s,
                &mut Logits::dense(z.as_view_mut(), t, v),
                &d.inputs(host_layout),
                (!host_layout).then_some(&layout),
                &cfg,
                &lc,
                &mut ws.as_view_mut(),
                &mut out.as_view_mut(),
            )
            .unwrap();
            let got = pending.read(&s, &out.as_view()).unwrap();
            same(
                &got,
                &want,
                &format!("from logits, host layout {host_layout}"),
            );
            assert_eq!(bits(&s.clone_dtoh(&z).unwrap()), bits(&dz0), "dlogits");
            let raw = s.clone_dtoh(&out).unwrap();
            assert_eq!(raw[cuda::GRPO_OUTPUT_LOSS].to_bits(), want.loss.to_bits());
        }
    }
}

/// One fused-linear call, asynchronous; returns the pending read and the gradients' buffers.
#[allow(clippy::too_many_arguments)]
fn linear_async(
    gpu: &Gpu,
    s: &Arc<CudaStream>,
    d: &Dev,
    layout: Option<&DeviceLayout<'_, '_>>,
    cfg: &GrpoConfig,
    opt: &FusedLinearConfig,
    ws: &mut CudaSlice<u8>,
    dh: &mut CudaSlice<bf16>,
    dw: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f64>,
) -> recap_kernels::Result<PendingLogitsLoss> {
    cuda::fused_linear_grpo_loss_async(
        gpu,
        s,
        &d.head(),
        &d.inputs(layout.is_none()),
        layout,
        cfg,
        &LogprobConfig::default(),
        opt,
        &mut ws.as_view_mut(),
        &mut dh.as_view_mut(),
        &mut dw.as_view_mut(),
        &mut out.as_view_mut(),
    )
}

/// The options the fused-linear tests run: one chunk, chunks of 20 tokens (cutting sequences), and
/// fp32 logits in chunks of 32.
fn linear_options() -> [FusedLinearConfig; 3] {
    [
        FusedLinearConfig::default(),
        FusedLinearConfig {
            chunk_tokens: Some(20),
            ..FusedLinearConfig::default()
        },
        FusedLinearConfig {
            chunk_tokens: Some(32),
            fp32_logits: true,
            ..FusedLinearConfig::default()
        },
    ]
}

fn ws_len(d: &Dev, opt: &FusedLinearConfig) -> usize {
    let (b, k) = (d.b.cu.len() - 1, d.b.lambda.len());
    cuda::fused_linear_workspace_len(d.t(), b, k, d.v, opt)
}

/// The asynchronous fused-linear loss gives the synchronous call's bits (loss, metrics, d_hidden,
/// d_weight) when every row carries loss, in one chunk or several, with the layout on the host or
/// on the device; with masked rows (which the synchronous call leaves out of its GEMMs, the
/// asynchronous one cannot) the same values to the rounding of the sums' grouping, and 0 in the
/// masked rows' `d_hidden` from both.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_linear_async_matches_sync_bits() {
    let gpu = common::require_cuda("fused_linear_async_matches_sync_bits");
    let s = gpu.stream().clone();
    let lc = LogprobConfig::default();
    // the batches as drawn (masked rows, ignored labels), then with every row carrying loss
    let full = batches(&s).into_iter().map(|(mut d, cfg)| {
        let t = d.t();
        d.mask = s.clone_htod(&vec![1u8; t]).unwrap();
        let labels: Vec<i32> = s.clone_dtoh(&d.labels).unwrap();
        let labels: Vec<i32> = labels
            .iter()
            .map(|&y| if y == -100 { 0 } else { y })
            .collect();
        d.labels = s.clone_htod(&labels).unwrap();
        d.b.mask_u8 = vec![1u8; t];
        ((d, cfg), true)
    });
    for ((d, cfg), every_row) in batches(&s).into_iter().map(|x| (x, false)).chain(full) {
        let (t, k) = (d.t(), d.b.lambda.len());
        for opt in linear_options() {
            if t == 0 || (opt.chunk(t, d.v) < t && whole_batch(&cfg)) {
                continue; // GSPO / GMPO take the whole batch in one chunk
            }
            let mut dh0 = s.alloc_zeros::<bf16>(t * d.h).unwrap();
            let mut dw0 = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
            let want = cuda::fused_linear_grpo_loss(
                &gpu,
                &s,
                &d.head(),
                &d.inputs(true),
                &cfg,
                &lc,
                &opt,
                &mut dh0.as_view_mut(),
                &mut dw0.as_view_mut(),
            )
            .unwrap();
            let (dh0, dw0) = (s.clone_dtoh(&dh0).unwrap(), s.clone_dtoh(&dw0).unwrap());
            for host_layout in [true, false] {
                let (cu, mem, lam) = (
                    d.cu.as_view(),
                    d.membership.as_ref().map(|m| m.as_view()),
                    d.lambda.as_view(),
                );
                let layout = device_layout(&cu, mem.as_ref(), &lam);
                let mut ws = s.alloc_zeros::<u8>(ws_len(&d, &opt)).unwrap();
                let mut dh = s.alloc_zeros::<bf16>(t * d.h).unwrap();
                let mut dw = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
                let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
                let pending = linear_async(
                    &gpu,
                    &s,
                    &d,
                    (!host_layout).then_some(&layout),
                    &cfg,
                    &opt,
                    &mut ws,
                    &mut dh,
                    &mut dw,
                    &mut out,
                )
                .unwrap();
                let got = pending.read(&s, &out.as_view()).unwrap();
                let what = format!(
                    "fused linear {opt:?}, host layout {host_layout}, every row {every_row}"
                );
                let (dh, dw) = (s.clone_dtoh(&dh).unwrap(), s.clone_dtoh(&dw).unwrap());
                if every_row {
                    same(&got, &want, &what);
                    assert_eq!(bits(&dh), bits(&dh0), "{what}: d_hidden");
                    assert_eq!(bits(&dw), bits(&dw0), "{what}: d_weight");
                    continue;
                }
                assert!(
                    common::close(got.loss, want.loss, 1e-7, 1e-5),
                    "{what}: loss {} vs {}",
                    got.loss,
                    want.loss
                );
                assert_eq!(
                    got.grpo.metrics.num_tokens, want.grpo.metrics.num_tokens,
                    "{what}"
                );
                for (name, a, b) in [
                    (
                        "d_hidden",
                        dh.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
                        { dh0.iter().map(|x| x.to_f32()).collect::<Vec<_>>() },
                    ),
                    ("d_weight", dw.clone(), dw0.clone()),
                ] {
                    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            common::close(*x as f64, *y as f64, 1e-3 * scale, 1e-2),
                            "{what}: {name}[{i}] {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}

/// On the emulated device, once the stream's scratch is warm: the asynchronous calls make no host
/// synchronization, no allocation and (with the layout on the device) no host-to-device copy; the
/// read is one copy and one synchronization.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn async_logits_calls_counted() {
    let gpu = common::require_cuda("async_logits_calls_counted");
    let s = gpu.stream().clone();
    let lc = LogprobConfig::default();
    for (d, cfg) in batches(&s) {
        let (t, v, k) = (d.t(), d.v, d.b.lambda.len());
        let (cu, mem, lam) = (
            d.cu.as_view(),
            d.membership.as_ref().map(|m| m.as_view()),
            d.lambda.as_view(),
        );
        let layout = device_layout(&cu, mem.as_ref(), &lam);
        let mut z = s.clone_htod(&d.logits).unwrap();
        let mut ws = s.alloc_zeros::<u8>(cuda::logits_workspace_len(t)).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
        let mut call = || {
            cuda::grpo_loss_from_logits_async(
                &gpu,
                &s,
                &mut Logits::dense(z.as_view_mut(), t, v),
                &d.inputs(false),
                Some(&layout),
                &cfg,
                &lc,
                &mut ws.as_view_mut(),
                &mut out.as_view_mut(),
            )
        };
        call().unwrap(); // warms the stream's scratch
        let (r, c) = count_calls(&mut call);
        let pending = r.unwrap();
        let Some(c) = c else {
            eprintln!("async_logits_calls_counted: not the emulated driver: nothing checked");
            return;
        };
        let (h, dh) = c.copies();
        assert_eq!(
            (c.syncs(), c.allocs(), h, dh),
            (0, 0, 0, 0),
            "from logits, K={k}: {c:?}"
        );
        assert!(c.launches() >= 6, "{c:?}");
        let (r, c) = count_calls(|| pending.read(&s, &out.as_view()));
        r.unwrap();
        let c = c.unwrap();
        assert_eq!((c.syncs(), c.launches()), (2, 0), "read: {c:?}");

        let opt = linear_options()[1];
        if opt.chunk(t, v) < t && whole_batch(&cfg) {
            continue;
        }
        let mut ws = s.alloc_zeros::<u8>(ws_len(&d, &opt)).unwrap();
        let mut dh = s.alloc_zeros::<bf16>(t * d.h).unwrap();
        let mut dw = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
        let mut call = || {
            linear_async(
                &gpu,
                &s,
                &d,
                Some(&layout),
                &cfg,
                &opt,
                &mut ws,
                &mut dh,
                &mut dw,
                &mut out,
            )
        };
        call().unwrap();
        let (r, c) = count_calls(&mut call);
        r.unwrap();
        let c = c.unwrap();
        let (h, dh) = c.copies();
        assert_eq!(
            (c.syncs(), c.allocs(), h, dh),
            (0, 0, 0, 0),
            "fused linear, K={k}: {c:?}"
        );
    }
}

/// A label outside [0, V) that is not ignore_index: the asynchronous call returns, the loss on the
/// device is NaN, and the read reports the labels with their count; the synchronous call reports
/// the same.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn bad_labels_reported_by_the_read() {
    let gpu = common::require_cuda("bad_labels_reported_by_the_read");
    let s = gpu.stream().clone();
    let (mut d, cfg) = batches(&s).remove(1);
    let (t, v, k) = (d.t(), d.v, d.b.lambda.len());
    let mut labels = s.clone_dtoh(&d.labels).unwrap();
    labels[5] = v as i32;
    labels[t - 1] = -7;
    d.labels = s.clone_htod(&labels).unwrap();
    let mut z = s.clone_htod(&d.logits).unwrap();
    let mut ws = s.alloc_zeros::<u8>(cuda::logits_workspace_len(t)).unwrap();
    let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
    let lc = LogprobConfig::default();
    let pending = cuda::grpo_loss_from_logits_async(
        &gpu,
        &s,
        &mut Logits::dense(z.as_view_mut(), t, v),
        &d.inputs(true),
        None,
        &cfg,
        &lc,
        &mut ws.as_view_mut(),
        &mut out.as_view_mut(),
    )
    .unwrap();
    let err = pending.read(&s, &out.as_view()).unwrap_err().to_string();
    assert!(
        err.contains("labels") && err.contains("2 label(s)"),
        "{err}"
    );
    assert!(s.clone_dtoh(&out).unwrap()[cuda::GRPO_OUTPUT_LOSS].is_nan());
    let mut z = s.clone_htod(&d.logits).unwrap();
    let err = cuda::grpo_loss_from_logits(
        &gpu,
        &s,
        &mut Logits::dense(z.as_view_mut(), t, v),
        &d.inputs(true),
        &cfg,
        &lc,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("labels") && err.contains("2 label(s)"),
        "{err}"
    );
    // the top-entropy-quantile mask sorts on the host: refused asynchronously, before any launch
    let err = cuda::grpo_loss_from_logits_async(
        &gpu,
        &s,
        &mut Logits::dense(z.as_view_mut(), t, v),
        &d.inputs(true),
        None,
        &cfg.clone().with_top_entropy_quantile(0.5),
        &lc,
        &mut ws.as_view_mut(),
        &mut out.as_view_mut(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("top_entropy_quantile"), "{err}");
    // a workspace too short is refused before any launch
    let mut short = s.alloc_zeros::<u8>(16).unwrap();
    let err = cuda::grpo_loss_from_logits_async(
        &gpu,
        &s,
        &mut Logits::dense(z.as_view_mut(), t, v),
        &d.inputs(true),
        None,
        &cfg,
        &lc,
        &mut short.as_view_mut(),
        &mut out.as_view_mut(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("workspace"), "{err}");
}

/// One asynchronous call of each loss (layout on the device) captured in a CUDA graph and replayed
/// 10 times gives the eager call's bits each time: the loss from logits (its logits restored
/// between replays: the gradient is written over them) and the fused-linear loss in chunks.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn capture_replays_logits_losses() {
    let gpu = common::require_cuda("capture_replays_logits_losses");
    // SAFETY: every buffer of this test is used on `s` only (the caller keeps stream order, as
    // PyTorch does).
    unsafe { gpu.context().disable_event_tracking() };
    let s = gpu.context().new_stream().unwrap();
    let lc = LogprobConfig::default();
    for (d, cfg) in batches(&s) {
        let (t, v, k) = (d.t(), d.v, d.b.lambda.len());
        let (cu, mem, lam) = (
            d.cu.as_view(),
            d.membership.as_ref().map(|m| m.as_view()),
            d.lambda.as_view(),
        );
        let layout = device_layout(&cu, mem.as_ref(), &lam);
        let inputs = d.inputs(false);
        let z_in = s.clone_htod(&d.logits).unwrap();
        let mut z = s.clone_htod(&d.logits).unwrap();
        let mut ws = s.alloc_zeros::<u8>(cuda::logits_workspace_len(t)).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
        let call = |z: &mut CudaSlice<f32>, ws: &mut CudaSlice<u8>, out: &mut CudaSlice<f64>| {
            cuda::grpo_loss_from_logits_async(
                &gpu,
                &s,
                &mut Logits::dense(z.as_view_mut(), t, v),
                &inputs,
                Some(&layout),
                &cfg,
                &lc,
                &mut ws.as_view_mut(),
                &mut out.as_view_mut(),
            )
        };
        let pending = call(&mut z, &mut ws, &mut out).unwrap();
        let want = pending.read(&s, &out.as_view()).unwrap();
        let (want_z, want_out) = (s.clone_dtoh(&z).unwrap(), s.clone_dtoh(&out).unwrap());
        s.memcpy_dtod(&z_in, &mut z).unwrap();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = call(&mut z, &mut ws, &mut out);
        let graph = s
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        captured.unwrap();
        for replay in 0..10 {
            s.memcpy_dtod(&z_in, &mut z).unwrap();
            s.memset_zeros(&mut out).unwrap();
            graph.launch().unwrap();
            let got = pending.read(&s, &out.as_view()).unwrap();
            same(&got, &want, &format!("from logits K={k} replay {replay}"));
            assert_eq!(
                bits(&s.clone_dtoh(&z).unwrap()),
                bits(&want_z),
                "replay {replay}"
            );
            assert_eq!(bits64(&s.clone_dtoh(&out).unwrap()), bits64(&want_out));
        }
        drop(graph);

        let opt = linear_options()[1];
        if t == 0 || (opt.chunk(t, v) < t && whole_batch(&cfg)) {
            continue;
        }
        let mut ws = s.alloc_zeros::<u8>(ws_len(&d, &opt)).unwrap();
        let mut dh = s.alloc_zeros::<bf16>(t * d.h).unwrap();
        let mut dw = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
        let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(k)).unwrap();
        let pending = linear_async(
            &gpu,
            &s,
            &d,
            Some(&layout),
            &cfg,
            &opt,
            &mut ws,
            &mut dh,
            &mut dw,
            &mut out,
        )
        .unwrap();
        let want = pending.read(&s, &out.as_view()).unwrap();
        let (want_dh, want_dw) = (s.clone_dtoh(&dh).unwrap(), s.clone_dtoh(&dw).unwrap());
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        let captured = linear_async(
            &gpu,
            &s,
            &d,
            Some(&layout),
            &cfg,
            &opt,
            &mut ws,
            &mut dh,
            &mut dw,
            &mut out,
        );
        let graph = s
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        captured.unwrap();
        for replay in 0..10 {
            s.memset_zeros(&mut dh).unwrap();
            s.memset_zeros(&mut dw).unwrap();
            s.memset_zeros(&mut out).unwrap();
            graph.launch().unwrap();
            let got = pending.read(&s, &out.as_view()).unwrap();
            same(&got, &want, &format!("fused linear K={k} replay {replay}"));
            assert_eq!(bits(&s.clone_dtoh(&dh).unwrap()), bits(&want_dh));
            assert_eq!(bits(&s.clone_dtoh(&dw).unwrap()), bits(&want_dw));
        }
    }
}
