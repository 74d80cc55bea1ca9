//! The device's per-token formulas (`kernels/grpo_math.cuh`), compiled for the host by `build.rs`
//! with the C compiler: the one definition of each formula, for the host too. The tests use them to
//! check the exact device arithmetic on machines without a GPU; the CPU paths that must
//! round as the device does use them at run time (the rollout IS batch mean, `rollout_is`).

use std::os::raw::c_int;

/// The per-token result structs of `kernels/grpo_math.cuh`, generated from it by `build.rs`
/// (`Ratio` mirrors `RecapRatio`, and so on).
#[allow(missing_docs, dead_code)]
mod c {
    include!(concat!(env!("OUT_DIR"), "/device_structs.rs"));
}
use c::{KlToken as CKl, PolicyOpts as COpts, PolicyToken as CPolicy, Ratio as CRatio};

extern "C" {
    fn recap_host_ratio(logp: f32, old_logp: f32, clamp: f32, out: *mut CRatio);
    fn recap_host_policy_token(
        q: *const CRatio,
        adv: f32,
        logp: f32,
        old_logp: f32,
        opts: *const COpts,
        out: *mut CPolicy,
    );
    fn recap_host_kl_is_corrected(kt: *const CKl, q: *const CRatio, out: *mut CKl);
    fn recap_host_gspo_ratio(lr: f32, out: *mut CRatio);
    fn recap_host_geo_mean_ratio(d: f32, mean: f32, out: *mut CRatio);
    fn recap_host_kl_token(logp: f32, ref_logp: f32, est: c_int, out: *mut CKl);
    fn recap_host_agg_weight(
        mode: c_int,
        inv_tokens: f32,
        inv_seqs: f32,
        inv_seq_tokens: f32,
        inv_const: f32,
    ) -> f32;
    fn recap_host_rs_stat(lr: f64, statistic: c_int) -> f64;
    fn recap_host_is_batch_mean(sum: f64, units: f64, level: c_int) -> f64;
    fn recap_host_is_batch_factor(mean: f64) -> f64;
    fn recap_host_rs_keep(v: f64, statistic: c_int, lower: f64, upper: f64) -> c_int;
    fn recap_host_softmax_row(
        x: *const f32,
        n: std::os::raw::c_long,
        lse: *mut f32,
        entropy: *mut f32,
    );
    fn recap_host_softmax_split(
        x: *const f32,
        n: std::os::raw::c_long,
        split: std::os::raw::c_long,
        lse: *mut f32,
        entropy: *mut f32,
    );
    fn recap_host_draw(seed: u64, counter: u64) -> f64;
    fn recap_host_advantage(
        mode: c_int,
        v: f64,
        mu: f64,
        sd: f64,
        sum: f64,
        n: c_int,
        vmax: f64,
        v2nd: f64,
        n_max: c_int,
        len_mean: f64,
        batch_sd: f64,
        batch_alpha: f64,
        eps: f64,
        verl_singletons: c_int,
        baseline: f64,
    ) -> f64;
    fn recap_host_whiten(x: f64, m: f64, var: f64, n_tokens: f64) -> f64;
    fn recap_host_batch_normalize(x: f64, m: f64, sd: f64, eps: f64) -> f64;
    fn recap_host_difficulty_weight(rho: f64, a: f64, b: f64, rho0: f64, k: f64) -> f64;
    #[allow(clippy::too_many_arguments)]
    fn recap_host_adamw(
        w: *mut f32,
        m: *mut f32,
        v: *mut f32,
        g: *const f32,
        n: usize,
        lr: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        wd: f32,
        c1: f32,
        c2: f32,
    );
    fn recap_host_div_small(a: f64, k: c_int) -> f64;
    fn recap_host_inv_norm(x: f64) -> f32;
    fn recap_host_logit_grad(
        x: f32,
        is_label: c_int,
        lse: f32,
        entropy: f32,
        g_logp: f32,
        g_ent: f32,
        inv_tau: f32,
    ) -> f32;
    fn recap_host_softmax_sum_sq(
        x: *const f32,
        n: std::os::raw::c_long,
        split: std::os::raw::c_long,
    ) -> f32;
    fn recap_host_logit_grad_sum_sq(x: f32, lse: f32, sum_sq: f32, g_spp: f32, inv_tau: f32)
        -> f32;
}

/// `(LSE, entropy)` of a row (already divided by tau) by the device's online softmax state, folded
/// in order, or, with `split`, as two halves merged (`recap_softmax_merge`).
pub fn softmax_row(x: &[f32], split: Option<usize>) -> (f32, f32) {
    let (mut lse, mut h) = (0f32, 0f32);
    let n = x.len() as std::os::raw::c_long;
    // SAFETY: the C functions read exactly n floats from x and write one float to each output.
    unsafe {
        match split {
            None => recap_host_softmax_row(x.as_ptr(), n, &mut lse, &mut h),
            Some(s) => recap_host_softmax_split(
                x.as_ptr(),
                n,
                s.min(x.len()) as std::os::raw::c_long,
                &mut lse,
                &mut h,
            ),
        }
    }
    (lse, h)
}

/// `sum_j p_j^2` of a row (already divided by tau) by the device's online softmax state
/// (`recap_softmax_sum_sq`), folded in order, or, with `split`, as two halves merged.
pub fn softmax_sum_sq(x: &[f32], split: Option<usize>) -> f32 {
    let n = x.len() as std::os::raw::c_long;
    let split = split.map_or(0, |s| s.min(x.len())) as std::os::raw::c_long;
    // SAFETY: the C function reads exactly n floats from x.
    unsafe { recap_host_softmax_sum_sq(x.as_ptr(), n, split) }
}

/// `recap_logit_grad_sum_sq` of grpo_math.cuh: the sum_pi_squared term of one logit's gradient.
pub fn logit_grad_sum_sq(x: f32, lse: f32, sum_sq: f32, g_spp: f32, inv_tau: f32) -> f32 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_logit_grad_sum_sq(x, lse, sum_sq, g_spp, inv_tau) }
}

/// `recap_div_small` of grpo_math.cuh: `a / k` for `1 <= k <= 16` without a division (the fused
/// loss's last block divides the weighted sum by K this way).
pub fn div_small(a: f64, k: i32) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_div_small(a, k) }
}

/// `recap_inv_norm` of grpo_math.cuh: a normalizer's f32 reciprocal, 0 for a normalizer <= 0.
pub fn inv_norm(x: f64) -> f32 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_inv_norm(x) }
}

/// `recap_logit_grad` of grpo_math.cuh.
pub fn logit_grad(
    x: f32,
    is_label: bool,
    lse: f32,
    entropy: f32,
    g_logp: f32,
    g_ent: f32,
    inv_tau: f32,
) -> f32 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_logit_grad(x, is_label as c_int, lse, entropy, g_logp, g_ent, inv_tau) }
}

/// One token of the policy loss as the device computes it (f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DevicePolicyToken {
    pub log_ratio: f32,
    pub ratio: f32,
    pub saturated: bool,
    pub loss: f32,
    pub grad: f32,
    pub clipped: bool,
    pub dual: bool,
}

/// `recap_ratio` then `recap_policy_token` of grpo_math.cuh, with the options of `cfg` (its
/// `log_ratio_clamp`, clip range, dual-clip, policy-loss variant and `delta`).
pub fn policy_token(
    logp: f32,
    old_logp: f32,
    adv: f32,
    cfg: &crate::GrpoConfig,
) -> DevicePolicyToken {
    let mut q = CRatio::default();
    let mut p = CPolicy::default();
    let (tau_pos, tau_neg) = cfg.policy_loss.taus();
    let o = COpts {
        loss_type: cfg.policy_loss.code(),
        dual_clip: cfg.dual_clip.is_some() as c_int,
        clip_low: cfg.clip_low,
        clip_high: cfg.clip_high,
        clip_c: cfg.dual_clip.unwrap_or(0.0),
        delta: cfg.delta.unwrap_or(0.0),
        tau_pos,
        tau_neg,
        dro_beta: cfg.policy_loss.dro_beta(),
    };
    // SAFETY: plain C functions over scalars and valid, properly aligned locals given by pointer.
    unsafe {
        recap_host_ratio(logp, old_logp, cfg.log_ratio_clamp, &mut q);
        recap_host_policy_token(&q, adv, logp, old_logp, &o, &mut p);
    }
    DevicePolicyToken {
        log_ratio: q.log_ratio,
        ratio: q.ratio,
        saturated: q.saturated != 0,
        loss: p.loss,
        grad: p.grad,
        clipped: p.clipped != 0,
        dual: p.dual != 0,
    }
}

/// `recap_gspo_ratio` of grpo_math.cuh: (log-ratio, ratio, saturated) at a sequence mean log-ratio.
pub fn gspo_ratio(lr: f32) -> (f32, f32, bool) {
    let mut q = CRatio::default();
    // SAFETY: plain C function over a scalar writing into a valid local.
    unsafe { recap_host_gspo_ratio(lr, &mut q) };
    (q.log_ratio, q.ratio, q.saturated != 0)
}

/// `recap_geo_mean_ratio` of grpo_math.cuh: (log-ratio, ratio, saturated) of a token of log-ratio
/// `d` in a sequence with sign-clipped mean log-ratio `mean`.
pub fn geo_mean_ratio(d: f32, mean: f32) -> (f32, f32, bool) {
    let mut q = CRatio::default();
    // SAFETY: plain C function over scalars writing into a valid local.
    unsafe { recap_host_geo_mean_ratio(d, mean, &mut q) };
    (q.log_ratio, q.ratio, q.saturated != 0)
}

/// `recap_kl_token`, then `recap_kl_is_corrected` with the ratio of `(logp, old_logp)` (clamp 20):
/// (value, gradient).
pub fn kl_token_is_corrected(
    logp: f32,
    old_logp: f32,
    ref_logp: f32,
    est: crate::KlEstimator,
) -> (f32, f32) {
    let mut q = CRatio::default();
    let mut k = CKl::default();
    let mut o = CKl::default();
    // SAFETY: plain C functions over scalars writing into valid locals.
    unsafe {
        recap_host_ratio(logp, old_logp, 20.0, &mut q);
        recap_host_kl_token(logp, ref_logp, est.code(), &mut k);
        recap_host_kl_is_corrected(&k, &q, &mut o);
    }
    (o.value, o.grad)
}

/// `recap_kl_token` of grpo_math.cuh: (value, gradient).
pub fn kl_token(logp: f32, ref_logp: f32, est: crate::KlEstimator) -> (f32, f32) {
    let mut o = CKl::default();
    // SAFETY: plain C function over scalars writing into a valid local.
    unsafe { recap_host_kl_token(logp, ref_logp, est.code(), &mut o) };
    (o.value, o.grad)
}

/// `recap_rs_stat` of grpo_math.cuh: the rejection statistic of the log-ratio `lr`.
pub fn rs_stat(lr: f64, statistic: crate::RsStatistic) -> f64 {
    let c = crate::RejectionCriterion {
        level: crate::RsLevel::Token,
        statistic,
        lower: 0.0,
        upper: 0.0,
    };
    // SAFETY: plain C function over scalars.
    unsafe { recap_host_rs_stat(lr, c.statistic_code()) }
}

/// `recap_rs_keep` of grpo_math.cuh: whether `v` passes `criterion`'s bounds.
pub fn rs_keep(v: f64, criterion: &crate::RejectionCriterion) -> bool {
    // SAFETY: plain C function over scalars.
    unsafe {
        recap_host_rs_keep(
            v,
            criterion.statistic_code(),
            criterion.lower,
            criterion.upper,
        ) != 0
    }
}

/// `recap_agg_weight` of grpo_math.cuh.
pub fn agg_weight(
    mode: crate::AggMode,
    inv_tokens: f32,
    inv_seqs: f32,
    inv_seq_tokens: f32,
    inv_const: f32,
) -> f32 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_agg_weight(mode.code(), inv_tokens, inv_seqs, inv_seq_tokens, inv_const) }
}

/// `recap_draw` of train_math.cuh: the counter-based uniform draw in [0, 1) of the driver (the
/// device's sampling kernel and the CPU backend use this one definition).
pub fn draw(seed: u64, counter: u64) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_draw(seed, counter) }
}

/// The statistics `recap_advantage` reads: of the value's group, and of the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupStats {
    /// The group's mean.
    pub mu: f64,
    /// The group's unbiased std.
    pub sd: f64,
    /// The group's sum.
    pub sum: f64,
    /// Members of the group.
    pub n: i32,
    /// The group's largest value.
    pub vmax: f64,
    /// The largest value below `vmax` (`vmax` when two or more members hold it).
    pub v2nd: f64,
    /// Members holding `vmax`.
    pub n_max: i32,
    /// `sum len v / sum len` over the group (OPO's baseline; `mu` when the lengths sum to 0).
    pub len_mean: f64,
    /// The unbiased std of the batch's values.
    pub batch_sd: f64,
    /// `B / max(1, non-zero values of the batch)` (GPG).
    pub batch_alpha: f64,
    /// The value's own baseline (ReMax's `b`; the other modes ignore it).
    pub baseline: f64,
}

/// `recap_advantage` of train_math.cuh (mode: `RECAP_ADV_*`): the advantage of value `v`, or for
/// REINFORCE++'s modes the value before the whitening ([`whiten`]).
pub fn advantage(mode: i32, v: f64, g: &GroupStats, eps: f64, verl_singletons: bool) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe {
        recap_host_advantage(
            mode,
            v,
            g.mu,
            g.sd,
            g.sum,
            g.n,
            g.vmax,
            g.v2nd,
            g.n_max,
            g.len_mean,
            g.batch_sd,
            g.batch_alpha,
            eps,
            verl_singletons as c_int,
            g.baseline,
        )
    }
}

/// `recap_whiten` of train_math.cuh: `(x - m) / sqrt(var + 1e-8)`, 0 when `n_tokens < 2`.
pub fn whiten(x: f64, m: f64, var: f64, n_tokens: f64) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_whiten(x, m, var, n_tokens) }
}

/// `recap_is_batch_mean` of grpo_math.cuh: the batch mean of the applied rollout IS weights from
/// their sum and their units' weight, at `level` (token: `sum / (units + 1e-8)`, the sequence levels:
/// `sum / max(units, 1e-8)`).
pub fn is_batch_mean(sum: f64, units: f64, level: crate::IsLevel) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_is_batch_mean(sum, units, level.code()) }
}

/// `recap_is_batch_factor` of grpo_math.cuh: the divisor of the weights, `mean` where it is > 1e-8,
/// else 1.
pub fn is_batch_factor(mean: f64) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_is_batch_factor(mean) }
}

/// `recap_batch_normalize` of train_math.cuh: `(x - m) / (sd + eps)` (GDPO's batch step).
pub fn batch_normalize(x: f64, m: f64, sd: f64, eps: f64) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_batch_normalize(x, m, sd, eps) }
}

/// `recap_difficulty_weight` of train_math.cuh.
pub fn difficulty_weight(rho: f64, a: f64, b: f64, rho0: f64, k: f64) -> f64 {
    // SAFETY: pure C function over scalars.
    unsafe { recap_host_difficulty_weight(rho, a, b, rho0, k) }
}

/// AdamW hyper-parameters of the driver (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01 as
/// `torch.optim.AdamW`'s defaults besides the decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    /// `(1 - beta1^t, 1 - beta2^t)` of step `t` (from 1).
    pub fn bias_corrections(&self, t: i32) -> (f32, f32) {
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// Step `t` (from 1) of `recap_adamw` of train_math.cuh over every element, in place. Errors
/// unless the four slices have the same length.
pub fn adamw(
    opt: &AdamW,
    t: i32,
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
) -> crate::Result<()> {
    let n = w.len();
    for (name, len) in [("adam_m", m.len()), ("adam_v", v.len()), ("grad", g.len())] {
        crate::layout::check_len(name, len, n, "[n] (the length of the weights)")?;
    }
    let (c1, c2) = opt.bias_corrections(t);
    // SAFETY: the four pointers are valid for n elements (checked above); the C loop reads g and
    // reads/writes w, m, v at indices < n only.
    unsafe {
        recap_host_adamw(
            w.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            g.as_ptr(),
            n,
            opt.lr,
            opt.beta1,
            opt.beta2,
            opt.eps,
            opt.weight_decay,
            c1,
            c2,
        )
    };
    Ok(())
}
