//! The chunked fused-linear path: the f64 reference against finite differences of its loss with
//! respect to the hidden states, and on the GPU against the reference and across chunk sizes (one
//! chunk of all T tokens is the unfused path with materialized logits).

mod common;

use common::{close, Rng};
use half::bf16;
use recap_kernels::cuda::{self, FusedLinearConfig, LinearHead};
use recap_kernels::{
    cpu, Advantages, AggMode, GrpoConfig, HostLogitsLossInputs, LogitsLossInputs, LogprobConfig,
    Mask, ObjectiveKind,
};

struct Case {
    hidden: Vec<bf16>,
    weight: Vec<bf16>,
    h: usize,
    v: usize,
    labels: Vec<i32>,
    old: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<u8>,
    cu: Vec<i32>,
    /// The whole batch's normalizers when this case is a part of it.
    norms: Option<recap_kernels::Normalizers>,
}

impl Case {
    fn new(seed: u64, lens: &[usize], h: usize, v: usize) -> Case {
        let mut rng = Rng::new(seed);
        let t: usize = lens.iter().sum();
        // multiples of 1/64 in [-1, 1]: exact in bf16, so finite differences can step by 1/64
        let q = |rng: &mut Rng| bf16::from_f32((rng.below(129) as f32 - 64.0) / 64.0);
        let hidden = (0..t * h).map(|_| q(&mut rng)).collect();
        let weight = (0..v * h).map(|_| q(&mut rng)).collect();
        let labels = (0..t)
            .map(|r| {
                if r % 17 == 3 {
                    -100
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let old = (0..t)
            .map(|_| -(v as f32).ln() + 0.3 * rng.normal() as f32)
            .collect();
        let adv = (0..lens.len()).map(|_| rng.normal() as f32).collect();
        let mask = (0..t).map(|_| (rng.below(9) != 0) as u8).collect();
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + *l as i32);
        }
        Case {
            hidden,
            weight,
            h,
            v,
            labels,
            old,
            adv,
            mask,
            cu,
            norms: None,
        }
    }

    fn inputs(&self) -> HostLogitsLossInputs<'_> {
        HostLogitsLossInputs {
            labels: &self.labels,
            old_logp: &self.old,
            ref_logp: Some(&self.old),
            rollout_logp: None,
            advantages: Advantages::PerSequence(&self.adv),
            mask: Mask::U8(&self.mask),
            cu_seqlens: &self.cu,
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: self.norms.as_ref(),
        }
    }

    fn t(&self) -> usize {
        self.labels.len()
    }
}

fn config(mode: AggMode) -> GrpoConfig {
    GrpoConfig::default()
        .with_agg_mode(mode)
        .with_kl_coef(0.1)
        .with_entropy_coef(0.02)
        .with_clip_low(0.9)
        .with_clip_high(9.0)
        .with_dual_clip(None)
}

#[test]
fn reference_hidden_gradient_matches_finite_differences() {
    let c = Case::new(3, &[4, 3], 8, 11);
    let cfg = config(AggMode::SeqMeanTokenMean);
    let lcfg = LogprobConfig {
        temperature: 0.9,
        ..LogprobConfig::default()
    };
    let (t, h, v) = (c.t(), c.h, c.v);
    let run = |hidden: &[bf16]| {
        let (mut dh, mut dw) = (vec![0f32; t * h], vec![0f32; v * h]);
        let out = cpu::fused_linear_grpo_loss(
            hidden,
            &c.weight,
            h,
            &c.inputs(),
            &cfg,
            &lcfg,
            true,
            &mut dh,
            &mut dw,
        )
        .unwrap();
        (out.loss, dh)
    };
    let (_, dh) = run(&c.hidden);
    let step = 1.0 / 64.0;
    for i in 0..t * h {
        let (mut hp, mut hm) = (c.hidden.clone(), c.hidden.clone());
        hp[i] = bf16::from_f32(hp[i].to_f32() + step);
        hm[i] = bf16::from_f32(hm[i].to_f32() - step);
        let fd = (run(&hp).0 - run(&hm).0) / (hp[i].to_f64() - hm[i].to_f64());
        // the analytic gradient passes through a bf16 rounding of dlogits (as on the GPU)
        assert!(
            close(dh[i] as f64, fd, 2e-4, 2e-2),
            "hidden[{i}]: analytic {} vs finite difference {fd}",
            dh[i]
        );
    }
}

/// Case `c` on the device.
struct DeviceCase {
    x: cudarc::driver::CudaSlice<bf16>,
    w: cudarc::driver::CudaSlice<bf16>,
    y: cudarc::driver::CudaSlice<i32>,
    o: cudarc::driver::CudaSlice<f32>,
    a: cudarc::driver::CudaSlice<f32>,
    m: cudarc::driver::CudaSlice<u8>,
}

impl DeviceCase {
    fn new(s: &std::sync::Arc<cudarc::driver::CudaStream>, c: &Case) -> DeviceCase {
        DeviceCase {
            x: s.clone_htod(&c.hidden).unwrap(),
            w: s.clone_htod(&c.weight).unwrap(),
            y: s.clone_htod(&c.labels).unwrap(),
            o: s.clone_htod(&c.old).unwrap(),
            a: s.clone_htod(&c.adv).unwrap(),
            m: s.clone_htod(&c.mask).unwrap(),
        }
    }

    /// The case's inputs (the old log-probs stand in for the reference's too).
    fn inputs<'a>(&'a self, c: &'a Case) -> cuda::DeviceLogitsLossInputs<'a> {
        LogitsLossInputs {
            labels: self.y.as_view(),
            old_logp: self.o.as_view(),
            ref_logp: Some(self.o.as_view()),
            rollout_logp: None,
            advantages: Advantages::PerSequence(self.a.as_view()),
            mask: Mask::U8(self.m.as_view()),
            cu_seqlens: &c.cu,
            lambda: &[1.0],
            objectives: &[ObjectiveKind::Policy],
            membership: None,
            normalizers: c.norms.as_ref(),
        }
    }

    fn head(&self, c: &Case) -> LinearHead<'_> {
        LinearHead {
            hidden: self.x.as_view(),
            weight: self.w.as_view(),
            hidden_size: c.h,
            vocab: c.v,
        }
    }
}

fn gpu_case(
    g: &std::sync::Arc<cuda::Gpu>,
    c: &Case,
    cfg: &GrpoConfig,
    lcfg: &LogprobConfig,
    opt: &FusedLinearConfig,
) -> recap_kernels::Result<(recap_kernels::LogitsLossOutput, Vec<f32>, Vec<f32>)> {
    let s = g.stream().clone();
    let (t, h, v) = (c.t(), c.h, c.v);
    let d = DeviceCase::new(&s, c);
    let mut dh = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut dw = s.alloc_zeros::<f32>(v * h).unwrap();
    let out = cuda::fused_linear_grpo_loss(
        g,
        &s,
        &d.head(c),
        &d.inputs(c),
        cfg,
        lcfg,
        opt,
        &mut dh.as_view_mut(),
        &mut dw.as_view_mut(),
    )?;
    let dh: Vec<f32> = s
        .clone_dtoh(&dh)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    Ok((out, dh, s.clone_dtoh(&dw).unwrap()))
}

/// The f64 reference of case `c`: its output, `d_hidden` and `d_weight`.
fn reference(
    c: &Case,
    cfg: &GrpoConfig,
    lcfg: &LogprobConfig,
    fp32: bool,
) -> (recap_kernels::LogitsLossOutput, Vec<f32>, Vec<f32>) {
    let (t, h, v) = (c.t(), c.h, c.v);
    let (mut dh, mut dw) = (vec![0f32; t * h], vec![0f32; v * h]);
    let out = cpu::fused_linear_grpo_loss(
        &c.hidden,
        &c.weight,
        h,
        &c.inputs(),
        cfg,
        lcfg,
        fp32,
        &mut dh,
        &mut dw,
    )
    .unwrap();
    (out, dh, dw)
}

/// One chunk of all `t` tokens.
fn one_chunk(t: usize) -> FusedLinearConfig {
    FusedLinearConfig {
        chunk_tokens: Some(t),
        ..FusedLinearConfig::default()
    }
}

fn assert_grad_close(what: &str, got: &[f32], want: &[f32], rel: f64) {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            close(*a as f64, *b as f64, 2e-3 * scale, rel),
            "{what}[{i}]: {a:e} vs {b:e} (max |ref| {scale:e})"
        );
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_linear_matches_reference_and_chunk_sizes_on_gpu() {
    let g = common::require_cuda("fused_linear_matches_reference_and_chunk_sizes_on_gpu");
    let c = Case::new(9, &[30, 0, 25, 15, 1], 64, 1003);
    let t = c.t();
    let lcfg = LogprobConfig {
        temperature: 0.8,
        ..LogprobConfig::default()
    };
    for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
        let cfg = config(mode);
        for fp32 in [false, true] {
            let (want, dh, dw) = reference(&c, &cfg, &lcfg, fp32);
            let whole = FusedLinearConfig {
                chunk_tokens: Some(t),
                fp32_logits: fp32,
                ..FusedLinearConfig::default()
            };
            let (o_whole, dh_whole, dw_whole) = gpu_case(&g, &c, &cfg, &lcfg, &whole).unwrap();
            let (l_whole, e_whole) = (o_whole.loss, o_whole.entropy_mean);
            let what = format!("{mode} fp32_logits={fp32}");
            assert!(
                close(l_whole, want.loss, 1e-4, 1e-3),
                "{what}: loss {l_whole} vs reference {}",
                want.loss
            );
            assert!(
                close(e_whole, want.entropy_mean, 1e-4, 1e-3),
                "{what}: entropy {e_whole} vs {}",
                want.entropy_mean
            );
            assert_grad_close(&format!("{what} d_hidden"), &dh_whole, &dh, 2e-2);
            assert_grad_close(&format!("{what} d_weight"), &dw_whole, &dw, 2e-2);
            for chunk in [16usize, 37] {
                let opt = FusedLinearConfig {
                    chunk_tokens: Some(chunk),
                    fp32_logits: fp32,
                    ..FusedLinearConfig::default()
                };
                let (o, dhc, dwc) = gpu_case(&g, &c, &cfg, &lcfg, &opt).unwrap();
                let (l, e) = (o.loss, o.entropy_mean);
                let w = format!("{what} chunk {chunk} vs one chunk");
                let (m, mw) = (&o.grpo.metrics, &o_whole.grpo.metrics);
                for (name, a, b) in [
                    ("pg_clipfrac", m.pg_clipfrac[0], mw.pg_clipfrac[0]),
                    ("ratio_mean", m.ratio_mean, mw.ratio_mean),
                    ("ratio_max", m.ratio_max, mw.ratio_max),
                    ("ppo_kl", m.ppo_kl, mw.ppo_kl),
                    ("kl_loss", o.grpo.kl_loss, o_whole.grpo.kl_loss),
                ] {
                    assert!(close(a, b, 1e-6, 1e-5), "{w}: {name} {a} vs {b}");
                }
                assert_eq!(
                    (m.num_tokens, m.num_seqs, m.objective_seqs.clone()),
                    (mw.num_tokens, mw.num_seqs, mw.objective_seqs.clone()),
                    "{w}: counts"
                );
                assert!(close(l, l_whole, 1e-6, 1e-5), "{w}: loss {l} vs {l_whole}");
                assert!(
                    close(e, e_whole, 1e-6, 1e-5),
                    "{w}: entropy {e} vs {e_whole}"
                );
                assert_grad_close(&format!("{w} d_hidden"), &dhc, &dh_whole, 1e-2);
                assert_grad_close(&format!("{w} d_weight"), &dwc, &dw_whole, 1e-2);
            }
        }
    }
}

/// GSPO through the fused-linear path: one chunk matches the reference; chunks that would cut the
/// sequences' means are refused with an error naming the option.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gspo_needs_one_chunk() {
    let g = common::require_cuda("gspo_needs_one_chunk");
    let c = Case::new(5, &[9, 4, 12], 16, 300);
    let t = c.t();
    let cfg = GrpoConfig::gspo().with_clip_low(0.2).with_clip_high(0.28);
    let lcfg = LogprobConfig::default();
    let (want, dh, dw) = reference(&c, &cfg, &lcfg, false);
    let (out, dh_gpu, dw_gpu) = gpu_case(&g, &c, &cfg, &lcfg, &one_chunk(t)).unwrap();
    assert!(
        close(out.loss, want.loss, 1e-4, 1e-3),
        "loss {} vs {}",
        out.loss,
        want.loss
    );
    assert_grad_close("gspo d_hidden", &dh_gpu, &dh, 2e-2);
    assert_grad_close("gspo d_weight", &dw_gpu, &dw, 2e-2);
    let chunked = FusedLinearConfig {
        chunk_tokens: Some(8),
        ..FusedLinearConfig::default()
    };
    let err = gpu_case(&g, &c, &cfg, &lcfg, &chunked).unwrap_err();
    assert!(err.to_string().contains("options.chunk_tokens"), "{err}");
}

/// Only the rows that carry loss: with 0 % (no gather), 50 % and 90 % of the rows masked (and a
/// fully masked sequence, ignored labels, empty and one-token sequences), the synchronous call matches the
/// reference, gives exactly 0 in the masked rows of `d_hidden`, and asks cuBLAS for the kept rows'
/// work only: 3 GEMMs of `n V H` multiply-adds for n kept rows (the emulated device's counter).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn only_rows_that_carry_loss_are_computed_on_gpu() {
    let g = common::require_cuda("only_rows_that_carry_loss_are_computed_on_gpu");
    let mut rng = Rng::new(41);
    let lens = [40usize, 0, 33, 31, 1, 32];
    let lcfg = LogprobConfig::default();
    for (masked, mode) in [
        (0.0, AggMode::TokenMean),
        (0.5, AggMode::SeqMeanTokenMean),
        (0.9, AggMode::TokenMean),
    ] {
        let mut c = Case::new(17, &lens, 32, 257);
        let t = c.t();
        if masked == 0.0 {
            // every row carries loss: nothing to gather
            c.labels
                .iter_mut()
                .filter(|y| **y == -100)
                .for_each(|y| *y = 0);
        }
        // the third sequence (rows 40 .. 73) fully masked when any row is
        c.mask = (0..t)
            .map(|r| (rng.uniform() >= masked && !(masked > 0.0 && (40..73).contains(&r))) as u8)
            .collect();
        let (h, v) = (c.h, c.v);
        let kept = (0..t)
            .filter(|&r| c.mask[r] != 0 && c.labels[r] != -100)
            .count();
        let cfg = config(mode);
        let (want, dh, dw) = reference(&c, &cfg, &lcfg, false);
        let ((got, dhg, dwg), calls) =
            cuda::count_calls(|| gpu_case(&g, &c, &cfg, &lcfg, &one_chunk(t)).unwrap());
        let what = format!("{masked} masked, {kept} of {t} rows kept, {mode}");
        assert!(
            close(got.loss, want.loss, 1e-4, 1e-3),
            "{what}: loss {} vs reference {}",
            got.loss,
            want.loss
        );
        assert_eq!(got.grpo.metrics.num_tokens, want.grpo.metrics.num_tokens);
        assert_grad_close(&format!("{what} d_hidden"), &dhg, &dh, 2e-2);
        assert_grad_close(&format!("{what} d_weight"), &dwg, &dw, 2e-2);
        for r in 0..t {
            if c.mask[r] == 0 || c.labels[r] == -100 {
                assert!(
                    dhg[r * h..(r + 1) * h].iter().all(|x| *x == 0.0),
                    "{what}: row {r}"
                );
            }
        }
        match calls {
            Some(calls) => assert_eq!(
                calls.get("gemm_macs"),
                3 * (kept * v * h) as u64,
                "{what}: {calls:?}"
            ),
            None => eprintln!("not the emulated driver: GEMM work not counted"),
        }
    }
}

/// The batch-invariant mode: with the whole batch's normalizers, a sequence's `d_hidden` rows are
/// the same bits alone or inside the batch (at another position, in a full or a padded chunk), the
/// loss matches the reference, and the GEMMs that produce rows run on whole chunks: `2 c V H`
/// multiply-adds per chunk plus `t V H` for the weight gradient (the emulated device counts them),
/// where the default mode asks for `3 t V H`; the asynchronous call refuses the mode by name.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn batch_invariant_rows_on_gpu() {
    let g = common::require_cuda("batch_invariant_rows_on_gpu");
    let mut whole = Case::new(23, &[40, 30], 32, 257);
    whole
        .labels
        .iter_mut()
        .filter(|y| **y == -100)
        .for_each(|y| *y = 1);
    whole.mask = vec![1; whole.t()];
    let (t, h, v) = (whole.t(), whole.h, whole.v);
    let cfg = config(AggMode::TokenMean);
    let lcfg = LogprobConfig::default();
    whole.norms =
        Some(recap_kernels::count_normalizers(Mask::U8(&whole.mask), &whole.cu, None, 1).unwrap());
    let opt = FusedLinearConfig {
        chunk_tokens: Some(32),
        batch_invariant: true,
        ..FusedLinearConfig::default()
    };
    let ((out, dh_whole, _), calls) =
        cuda::count_calls(|| gpu_case(&g, &whole, &cfg, &lcfg, &opt).unwrap());
    let (want, _, _) = reference(&whole, &cfg, &lcfg, false);
    assert!(
        close(out.loss, want.loss, 1e-4, 1e-3),
        "loss {} vs reference {}",
        out.loss,
        want.loss
    );
    if let Some(calls) = calls {
        let parts = t.div_ceil(32);
        assert_eq!(
            calls.get("gemm_macs"),
            ((2 * parts * 32 + t) * v * h) as u64,
            "{calls:?}"
        );
    }
    // each sequence alone: rows 0..40 (chunks of 32 and 8) and rows 40..70 (one chunk of 30,
    // which sit at offsets 8..32 of the whole batch's second chunk and 0..6 of its third)
    for (rows, seq) in [(0..40usize, 0..1usize), (40..70, 1..2)] {
        let part = Case {
            hidden: whole.hidden[rows.start * h..rows.end * h].to_vec(),
            weight: whole.weight.clone(),
            h,
            v,
            labels: whole.labels[rows.clone()].to_vec(),
            old: whole.old[rows.clone()].to_vec(),
            adv: whole.adv[seq].to_vec(),
            mask: whole.mask[rows.clone()].to_vec(),
            cu: vec![0, rows.len() as i32],
            norms: whole.norms.clone(),
        };
        let (_, dh, _) = gpu_case(&g, &part, &cfg, &lcfg, &opt).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&dh),
            bits(&dh_whole[rows.start * h..rows.end * h]),
            "rows {rows:?}"
        );
    }
    let default = FusedLinearConfig {
        batch_invariant: false,
        ..opt
    };
    let (_, calls) = cuda::count_calls(|| gpu_case(&g, &whole, &cfg, &lcfg, &default).unwrap());
    if let Some(calls) = calls {
        assert_eq!(calls.get("gemm_macs"), (3 * t * v * h) as u64, "{calls:?}");
    }
    // the asynchronous call has no scratch for the pad: refused, naming the option
    let s = g.stream().clone();
    let d = DeviceCase::new(&s, &whole);
    let mut ws = s.alloc_zeros::<u8>(16).unwrap();
    let mut dh = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut dw = s.alloc_zeros::<f32>(v * h).unwrap();
    let mut out = s.alloc_zeros::<f64>(cuda::logits_output_len(1)).unwrap();
    let e = cuda::fused_linear_grpo_loss_async(
        &g,
        &s,
        &d.head(&whole),
        &d.inputs(&whole),
        None,
        &cfg,
        &lcfg,
        &opt,
        &mut ws.as_view_mut(),
        &mut dh.as_view_mut(),
        &mut dw.as_view_mut(),
        &mut out.as_view_mut(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("batch_invariant"), "{e}");
}
