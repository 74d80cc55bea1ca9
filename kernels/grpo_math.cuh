/*
 * grpo_math.cuh — the per-token formulas of the GRPO loss family, one definition for the GPU and the
 * host. Every kernel includes this file (compiled by nvcc as __host__ __device__), and `build.rs`
 * compiles it for the host too, through `kernels/host_shim.c` with the C compiler, so the exact
 * device arithmetic (float32, the same branch rules) is tested against the f64 Rust reference on
 * machines without a GPU (`tests/device_math.rs`).
 *
 * Plain C99 that is also valid CUDA C++: no templates, no overloading.
 *
 * Ratio (verl core_algos.compute_policy_loss_vanilla):
 *   d = clamp(logp - old_logp, -c0, c0)      c0 = log_ratio_clamp = 20; NaN stays NaN
 *   r = exp(d)                               dd/dlogp = 1 inside the clamp, 0 where it saturates
 * Clipped surrogate with advantage A:
 *   l1 = -A r,  l2 = -A clip(r, 1 - eps_low, 1 + eps_high),  l = max(l1, l2)
 *   clipped  <=> l2 > l1  (verl's pg_clipfrac)           dl/dlogp = 0
 *   else                                                  dl/dlogp = -A r
 *   dual-clip (A < 0): l = min(l, -c A); active <=> l > -c A (pg_clipfrac_lower), then dl/dlogp = 0
 * Variants (recap_policy_token): CISPO, SAPO, two-sided clipping `delta`; the KL term optionally
 * multiplied by r (recap_kl_is_corrected).
 * Supervised replay (nll): l = -logp, dl/dlogp = -1.
 * KL to the reference (verl core_algos.kl_penalty), diff = logp - ref_logp:
 *   k1   diff                           grad 1
 *   abs  |diff|                         grad sign(diff)
 *   k2   diff^2 / 2                     grad diff
 *   k3   x = clamp(-diff, -20, 20); clamp(exp(x) - x - 1, -10, 10)
 *                                       grad 1 - exp(x), 0 where either clamp saturates
 *   k1+, k3+  value of k1 / k3, gradient of k2 (straight-through)
 *   k3-unclamped  x = -diff; exp(x) - x - 1, grad 1 - exp(x), no clamp (TRL's per_token_kl)
 * Aggregation weight of one unmasked token (its mask weight m multiplies it):
 *   token-mean 1/N_tokens; seq-mean-token-mean 1/(n_seq * N_seqs); seq-mean-token-sum 1/N_seqs;
 *   token-sum-norm 1/C. A zero normalizer gives weight 0 (nothing to average).
 */
#ifndef RECAP_GRPO_MATH_CUH
#define RECAP_GRPO_MATH_CUH

#include "recap_params.h"

#ifdef __CUDACC__
#define RECAP_HD static __host__ __device__ __forceinline__
#else
#include <math.h>
#define RECAP_HD static inline
#endif

#define RECAP_NEG_INF (-__builtin_huge_valf())

/* Clamp of the k3 estimator's log-ratio and value, fixed by verl. */
#define RECAP_KL_LOG_RATIO_CLAMP 20.0f
#define RECAP_KL_VALUE_CLAMP 10.0f

/* clamp(x, lo, hi) that keeps NaN (as torch.clamp does), unlike fminf/fmaxf. */
RECAP_HD float recap_clampf(float x, float lo, float hi) {
    return (x != x) ? x : fminf(fmaxf(x, lo), hi);
}

RECAP_HD int recap_isfinite(float x) { return (x == x) && (x - x == 0.0f); }

typedef struct RecapRatio {
    float log_ratio; /* d, clamped                              */
    float ratio;     /* r = exp(d)                              */
    int saturated;   /* the clamp saturated: dd/dlogp = 0       */
} RecapRatio;

RECAP_HD RecapRatio recap_ratio(float logp, float old_logp, float clamp) {
    RecapRatio out;
    float raw = logp - old_logp;
    out.log_ratio = recap_clampf(raw, -clamp, clamp);
    out.saturated = (raw < -clamp) || (raw > clamp);
    out.ratio = expf(out.log_ratio);
    return out;
}

typedef struct RecapPolicyToken {
    float loss;  /* l                                                   */
    float grad;  /* dl/dlogp                                            */
    int clipped; /* vanilla: l2 > l1; CISPO, SAPO: r outside the clip band */
    int dual;    /* dual-clip branch active                             */
} RecapPolicyToken;

/* The policy-loss options of a launch. */
typedef struct RecapPolicyOpts {
    int loss_type;   /* RECAP_LOSS_*                                   */
    int dual_clip;   /* vanilla only: dual-clip on for A < 0           */
    float clip_low;  /* eps_low                                        */
    float clip_high; /* eps_high                                       */
    float clip_c;    /* dual-clip constant c > 1                       */
    float delta;     /* vanilla two-sided clipping bound, or 0 (off)   */
    float tau_pos;   /* SAPO temperature, A > 0                        */
    float tau_neg;   /* SAPO temperature, A <= 0                       */
    float dro_beta;  /* DRO coefficient of the squared log-ratio       */
} RecapPolicyOpts;

/* The loss clamps GSPO's sequence log-ratio above at this value (verl: 10). */
#define RECAP_GSPO_LOG_RATIO_MAX 10.0f

/* GMPO's ratio at a token with log-ratio d in a sequence whose sign-clipped mean log-ratio (for
 * the token's advantage sign) is `mean`: ratio = exp(min(mean, 10)) (saturated above 10, no
 * gradient), log_ratio = d (the token's own, for its clip test in recap_policy_token). */
RECAP_HD RecapRatio recap_geo_mean_ratio(float d, float mean) {
    RecapRatio out;
    out.log_ratio = d;
    out.saturated = mean > RECAP_GSPO_LOG_RATIO_MAX;
    out.ratio = expf((mean != mean) ? mean : fminf(mean, RECAP_GSPO_LOG_RATIO_MAX));
    return out;
}

/* GSPO's ratio at a token of a sequence with mean log-ratio `lr` (GSPO-token form: value
 * s = exp(min(lr, 10)), d s / d logp_t = s, 0 where the clamp saturates; NaN stays NaN). */
RECAP_HD RecapRatio recap_gspo_ratio(float lr) {
    RecapRatio out;
    out.log_ratio = (lr != lr) ? lr : fminf(lr, RECAP_GSPO_LOG_RATIO_MAX);
    out.saturated = lr > RECAP_GSPO_LOG_RATIO_MAX;
    out.ratio = expf(out.log_ratio);
    return out;
}

/*
 * One token of the policy loss with advantage `adv` (dr/dlogp = r inside the log-ratio clamp, 0 where
 * it saturates):
 *   vanilla  l1 = -A min(r, delta) (delta > 0; else -A r), l2 = -A clip(r, 1 - el, 1 + eh),
 *            l = max(l1, l2); grad -A r where the larger term's ratio is live (l1: r <= delta;
 *            l2: r inside the clip range), else 0; clipped <=> l2 > l1 and r outside the range;
 *            dual-clip (A < 0): l = min(l, -c A), active <=> l > -c A (grad 0)
 *   CISPO    l = -sg(clip(r, 1 - el, 1 + eh)) A logp, grad = -clip(r) A  (MiniMax-M1; verl "cispo")
 *   SAPO     tau = tau_pos if A > 0 else tau_neg, s = sigmoid(tau (r - 1)),
 *            l = -A (4 / tau) s, grad = -4 A s (1 - s) r                 (verl/TRL "sapo")
 *   GSPO     the vanilla surrogate without dual-clip or delta, on q = recap_gspo_ratio (verl "gspo")
 *   GPG      l = -A logp, grad -A                                         (verl "gpg")
 *   DPPO     p = exp(logp), po = exp(old_logp), a token is valid inside the trust region:
 *            TV   A > 0: p - po <= eh;  A <= 0: p - po >= -el             (verl "dppo_tv")
 *            KL   bkl = po (old - logp) + (1 - po) log((1 - po + 1e-8) / (1 - p + 1e-8));
 *                 A > 0: bkl <= eh or p <= po;  A <= 0: bkl <= el or p >= po  (verl "dppo_kl")
 *            l = -A sg(min(r, c)) logp on valid tokens (c the dual-clip constant, none when off),
 *            grad -A min(r, c); clipped <=> not valid (pg_clipfrac), dual <=> valid and r > c
 *   DRO      d = logp - old_logp (unclamped), l = -(A logp - beta d^2 / 2), grad -(A - beta d)
 *   GMPO     q from recap_geo_mean_ratio: R = q.ratio the sequence's geometric-mean ratio, d = q.log_ratio;
 *            l = -A R, grad = -A R where the token's clip is inactive (A > 0: d <= eh; A < 0:
 *            d >= -el), else 0; clipped <=> d outside [-el, eh] and A > 0 (verl's pg_clipfrac),
 *            dual <=> outside and A < 0 (its pg_clipfrac_lower)             (verl "geo_mean")
 */
RECAP_HD RecapPolicyToken recap_policy_token(RecapRatio q, float adv, float logp, float old_logp,
                                             RecapPolicyOpts o) {
    RecapPolicyToken out;
    const float r = q.ratio;
    const float rc = recap_clampf(r, 1.0f - o.clip_low, 1.0f + o.clip_high);
    out.dual = 0;
    if (o.loss_type == RECAP_LOSS_GPG) {
        out.loss = -adv * logp;
        out.grad = -adv;
        out.clipped = 0;
        return out;
    }
    if (o.loss_type == RECAP_LOSS_GEO_MEAN) {
        const float d = q.log_ratio;
        const int outside = d > o.clip_high || d < -o.clip_low;
        const int live = adv > 0.0f ? d <= o.clip_high : d >= -o.clip_low;
        out.loss = -adv * r;
        out.grad = (live && !q.saturated) ? -adv * r : 0.0f;
        out.clipped = outside && adv > 0.0f;
        out.dual = outside && adv < 0.0f;
        return out;
    }
    if (o.loss_type == RECAP_LOSS_DRO) {
        const float d = logp - old_logp;
        out.loss = -(adv * logp - 0.5f * o.dro_beta * d * d);
        out.grad = -(adv - o.dro_beta * d);
        out.clipped = 0;
        return out;
    }
    if (o.loss_type == RECAP_LOSS_DPPO_TV || o.loss_type == RECAP_LOSS_DPPO_KL) {
        const float p = expf(logp), po = expf(old_logp);
        int valid;
        if (o.loss_type == RECAP_LOSS_DPPO_TV) {
            valid = adv > 0.0f ? (p - po <= o.clip_high) : (p - po >= -o.clip_low);
        } else {
            const float bkl = po * (old_logp - logp) + (1.0f - po) * logf((1.0f - po + 1e-8f) / (1.0f - p + 1e-8f));
            valid = adv > 0.0f ? (bkl <= o.clip_high || p <= po) : (bkl <= o.clip_low || p >= po);
        }
        const int truncated = o.dual_clip && r > o.clip_c;
        const float tr = truncated ? o.clip_c : r;
        out.loss = valid ? -adv * tr * logp : 0.0f;
        out.grad = valid ? -adv * tr : 0.0f;
        out.clipped = !valid;
        out.dual = valid && truncated;
        return out;
    }
    if (o.loss_type == RECAP_LOSS_CISPO) {
        out.loss = -rc * adv * logp;
        out.grad = -rc * adv;
        out.clipped = rc != r;
        return out;
    }
    if (o.loss_type == RECAP_LOSS_SAPO) {
        const float tau = adv > 0.0f ? o.tau_pos : o.tau_neg;
        /* s = 1 / (1 + e), 1 - s = e / (1 + e) with e = exp(-tau (r - 1)): no cancellation in 1 - s */
        const float e = expf(-tau * (r - 1.0f));
        const float s = 1.0f / (1.0f + e);
        const float s1 = e / (1.0f + e);
        out.loss = -adv * (4.0f / tau) * s;
        out.grad = q.saturated ? 0.0f : -4.0f * adv * s * s1 * r;
        out.clipped = rc != r;
        return out;
    }
    const int vanilla = o.loss_type == RECAP_LOSS_VANILLA; /* else GSPO: no dual-clip, no delta */
    const int capped = vanilla && o.delta > 0.0f && r > o.delta;
    float l1 = -adv * (capped ? o.delta : r);
    float l2 = -adv * rc;
    /* the larger term is the loss; its gradient is -A r where its ratio is live (l1 below delta,
     * l2 inside the clip range: with delta < 1 + eh, TRL's l2 passes gradient for A < 0) */
    const int take2 = l2 > l1;
    out.clipped = take2 && rc != r;
    out.loss = take2 ? l2 : l1;
    const int live = take2 ? (rc == r) : !capped;
    out.grad = (live && !q.saturated) ? -adv * r : 0.0f;
    if (vanilla && o.dual_clip && adv < 0.0f) {
        float l3 = -o.clip_c * adv;
        if (out.loss > l3) {
            out.dual = 1;
            out.loss = l3;
            out.grad = 0.0f;
        }
    }
    return out;
}

typedef struct RecapKlToken {
    float value; /* kl_t          */
    float grad;  /* d kl_t/d logp */
} RecapKlToken;

RECAP_HD RecapKlToken recap_kl_token(float logp, float ref_logp, int estimator) {
    RecapKlToken out;
    float diff = logp - ref_logp;
    if (estimator == RECAP_KL_K3 || estimator == RECAP_KL_K3_PLUS) {
        float raw = ref_logp - logp;
        float x = recap_clampf(raw, -RECAP_KL_LOG_RATIO_CLAMP, RECAP_KL_LOG_RATIO_CLAMP);
        float e = expf(x);
        float kld = e - x - 1.0f;
        int sat = (raw < -RECAP_KL_LOG_RATIO_CLAMP) || (raw > RECAP_KL_LOG_RATIO_CLAMP) ||
                  (kld > RECAP_KL_VALUE_CLAMP) || (kld < -RECAP_KL_VALUE_CLAMP);
        out.value = recap_clampf(kld, -RECAP_KL_VALUE_CLAMP, RECAP_KL_VALUE_CLAMP);
        out.grad = (estimator == RECAP_KL_K3_PLUS) ? diff : (sat ? 0.0f : 1.0f - e);
    } else if (estimator == RECAP_KL_K3_UNCLAMPED) {
        const float x = ref_logp - logp;
        const float e = expf(x);
        out.value = e - x - 1.0f;
        out.grad = 1.0f - e;
    } else if (estimator == RECAP_KL_ABS) {
        out.value = fabsf(diff);
        out.grad = (diff > 0.0f) ? 1.0f : ((diff < 0.0f) ? -1.0f : ((diff != diff) ? diff : 0.0f));
    } else if (estimator == RECAP_KL_K2) {
        out.value = 0.5f * diff * diff;
        out.grad = diff;
    } else { /* k1, k1+ */
        out.value = diff;
        out.grad = (estimator == RECAP_KL_K1_PLUS) ? diff : 1.0f;
    }
    return out;
}

/* Rollout importance-sampling weight from its log (old - rollout, or the sequence's sum or mean):
 *   ratio = exp(clamp(log_w, -20, 20))  (verl's safety bound; NaN stays NaN)
 *   truncate: weight = min(ratio, upper), corrected <=> ratio > upper            (verl TIS)
 *   mask:     weight = ratio inside [lower, upper], else 0, corrected <=> outside (verl MIS)
 *   metrics:  weight = 1 (the ratio is only reported)
 * The weight multiplies the policy objectives' loss and gradient at that token (not nll, not KL). */
typedef struct RecapIsWeight {
    float ratio;
    float weight;
    int corrected;
} RecapIsWeight;

RECAP_HD RecapIsWeight recap_rollout_is(float log_w, int mode, float lower, float upper) {
    RecapIsWeight out;
    out.ratio = expf(recap_clampf(log_w, -20.0f, 20.0f));
    if (mode == RECAP_IS_TRUNCATE) {
        out.corrected = out.ratio > upper;
        out.weight = out.corrected ? upper : out.ratio;
    } else if (mode == RECAP_IS_MASK) {
        const int in = out.ratio >= lower && out.ratio <= upper;
        out.corrected = !in;
        out.weight = in ? out.ratio : 0.0f;
    } else {
        out.corrected = 0;
        out.weight = 1.0f;
    }
    return out;
}

/* verl's rollout_is_batch_normalize: the mean of the applied IS weights over the batch's units
 * (rollout_is.cu), from the reduced sums RECAP_ISW_SUM and RECAP_ISW_UNITS: at token level
 * sum / (units + 1e-8) (verl's masked_mean), at the sequence levels sum / max(units, 1e-8). */
RECAP_HD double recap_is_batch_mean(double sum, double units, int level) {
    return level == RECAP_IS_TOKEN ? sum / (units + 1e-8) : sum / (units > 1e-8 ? units : 1e-8);
}

/* The divisor of the weights: the batch mean where it is > 1e-8 (verl's guard), else 1. */
RECAP_HD double recap_is_batch_factor(double mean) { return mean > 1e-8 ? mean : 1.0; }

/* TRL's use_bias_correction_kl: kl_t -> kl_t r_t, d/dlogp = kl' r + kl r (the second term is 0 where
 * the log-ratio clamp saturates). */
RECAP_HD RecapKlToken recap_kl_is_corrected(RecapKlToken kt, RecapRatio q) {
    RecapKlToken out;
    out.value = kt.value * q.ratio;
    out.grad = kt.grad * q.ratio + (q.saturated ? 0.0f : kt.value * q.ratio);
    return out;
}

/*
 * Aggregation weight of one token of sequence b for one objective (before its mask weight), from the
 * reciprocals of the objective's token normalizer, sequence normalizer, the sequence's own token
 * weight, and the token-sum-norm constant (each 0 where the normalizer is 0). It factors into a
 * per-objective base (recap_agg_base) and a per-sequence factor (recap_agg_seq_factor), which the
 * kernels compute once per block and once per token.
 */
RECAP_HD float recap_agg_base(int mode, float inv_tokens, float inv_seqs, float inv_const) {
    switch (mode) {
    case RECAP_AGG_SEQ_MEAN_TOKEN_MEAN:
    case RECAP_AGG_SEQ_MEAN_TOKEN_SUM: return inv_seqs;
    case RECAP_AGG_TOKEN_SUM_NORM: return inv_const;
    default: return inv_tokens;
    }
}

RECAP_HD float recap_agg_seq_factor(int mode, float inv_seq_tokens) {
    return (mode == RECAP_AGG_SEQ_MEAN_TOKEN_MEAN) ? inv_seq_tokens : 1.0f;
}

RECAP_HD float recap_agg_weight(int mode, float inv_tokens, float inv_seqs, float inv_seq_tokens,
                                float inv_const) {
    return recap_agg_base(mode, inv_tokens, inv_seqs, inv_const) * recap_agg_seq_factor(mode, inv_seq_tokens);
}

/*
 * Rollout rejection sampling (verl's rollout_rs): the statistic of the log-ratio lr = old - rollout,
 * clamped to [-20, 20] (a NaN stays NaN): k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr; and whether
 * a value passes a criterion: inside [lower, upper] for k1, at most upper otherwise (NaN fails).
 */
RECAP_HD double recap_rs_stat(double lr, int statistic) {
    if (lr == lr) lr = lr < -20.0 ? -20.0 : (lr > 20.0 ? 20.0 : lr);
    switch (statistic) {
    case RECAP_RS_K1: return -lr;
    case RECAP_RS_K2: return 0.5 * lr * lr;
    default: return exp(lr) - 1.0 - lr;
    }
}

RECAP_HD int recap_rs_keep(double v, int statistic, double lower, double upper) {
    return statistic == RECAP_RS_K1 ? (v >= lower && v <= upper) : (v <= upper);
}

/*
 * Online softmax statistics of one row of x = z / tau, shifted by the running maximum m:
 *   s = sum_j exp(x_j - m),  a = sum_j exp(x_j - m) (x_j - m),  q = sum_j exp(2 (x_j - m))
 * so that LSE = m + log s, the entropy H = -sum p log p = log s - a / s (no cancellation against
 * m), and sum_j p_j^2 = q / s^2 (= exp(LSE(2x) - 2 LSE(x)): verl's sum_pi_squared). Terms with
 * exp(x_j - m) = 0 (x_j = -inf) add nothing. Merging two states is exact: moving a state to a
 * larger maximum M scales s by e = exp(m - M), a to e (a + (m - M) s) and q by e^2.
 */
typedef struct RecapSoftmaxState {
    float m;
    float s;
    float a;
    float q;
} RecapSoftmaxState;

RECAP_HD RecapSoftmaxState recap_softmax_init(void) {
    RecapSoftmaxState st;
    st.m = RECAP_NEG_INF;
    st.s = 0.0f;
    st.a = 0.0f;
    st.q = 0.0f;
    return st;
}

RECAP_HD RecapSoftmaxState recap_softmax_rebase(RecapSoftmaxState st, float m_new) {
    if (st.s == 0.0f || m_new == st.m) { st.m = m_new; return st; }
    const float d = st.m - m_new; /* <= 0 */
    const float e = expf(d);
    st.a = e * (st.a + d * st.s);
    st.s = e * st.s;
    st.q = (e * e) * st.q;
    st.m = m_new;
    return st;
}

/* Adds x (already divided by tau) to a state whose m >= x. */
RECAP_HD RecapSoftmaxState recap_softmax_add(RecapSoftmaxState st, float x) {
    const float d = x - st.m;
    const float e = expf(d);
    if (e > 0.0f) {
        st.s += e;
        st.a += e * d;
        st.q += e * e;
    }
    return st;
}

RECAP_HD RecapSoftmaxState recap_softmax_merge(RecapSoftmaxState u, RecapSoftmaxState v) {
    const float m = fmaxf(u.m, v.m);
    if (m == RECAP_NEG_INF) return u;
    u = recap_softmax_rebase(u, m);
    v = recap_softmax_rebase(v, m);
    u.s += v.s;
    u.a += v.a;
    u.q += v.q;
    return u;
}

/* sum_j p_j^2 of a row's final state. */
RECAP_HD float recap_softmax_sum_sq(RecapSoftmaxState st) { return st.q / (st.s * st.s); }

/* Gradient of g_spp sum_k p_k^2 with respect to logit j: (1/tau) 2 g_spp p_j (p_j - sum_k p_k^2);
 * 0 without upstream gradient, whatever the logits hold. */
RECAP_HD float recap_logit_grad_sum_sq(float x, float lse, float sum_sq, float g_spp, float inv_tau) {
    if (g_spp == 0.0f) return 0.0f;
    const float p = expf(x - lse);
    return inv_tau * (2.0f * g_spp * p * (p - sum_sq));
}

/* Gradient of one logit: dz_j = (1/tau) (g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H)), with
 * log p_j = x_j - lse; a zero probability contributes only through 1[j = y]. */

RECAP_HD float recap_logit_grad(float x, int is_label, float lse, float entropy, float g_logp, float g_ent,
                                float inv_tau) {
    /* no upstream gradient (a masked or ignored token): exactly 0, whatever the logits hold (a NaN
     * there must not reach the model's gradient) */
    if (g_logp == 0.0f && g_ent == 0.0f) return 0.0f;
    const float lp = x - lse;
    const float p = expf(lp);
    float d = g_logp * ((is_label ? 1.0f : 0.0f) - p);
    if (p > 0.0f) d -= g_ent * p * (lp + entropy);
    return inv_tau * d;
}

/* 1/x for a normalizer, 0 where there is nothing to normalize: the float reciprocal of x rounded to
 * float (counts and mask sums below 2^24 are exact there), so device code needs no double
 * division. */
RECAP_HD float recap_inv_norm(double x) { return (x > 0.0) ? 1.0f / (float)x : 0.0f; }

/* 1/k rounded to nearest, for 1 <= k <= 16: in device code from a table of constants the
 * compiler folded (a division would bring its slow path into the kernel; 0 outside the range),
 * on the host divided. */
#ifdef __CUDACC__
static __constant__ const double recap_inv_small_table[17] = {
    0.0,        1.0,        1.0 / 2.0,  1.0 / 3.0,  1.0 / 4.0,  1.0 / 5.0,  1.0 / 6.0,  1.0 / 7.0, 1.0 / 8.0,
    1.0 / 9.0,  1.0 / 10.0, 1.0 / 11.0, 1.0 / 12.0, 1.0 / 13.0, 1.0 / 14.0, 1.0 / 15.0, 1.0 / 16.0};
#endif
RECAP_HD double recap_inv_small(int k) {
#ifdef __CUDA_ARCH__
    return recap_inv_small_table[(unsigned)k <= 16u ? k : 0]; /* 0 outside the range */
#else
    return 1.0 / (double)k;
#endif
}

/* a / k for 1 <= k <= 16, rounded to nearest as the division a / (double)k is, without a division
 * (whose slow path is a large part of a kernel's code): with y = RN(1/k), q = RN(a y) is within an
 * ulp of a / k, the residual r = a - k q is exact under a fused multiply-add, and RN(q + r y) is
 * RN(a / k) (Markstein's theorem). Zero, infinite and NaN a return a y (exact there); a quotient
 * in the subnormal range may differ from the division's in its last bit. */
RECAP_HD double recap_div_small(double a, int k) {
    const double y = recap_inv_small(k), q = a * y;
    if (!(q != 0.0 && q - q == 0.0)) return q;
    const double r = fma(-q, (double)k, a);
    return fma(r, y, q);
}

#endif /* RECAP_GRPO_MATH_CUH */
