//! `recap bench` on the GPU: CUDA events around each API call, L2 flushed before each timed run,
//! against a 1 GiB device-to-device copy timed in the same run.

use super::{inputs, logits_records, record, stats, BenchConfig, BenchRecord, BenchReport, Timing};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use recap_kernels::advantages::{AdvantageConfig, AdvantageMode};
use recap_kernels::config::{GrpoConfig, ObjectiveKind};
use recap_kernels::cuda::{self, DeviceGroups, FusedLinearConfig, Gpu, LinearHead, LogprobGrads};
use recap_kernels::error::Result;
use recap_kernels::layout::{Advantages, GrpoInputs, Mask};
use recap_kernels::logits::{LogitElem, Logits, LogitsLossInputs, LogprobConfig};
use std::sync::Arc;

struct Timer {
    stream: Arc<CudaStream>,
    /// Written before each timed run to evict the L2 cache.
    flush: CudaSlice<u8>,
    warm: usize,
    runs: usize,
}

impl Timer {
    /// Median and min microseconds of `f` (events on the stream), with `runs` override, and on the
    /// emulated device the launches and syncs per timed call.
    fn time(
        &mut self,
        runs: Option<(usize, usize)>,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<(Timing, usize)> {
        let (warm, runs) = runs.unwrap_or((self.warm, self.runs));
        for _ in 0..warm {
            f()?;
        }
        let mut v = Vec::with_capacity(runs);
        // the driver calls of the timed calls alone (emulated device; None on a GPU)
        let (mut launches, mut syncs, mut counted) = (0u64, 0u64, true);
        for _ in 0..runs {
            self.stream.memset_zeros(&mut self.flush)?;
            let start = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let (r, calls) = cuda::count_calls(&mut f);
            r?;
            match calls {
                Some(c) => {
                    launches += c.launches();
                    syncs += c.syncs();
                }
                None => counted = false,
            }
            let end = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            end.synchronize()?;
            v.push(start.elapsed_ms(&end)? as f64 * 1e3);
        }
        let mut tm = Timing::from(stats(v));
        if counted && runs > 0 {
            let n = runs as f64;
            tm.calls = Some((launches as f64 / n, syncs as f64 / n));
        }
        Ok((tm, runs))
    }
}

pub(super) fn run(
    gpu: &Arc<Gpu>,
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    // the emulated device (scripts/emulated-gpu.sh --bench): the quick cases, with the logits,
    // tensor-parallel and fused-linear shapes small enough for the host to emulate
    let emulated = cuda::emulated_counters().is_some();
    let s = gpu.stream().clone();
    let (warm, runs) = cfg.runs();
    let mut timer = Timer {
        flush: s.alloc_zeros::<u8>(if emulated { 1 << 20 } else { 256 << 20 })?,
        stream: s.clone(),
        warm,
        runs,
    };
    let mut records: Vec<BenchRecord> = Vec::new();
    let mut push = |r: BenchRecord, progress: &mut dyn FnMut(&str)| {
        progress(&r.progress_line());
        records.push(r);
    };
    progress(&format!(
        "device {} ({} SMs), kernels for sm_{} ({})",
        gpu.name(),
        gpu.multiprocessors(),
        cuda::CUDA_ARCHS,
        cuda::NVCC_VERSION
    ));
    if emulated {
        progress(
            "the emulated CUDA device: times are the host emulator's and mean nothing; \
             each record counts its launches and syncs per call (small logits shapes)",
        );
    }

    // baseline: device-to-device copy of 1 GiB (256 MiB with --quick), bytes read + written
    let n = if emulated {
        1usize << 22
    } else if cfg.quick {
        1usize << 26
    } else {
        1usize << 28
    };
    let copy_gb_s = {
        let src = s.alloc_zeros::<f32>(n)?;
        let mut dst = s.alloc_zeros::<f32>(n)?;
        let (tm, r) = timer.time(None, || Ok(s.memcpy_dtod(&src, &mut dst)?))?;
        let bytes = 2.0 * (n * 4) as f64;
        let gbs = bytes / (tm.median_us * 1e-6) / 1e9;
        push(
            record(
                "copy",
                format!("d2d {} MiB", (n * 4) >> 20),
                tm,
                r,
                bytes,
                0.0,
                gbs,
            ),
            progress,
        );
        gbs
    };

    // fused GRPO loss, forward + gradient
    let sizes: &[usize] = if cfg.quick {
        &[16_384, 262_144]
    } else {
        &[16_384, 262_144, 4_194_304, 16_777_216]
    };
    let ks: &[usize] = if cfg.quick { &[3] } else { &[1, 3, 8] };
    for &t in sizes {
        for &k in ks {
            let case = format!("T={t} K={k}");
            if !cfg.wants(&case) {
                continue;
            }
            let (logp, old, adv, mask, cu) = inputs::grpo(t, k, 4096.min(t));
            let (dl, d_old, da, dm) = (
                s.clone_htod(&logp)?,
                s.clone_htod(&old)?,
                s.clone_htod(&adv)?,
                s.clone_htod(&mask)?,
            );
            let mut dg = s.alloc_zeros::<f32>(t)?;
            let lambda = vec![1.0f32; k];
            let objectives = vec![ObjectiveKind::Policy; k];
            let inp: cuda::DeviceGrpoInputs = GrpoInputs {
                logp: dl.as_view(),
                old_logp: d_old.as_view(),
                ref_logp: None,
                rollout_logp: None,
                policy_weight: None,
                advantages: Advantages::PerSequence(da.as_view()),
                mask: Mask::U8(dm.as_view()),
                cu_seqlens: &cu,
                lambda: &lambda,
                objectives: &objectives,
                membership: None,
                normalizers: None,
            };
            let conf = GrpoConfig::default();
            // the loss, for the peers' value check (grpo_peers.py) before they are timed
            let mut call = || cuda::grpo_loss(gpu, &s, &inp, &conf, &mut dg.as_view_mut());
            let value = call()?.loss;
            let (tm, r) = timer.time(None, || call().map(|_| ()))?;
            let bytes = (t * (4 * 3 + 1) + adv.len() * 4) as f64;
            // the stream's kept workspace: output, per-sequence stats, both launches' block
            // partials, the layout (a few KiB; allocated by the first call, reused after)
            let blocks = t.div_ceil(256 * gpu.items_per_thread(t));
            let slots = recap_kernels::tools::grpo_slots(k);
            let b = cu.len() - 1;
            let seq_blocks = b.div_ceil(8).max(1) * 8; // at most 8 warps per sequence
            let extra = (8
                * (cuda::grpo_output_len(k) + 4 * b + (2 * k + 4) * seq_blocks + blocks * slots)
                + 4 * (2 * b + 1 + blocks)) as f64;
            let mut rec = record("fused_loss", case.clone(), tm, r, bytes, extra, copy_gb_s);
            rec.value = Some(value);
            push(rec, progress);

            // the same call asynchronously, the layout on the device: the two launches alone
            // (no upload, no read-back inside the timed region), as a captured graph runs it
            let (dcu, dlam) = (s.clone_htod(&cu)?, s.clone_htod(&lambda)?);
            let (cu_v, lam_v) = (dcu.as_view(), dlam.as_view());
            let layout = cuda::DeviceLayout {
                cu_seqlens: &cu_v,
                membership: None,
                lambda: Some(&lam_v),
            };
            let ainp = cuda::DeviceGrpoInputs {
                cu_seqlens: &[],
                lambda: &[],
                ..inp
            };
            let mut out = s.alloc_zeros::<f64>(cuda::grpo_output_len(k))?;
            let mut acall = || {
                cuda::grpo_loss_async(
                    gpu,
                    &s,
                    &ainp,
                    Some(&layout),
                    &conf,
                    &mut dg.as_view_mut(),
                    &mut out.as_view_mut(),
                )
            };
            let pending = acall()?;
            let (tm, r) = timer.time(None, || acall().map(|_| ()))?;
            let got = pending.read(&s, &out.as_view())?.loss;
            if got.to_bits() != value.to_bits() {
                return Err(recap_kernels::Error::NoDevice(format!(
                    "bench: the asynchronous fused loss gave {got}, the synchronous one {value}"
                )));
            }
            let mut rec = record("fused_loss_async", case, tm, r, bytes, extra, copy_gb_s);
            rec.value = Some(value);
            push(rec, progress);
        }
    }

    // log-probs and entropy from logits: forward, in-place backward, both
    let shapes: &[(usize, usize)] = if emulated {
        &[(256, 4096)]
    } else if cfg.quick {
        &[(1024, 32_768)]
    } else {
        &[
            (1024, 32_768),
            (4096, 32_768),
            (16_384, 32_768),
            (1024, 151_936),
            (4096, 151_936),
            (16_384, 151_936),
        ]
    };
    for &(t, v) in shapes {
        for dtype in ["bf16", "f32"] {
            if dtype == "f32" && t * v > 4096 * 151_936 {
                continue; // 10 GB of f32 logits: not a shape anyone trains with
            }
            let case = format!("T={t} V={v} {dtype}");
            if !cfg.wants(&case) {
                continue;
            }
            let recs = if dtype == "bf16" {
                logits_case::<bf16>(gpu, &mut timer, t, v, &case, copy_gb_s)?
            } else {
                logits_case::<f32>(gpu, &mut timer, t, v, &case, copy_gb_s)?
            };
            for r in recs {
                push(r, progress);
            }
        }
    }

    // tensor parallelism: one rank's sharded forward (partials), the combine of tp partials and the
    // in-place backward on its shard, beside the unsharded logits rows above
    let (t, v) = if emulated {
        (256, 4096)
    } else if cfg.quick {
        (1024, 32_768)
    } else {
        (16_384, 151_936)
    };
    for &tp in if cfg.quick {
        &[2usize][..]
    } else {
        &[2usize, 4, 8][..]
    } {
        let case = format!("tp={tp} T={t} V={v} bf16 per rank");
        if cfg.wants(&case) || cfg.wants("tensor_parallel") {
            push(
                tp_case(gpu, &mut timer, t, v, tp, &case, copy_gb_s)?,
                progress,
            );
        }
    }

    // fused-linear loss against the unfused path (one chunk of all T tokens)
    let (t, h, v) = if emulated {
        (256, 128, 4096)
    } else if cfg.quick {
        (1024, 1024, 32_768)
    } else {
        (8192, 4096, 151_936)
    };
    let fl_case = format!("T={t} H={h} V={v} bf16");
    if cfg.wants(&fl_case) || cfg.wants("fused_linear") {
        for r in fused_linear_cases(gpu, &mut timer, t, h, v, &fl_case)? {
            push(r, progress);
        }
    }

    // group advantages
    for &b in if cfg.quick {
        &[4096usize][..]
    } else {
        &[4096usize, 65_536][..]
    } {
        let case = format!("B={b} K=3 G=16 grpo");
        if !cfg.wants(&case) {
            continue;
        }
        let r = s.clone_htod(&inputs::rewards(b, 3))?;
        let mut out = s.alloc_zeros::<f32>(b * 3)?;
        let ac = AdvantageConfig {
            modes: vec![AdvantageMode::Grpo; 3],
            eps: 1e-6,
            lead: None,
            reward_weights: None,
            singletons: recap_kernels::Singletons::Zero,
        };
        let (tm, runs) = timer.time(None, || {
            cuda::group_advantages(
                gpu,
                &s,
                &r.as_view(),
                DeviceGroups::Consecutive(16),
                None,
                None,
                &ac,
                &mut out.as_view_mut(),
            )
        })?;
        push(
            record(
                "advantages",
                case,
                tm,
                runs,
                (b * 3 * 8) as f64,
                (b * 3 * 8 + 24) as f64,
                copy_gb_s,
            ),
            progress,
        );
    }

    // verl's optimal token baseline
    for c in super::TokenBaselineCase::wanted(cfg) {
        let t = c.t;
        let (r, old, spp, mask, cu) = inputs::token_baseline(t, c.seq_len);
        let b = cu.len() - 1;
        let (r, old, spp) = (s.clone_htod(&r)?, s.clone_htod(&old)?, s.clone_htod(&spp)?);
        let mask = s.clone_htod(&mask)?;
        let (mut adv, mut ret) = (s.alloc_zeros::<f32>(t)?, s.alloc_zeros::<f32>(t)?);
        let x = recap_kernels::TokenBaselineInputs {
            token_rewards: r.as_view(),
            old_logp: old.as_view(),
            sum_pi_squared: spp.as_view(),
            rollout_is_weights: None,
            mask: Mask::U8(mask.as_view()),
            cu_seqlens: &cu,
            groups: recap_kernels::Groups::Consecutive(c.group),
        };
        let config = recap_kernels::TokenBaselineConfig::default();
        let (tm, runs) = timer.time(None, || {
            cuda::optimal_token_baseline(
                gpu,
                &s,
                &x,
                &config,
                &mut adv.as_view_mut(),
                &mut ret.as_view_mut(),
            )
        })?;
        // scratch: W and G (double), the aligned tokens and live counts, the group table, cu
        let extra = t * 16 + (t + b) * 4 + (2 * b + b / c.group + 2) * 4 + 16;
        push(
            record(
                "token_baseline",
                c.case.clone(),
                tm,
                runs,
                c.bytes(),
                extra as f64,
                copy_gb_s,
            ),
            progress,
        );
    }

    // verl's rollout IS weights, batch-normalized
    for c in super::RolloutIsCase::wanted(cfg) {
        let (lr, mask, cu) = c.inputs();
        let b = cu.len() - 1;
        let (lr, mask) = (s.clone_htod(&lr)?, s.clone_htod(&mask)?);
        let mut w = s.alloc_zeros::<f32>(c.t)?;
        let (tm, runs) = timer.time(None, || {
            cuda::rollout_is_weights(
                gpu,
                &s,
                &lr.as_view(),
                Mask::U8(mask.as_view()),
                &cu,
                &c.correction,
                true,
                &mut w.as_view_mut(),
            )
            .map(|_| ())
        })?;
        // scratch: the per-sequence statistics, the reduced ones, cu_seqlens
        let slots = recap_kernels::rollout_is::STAT_SLOTS;
        let extra = (slots * b + slots) * 8 + (b + 1) * 4;
        push(
            record(
                "rollout_is",
                c.case.clone(),
                tm,
                runs,
                c.bytes(),
                extra as f64,
                copy_gb_s,
            ),
            progress,
        );
    }

    // the ops benchmarked through their pointer-level entry points (bench/mod.rs OP_BENCHES)
    let place = recap_kernels::raw::Place::Cuda {
        device: gpu.context().ordinal(),
        stream: s.cu_stream() as usize,
    };
    super::run_op_benches(
        cfg,
        emulated,
        place,
        Some(s.clone()),
        &mut |f| timer.time(None, f),
        &mut |r| push(r, progress),
        copy_gb_s,
    )?;

    // a training step of the h100 preset (small preset with --quick), by phase
    if cfg.wants("train_step") {
        let preset = if cfg.quick {
            crate::train::Preset::Small
        } else {
            crate::train::Preset::H100
        };
        let tc = crate::train::TrainConfig {
            steps: if cfg.quick { 2 } else { 6 },
            device: crate::train::Device::Cuda,
            ..crate::train::TrainConfig::preset(preset)
        };
        for r in super::cpu::train_records(&tc, copy_gb_s)? {
            push(r, progress);
        }
    }
    Ok(BenchReport {
        backend: "cuda".into(),
        device: gpu.name().into(),
        copy_gb_s,
        quick: cfg.quick,
        crate_version: env!("CARGO_PKG_VERSION").into(),
        nvcc: cuda::NVCC_VERSION.into(),
        records,
        emulated,
    })
}

fn logits_case<E: LogitElem>(
    gpu: &Arc<Gpu>,
    timer: &mut Timer,
    t: usize,
    v: usize,
    case: &str,
    copy_gb_s: f64,
) -> Result<Vec<BenchRecord>> {
    let s = timer.stream.clone();
    let host: Vec<E> = (0..t * v).map(|i| E::from_f32(inputs::logit(i))).collect();
    let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
    let g: Vec<f32> = (0..t).map(|r| ((r % 7) as f32 - 3.0) * 1e-3).collect();
    let mut z = s.clone_htod(&host)?;
    drop(host);
    let (y, gd) = (s.clone_htod(&labels)?, s.clone_htod(&g)?);
    let (mut lp, mut h, mut l) = (
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
    );
    let lc = LogprobConfig::default();
    // the forward, and the same with verl's sum_pi_squared as a fourth output (one more accumulator)
    let mut spp = s.alloc_zeros::<f32>(t)?;
    let mut forward_call = |spp: Option<&mut CudaSlice<f32>>| {
        cuda::logprob_forward(
            gpu,
            &s,
            &Logits::dense(z.as_view(), t, v),
            &y.as_view(),
            &lc,
            &mut lp.as_view_mut(),
            Some(&mut h.as_view_mut()),
            &mut l.as_view_mut(),
            spp.map(|x| x.as_view_mut()).as_mut(),
        )
    };
    let (fwd, runs) = timer.time(None, || forward_call(None))?;
    let (fwd_spp, _) = timer.time(None, || forward_call(Some(&mut spp)))?;
    let (bwd, _) = timer.time(None, || {
        let (yv, lv, hv, gv) = (y.as_view(), l.as_view(), h.as_view(), gd.as_view());
        let grads = LogprobGrads {
            labels: &yv,
            lse: &lv,
            entropy: &hv,
            g_logp: &gv,
            g_entropy: Some(&gv),
            sum_pi_squared: None,
        };
        cuda::logprob_backward_inplace(
            gpu,
            &s,
            &mut Logits::dense(z.as_view_mut(), t, v),
            &grads,
            &lc,
        )
    })?;
    let bytes = (t * v * std::mem::size_of::<E>()) as f64;
    let extra = (3 * t * 4 + 4) as f64; // logp, entropy, LSE and the label check
    let [mut forward, backward, both] =
        logits_records(case, fwd, bwd, runs, bytes, extra, copy_gb_s);
    // the sum of the log-probs, for the peers' value check (grpo_peers.py)
    forward.value = Some(s.clone_dtoh(&lp)?.iter().map(|&x| x as f64).sum());
    let with_spp = record(
        "logits",
        format!("{case} forward + sum_pi_squared"),
        fwd_spp,
        runs,
        bytes,
        extra + (t * 4) as f64,
        copy_gb_s,
    );
    Ok(vec![forward, with_spp, backward, both])
}

/// One rank of `tp`: its shard (the first, the widest), the partials, the combine of `tp` partials
/// (this rank's, standing in for the gathered ones) and the in-place backward; the bytes are the
/// shard's logits read by the forward and read and written by the backward.
fn tp_case(
    gpu: &Arc<Gpu>,
    timer: &mut Timer,
    t: usize,
    v: usize,
    tp: usize,
    case: &str,
    copy_gb_s: f64,
) -> Result<BenchRecord> {
    let s = timer.stream.clone();
    let range = recap_kernels::tensor_parallel::shard_range(v, tp, 0);
    let vr = range.len();
    let host: Vec<bf16> = (0..t * vr)
        .map(|i| bf16::from_f32(inputs::logit((i / vr) * v + i % vr)))
        .collect();
    // labels in this shard: the stand-in partials of the other ranks are copies of its own
    let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % vr) as i32).collect();
    let g: Vec<f32> = (0..t).map(|r| ((r % 7) as f32 - 3.0) * 1e-3).collect();
    let mut z = s.clone_htod(&host)?;
    drop(host);
    let (y, gd) = (s.clone_htod(&labels)?, s.clone_htod(&g)?);
    let mut part = s.alloc_zeros::<f32>(3 * t)?;
    let mut gathered = s.alloc_zeros::<f32>(tp * 3 * t)?;
    let (mut lp, mut h, mut l) = (
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
    );
    let lc = LogprobConfig::default();
    cuda::tp_partials(
        gpu,
        &s,
        &Logits::dense(z.as_view(), t, vr),
        &y.as_view(),
        0,
        &lc,
        &mut part.as_view_mut(),
    )?;
    for r in 0..tp {
        s.memcpy_dtod(
            &part.slice(..),
            &mut gathered.slice_mut(r * 3 * t..(r + 1) * 3 * t),
        )?;
    }
    let (tm, runs) = timer.time(None, || {
        cuda::tp_partials(
            gpu,
            &s,
            &Logits::dense(z.as_view(), t, vr),
            &y.as_view(),
            0,
            &lc,
            &mut part.as_view_mut(),
        )?;
        cuda::tp_combine(
            gpu,
            &s,
            &gathered.as_view(),
            tp,
            &y.as_view(),
            &lc,
            &mut lp.as_view_mut(),
            &mut h.as_view_mut(),
            &mut l.as_view_mut(),
            None,
        )?;
        let (yv, lv, hv, gv) = (y.as_view(), l.as_view(), h.as_view(), gd.as_view());
        let grads = LogprobGrads {
            labels: &yv,
            lse: &lv,
            entropy: &hv,
            g_logp: &gv,
            g_entropy: Some(&gv),
            sum_pi_squared: None,
        };
        cuda::tp_backward_inplace(
            gpu,
            &s,
            &mut Logits::dense(z.as_view_mut(), t, vr),
            &grads,
            0,
            &lc,
        )
    })?;
    let bytes = (3 * t * vr * 2) as f64;
    let extra = ((3 + 3 * tp + 3) * t * 4) as f64;
    Ok(record(
        "tensor_parallel",
        case.into(),
        tm,
        runs,
        bytes,
        extra,
        copy_gb_s,
    ))
}

fn fused_linear_cases(
    gpu: &Arc<Gpu>,
    timer: &mut Timer,
    t: usize,
    h: usize,
    v: usize,
    case: &str,
) -> Result<Vec<BenchRecord>> {
    let s = timer.stream.clone();
    let q = |i: usize| {
        bf16::from_f32((((i.wrapping_mul(2_654_435_761)) >> 7) % 2001) as f32 * 1e-5 - 0.01)
    };
    let x = s.clone_htod(&(0..t * h).map(q).collect::<Vec<_>>())?;
    let w = s.clone_htod(&(0..v * h).map(|i| q(i + 17)).collect::<Vec<_>>())?;
    let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
    let cu: Vec<i32> = (0..=8).map(|i| (i * t / 8) as i32).collect();
    let (y, o, a) = (
        s.clone_htod(&labels)?,
        s.clone_htod(&vec![-12.0f32; t])?,
        s.clone_htod(&(0..8).map(|i| i as f32 / 4.0 - 1.0).collect::<Vec<f32>>())?,
    );
    // the mask: every row, or the first 50 % / 90 % of each sequence masked (a prompt or the tool
    // turns of a multi-turn batch): the synchronous call computes the kept rows only
    let mask = |masked: f64| -> Result<_> {
        let m: Vec<u8> = (0..t)
            .map(|r| {
                let (b0, b1) = (
                    cu[r * 8 / t.max(1)] as usize,
                    cu[r * 8 / t.max(1) + 1] as usize,
                );
                ((r - b0) as f64 >= masked * (b1 - b0) as f64) as u8
            })
            .collect();
        let kept = m.iter().filter(|x| **x != 0).count();
        Ok((s.clone_htod(&m)?, kept))
    };
    let masks = [mask(0.0)?, mask(0.5)?, mask(0.9)?];
    let mut dh = s.alloc_zeros::<bf16>(t * h)?;
    let mut dw = s.alloc_zeros::<f32>(v * h)?;
    let (conf, lc) = (GrpoConfig::default(), LogprobConfig::default());
    let mut out = Vec::new();
    for (name, opt, (m, kept)) in [
        (
            "fused, default chunks",
            FusedLinearConfig::default(),
            &masks[0],
        ),
        (
            "fused, fp32 logits",
            FusedLinearConfig {
                fp32_logits: true,
                ..FusedLinearConfig::default()
            },
            &masks[0],
        ),
        (
            "unfused (one chunk of T)",
            FusedLinearConfig {
                chunk_tokens: Some(t),
                ..FusedLinearConfig::default()
            },
            &masks[0],
        ),
        (
            "fused, batch-invariant",
            FusedLinearConfig {
                batch_invariant: true,
                ..FusedLinearConfig::default()
            },
            &masks[0],
        ),
        (
            "fused, 50 % of rows masked",
            FusedLinearConfig::default(),
            &masks[1],
        ),
        (
            "fused, 90 % of rows masked",
            FusedLinearConfig::default(),
            &masks[2],
        ),
    ] {
        let kept = *kept;
        let inputs = LogitsLossInputs {
            labels: y.as_view(),
            old_logp: o.as_view(),
            ref_logp: None,
            rollout_logp: None,
            advantages: Advantages::PerSequence(a.as_view()),
            mask: Mask::U8(m.as_view()),
            cu_seqlens: &cu,
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: None,
        };
        let head = LinearHead {
            hidden: x.as_view(),
            weight: w.as_view(),
            hidden_size: h,
            vocab: v,
        };
        let runs = if timer.runs >= 20 { (2, 20) } else { (1, 3) };
        let mut call = || {
            cuda::fused_linear_grpo_loss(
                gpu,
                &s,
                &head,
                &inputs,
                &conf,
                &lc,
                &opt,
                &mut dh.as_view_mut(),
                &mut dw.as_view_mut(),
            )
        };
        // the loss, for the peers' value check (grpo_peers.py)
        let value = call()?.loss;
        let (tm, r) = timer.time(Some(runs), || call().map(|_| ()))?;
        // the memory beyond inputs and outputs: a chunk of logits (and its bf16 copy), 7 floats
        // per computed row, and when rows are masked the kept rows' gathered copies (hidden and
        // its gradient, bf16; labels, old log-probs, mask)
        let c = opt.chunk(kept, v);
        // (and in the batch-invariant mode its pad, one chunk of hidden rows)
        let gathered = if kept < t { kept * (4 * h + 9) } else { 0 }
            + if opt.batch_invariant { 2 * c * h } else { 0 };
        let extra =
            (c * v * if opt.fp32_logits { 4 + 2 } else { 2 } + 7 * kept * 4 + gathered) as f64;
        let mut rec = record(
            "fused_linear",
            format!("{case} {name} (chunk {c}, {kept} rows computed)"),
            tm,
            r,
            0.0,
            extra,
            0.0,
        );
        rec.value = Some(value);
        out.push(rec);
    }
    Ok(out)
}
