//! Shared test support: seeded random data (rand_chacha), random packed batches, backend selection
//! and tolerances (`abs + rel * |want|`, compared with approx).
#![allow(dead_code, clippy::needless_range_loop)]

use recap_kernels::{
    Advantages, Backend, GrpoConfig, HostGrpoInputs, Mask, Normalizers, ObjectiveKind,
};

/// Seeded, portable test data: ChaCha8 (`rand_chacha`), the same stream on every platform.
pub struct Rng(rand_chacha::ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Rng(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        rand::Rng::random(&mut self.0)
    }
    /// Uniform in `0..n` (0 for `n = 0`).
    pub fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.0, 0..n.max(1))
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        rand::Rng::sample(&mut self.0, rand_distr::StandardNormal)
    }
}

/// The GPU backend for a GPU-only test, which is `#[ignore]`d unless the `recap_gpu_tests` cfg is
/// set (tests/common/gpu_cfg.rs) or the test runs with `--include-ignored`: when it runs, an
/// unusable GPU fails it, with the reason.
#[track_caller]
pub fn require_gpu(test: &str) -> Backend {
    let why = if !recap_kernels::cuda::driver_present() {
        "no CUDA driver (libcuda) present".to_string()
    } else {
        match Backend::cuda(0) {
            Ok(b) => return b,
            Err(e) => e.to_string(),
        }
    };
    panic!("{test} needs a usable CUDA GPU: {why}")
}

/// [`require_gpu`]'s device.
#[track_caller]
pub fn require_cuda(test: &str) -> std::sync::Arc<recap_kernels::cuda::Gpu> {
    match require_gpu(test) {
        Backend::Cuda(g) => g,
        Backend::Cpu => unreachable!("require_gpu returns the CUDA backend"),
    }
}

/// One test body on every backend: `NAME::cpu` always runs; `NAME::gpu` is a GPU-only test
/// (ignored without a GPU, see [`require_gpu`]), so the summary says which halves ran.
///
/// ```ignore
/// on_every_backend! {
///     /// docs
///     fn name(be) { /* a body using `be: Backend` */ }
/// }
/// ```
#[macro_export]
macro_rules! on_every_backend {
    ($(#[$meta:meta])* fn $name:ident($be:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($be: recap_kernels::Backend) $body

            #[test]
            fn cpu() {
                body(recap_kernels::Backend::Cpu)
            }

            #[test]
            #[cfg_attr(not(recap_gpu_tests), ignore = "needs a CUDA GPU")]
            fn gpu() {
                body($crate::common::require_gpu(concat!(stringify!($name), "::gpu")))
            }
        }
    };
}

/// `|got - want| <= abs + rel * |want|`, with NaN never passing unless both are NaN.
pub fn close(got: f64, want: f64, abs: f64, rel: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    if got.is_infinite() || want.is_infinite() {
        return got == want;
    }
    approx::abs_diff_eq!(got, want, epsilon = abs + rel * want.abs())
}

#[track_caller]
pub fn assert_close(what: &str, got: f64, want: f64, abs: f64, rel: f64) {
    assert!(
        close(got, want, abs, rel),
        "{what}: got {got:e}, want {want:e} (abs {abs:e} + rel {rel:e})"
    );
}

#[track_caller]
pub fn assert_all_close(what: &str, got: &[f32], want: &[f32], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(*g as f64, *w as f64, abs, rel),
            "{what}[{i}]: got {g:e}, want {w:e} (abs {abs:e} + rel {rel:e})"
        );
    }
}

/// An owned random batch for the fused loss.
#[derive(Clone, Debug)]
pub struct Batch {
    pub logp: Vec<f32>,
    pub old_logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
    pub adv: Vec<f32>,
    pub adv_per_token: bool,
    pub mask_f32: Vec<f32>,
    pub mask_u8: Vec<u8>,
    pub use_u8: bool,
    pub cu: Vec<i32>,
    pub lambda: Vec<f32>,
    pub objectives: Vec<ObjectiveKind>,
    pub membership: Option<Vec<u32>>,
    pub with_ref: bool,
    pub rollout_logp: Vec<f32>,
    /// `rollout_logp` is passed (seed % 3 == 1, as `config_for` sets a rollout correction).
    pub with_rollout: bool,
}

/// The packed layouts (`cu_seqlens`, T) of the edge-case batches the per-sequence ops are tested
/// on: empty, lengths 0 and 1, 31 / 32 / 33 around a warp, 4097 beside short and empty sequences,
/// and 40 sequences of 300 (several blocks).
pub fn edge_layouts() -> Vec<(Vec<i32>, usize)> {
    let lens: [Vec<i32>; 5] = [
        vec![],
        vec![0, 1],
        vec![31, 32, 33],
        vec![4097, 5, 0, 64],
        vec![300; 40],
    ];
    lens.iter()
        .map(|l| {
            let mut cu = vec![0i32];
            for n in l {
                cu.push(cu.last().unwrap() + n);
            }
            let t = *cu.last().unwrap() as usize;
            (cu, t)
        })
        .collect()
}

/// Ratios at which a branch of the loss switches for the configs the tests use; random tokens are
/// kept away from them so that f32 (GPU) and f64 (CPU) take the same branch.
const KINKS: [f64; 6] = [0.8, 1.2, 1.28, 0.72, 3.0, 2.5];

impl Batch {
    /// Random batch with the given sequence lengths, K objectives; `fully_masked` sequences get a
    /// zero mask; options vary with the seed.
    pub fn random(seed: u64, lens: &[usize], k: usize) -> Batch {
        let mut rng = Rng::new(seed);
        let t: usize = lens.iter().sum();
        let b = lens.len();
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + *l as i32);
        }
        let mut logp = Vec::with_capacity(t);
        let mut old = Vec::with_capacity(t);
        let mut refp = Vec::with_capacity(t);
        for _ in 0..t {
            let o = -(rng.uniform() * 4.0) as f32 - 0.01;
            let mut d = (rng.normal() * 0.35) as f32;
            // a few saturated log-ratios
            if rng.below(500) == 0 {
                d = if rng.below(2) == 0 { 25.0 } else { -25.0 };
            }
            let mut l = o + d;
            let r = ((l - o) as f64).exp();
            if KINKS.iter().any(|kink| (r - kink).abs() < 2e-4 * kink) {
                l += 1e-3;
            }
            logp.push(l);
            old.push(o);
            refp.push(l + (rng.normal() * 0.3) as f32);
        }
        let adv_per_token = seed % 3 == 0;
        let rows = if adv_per_token { t } else { b };
        let adv = (0..rows * k).map(|_| (rng.normal() * 1.2) as f32).collect();
        let mut mask_f32 = vec![0f32; t];
        for s in 0..b {
            let fully_masked = rng.below(7) == 0;
            for i in cu[s] as usize..cu[s + 1] as usize {
                mask_f32[i] = if fully_masked || rng.below(10) == 0 {
                    0.0
                } else {
                    1.0
                };
            }
        }
        let mask_u8 = mask_f32.iter().map(|m| (*m != 0.0) as u8).collect();
        let objectives = (0..k)
            .map(|j| {
                if k > 1 && j == k - 1 {
                    ObjectiveKind::Nll
                } else {
                    ObjectiveKind::Policy
                }
            })
            .collect();
        let lambda = (0..k)
            .map(|_| (0.25 + rng.uniform() * 1.5) as f32)
            .collect();
        let full = if k >= 32 { u32::MAX } else { (1u32 << k) - 1 };
        let membership =
            (seed % 2 == 1).then(|| (0..b).map(|_| (rng.next_u64() as u32) & full).collect());
        // the inference engine's log-probs: the trainer's plus a small mismatch, a few large ones
        let rollout_logp = old
            .iter()
            .map(|o| {
                let spread = if rng.below(50) == 0 { 2.0 } else { 0.05 };
                o + (rng.normal() * spread) as f32
            })
            .collect();
        Batch {
            rollout_logp,
            with_rollout: seed % 3 == 1,
            logp,
            old_logp: old,
            ref_logp: refp,
            adv,
            adv_per_token,
            mask_f32,
            mask_u8,
            use_u8: seed % 4 == 1,
            cu,
            lambda,
            objectives,
            membership,
            with_ref: seed % 5 != 2,
        }
    }

    pub fn t(&self) -> usize {
        self.logp.len()
    }

    pub fn inputs<'a>(&'a self, normalizers: Option<&'a Normalizers>) -> HostGrpoInputs<'a> {
        HostGrpoInputs {
            logp: &self.logp,
            old_logp: &self.old_logp,
            ref_logp: self.with_ref.then_some(&self.ref_logp[..]),
            rollout_logp: self.with_rollout.then_some(&self.rollout_logp[..]),
            policy_weight: None,
            advantages: if self.adv_per_token {
                Advantages::PerToken(&self.adv)
            } else {
                Advantages::PerSequence(&self.adv)
            },
            mask: if self.use_u8 {
                Mask::U8(&self.mask_u8)
            } else {
                Mask::F32(&self.mask_f32)
            },
            cu_seqlens: &self.cu,
            lambda: &self.lambda,
            objectives: &self.objectives,
            membership: self.membership.as_deref(),
            normalizers,
        }
    }
}

/// A config that varies with the seed (clip values, dual-clip, KL estimator, beta, the policy-loss
/// variant (vanilla, GSPO, CISPO, SAPO, GPG, DRO), two-sided clipping, the KL's IS correction).
pub fn config_for(seed: u64, agg: recap_kernels::AggMode) -> GrpoConfig {
    let est = recap_kernels::KlEstimator::ALL[(seed % 7) as usize];
    use recap_kernels::PolicyLoss;
    let policy_loss = match (seed % 7, seed % 4) {
        (4, _) => PolicyLoss::Gspo,
        (5, 0) => PolicyLoss::Gpg,
        (5, 1) => PolicyLoss::GeoMean,
        (6, 0) => PolicyLoss::Dro { beta: 0.2 },
        (_, 2) => PolicyLoss::Cispo,
        (_, 3) => PolicyLoss::sapo(),
        _ => PolicyLoss::Vanilla,
    };
    GrpoConfig::default()
        .with_policy_loss(policy_loss)
        .with_delta((seed % 4 == 1 && policy_loss == PolicyLoss::Vanilla).then_some(1.6))
        .with_rollout_correction((seed % 3 == 1).then(|| recap_kernels::RolloutCorrection {
            level: [
                recap_kernels::IsLevel::Token,
                recap_kernels::IsLevel::Sequence,
                recap_kernels::IsLevel::Geometric,
            ][(seed / 3 % 3) as usize],
            mode: [
                recap_kernels::IsMode::Truncate,
                recap_kernels::IsMode::Mask,
                recap_kernels::IsMode::MetricsOnly,
            ][(seed / 9 % 3) as usize],
            upper: 2.0,
            lower: None,
        }))
        .with_kl_is_correction(seed % 5 == 2)
        .with_clip_high(if seed % 2 == 0 { 0.2 } else { 0.28 })
        .with_clip_low(if seed % 3 == 0 { 0.28 } else { 0.2 })
        .with_dual_clip(match seed % 3 {
            0 => Some(3.0),
            1 => Some(2.5),
            _ => None,
        })
        .with_agg_mode(agg)
        // per-term aggregation on some seeds with a KL term (the objectives in another mode)
        .with_policy_agg_mode(
            (seed % 6 == 4).then(|| recap_kernels::AggMode::ALL[(seed / 6 % 4) as usize]),
        )
        .with_norm_constant(Some(64.0))
        .with_kl_coef(if seed % 2 == 0 { 0.05 } else { 0.0 })
        .with_kl_estimator(est)
}

/// The sequences [a, b) of a batch, as a batch of its own.
pub fn sub_batch(w: &Batch, a: usize, b: usize, k: usize) -> Batch {
    let (t0, t1) = (w.cu[a] as usize, w.cu[b] as usize);
    let mut s = w.clone();
    s.logp = w.logp[t0..t1].to_vec();
    s.old_logp = w.old_logp[t0..t1].to_vec();
    s.ref_logp = w.ref_logp[t0..t1].to_vec();
    s.rollout_logp = w.rollout_logp[t0..t1].to_vec();
    s.mask_f32 = w.mask_f32[t0..t1].to_vec();
    s.mask_u8 = w.mask_u8[t0..t1].to_vec();
    s.adv = if w.adv_per_token {
        w.adv[t0 * k..t1 * k].to_vec()
    } else {
        w.adv[a * k..b * k].to_vec()
    };
    s.cu = w.cu[a..=b].iter().map(|c| c - w.cu[a]).collect();
    s.membership = w.membership.as_ref().map(|m| m[a..b].to_vec());
    s
}

/// The batch cut at token `cut` into two parts; the sequence containing `cut` is split between
/// them (its per-sequence rows repeated in both).
pub fn split_at_token(w: &Batch, cut: usize, k: usize) -> (Batch, Batch) {
    let b = w.cu.len() - 1;
    let s = (0..b)
        .find(|&i| (w.cu[i] as usize) <= cut && cut < w.cu[i + 1] as usize)
        .expect("cut inside a sequence");
    let part = |t0: usize, t1: usize, seqs: std::ops::Range<usize>| {
        let mut p = w.clone();
        p.logp = w.logp[t0..t1].to_vec();
        p.old_logp = w.old_logp[t0..t1].to_vec();
        p.ref_logp = w.ref_logp[t0..t1].to_vec();
        p.rollout_logp = w.rollout_logp[t0..t1].to_vec();
        p.mask_f32 = w.mask_f32[t0..t1].to_vec();
        p.mask_u8 = w.mask_u8[t0..t1].to_vec();
        p.adv = if w.adv_per_token {
            w.adv[t0 * k..t1 * k].to_vec()
        } else {
            w.adv[seqs.start * k..seqs.end * k].to_vec()
        };
        p.cu = std::iter::once(0)
            .chain(
                seqs.clone()
                    .map(|i| (w.cu[i + 1] as usize).clamp(t0, t1) as i32 - t0 as i32),
            )
            .collect();
        p.membership = w.membership.as_ref().map(|m| m[seqs.clone()].to_vec());
        p
    };
    let t = w.logp.len();
    (part(0, cut, 0..s + 1), part(cut, t, s..b))
}

/// The whole batch's per-sequence token weights for the sequences of a part starting at sequence
/// `first` (as `Normalizers::seq_tokens`).
pub fn whole_seq_tokens(w: &Batch, first: usize, count: usize) -> Vec<f64> {
    (first..first + count)
        .map(|i| {
            (w.cu[i] as usize..w.cu[i + 1] as usize)
                .map(|t| {
                    if w.use_u8 {
                        (w.mask_u8[t] != 0) as u8 as f64
                    } else {
                        w.mask_f32[t] as f64
                    }
                })
                .sum()
        })
        .collect()
}

/// Parts that cut a sequence in two (at each of `cuts`), with the whole batch's normalizers and
/// per-sequence token weights, reproduce the whole batch on `be` in every aggregation mode: their
/// losses sum to its loss (`abs`, `rel`) and their gradients concatenate to its gradient.
pub fn check_split_parts(
    be: &Backend,
    lens: &[usize],
    k: usize,
    seeds: std::ops::Range<u64>,
    cuts: &[usize],
    abs: f64,
    rel: f64,
) {
    for seed in seeds {
        let whole = Batch::random(seed, lens, k);
        let total = recap_kernels::count_normalizers(
            whole.inputs(None).mask,
            &whole.cu,
            whole.membership.as_deref(),
            k,
        )
        .unwrap();
        for &cut in cuts {
            let (a, b) = split_at_token(&whole, cut, k);
            let first_b = (0..lens.len())
                .find(|&i| whole.cu[i + 1] as usize > cut)
                .unwrap();
            for mode in recap_kernels::AggMode::ALL {
                let cfg = config_for(seed, mode);
                if matches!(
                    cfg.policy_loss,
                    recap_kernels::PolicyLoss::Gspo | recap_kernels::PolicyLoss::GeoMean
                ) || cfg
                    .rollout_correction
                    .is_some_and(|r| r.level != recap_kernels::IsLevel::Token)
                {
                    // GSPO's and GMPO's ratios and sequence-level IS weights span a whole sequence: parts must
                    // not cut one
                    continue;
                }
                let mut g_whole = vec![0f32; whole.t()];
                let out = be
                    .grpo_loss(&whole.inputs(None), &cfg, &mut g_whole)
                    .unwrap();
                let mut loss = 0.0;
                let mut g_cat = Vec::new();
                for (part, first) in [(&a, 0usize), (&b, first_b)] {
                    let n = Normalizers {
                        seq_tokens: Some(whole_seq_tokens(&whole, first, part.cu.len() - 1)),
                        ..total.clone()
                    };
                    let mut g = vec![0f32; part.t()];
                    loss += be
                        .grpo_loss(&part.inputs(Some(&n)), &cfg, &mut g)
                        .unwrap()
                        .loss;
                    g_cat.extend(g);
                }
                let what = format!("{} seed {seed} cut {cut} {mode}", be.name());
                assert_close(&format!("{what} loss"), loss, out.loss, abs, rel);
                assert_all_close(&format!("{what} grad"), &g_cat, &g_whole, 1e-9, 1e-6);
            }
        }
    }
}
