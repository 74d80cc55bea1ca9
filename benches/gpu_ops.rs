//! GPU benchmark of the fused GRPO loss (forward + gradient) beside the device's own copy bandwidth
//! measured in the same run. Timed with CUDA events on the stream around the whole API call
//! (uploads of cu_seqlens, the four launches, the read-back of the statistics), median and min of
//! `RUNS` runs after warm-up, L2 flushed before each run (llm.c style).
//!
//!   cargo bench --bench gpu_ops            # on a machine with a GPU; prints why it skips otherwise
//!   GPU_OPS_FILTER="T=16777216 K=3" ...    # only the cases whose name contains the text
//!
//! Bytes counted: each per-token input read once and the gradient written once.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use recap_kernels::cuda::{self, DeviceGrpoInputs, Gpu};
use recap_kernels::{
    Advantages, GrpoConfig, GrpoInputs, LogitElem, Logits, LogprobConfig, Mask, ObjectiveKind,
};
use std::sync::Arc;

const RUNS: usize = 50;
const WARMUP: usize = 5;

fn main() {
    if let Err(e) = run() {
        println!("gpu_ops: skipped: {e}");
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0])
}

fn time_ms(
    stream: &Arc<CudaStream>,
    flush: &mut CudaSlice<u8>,
    f: impl FnMut() -> recap_kernels::Result<()>,
) -> recap_kernels::Result<(f64, f64)> {
    time_ms_n(stream, flush, WARMUP, RUNS, f)
}

fn time_ms_n(
    stream: &Arc<CudaStream>,
    flush: &mut CudaSlice<u8>,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> recap_kernels::Result<()>,
) -> recap_kernels::Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        stream.memset_zeros(flush)?;
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    Ok(stats(times))
}

fn run() -> recap_kernels::Result<()> {
    let gpu = Gpu::new(0)?;
    let s = gpu.stream().clone();
    println!(
        "device: {} ({} SMs), kernels for sm_{} ({})",
        gpu.name(),
        gpu.multiprocessors(),
        cuda::CUDA_ARCHS,
        cuda::NVCC_VERSION
    );
    let mut flush = s.alloc_zeros::<u8>(256 << 20)?;

    // Baseline: device-to-device copy of 1 GiB, bytes read + written.
    let n = 1usize << 28;
    let src = s.alloc_zeros::<f32>(n)?;
    let mut dst = s.alloc_zeros::<f32>(n)?;
    let (copy_med, copy_min) = time_ms(&s, &mut flush, || Ok(s.memcpy_dtod(&src, &mut dst)?))?;
    let copy_gbs = 2.0 * (n * 4) as f64 / (copy_med * 1e-3) / 1e9;
    println!(
        "copy d2d 1 GiB: median {:.3} ms (min {:.3}) = {copy_gbs:.0} GB/s (read + write)",
        copy_med, copy_min
    );
    drop((src, dst));

    println!(
        "{:<44} {:>10} {:>10} {:>9} {:>8}",
        "fused GRPO loss fwd+grad", "median us", "min us", "GB/s", "% copy"
    );
    for &(t, k, seq_len, with_ref, u8_mask) in &[
        (16_384usize, 3usize, 1024usize, false, false),
        (262_144, 1, 1024, false, false),
        (262_144, 3, 1024, false, false),
        (262_144, 8, 1024, false, false),
        (262_144, 3, 1024, true, false),
        (4_194_304, 3, 4096, false, false),
        (16_777_216, 3, 4096, false, false),
        (16_777_216, 3, 4096, false, true),
        (16_777_216, 8, 4096, true, true),
    ] {
        let name = format!(
            "T={t} K={k}{}{}",
            if with_ref { " +kl" } else { "" },
            if u8_mask { " u8 mask" } else { "" }
        );
        if std::env::var("GPU_OPS_FILTER").is_ok_and(|f| !name.contains(&f)) {
            continue;
        }
        let b = t / seq_len;
        let host: Vec<f32> = (0..t)
            .map(|i| -0.5 - ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let host_old: Vec<f32> = host
            .iter()
            .enumerate()
            .map(|(i, x)| x + ((i * 104_729) % 200) as f32 * 1e-3 - 0.1)
            .collect();
        let adv: Vec<f32> = (0..b * k)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mask: Vec<f32> = (0..t)
            .map(|i| ((i % seq_len) < seq_len * 7 / 8) as u8 as f32)
            .collect();
        let cu: Vec<i32> = (0..=b).map(|i| (i * seq_len) as i32).collect();
        let lambda = vec![1.0f32; k];
        let objectives = vec![ObjectiveKind::Policy; k];
        let d_logp = s.clone_htod(&host)?;
        let d_old = s.clone_htod(&host_old)?;
        let d_ref = s.clone_htod(&host_old)?;
        let d_adv = s.clone_htod(&adv)?;
        let d_mask = s.clone_htod(&mask)?;
        let mask_u8: Vec<u8> = mask.iter().map(|m| (*m != 0.0) as u8).collect();
        let d_mask_u8 = s.clone_htod(&mask_u8)?;
        let mut d_grad = s.alloc_zeros::<f32>(t)?;
        let cfg = GrpoConfig {
            kl_coef: if with_ref { 0.01 } else { 0.0 },
            ..GrpoConfig::default()
        };
        let inputs: DeviceGrpoInputs = GrpoInputs {
            logp: d_logp.as_view(),
            old_logp: d_old.as_view(),
            ref_logp: with_ref.then(|| d_ref.as_view()),
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerSequence(d_adv.as_view()),
            mask: if u8_mask {
                Mask::U8(d_mask_u8.as_view())
            } else {
                Mask::F32(d_mask.as_view())
            },
            cu_seqlens: &cu,
            lambda: &lambda,
            objectives: &objectives,
            membership: None,
            normalizers: None,
        };
        let (med, min) = time_ms(&s, &mut flush, || {
            cuda::grpo_loss(&gpu, &s, &inputs, &cfg, &mut d_grad.as_view_mut()).map(|_| ())
        })?;
        let mask_bytes = if u8_mask { 1 } else { 4 };
        let bytes = (t * (4 * (3 + with_ref as usize) + mask_bytes) + b * k * 4) as f64;
        let gbs = bytes / (med * 1e-3) / 1e9;
        println!(
            "{name:<44} {:>10.1} {:>10.1} {gbs:>9.0} {:>7.1}%",
            med * 1e3,
            min * 1e3,
            100.0 * gbs / copy_gbs
        );
    }
    logits_cases(&gpu, &s, &mut flush, copy_gbs)?;
    fused_linear_cases(&gpu, &s, &mut flush)?;
    Ok(())
}

/// The fused-linear loss at T = 8192, H = 4096, V = 151,936 bf16: default chunks against one chunk
/// of all T tokens (the unfused path: materialized [T, V] logits, three GEMMs), same run.
fn fused_linear_cases(
    gpu: &Gpu,
    s: &Arc<CudaStream>,
    flush: &mut CudaSlice<u8>,
) -> recap_kernels::Result<()> {
    use cuda::{FusedLinearConfig, LinearHead};
    let (t, h, v) = (8192usize, 4096usize, 151_936usize);
    if std::env::var("GPU_OPS_FILTER").is_ok_and(|f| !"fused-linear".contains(&f)) {
        return Ok(());
    }
    println!(
        "{:<44} {:>10} {:>10} {:>22}",
        "fused-linear GRPO loss T=8192 H=4096 V=151936",
        "median ms",
        "min ms",
        "extra device memory"
    );
    let q = |i: usize| {
        half::bf16::from_f32((((i * 2_654_435_761usize) >> 7) % 2001) as f32 * 1e-5 - 0.01)
    };
    let hidden: Vec<half::bf16> = (0..t * h).map(q).collect();
    let weight: Vec<half::bf16> = (0..v * h).map(|i| q(i + 17)).collect();
    let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
    let old: Vec<f32> = vec![-12.0; t];
    let adv: Vec<f32> = (0..8).map(|i| i as f32 / 4.0 - 1.0).collect();
    let mask = vec![1u8; t];
    let cu: Vec<i32> = (0..=8).map(|i| (i * t / 8) as i32).collect();
    let (x, w) = (s.clone_htod(&hidden)?, s.clone_htod(&weight)?);
    let (y, o, a, m) = (
        s.clone_htod(&labels)?,
        s.clone_htod(&old)?,
        s.clone_htod(&adv)?,
        s.clone_htod(&mask)?,
    );
    let mut dh = s.alloc_zeros::<half::bf16>(t * h)?;
    let mut dw = s.alloc_zeros::<f32>(v * h)?;
    let cfg = GrpoConfig::default();
    let lcfg = LogprobConfig::default();
    for (name, opt) in [
        ("fused, default chunks", FusedLinearConfig::default()),
        (
            "fused, fp32 logits",
            FusedLinearConfig {
                fp32_logits: true,
                ..FusedLinearConfig::default()
            },
        ),
        (
            "unfused (one chunk of T)",
            FusedLinearConfig {
                chunk_tokens: Some(t),
                ..FusedLinearConfig::default()
            },
        ),
    ] {
        let inputs = recap_kernels::LogitsLossInputs {
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
        let (med, min) = time_ms_n(s, flush, 2, 10, || {
            cuda::fused_linear_grpo_loss(
                gpu,
                s,
                &head,
                &inputs,
                &cfg,
                &lcfg,
                &opt,
                &mut dh.as_view_mut(),
                &mut dw.as_view_mut(),
            )
            .map(|_| ())
        })?;
        let c = opt.chunk(t, v);
        let extra = c * v * if opt.fp32_logits { 4 + 2 } else { 2 } + 7 * t * 4;
        println!(
            "{:<44} {med:>10.2} {min:>10.2} {:>18.1} MiB  (chunk {c})",
            name,
            extra as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn logits_cases(
    gpu: &Gpu,
    s: &Arc<CudaStream>,
    flush: &mut CudaSlice<u8>,
    copy_gbs: f64,
) -> recap_kernels::Result<()> {
    println!(
        "{:<44} {:>10} {:>10} {:>9} {:>8}",
        "logprob + entropy from logits", "median us", "min us", "GB/s", "% copy"
    );
    for &(t, v, dtype) in &[
        (4096usize, 151_936usize, "bf16"),
        (16_384, 151_936, "bf16"),
        (4096, 32_768, "f32"),
    ] {
        match dtype {
            "bf16" => logits_case::<half::bf16>(gpu, s, flush, copy_gbs, t, v)?,
            _ => logits_case::<f32>(gpu, s, flush, copy_gbs, t, v)?,
        }
    }
    Ok(())
}

fn logits_case<E: LogitElem>(
    gpu: &Gpu,
    s: &Arc<CudaStream>,
    flush: &mut CudaSlice<u8>,
    copy_gbs: f64,
    t: usize,
    v: usize,
) -> recap_kernels::Result<()> {
    let name = format!("T={t} V={v} {}", E::SUFFIX);
    if std::env::var("GPU_OPS_FILTER").is_ok_and(|f| !name.contains(&f)) {
        return Ok(());
    }
    let host: Vec<E> = (0..t * v)
        .map(|i| E::from_f32(((i * 2_654_435_761usize) % 1000) as f32 * 0.01 - 5.0))
        .collect();
    let labels: Vec<i32> = (0..t).map(|r| ((r * 7919) % v) as i32).collect();
    let g: Vec<f32> = (0..t).map(|r| ((r % 7) as f32 - 3.0) * 1e-3).collect();
    let mut z = s.clone_htod(&host)?;
    let y = s.clone_htod(&labels)?;
    let gd = s.clone_htod(&g)?;
    let (mut lp, mut h, mut l) = (
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
        s.alloc_zeros::<f32>(t)?,
    );
    let cfg = LogprobConfig::default();
    let (med_f, min_f) = time_ms(s, flush, || {
        let zl = Logits::dense(z.as_view(), t, v);
        cuda::logprob_forward(
            gpu,
            s,
            &zl,
            &y.as_view(),
            &cfg,
            &mut lp.as_view_mut(),
            Some(&mut h.as_view_mut()),
            &mut l.as_view_mut(),
        )
    })?;
    let (med_b, min_b) = time_ms(s, flush, || {
        let (yv, lv, hv, gv) = (y.as_view(), l.as_view(), h.as_view(), gd.as_view());
        let grads = cuda::LogprobGrads {
            labels: &yv,
            lse: &lv,
            entropy: &hv,
            g_logp: &gv,
            g_entropy: Some(&gv),
        };
        cuda::logprob_backward_inplace(
            gpu,
            s,
            &mut Logits::dense(z.as_view_mut(), t, v),
            &grads,
            &cfg,
        )
    })?;
    let bytes = (t * v * std::mem::size_of::<E>()) as f64;
    for (what, med, min, b) in [
        ("forward", med_f, min_f, bytes),
        ("backward in place", med_b, min_b, 2.0 * bytes),
        (
            "forward + backward",
            med_f + med_b,
            min_f + min_b,
            3.0 * bytes,
        ),
    ] {
        let gbs = b / (med * 1e-3) / 1e9;
        println!(
            "{:<44} {:>10.1} {:>10.1} {gbs:>9.0} {:>7.1}%",
            format!("{name} {what}"),
            med * 1e3,
            min * 1e3,
            100.0 * gbs / copy_gbs
        );
    }
    println!(
        "{:<44} {} bytes (logp, entropy, lse: 3 x T x 4 B, + a 4 B label check); gradient written over the logits",
        format!("{name} extra device memory"),
        3 * t * 4 + 4
    );
    Ok(())
}
