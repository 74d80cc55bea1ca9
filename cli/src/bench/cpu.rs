//! `recap bench` on the CPU reference backend (host clock, against a host memcpy).

use super::{inputs, logits_records, record, stats, BenchConfig, BenchRecord, BenchReport};
use recap_kernels::advantages::{group_advantages, AdvantageConfig, AdvantageMode, Groups};
use recap_kernels::config::{GrpoConfig, ObjectiveKind};
use recap_kernels::error::Result;
use recap_kernels::layout::{Advantages, HostGrpoInputs, Mask};
use recap_kernels::logits::{Logits, LogprobConfig};
use std::time::Instant;

/// Median and min microseconds of `f` over the configured runs.
fn time_us(cfg: &BenchConfig, mut f: impl FnMut() -> Result<()>) -> Result<((f64, f64), usize)> {
    let (warm, runs) = cfg.runs();
    for _ in 0..warm {
        f()?;
    }
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok((stats(v), runs))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub(super) fn run(cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let mut records: Vec<BenchRecord> = Vec::new();
    let mut push = |r: BenchRecord, progress: &mut dyn FnMut(&str)| {
        progress(&r.progress_line());
        records.push(r);
    };
    // baseline: host memcpy, bytes read + written
    let n = if cfg.quick { 4 << 20 } else { 64 << 20 }; // f32 elements: 16 MiB / 256 MiB
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let (copy, runs) = time_us(cfg, || {
        dst.copy_from_slice(&src);
        Ok(())
    })?;
    std::hint::black_box(&dst);
    let bytes = 2.0 * (n * 4) as f64;
    let copy_gb_s = bytes / (copy.0 * 1e-6) / 1e9;
    push(
        record(
            "copy",
            format!("host memcpy {} MiB", (n * 4) >> 20),
            copy,
            runs,
            bytes,
            0.0,
            copy_gb_s,
        ),
        progress,
    );
    drop((src, dst));

    // fused GRPO loss
    let sizes: &[usize] = if cfg.quick {
        &[16_384]
    } else {
        &[16_384, 262_144]
    };
    let ks: &[usize] = if cfg.quick { &[3] } else { &[1, 3, 8] };
    for &t in sizes {
        for &k in ks {
            let case = format!("T={t} K={k}");
            if !cfg.wants(&case) {
                continue;
            }
            let (logp, old, adv, mask, cu) = inputs::grpo(t, k, 1024);
            let lambda = vec![1.0f32; k];
            let objectives = vec![ObjectiveKind::Policy; k];
            let inp = HostGrpoInputs {
                logp: &logp,
                old_logp: &old,
                ref_logp: None,
                rollout_logp: None,
                policy_weight: None,
                advantages: Advantages::PerSequence(&adv),
                mask: Mask::U8(&mask),
                cu_seqlens: &cu,
                lambda: &lambda,
                objectives: &objectives,
                membership: None,
                normalizers: None,
            };
            let mut grad = vec![0f32; t];
            let conf = GrpoConfig::default();
            let (tm, runs) = time_us(cfg, || {
                recap_kernels::cpu::grpo_loss(&inp, &conf, &mut grad).map(|_| ())
            })?;
            let bytes = (t * (4 * 3 + 1) + adv.len() * 4) as f64;
            push(
                record("fused_loss", case, tm, runs, bytes, 0.0, copy_gb_s),
                progress,
            );
        }
    }

    // log-probs and entropy from f32 logits
    let shapes: &[(usize, usize)] = if cfg.quick {
        &[(16, 32_768)]
    } else {
        &[(64, 32_768), (256, 32_768)]
    };
    for &(t, v) in shapes {
        let case = format!("T={t} V={v} f32");
        if !cfg.wants(&case) {
            continue;
        }
        let z: Vec<f32> = (0..t * v).map(inputs::logit).collect();
        let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
        let lc = LogprobConfig::default();
        let (mut lp, mut h, mut l) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
        let (fwd, runs) = time_us(cfg, || {
            recap_kernels::cpu::logprob_forward(
                &Logits::dense(&z[..], t, v),
                &labels,
                &lc,
                &mut lp,
                Some(&mut h),
                &mut l,
            )
        })?;
        let g = vec![1e-3f32; t];
        let mut dz = vec![0f32; t * v];
        let (bwd, _) = time_us(cfg, || {
            recap_kernels::cpu::logprob_backward(
                &Logits::dense(&z[..], t, v),
                &labels,
                &lc,
                &g,
                Some(&g),
                None,
                &mut Logits::dense(&mut dz[..], t, v),
            )
        })?;
        let bytes = (t * v * 4) as f64;
        let [forward, backward, _] = logits_records(&case, fwd, bwd, runs, bytes, 0.0, copy_gb_s);
        push(forward, progress);
        push(backward, progress);
    }

    // tensor parallelism: one rank's shard of 2, partials, combine and backward
    let (t, v) = if cfg.quick {
        (16, 32_768)
    } else {
        (64, 32_768)
    };
    let case = format!("tp=2 T={t} V={v} f32 per rank");
    if cfg.wants(&case) || cfg.wants("tensor_parallel") {
        let vr = recap_kernels::tensor_parallel::shard_range(v, 2, 0).len();
        let z: Vec<f32> = (0..t * vr)
            .map(|i| inputs::logit((i / vr) * v + i % vr))
            .collect();
        // labels in this shard: the stand-in partials of the other ranks are copies of its own
        let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % vr) as i32).collect();
        let lc = LogprobConfig::default();
        let g = vec![1e-3f32; t];
        let (mut part, mut both) = (vec![0f32; 3 * t], vec![0f32; 6 * t]);
        let (mut lp, mut h, mut l) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
        let mut dz = vec![0f32; t * vr];
        let (tm, runs) = time_us(cfg, || {
            recap_kernels::cpu::tp_partials(
                &Logits::dense(&z[..], t, vr),
                &labels,
                0,
                &lc,
                &mut part,
            )?;
            both[..3 * t].copy_from_slice(&part);
            both[3 * t..].copy_from_slice(&part);
            recap_kernels::cpu::tp_combine(&both, 2, &labels, &lc, &mut lp, &mut h, &mut l, None)?;
            recap_kernels::cpu::tp_backward(
                &Logits::dense(&z[..], t, vr),
                &labels,
                0,
                &l,
                &h,
                &g,
                Some(&g),
                None,
                &lc,
                &mut Logits::dense(&mut dz[..], t, vr),
            )
        })?;
        push(
            record(
                "tensor_parallel",
                case,
                tm,
                runs,
                (3 * t * vr * 4) as f64,
                0.0,
                copy_gb_s,
            ),
            progress,
        );
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
        let r = inputs::rewards(b, 3);
        let mut out = vec![0f32; b * 3];
        let ac = AdvantageConfig {
            modes: vec![AdvantageMode::Grpo; 3],
            eps: 1e-6,
            lead: None,
            reward_weights: None,
            singletons: recap_kernels::Singletons::Zero,
        };
        let (tm, runs) = time_us(cfg, || {
            group_advantages(&r, Groups::Consecutive(16), None, None, &ac, &mut out)
        })?;
        push(
            record(
                "advantages",
                case,
                tm,
                runs,
                (b * 3 * 8) as f64,
                0.0,
                copy_gb_s,
            ),
            progress,
        );
    }

    // verl's optimal token baseline
    for c in super::TokenBaselineCase::wanted(cfg) {
        let t = c.t;
        let (r, old, spp, mask, cu) = inputs::token_baseline(t, c.seq_len);
        let (mut adv, mut ret) = (vec![0f32; t], vec![0f32; t]);
        let x = recap_kernels::HostTokenBaselineInputs {
            token_rewards: &r,
            old_logp: &old,
            sum_pi_squared: &spp,
            rollout_is_weights: None,
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            groups: Groups::Consecutive(c.group),
        };
        let config = recap_kernels::TokenBaselineConfig::default();
        let (tm, runs) = time_us(cfg, || {
            recap_kernels::optimal_token_baseline(&x, &config, &mut adv, &mut ret)
        })?;
        push(
            record(
                "token_baseline",
                c.case.clone(),
                tm,
                runs,
                c.bytes(),
                0.0,
                copy_gb_s,
            ),
            progress,
        );
    }

    // verl's rollout IS weights, batch-normalized
    for c in super::RolloutIsCase::wanted(cfg) {
        let (lr, mask, cu) = c.inputs();
        let mut w = vec![0f32; c.t];
        let (tm, runs) = time_us(cfg, || {
            recap_kernels::cpu::rollout_is_weights(
                &lr,
                Mask::U8(&mask),
                &cu,
                &c.correction,
                true,
                &mut w,
            )
            .map(|_| ())
        })?;
        push(
            record(
                "rollout_is",
                c.case.clone(),
                tm,
                runs,
                c.bytes(),
                0.0,
                copy_gb_s,
            ),
            progress,
        );
    }

    // the ops benchmarked through their pointer-level entry points (bench/mod.rs OP_BENCHES)
    super::run_op_benches(
        cfg,
        false,
        recap_kernels::raw::Place::Host,
        None,
        &mut |f| time_us(cfg, f).map(|(tm, runs)| (tm.into(), runs)),
        &mut |r| push(r, progress),
        copy_gb_s,
    )?;

    // one training step of the small preset, by phase
    if cfg.wants("train_step") {
        let tc = crate::train::TrainConfig {
            steps: if cfg.quick { 2 } else { 10 },
            device: crate::train::Device::Cpu,
            ..crate::train::TrainConfig::default()
        };
        for r in train_records(&tc, copy_gb_s)? {
            push(r, progress);
        }
    }
    Ok(BenchReport {
        backend: "cpu".into(),
        device: cpu_name(),
        copy_gb_s,
        quick: cfg.quick,
        crate_version: env!("CARGO_PKG_VERSION").into(),
        nvcc: recap_kernels::cuda::NVCC_VERSION.into(),
        records,
        emulated: false,
    })
}

/// Per-phase medians and minima of a short `recap train` run (the first step, which warms up, is
/// left out when there are more).
pub(super) fn train_records(
    tc: &crate::train::TrainConfig,
    copy_gb_s: f64,
) -> Result<Vec<BenchRecord>> {
    let steps = crate::train::train(tc)?;
    let timed = if steps.len() > 1 {
        &steps[1..]
    } else {
        &steps[..]
    };
    let preset = format!(
        "{}x{}x{} V={} H={}",
        tc.prompts, tc.group, tc.resp_len, tc.vocab, tc.hidden
    );
    type Phase = (&'static str, fn(&crate::train::StepMetrics) -> f64);
    let phases: [Phase; 5] = [
        ("step", |m| m.step_time_ms),
        ("sampling", |m| m.sample_ms),
        ("advantages", |m| m.advantages_ms),
        ("loss (all epochs)", |m| m.loss_ms),
        ("optimizer (all epochs)", |m| m.optimizer_ms),
    ];
    Ok(phases
        .iter()
        .map(|(name, f)| {
            let us = stats(timed.iter().map(|m| f(m) * 1e3).collect());
            record(
                "train_step",
                format!("{preset} {name}"),
                us,
                timed.len(),
                0.0,
                0.0,
                copy_gb_s,
            )
        })
        .collect())
}
