/*
 * grpo_loss.cu — kernel 1: the fused GRPO policy loss for K objectives, forward and gradient in one
 * pass over the token data, with the KL term (kernel 2's formulas) fused in.
 *
 * Math (per-token formulas in grpo_math.cuh). For an unmasked token t of sequence b, weight m_t:
 *   d_t = clamp(logp_t - old_t, -20, 20), r_t = exp(d_t)
 *   objective k of kind policy (advantage A = adv[b or t, k]): l_tk = max(-A r, -A clip(r, 1-el, 1+eh)),
 *     for A < 0 with dual-clip l_tk = min(l_tk, -c A), or the CISPO / SAPO / two-sided / GSPO
 *     variants (recap_policy_token; GSPO's r is the sequence ratio from recap_seq_stats, GMPO's the
 *     exp of the sequence's mean sign-clipped log-ratio for the token's advantage sign); of kind
 *     nll: l_tk = -logp_t
 *   kl_t  = the estimator at (logp, ref), times r_t at policy tokens with kl_is_correction
 *   with rollout_logp, each policy token's policy terms are multiplied by its rollout IS weight
 *   (recap_rollout_is of old - rollout, or of its sequence's sum or mean from recap_seq_stats), and
 *   by policy_weight[t] when given (TRL's top-entropy-quantile mask)
 *   w_tk  = m_t * aggregation weight (token-mean 1/N_k, seq-mean-token-mean 1/(n_b S_k), ...) for
 *           member sequences (membership bit k), else 0, in the objectives' mode (policy_agg_mode,
 *           EXT only; else agg_mode); the KL term uses slot K (every sequence) and agg_mode
 *   L     = (1/K) sum_k lambda_k sum_t w_tk l_tk + beta sum_t w_tK kl_t
 *   grad_t = dL/dlogp_t = (1/K) sum_k lambda_k w_tk dl_tk/dlogp + beta w_tK dkl_t/dlogp
 * The normalizers come from recap_seq_stats_* (reduce.cu), the call's first launch; this is the second
 * and last.
 *
 * Threads. A block of RECAP_BLOCK threads takes a tile of RECAP_BLOCK * items consecutive tokens
 * (common.cuh); thread i takes tokens tile_start + i, + RECAP_BLOCK, ... (coalesced), loading each
 * token's inputs one token ahead of its math (a loop that is not unrolled: the code stays small),
 * and divides nothing (the normalizers' reciprocals come from recap_seq_stats, 1/C and 1/K from
 * the host and a table of constants), and follows its tokens'
 * sequence with a cursor that only moves forward (one search per thread, not per token). The math
 * for all K objectives stays in registers (K <= MAXK, a template parameter, so the per-objective
 * accumulators are register arrays indexed by unrolled constants). The tile's per-sequence data
 * (membership, 1/n_b, advantage rows) is staged in shared memory when it spans at most
 * RECAP_TILE_SEQ_DATA sequences. Each block's 3K + 12 statistics (layout in recap_params.h) are
 * stored to shared memory and reduced there in a fixed order (recap_stage_reduce) into column
 * blockIdx.x of the slot-major `partials`; the block that finishes last (a ticket) reduces the
 * columns in block order into the output and computes the loss on the device. No float atomics:
 * the same inputs and launch shape give the same bits. Masked tokens are never read beyond their
 * mask, so NaN or Inf there changes nothing; grad is written (0) for every token.
 */
#include "common.cuh"

/* Sequences per tile whose per-sequence data is staged in shared memory. */
#define RECAP_TILE_SEQ_DATA 256

/* The statistics' staging positions (MAXK-based, so each thread's store is at a compile-time
 * position): q = k, MAXK + k, 2 MAXK + k for agg, clip and dual of objective k, then 3 MAXK + the
 * extra slot. Their slot in the partials (3K + 12 layout of recap_params.h), -1 when unused. */
template <int MAXK>
__device__ __forceinline__ int grpo_slot_of(int q, int K) {
    if (q < 3 * MAXK) {
        const int k = q % MAXK, which = q / MAXK;
        return k < K ? which * K + k : -1;
    }
    return 3 * K + (q - 3 * MAXK);
}
template <int MAXK>
__device__ __forceinline__ int grpo_op_of(int q) {
    const int x = q - 3 * MAXK;
    return (x == RECAP_SLOT_RATIO_MIN || x == RECAP_SLOT_IS_MIN)   ? RECAP_OP_MIN
           : (x == RECAP_SLOT_RATIO_MAX || x == RECAP_SLOT_IS_MAX) ? RECAP_OP_MAX
                                                                   : RECAP_OP_SUM;
}

/* One token's inputs, loaded a token ahead of their use (predicated, in bounds, whether or not the
 * token turns out masked), so each thread keeps a token's loads in flight while it computes. */
struct GrpoTok {
    float m, lp, old, ref, rol;
};
template <typename MT>
__device__ __forceinline__ GrpoTok grpo_load(const RecapGrpoParams& p, const MT* mask, int64_t t, bool token_is) {
    GrpoTok x;
    x.m = recap_load_mask(mask, t);
    x.lp = ((const float*)p.logp)[t];
    x.old = ((const float*)p.old_logp)[t];
    x.ref = p.ref_logp ? ((const float*)p.ref_logp)[t] : 0.0f;
    x.rol = token_is ? ((const float*)p.rollout_logp)[t] : 0.0f;
    return x;
}

/* EXT = false: the plain clipped surrogate (vanilla, no delta, no rollout IS, no KL IS correction,
 * no policy weight), the variant code compiled out so the common case keeps its registers;
 * EXT = true: every variant. */
template <int MAXK, typename MT, bool EXT>
__device__ __forceinline__ void grpo_token_pass(const RecapGrpoParams& p) {
    /* statistics staged per pass of at most 24 positions (K <= 4: one pass) */
    constexpr int SMAX = 3 * MAXK + RECAP_GRPO_EXTRA_SLOTS;
    constexpr int PASSES = (SMAX + 23) / 24;
    constexpr int SG = (SMAX + PASSES - 1) / PASSES;
    __shared__ int32_t s_cu[RECAP_TILE_SEQ_CAP];
    __shared__ float s_base[MAXK + 1]; /* per-objective aggregation base weight (recap_agg_base) */
    __shared__ float s_lambda[MAXK];
    /* per-sequence data of the tile's sequences: membership bits, 1/n_b, advantage rows */
    __shared__ uint32_t s_bits[RECAP_TILE_SEQ_DATA];
    __shared__ float s_seq_factor[RECAP_TILE_SEQ_DATA];
    __shared__ float s_adv[RECAP_TILE_SEQ_DATA * MAXK];
    __shared__ float s_stage[SG * RECAP_STAGE_LD];
    __shared__ double s_out[3 * MAXK + RECAP_GRPO_EXTRA_SLOTS];

    const int K = p.num_objectives;
    const int S = 3 * K + RECAP_GRPO_EXTRA_SLOTS;
    /* every reciprocal precomputed (recap_seq_stats, the host): the pass divides nothing */
    const float* __restrict__ inv_norms = (const float*)p.inv_norms;
    const float inv_c = p.inv_norm_const;
    /* the objectives' aggregation (slots k < K) and the KL term's (slot K, agg_mode) */
    const int pol_mode = EXT ? p.policy_agg_mode : p.agg_mode;
    if (threadIdx.x <= K)
        s_base[threadIdx.x] = recap_agg_base(threadIdx.x < K ? pol_mode : p.agg_mode,
                                             inv_norms[threadIdx.x], inv_norms[RECAP_NORM_SLOTS + threadIdx.x], inv_c);
    if (threadIdx.x < K) s_lambda[threadIdx.x] = p.lambda_dev ? ((const float*)p.lambda_dev)[threadIdx.x] : p.lambda[threadIdx.x];
    const int32_t* __restrict__ cu = (const int32_t*)p.cu_seqlens;
    const int64_t t0 = recap_tile_start(p.items_per_thread);
    const int64_t tile = (int64_t)RECAP_BLOCK * p.items_per_thread;
    const int64_t t1 = (t0 + tile < p.num_tokens) ? t0 + tile : p.num_tokens;
    const RecapTileSeqs ts = recap_tile_setup(cu, (const int32_t*)p.tile_seq, p.num_seqs, s_cu, t0 >= p.num_tokens);

    const MT* __restrict__ mask = (const MT*)p.mask;
    const float* __restrict__ adv = (const float*)p.advantages;
    const uint32_t* __restrict__ mem = (const uint32_t*)p.membership;
    const float* __restrict__ seq_inv = (const float*)p.seq_inv;
    const double* __restrict__ seq_lr = (const double*)p.seq_log_ratio;
    const double* __restrict__ seq_is = (const double*)p.seq_is_log;
    const bool rollout = EXT && p.rollout_logp;
    const bool token_is = rollout && p.is_level == RECAP_IS_TOKEN;
    float* __restrict__ grad = (float*)p.grad;
    const float inv_k = (float)recap_inv_small(K); /* = 1.0f / K (tests/device_math.rs) */
    const uint32_t kbits = (K >= 32) ? 0xffffffffu : ((1u << K) - 1u);
    const bool smtm = pol_mode == RECAP_AGG_SEQ_MEAN_TOKEN_MEAN;
    const bool kl_own_mode = EXT && pol_mode != p.agg_mode; /* per-term aggregation */
    RecapPolicyOpts opts;
    opts.loss_type = EXT ? p.loss_type : RECAP_LOSS_VANILLA;
    opts.dual_clip = p.dual_clip;
    opts.clip_low = p.clip_low;
    opts.clip_high = p.clip_high;
    opts.clip_c = p.clip_c;
    opts.delta = EXT ? p.delta : 0.0f;
    opts.tau_pos = p.tau_pos;
    opts.tau_neg = p.tau_neg;
    opts.dro_beta = p.dro_beta;

    /* Stage the per-sequence data when the tile's sequences fit (block-uniform decision). */
    const int nseq = ts.b_hi - ts.b_lo + 1;
    const bool staged = nseq <= RECAP_TILE_SEQ_DATA;
    if (staged) {
#pragma unroll 1
        for (int i = threadIdx.x; i < nseq; i += RECAP_BLOCK) {
            const int b = ts.b_lo + i;
            s_bits[i] = (mem ? mem[b] : 0xffffffffu) & kbits;
            s_seq_factor[i] = recap_agg_seq_factor(pol_mode, smtm ? seq_inv[b] : 0.0f);
        }
        if (!p.adv_per_token)
#pragma unroll 1
            for (int i = threadIdx.x; i < nseq; i += RECAP_BLOCK) {
                const float* row = adv + ((int64_t)ts.b_lo + i) * K;
#pragma unroll
                for (int k = 0; k < MAXK; ++k)
                    if (k < K) s_adv[i * MAXK + k] = row[k];
            }
    }
    __syncthreads(); /* s_base, s_lambda and the staged data */
    float lam[MAXK];
#pragma unroll
    for (int k = 0; k < MAXK; ++k) lam[k] = k < K ? s_lambda[k] : 0.0f;

    float agg[MAXK], clip[MAXK], dual[MAXK];
#pragma unroll
    for (int k = 0; k < MAXK; ++k) agg[k] = clip[k] = dual[k] = 0.0f;
    float r_sum = 0.0f, negd_sum = 0.0f, p_tok = 0.0f, kl_agg = 0.0f, kl_sum = 0.0f;
    float r_min = INFINITY, r_max = -INFINITY;
    float is_sum = 0.0f, is_corr = 0.0f, is_min = INFINITY, is_max = -INFINITY;
    unsigned nonfinite = 0;

    /* this thread's tokens t0 + threadIdx.x + i * RECAP_BLOCK, i < n; b: a cursor on the sequence of
     * the current token (tokens only increase, so it only moves forward) */
    const int64_t first = t0 + threadIdx.x;
    /* a tile is under 2^31 tokens (the host bounds items_per_thread): 32-bit arithmetic */
    const int n = first < t1 ? (int)(((unsigned)(t1 - first) + RECAP_BLOCK - 1) / RECAP_BLOCK) : 0;
    /* the tile's boundaries cu[b_lo ..], staged or in global memory: one generic pointer */
    const int32_t* cut = ts.staged ? s_cu : cu + ts.b_lo;
    int b = ts.b_lo;
    if (n > 0) {
        int lo = 0, hi = ts.b_hi - ts.b_lo; /* the last boundary <= first */
        while (lo < hi) {
            const int mid = lo + (hi - lo + 1) / 2;
            if ((int64_t)cut[mid] <= first) lo = mid; else hi = mid - 1;
        }
        b += lo;
    }
    GrpoTok next = n > 0 ? grpo_load(p, mask, first, token_is) : GrpoTok{0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
        const int64_t t = first + (int64_t)i * RECAP_BLOCK;
        const GrpoTok x = next;
        if (i + 1 < n) next = grpo_load(p, mask, t + RECAP_BLOCK, token_is);
        const float m = x.m;
        if (m == 0.0f) { grad[t] = 0.0f; continue; }
        nonfinite += !recap_isfinite(m);
        while (b < ts.b_hi && (int64_t)cut[b + 1 - ts.b_lo] <= t) ++b;
        const int sb = b - ts.b_lo;
        const uint32_t bits = staged ? s_bits[sb] : ((mem ? mem[b] : 0xffffffffu) & kbits);
        const uint32_t pol = bits & p.policy_bits;
        const float lp = x.lp;
        nonfinite += !recap_isfinite(lp);
        /* m times the per-sequence factor of the objectives' aggregation weight */
        const float mf = m * (staged ? s_seq_factor[sb]
                                     : recap_agg_seq_factor(pol_mode, smtm ? seq_inv[b] : 0.0f));

        RecapRatio q;
        q.log_ratio = 0.0f; q.ratio = 1.0f; q.saturated = 0;
        float isw = 1.0f; /* rollout IS weight of the policy terms */
        if (pol) {
            nonfinite += !recap_isfinite(x.old);
            q = recap_ratio(lp, x.old, p.log_ratio_clamp);
            negd_sum -= m * q.log_ratio; /* ppo_kl: the token log-ratio in every variant */
            if (EXT && p.loss_type == RECAP_LOSS_GSPO) q = recap_gspo_ratio((float)seq_lr[b]);
            r_sum += m * q.ratio;
            p_tok += m;
            if (rollout) {
                /* rollout IS weight of this policy token (multiplies the policy terms below) */
                float lw;
                if (token_is) {
                    nonfinite += !recap_isfinite(x.rol);
                    lw = x.old - x.rol;
                } else {
                    lw = (float)seq_is[b];
                    nonfinite += !recap_isfinite(lw); /* a NaN/Inf rollout log-prob in the sequence */
                }
                const RecapIsWeight iw = recap_rollout_is(lw, p.is_mode, p.is_lower, p.is_upper);
                is_sum += m * iw.ratio;
                is_min = fminf(is_min, iw.ratio);
                is_max = fmaxf(is_max, iw.ratio);
                is_corr += iw.corrected ? m : 0.0f;
                isw = iw.weight;
            }
            if (EXT && p.policy_weight) {
                const float pw = ((const float*)p.policy_weight)[t];
                nonfinite += !recap_isfinite(pw);
                isw *= pw;
            }
            r_min = fminf(r_min, q.ratio);
            r_max = fmaxf(r_max, q.ratio);
        }
        /* the advantage row: staged in shared memory or in global memory (one generic load per k) */
        const float* arow = (staged && !p.adv_per_token) ? s_adv + sb * MAXK
                                                         : adv + (p.adv_per_token ? t : (int64_t)b) * K;
        float g = 0.0f;
#pragma unroll
        for (int k = 0; k < MAXK; ++k) {
            if (k < K && ((bits >> k) & 1u)) {
                const float w = mf * s_base[k];
                if ((pol >> k) & 1u) {
                    const float a = arow[k];
                    nonfinite += !recap_isfinite(a);
                    const RecapPolicyToken pt = recap_policy_token(
                        (EXT && p.loss_type == RECAP_LOSS_GEO_MEAN)
                            ? recap_geo_mean_ratio(q.log_ratio, (float)seq_lr[a > 0.0f ? b : p.num_seqs + b])
                            : q,
                        a, lp, x.old, opts);
                    agg[k] += w * isw * pt.loss;
                    clip[k] += pt.clipped ? m : 0.0f;
                    dual[k] += pt.dual ? m : 0.0f;
                    g += lam[k] * w * isw * pt.grad;
                } else {
                    agg[k] -= w * lp;
                    g -= lam[k] * w;
                }
            }
        }
        g *= inv_k;
        if (p.ref_logp) {
            nonfinite += !recap_isfinite(x.ref);
            RecapKlToken kt = recap_kl_token(lp, x.ref, p.kl_estimator);
            if (EXT && p.kl_is_correction && pol) kt = recap_kl_is_corrected(kt, q);
            /* the KL term's own per-sequence factor when its aggregation differs */
            const float mk = kl_own_mode
                                 ? m * recap_agg_seq_factor(p.agg_mode, p.agg_mode == RECAP_AGG_SEQ_MEAN_TOKEN_MEAN
                                                                            ? seq_inv[b]
                                                                            : 0.0f)
                                 : mf;
            const float w = mk * s_base[K];
            kl_agg += w * kt.value;
            kl_sum += m * kt.value;
            g += p.beta * w * kt.grad;
        }
        grad[t] = g;
    }

    /* The block's statistics: stored at their staging positions (compile-time, per pass), then
     * reduced in a fixed order into column blockIdx.x of the slot-major partials. */
    double* part = (double*)p.partials;
    const float extra[RECAP_GRPO_EXTRA_SLOTS] = {r_sum, negd_sum, p_tok, r_min, r_max, (float)nonfinite,
                                                 kl_agg, kl_sum, is_sum, is_min, is_max, is_corr};
#pragma unroll
    for (int pass = 0; pass < PASSES; ++pass) {
        const int base = pass * SG;
        if (pass > 0) __syncthreads(); /* the previous pass's reads are done */
#pragma unroll
        for (int q = 0; q < SMAX; ++q) {
            if (q < base || q >= base + SG) continue;
            const float v = q < MAXK ? agg[q % MAXK]
                            : q < 2 * MAXK ? clip[q % MAXK]
                            : q < 3 * MAXK ? dual[q % MAXK]
                                           : extra[q - 3 * MAXK];
            s_stage[(q - base) * RECAP_STAGE_LD + threadIdx.x] = v;
        }
        recap_stage_reduce(s_stage, base, (SMAX - base < SG) ? SMAX - base : SG, part,
                           [K](int q) { return grpo_slot_of<MAXK>(q, K); }, [](int q) { return grpo_op_of<MAXK>(q); });
    }

    /* The last block: every block's partials reduced in block order into the output's slots, then
     * the loss (in double, the same formula as the host's finish_grpo) */
    if (!recap_last_block((unsigned int*)p.ticket)) return;
    recap_reduce_rows(part, gridDim.x, S, s_out, [K](int j) { return recap_grpo_slot_op(j, K); });
    double* out = (double*)p.out;
    if (threadIdx.x < S) out[RECAP_OUT_SLOTS + threadIdx.x] = s_out[threadIdx.x]; /* S < RECAP_BLOCK */
    if (threadIdx.x == 0) {
        const double loss = recap_grpo_loss_of(s_out, s_lambda, K, p.ref_logp != 0, p.beta);
        out[RECAP_OUT_LOSS] = out[RECAP_OUT_FLAGS] != 0.0 ? (double)NAN : loss;
    }
    recap_ticket_reset((unsigned int*)p.ticket);
}

/* Registers capped for 4 blocks per SM with MAXK <= 8 and 2 with MAXK = 16: more loads in flight
 * beat the few registers spilled (measured on an H100). */
#define RECAP_GRPO_INST(MAXK, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK, MINB)                                               \
        recap_grpo_loss_k##MAXK##_f32(const RecapGrpoParams p) { grpo_token_pass<MAXK, float, false>(p); }        \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK, MINB)                                               \
        recap_grpo_loss_k##MAXK##_u8(const RecapGrpoParams p) { grpo_token_pass<MAXK, uint8_t, false>(p); }       \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK, MINB)                                               \
        recap_grpo_loss_ext_k##MAXK##_f32(const RecapGrpoParams p) { grpo_token_pass<MAXK, float, true>(p); }     \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK, MINB)                                               \
        recap_grpo_loss_ext_k##MAXK##_u8(const RecapGrpoParams p) { grpo_token_pass<MAXK, uint8_t, true>(p); }
RECAP_GRPO_INST(1, 4)
RECAP_GRPO_INST(2, 4)
RECAP_GRPO_INST(4, 4)
RECAP_GRPO_INST(8, 3)
RECAP_GRPO_INST(16, 2)
