//! Every GPU kernel against the CPU reference on seeded random batches: lengths 0, 1, 31, 32, 33,
//! 4097, empty and fully masked sequences, tiles spanning thousands of sequences, K in 1..=8, every
//! aggregation mode, both mask dtypes, per-sequence and per-token advantages, membership subsets
//! and every KL estimator. Tolerance |gpu - cpu| <= 1e-6 + 1e-5 |cpu|. Also: two GPU runs give
//! identical bits, and micro-batches with global normalizers match the whole batch.
//!
//! Without a usable GPU these tests print why and pass; with RECAP_REQUIRE_GPU=1 they fail instead.

mod common;

use common::{assert_all_close, assert_close, config_for, Batch, Rng};
use recap_kernels::{AggMode, Backend, GrpoOutput, HostReduceInputs, KlEstimator, Mask};

const ABS: f64 = 1e-6;
const REL: f64 = 1e-5;

fn compare(what: &str, g: &GrpoOutput, c: &GrpoOutput) {
    assert_close(&format!("{what} loss"), g.loss, c.loss, ABS, REL);
    assert_close(&format!("{what} kl_loss"), g.kl_loss, c.kl_loss, ABS, REL);
    for k in 0..c.objective_loss.len() {
        assert_close(
            &format!("{what} objective_loss[{k}]"),
            g.objective_loss[k],
            c.objective_loss[k],
            ABS,
            REL,
        );
        assert_close(
            &format!("{what} pg_clipfrac[{k}]"),
            g.metrics.pg_clipfrac[k],
            c.metrics.pg_clipfrac[k],
            ABS,
            REL,
        );
        assert_close(
            &format!("{what} pg_clipfrac_lower[{k}]"),
            g.metrics.pg_clipfrac_lower[k],
            c.metrics.pg_clipfrac_lower[k],
            ABS,
            REL,
        );
    }
    let (gm, cm) = (&g.metrics, &c.metrics);
    assert_close(&format!("{what} ppo_kl"), gm.ppo_kl, cm.ppo_kl, ABS, REL);
    for (name, a, b) in [
        ("rollout_is_mean", gm.rollout_is_mean, cm.rollout_is_mean),
        ("rollout_is_min", gm.rollout_is_min, cm.rollout_is_min),
        ("rollout_is_max", gm.rollout_is_max, cm.rollout_is_max),
        (
            "rollout_is_corrected_fraction",
            gm.rollout_is_corrected_fraction,
            cm.rollout_is_corrected_fraction,
        ),
    ] {
        assert_close(&format!("{what} {name}"), a, b, ABS, REL);
    }
    assert_close(
        &format!("{what} ratio_min"),
        gm.ratio_min,
        cm.ratio_min,
        ABS,
        REL,
    );
    assert_close(
        &format!("{what} ratio_mean"),
        gm.ratio_mean,
        cm.ratio_mean,
        ABS,
        REL,
    );
    assert_close(
        &format!("{what} ratio_max"),
        gm.ratio_max,
        cm.ratio_max,
        ABS,
        REL,
    );
    assert_close(&format!("{what} kl_mean"), gm.kl_mean, cm.kl_mean, ABS, REL);
    assert_eq!(gm.num_tokens, cm.num_tokens, "{what} num_tokens");
    assert_eq!(gm.num_seqs, cm.num_seqs, "{what} num_seqs");
    assert_eq!(
        gm.objective_tokens, cm.objective_tokens,
        "{what} objective_tokens"
    );
    assert_eq!(
        gm.objective_seqs, cm.objective_seqs,
        "{what} objective_seqs"
    );
    assert_eq!(gm.policy_tokens, cm.policy_tokens, "{what} policy_tokens");
    assert_eq!(gm.nonfinite, cm.nonfinite, "{what} nonfinite");
}

fn length_sets() -> Vec<Vec<usize>> {
    let mut rng = Rng::new(99);
    let mut many_empty = vec![0usize; 3000];
    for i in (0..3000).step_by(97) {
        many_empty[i] = 1 + rng.below(40);
    }
    vec![
        vec![0],
        vec![1],
        vec![31],
        vec![32],
        vec![33],
        vec![4097],
        vec![0, 1, 31, 32, 33, 4097, 0, 5],
        (0..700).map(|_| rng.below(9)).collect(),
        many_empty,
    ]
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_loss_matches_reference() {
    let be = common::require_gpu("fused_loss_matches_reference");
    let mut cases = 0;
    for (li, lens) in length_sets().iter().enumerate() {
        for k in 1..=8usize {
            for (mi, mode) in AggMode::ALL.into_iter().enumerate() {
                let seed = (li * 1000 + k * 10 + mi) as u64;
                let b = Batch::random(seed, lens, k);
                let cfg = config_for(seed, mode);
                let what = format!(
                    "lens#{li} T={} K={k} {mode} seed {seed} kl {}",
                    b.t(),
                    cfg.kl_estimator
                );
                let mut g_gpu = vec![f32::NAN; b.t()];
                let mut g_cpu = vec![f32::NAN; b.t()];
                let o_gpu = be.grpo_loss(&b.inputs(None), &cfg, &mut g_gpu).unwrap();
                let o_cpu = Backend::Cpu
                    .grpo_loss(&b.inputs(None), &cfg, &mut g_cpu)
                    .unwrap();
                compare(&what, &o_gpu, &o_cpu);
                assert_all_close(&format!("{what} grad"), &g_gpu, &g_cpu, ABS, REL);
                cases += 1;
            }
        }
    }
    eprintln!("fused loss: {cases} GPU-vs-CPU cases on {}", be.name());
}

/// Sizes where each thread takes several tokens (items_per_thread > 1) and K = 16.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_loss_matches_reference_at_scale() {
    let be = common::require_gpu("fused_loss_matches_reference_at_scale");
    for (seed, t, seq_len, k) in [
        (1u64, 300_000usize, 1000usize, 3usize),
        (2, 1_200_000, 4096, 16),
        (3, 2_500_003, 977, 5),
    ] {
        let lens: Vec<usize> = (0..t / seq_len)
            .map(|_| seq_len)
            .chain([t % seq_len])
            .collect();
        let b = Batch::random(seed, &lens, k);
        for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
            let cfg = config_for(seed, mode);
            let mut g_gpu = vec![0f32; b.t()];
            let mut g_cpu = vec![0f32; b.t()];
            let o_gpu = be.grpo_loss(&b.inputs(None), &cfg, &mut g_gpu).unwrap();
            let o_cpu = Backend::Cpu
                .grpo_loss(&b.inputs(None), &cfg, &mut g_cpu)
                .unwrap();
            let what = format!("T={t} K={k} {mode}");
            compare(&what, &o_gpu, &o_cpu);
            assert_all_close(&format!("{what} grad"), &g_gpu, &g_cpu, ABS, REL);
        }
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn gpu_runs_are_bitwise_identical() {
    let be = common::require_gpu("gpu_runs_are_bitwise_identical");
    let lens: Vec<usize> = (0..300).map(|i| 1 + (i * 37) % 900).collect();
    let b = Batch::random(5, &lens, 4);
    let cfg = config_for(5, AggMode::SeqMeanTokenMean);
    let run = || {
        let mut g = vec![0f32; b.t()];
        let o = be.grpo_loss(&b.inputs(None), &cfg, &mut g).unwrap();
        (o, g.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    let (o1, g1) = run();
    for _ in 0..3 {
        let (o2, g2) = run();
        assert_eq!(o1.loss.to_bits(), o2.loss.to_bits(), "loss bits");
        assert_eq!(o1, o2, "every output");
        assert_eq!(g1, g2, "gradient bits");
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn micro_batches_match_whole_batch_on_gpu() {
    let be = common::require_gpu("micro_batches_match_whole_batch_on_gpu");
    let lens: Vec<usize> = (0..64).map(|i| (i * 53) % 300).collect();
    let k = 3;
    for seed in 0..4u64 {
        let whole = Batch::random(seed, &lens, k);
        for mode in AggMode::ALL {
            let cfg = config_for(seed, mode);
            let mut g_whole = vec![0f32; whole.t()];
            let o_whole = be
                .grpo_loss(&whole.inputs(None), &cfg, &mut g_whole)
                .unwrap();
            let cuts = [0usize, 10, 11, 40, 64];
            let subs: Vec<Batch> = cuts
                .windows(2)
                .map(|w| common::sub_batch(&whole, w[0], w[1], k))
                .collect();
            let mut global = recap_kernels::Normalizers::default();
            for s in &subs {
                global
                    .add(
                        &recap_kernels::count_normalizers(
                            s.inputs(None).mask,
                            &s.cu,
                            s.membership.as_deref(),
                            k,
                        )
                        .unwrap(),
                    )
                    .unwrap();
            }
            let mut loss = 0.0;
            let mut g_cat = Vec::new();
            for s in &subs {
                let mut g = vec![0f32; s.t()];
                loss += be
                    .grpo_loss(&s.inputs(Some(&global)), &cfg, &mut g)
                    .unwrap()
                    .loss;
                g_cat.extend(g);
            }
            let what = format!("seed {seed} {mode}");
            assert_close(&format!("{what} loss"), loss, o_whole.loss, ABS, REL);
            assert_all_close(&format!("{what} grad"), &g_cat, &g_whole, 1e-9, 1e-6);
        }
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn kl_matches_reference() {
    let be = common::require_gpu("kl_matches_reference");
    for (li, lens) in length_sets().iter().enumerate() {
        let b = Batch::random(li as u64, lens, 1);
        let t = b.t();
        for est in KlEstimator::ALL {
            for masked in [false, true] {
                let mask = masked.then(|| {
                    if b.use_u8 {
                        Mask::U8(&b.mask_u8[..])
                    } else {
                        Mask::F32(&b.mask_f32[..])
                    }
                });
                let (mut vg, mut gg) = (vec![f32::NAN; t], vec![f32::NAN; t]);
                let (mut vc, mut gc) = (vec![f32::NAN; t], vec![f32::NAN; t]);
                be.kl(&b.logp, &b.ref_logp, mask, est, &mut vg, &mut gg)
                    .unwrap();
                Backend::Cpu
                    .kl(&b.logp, &b.ref_logp, mask, est, &mut vc, &mut gc)
                    .unwrap();
                assert_all_close(&format!("lens#{li} {est} value"), &vg, &vc, ABS, REL);
                assert_all_close(&format!("lens#{li} {est} grad"), &gg, &gc, ABS, REL);
            }
        }
    }
}

#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn weighted_reduce_matches_reference() {
    let be = common::require_gpu("weighted_reduce_matches_reference");
    let mut rng = Rng::new(3);
    for (li, lens) in length_sets().iter().enumerate() {
        for k in [1usize, 2, 3, 5, 8, 16] {
            let b = Batch::random((li * 31 + k) as u64, lens, k);
            let t = b.t();
            let losses: Vec<f32> = (0..t * k).map(|_| (rng.normal() * 2.0) as f32).collect();
            let full = if k >= 32 { u32::MAX } else { (1u32 << k) - 1 };
            let membership: Option<Vec<u32>> = b
                .membership
                .as_ref()
                .map(|m| m.iter().map(|x| x & full).collect());
            for mode in AggMode::ALL {
                let cfg = config_for(k as u64, mode);
                let inputs = HostReduceInputs {
                    losses: &losses,
                    mask: if b.use_u8 {
                        Mask::U8(&b.mask_u8)
                    } else {
                        Mask::F32(&b.mask_f32)
                    },
                    cu_seqlens: &b.cu,
                    lambda: &b.lambda,
                    membership: membership.as_deref(),
                    normalizers: None,
                };
                let (mut gg, mut gc) = (vec![f32::NAN; t * k], vec![f32::NAN; t * k]);
                let og = be.weighted_reduce(&inputs, &cfg, &mut gg).unwrap();
                let oc = Backend::Cpu
                    .weighted_reduce(&inputs, &cfg, &mut gc)
                    .unwrap();
                let what = format!("lens#{li} K={k} {mode}");
                assert_close(&format!("{what} total"), og.total, oc.total, ABS, REL);
                for j in 0..k {
                    assert_close(
                        &format!("{what} agg[{j}]"),
                        og.objective_loss[j],
                        oc.objective_loss[j],
                        ABS,
                        REL,
                    );
                }
                assert_eq!(og.objective_tokens, oc.objective_tokens, "{what}");
                assert_eq!(og.objective_seqs, oc.objective_seqs, "{what}");
                assert_all_close(&format!("{what} grad"), &gg, &gc, ABS, REL);
            }
        }
    }
}

/// Parts that cut a sequence in two, with the whole batch's normalizers and per-sequence token
/// weights, reproduce the whole batch on the GPU in every mode.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn parts_splitting_a_sequence_match_whole_batch_on_gpu() {
    let be = common::require_gpu("parts_splitting_a_sequence_match_whole_batch_on_gpu");
    common::check_split_parts(&be, &[5, 400, 9, 1200, 33], 3, 0..4, &[100, 900], ABS, REL);
}

/// Ten runs of each GPU op on the same inputs give the same bits (no float atomics in final sums):
/// the fused loss in its plain and variant kernels, log-probs forward and backward, group
/// advantages.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn every_kernel_is_deterministic() {
    let be = common::require_gpu("every_kernel_is_deterministic");
    let b = Batch::random(7, &[300, 4097, 1, 0, 33, 2000], 3);
    for cfg in [
        config_for(0, AggMode::TokenMean),
        config_for(2, AggMode::SeqMeanTokenMean)
            .with_policy_loss(recap_kernels::PolicyLoss::sapo())
            .with_kl_is_correction(true),
    ] {
        let mut first: Option<(u64, Vec<u32>)> = None;
        for _ in 0..10 {
            let mut g = vec![0f32; b.t()];
            let out = be.grpo_loss(&b.inputs(None), &cfg, &mut g).unwrap();
            let bits = (out.loss.to_bits(), g.iter().map(|x| x.to_bits()).collect());
            match &first {
                None => first = Some(bits),
                Some(f) => assert_eq!(&bits, f, "fused loss run to run ({:?})", cfg.policy_loss),
            }
        }
    }
    let (t, v) = (257usize, 5000usize);
    let mut rng = Rng::new(9);
    let z: Vec<half::bf16> = (0..t * v)
        .map(|_| half::bf16::from_f32((rng.normal() * 3.0) as f32))
        .collect();
    let labels: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let g: Vec<f32> = (0..t).map(|_| rng.normal() as f32).collect();
    let mut first: Option<Vec<u16>> = None;
    for _ in 0..10 {
        let mut dz = vec![half::bf16::ZERO; t * v];
        be.logprob_backward(
            &recap_kernels::Logits::dense(&z[..], t, v),
            &labels,
            &recap_kernels::LogprobConfig::default(),
            &g,
            Some(&g),
            &mut recap_kernels::Logits::dense(&mut dz[..], t, v),
        )
        .unwrap();
        let bits: Vec<u16> = dz.iter().map(|x| x.to_bits()).collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert!(&bits == f, "logits backward run to run"),
        }
    }
    let rewards: Vec<f32> = (0..4096 * 3).map(|_| rng.below(3) as f32 / 2.0).collect();
    let cfg = recap_kernels::AdvantageConfig {
        modes: vec![recap_kernels::AdvantageMode::BatchStd; 3],
        eps: 1e-6,
        lead: None,
        reward_weights: None,
        singletons: recap_kernels::Singletons::Zero,
    };
    let mut first: Option<Vec<u32>> = None;
    for _ in 0..10 {
        let mut out = vec![0f32; rewards.len()];
        be.group_advantages(
            &rewards,
            recap_kernels::Groups::Consecutive(16),
            None,
            None,
            &cfg,
            &mut out,
        )
        .unwrap();
        let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert!(&bits == f, "group advantages run to run"),
        }
    }
}

/// More than 2^24 tokens (beyond exact f32 token counts and 24-bit indices): the loss, metrics and
/// a sample of the gradient against the CPU reference. Skipped under the sanitizer (RECAP_SANITIZE).
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn fused_loss_beyond_2_pow_24_tokens() {
    let be = common::require_gpu("fused_loss_beyond_2_pow_24_tokens");
    if std::env::var("RECAP_SANITIZE").is_ok() {
        eprintln!("fused_loss_beyond_2_pow_24_tokens: skipped under the sanitizer (too slow)");
        return;
    }
    let t = (1usize << 24) + 4099;
    let lens: Vec<usize> = (0..t / 4096).map(|_| 4096).chain([t % 4096]).collect();
    let b = Batch::random(13, &lens, 2);
    for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
        let cfg = config_for(13, mode);
        let (mut gg, mut gc) = (vec![0f32; t], vec![0f32; t]);
        let og = be.grpo_loss(&b.inputs(None), &cfg, &mut gg).unwrap();
        let oc = Backend::Cpu
            .grpo_loss(&b.inputs(None), &cfg, &mut gc)
            .unwrap();
        compare(&format!("T = {t} {mode}"), &og, &oc);
        let mut rng = Rng::new(1);
        for _ in 0..20_000 {
            let i = rng.below(t);
            assert_close(&format!("grad[{i}]"), gg[i] as f64, gc[i] as f64, ABS, REL);
        }
        for i in t - 4099..t {
            assert_close(&format!("grad[{i}]"), gg[i] as f64, gc[i] as f64, ABS, REL);
        }
    }
}

/// `raw::Place::CudaStaged` (what `Backend::Cuda` is): host arrays copied to the device, computed
/// there, the writable ones copied back. An in-place array is read and written (the log-prob
/// backward over host logits equals the host reference's), a pure output is fully written, and an
/// output overlapping an input is refused by name before any copy, as at the other places.
#[test]
#[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
fn staged_place_copies_in_and_out() {
    use recap_kernels::raw::{self, In, LogprobGrads, Out, Place};
    use recap_kernels::{Logits, LogprobConfig};
    let _ = common::require_gpu("staged_place_copies_in_and_out");
    let (t, v) = (33usize, 70usize);
    let mut rng = Rng::new(41);
    let z: Vec<f32> = (0..t * v).map(|_| rng.normal() as f32 * 2.0).collect();
    let y: Vec<i32> = (0..t as i32)
        .map(|r| if r % 9 == 4 { -100 } else { r * 7 % v as i32 })
        .collect();
    let g: Vec<f32> = (0..t).map(|r| 0.5 - (r % 3) as f32 * 0.25).collect();
    let lc = LogprobConfig::default();
    // SAFETY: every array below is alive, unaliased and of the stated length for each call.
    let arr = |x: &[f32]| unsafe { In::new(x.as_ptr() as usize, x.len()) };
    let run = |place: Place| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut lp, mut h, mut lse) = (vec![7f32; t], vec![7f32; t], vec![7f32; t]);
        // SAFETY: as above.
        let out = |x: &mut [f32]| unsafe { Out::new(x.as_mut_ptr() as usize, x.len()) };
        // SAFETY: as above.
        let labels = unsafe { In::new(y.as_ptr() as usize, t) };
        raw::logprob_forward::<f32>(
            place,
            &Logits {
                data: arr(&z),
                rows: t,
                vocab: v,
                ld: v,
            },
            labels,
            &lc,
            out(&mut lp),
            Some(out(&mut h)),
            out(&mut lse),
            None,
        )
        .unwrap();
        let mut dz = z.clone();
        let grads = LogprobGrads {
            labels,
            lse: arr(&lse),
            entropy: arr(&h),
            g_logp: arr(&g),
            g_entropy: None,
            sum_pi_squared: None,
        };
        raw::logprob_backward_inplace::<f32>(
            place,
            &Logits {
                data: out(&mut dz),
                rows: t,
                vocab: v,
                ld: v,
            },
            &grads,
            &lc,
            None,
        )
        .unwrap();
        (lp, lse, dz)
    };
    let (lp_h, lse_h, dz_h) = run(Place::Host);
    let (lp_s, lse_s, dz_s) = run(Place::CudaStaged { device: 0 });
    assert_all_close("logp", &lp_s, &lp_h, 1e-5, 1e-5);
    assert_all_close("lse", &lse_s, &lse_h, 1e-5, 1e-5);
    assert_all_close("dlogits", &dz_s, &dz_h, 1e-5, 1e-5);
    assert!(
        dz_s.iter().zip(&z).any(|(a, b)| a != b),
        "the gradient was not copied back"
    );
    // an output overlapping an input
    let mut both = vec![0f32; 3 * t];
    // SAFETY: both halves of `both` are alive; the overlap is the point (refused before any copy).
    let (a, b) = unsafe {
        (
            In::<f32>::new(both.as_ptr() as usize, t),
            Out::<f32>::new(both.as_mut_ptr() as usize + 4, t),
        )
    };
    let e = raw::kl(
        Place::CudaStaged { device: 0 },
        a,
        arr(&g),
        None,
        KlEstimator::K1,
        b,
        // SAFETY: a distinct, alive array.
        unsafe { Out::new(both.as_mut_ptr() as usize + 8 * t, t) },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("kl_out") || e.to_string().contains("logp"),
        "{e}"
    );
}
