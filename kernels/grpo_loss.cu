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
 * The normalizers come from recap_seq_stats_* and recap_norms_finalize (reduce.cu), run first.
 *
 * Threads. A block takes a tile of blockDim.x * items consecutive tokens (common.cuh), one thread
 * per token; the math for all K objectives stays in registers (K <= MAXK, a template parameter, so
 * the per-objective accumulators are register arrays indexed by unrolled constants). The tile's
 * per-sequence data (membership, 1/n_b, advantage rows) is staged in shared memory when it spans at
 * most RECAP_TILE_SEQ_DATA sequences. Each block reduces its 3K + 8 statistics (layout in
 * recap_params.h) in a fixed order into column blockIdx.x of the slot-major `partials`;
 * recap_partials_finalize reduces each row. Masked tokens are never read beyond their
 * mask, so NaN or Inf there changes nothing; grad is written (0) for every token.
 */
#include "common.cuh"

/* Tokens per thread whose loads are issued together. */
#define RECAP_UNROLL 4
/* Sequences per tile whose per-sequence data is staged in shared memory. */
#define RECAP_TILE_SEQ_DATA 256

/* EXT = false: the plain clipped surrogate (vanilla, no delta, no rollout IS, no KL IS correction),
 * the variant code compiled out so the common case keeps its registers; EXT = true: every variant. */
template <int MAXK, typename MT, bool EXT>
__device__ __forceinline__ void grpo_token_pass(const RecapGrpoParams& p) {
    __shared__ int32_t s_cu[RECAP_TILE_SEQ_CAP];
    __shared__ double s_red[RECAP_WARPS * (3 * MAXK + RECAP_GRPO_EXTRA_SLOTS)];
    __shared__ float s_base[MAXK + 1]; /* per-objective aggregation base weight (recap_agg_base) */
    /* per-sequence data of the tile's sequences: membership bits, 1/n_b, advantage rows */
    __shared__ uint32_t s_bits[RECAP_TILE_SEQ_DATA];
    __shared__ float s_seq_factor[RECAP_TILE_SEQ_DATA];
    __shared__ float s_adv[RECAP_TILE_SEQ_DATA * MAXK];

    const int K = p.num_objectives;
    const int S = 3 * K + RECAP_GRPO_EXTRA_SLOTS;
    const double* __restrict__ norms = (const double*)p.norms;
    const float inv_c = (p.sum_norm_const > 0.0f) ? 1.0f / p.sum_norm_const : 0.0f;
    /* the objectives' aggregation (slots k < K) and the KL term's (slot K, agg_mode) */
    const int pol_mode = EXT ? p.policy_agg_mode : p.agg_mode;
    if (threadIdx.x <= K)
        s_base[threadIdx.x] = recap_agg_base(threadIdx.x < K ? pol_mode : p.agg_mode,
                                             recap_inv_norm(norms[RECAP_NORM_TOKENS * RECAP_NORM_SLOTS + threadIdx.x]),
                                             recap_inv_norm(norms[RECAP_NORM_SEQS * RECAP_NORM_SLOTS + threadIdx.x]), inv_c);
    const int32_t* __restrict__ cu = (const int32_t*)p.cu_seqlens;
    const int64_t t0 = recap_tile_start(p.items_per_thread);
    const int64_t tile = (int64_t)blockDim.x * p.items_per_thread;
    const int64_t t1 = (t0 + tile < p.num_tokens) ? t0 + tile : p.num_tokens;
    const RecapTileSeqs ts = recap_tile_setup(cu, (const int32_t*)p.tile_seq, p.num_seqs, s_cu);

    const MT* __restrict__ mask = (const MT*)p.mask;
    const float* __restrict__ logp = (const float*)p.logp;
    const float* __restrict__ old_logp = (const float*)p.old_logp;
    const float* __restrict__ ref_logp = (const float*)p.ref_logp;
    const float* __restrict__ adv = (const float*)p.advantages;
    const uint32_t* __restrict__ mem = (const uint32_t*)p.membership;
    const double* __restrict__ seq_tokens = (const double*)p.seq_tokens;
    const double* __restrict__ seq_lr = (const double*)p.seq_log_ratio;
    const double* __restrict__ seq_is = (const double*)p.seq_is_log;
    const float* __restrict__ rollout = EXT ? (const float*)p.rollout_logp : (const float*)0;
    float* __restrict__ grad = (float*)p.grad;
    const float inv_k = 1.0f / (float)K;
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
        for (int i = threadIdx.x; i < nseq; i += blockDim.x) {
            const int b = ts.b_lo + i;
            s_bits[i] = (mem ? mem[b] : 0xffffffffu) & kbits;
            s_seq_factor[i] = recap_agg_seq_factor(pol_mode, smtm ? recap_inv_norm(seq_tokens[b]) : 0.0f);
        }
        if (!p.adv_per_token)
            for (int i = threadIdx.x; i < nseq * K; i += blockDim.x)
                s_adv[(i / K) * MAXK + (i % K)] = adv[(int64_t)ts.b_lo * K + i];
        __syncthreads();
    }

    float agg[MAXK], clip[MAXK], dual[MAXK];
#pragma unroll
    for (int k = 0; k < MAXK; ++k) agg[k] = clip[k] = dual[k] = 0.0f;
    float r_sum = 0.0f, negd_sum = 0.0f, p_tok = 0.0f, kl_agg = 0.0f, kl_sum = 0.0f;
    float r_min = 1.0f / 0.0f, r_max = -1.0f / 0.0f;
    float is_sum = 0.0f, is_corr = 0.0f, is_min = 1.0f / 0.0f, is_max = -1.0f / 0.0f;
    unsigned nonfinite = 0;

    /* RECAP_UNROLL tokens per step: their mask, logp, old_logp (and ref_logp) loads are all issued
     * before the first use (predicated, in bounds, whether or not the token turns out masked or
     * non-policy), so each thread keeps several independent loads in flight. */
    for (int i0 = 0; i0 < p.items_per_thread; i0 += RECAP_UNROLL) {
        float mv[RECAP_UNROLL], lpv[RECAP_UNROLL], oldv[RECAP_UNROLL], refv[RECAP_UNROLL], rolv[RECAP_UNROLL];
#pragma unroll
        for (int u = 0; u < RECAP_UNROLL; ++u) {
            const int64_t t = t0 + (int64_t)(i0 + u) * blockDim.x + threadIdx.x;
            const bool in = (i0 + u < p.items_per_thread) && t < t1;
            mv[u] = in ? recap_load_mask(mask, t) : 0.0f;
            lpv[u] = in ? logp[t] : 0.0f;
            oldv[u] = in ? old_logp[t] : 0.0f;
            refv[u] = (in && ref_logp) ? ref_logp[t] : 0.0f;
            rolv[u] = (in && rollout && p.is_level == RECAP_IS_TOKEN) ? rollout[t] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < RECAP_UNROLL; ++u) {
            const int64_t t = t0 + (int64_t)(i0 + u) * blockDim.x + threadIdx.x;
            if (i0 + u >= p.items_per_thread || t >= t1) break;
            const float m = mv[u];
            if (m == 0.0f) { grad[t] = 0.0f; continue; }
            nonfinite += !recap_isfinite(m);
            const int b = recap_tile_find(ts, cu, s_cu, t);
            const int sb = b - ts.b_lo;
            const uint32_t bits = staged ? s_bits[sb] : ((mem ? mem[b] : 0xffffffffu) & kbits);
            const uint32_t pol = bits & p.policy_bits;
            const float lp = lpv[u];
            nonfinite += !recap_isfinite(lp);
            /* m times the per-sequence factor of the objectives' aggregation weight */
            const float mf = m * (staged ? s_seq_factor[sb]
                                         : recap_agg_seq_factor(pol_mode, smtm ? recap_inv_norm(seq_tokens[b]) : 0.0f));

            RecapRatio q;
            q.log_ratio = 0.0f; q.ratio = 1.0f; q.saturated = 0;
            float isw = 1.0f; /* rollout IS weight of the policy terms */
            if (pol) {
                const float old = oldv[u];
                nonfinite += !recap_isfinite(old);
                q = recap_ratio(lp, old, p.log_ratio_clamp);
                negd_sum -= m * q.log_ratio; /* ppo_kl: the token log-ratio in every variant */
                if (EXT && p.loss_type == RECAP_LOSS_GSPO) q = recap_gspo_ratio((float)seq_lr[b]);
                r_sum += m * q.ratio;
                p_tok += m;
                if (rollout) {
                    /* rollout IS weight of this policy token (multiplies the policy terms below) */
                    float lw;
                    if (p.is_level == RECAP_IS_TOKEN) {
                        nonfinite += !recap_isfinite(rolv[u]);
                        lw = old - rolv[u];
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
                if (EXT && p.policy_weight) isw *= ((const float*)p.policy_weight)[t];
                r_min = fminf(r_min, q.ratio);
                r_max = fmaxf(r_max, q.ratio);
            }
            const bool adv_smem = staged && !p.adv_per_token;
            const float* arow = adv + (p.adv_per_token ? t : (int64_t)b) * K;
            float g = 0.0f;
#pragma unroll
            for (int k = 0; k < MAXK; ++k) {
                if (k < K && ((bits >> k) & 1u)) {
                    const float w = mf * s_base[k];
                    if ((pol >> k) & 1u) {
                        const float a = adv_smem ? s_adv[sb * MAXK + k] : arow[k];
                        nonfinite += !recap_isfinite(a);
                        const RecapPolicyToken pt = recap_policy_token(
                            (EXT && p.loss_type == RECAP_LOSS_GEO_MEAN)
                                ? recap_geo_mean_ratio(q.log_ratio, (float)seq_lr[a > 0.0f ? b : p.num_seqs + b])
                                : q,
                            a, lp, oldv[u], opts);
                        agg[k] += w * isw * pt.loss;
                        clip[k] += pt.clipped ? m : 0.0f;
                        dual[k] += pt.dual ? m : 0.0f;
                        g += p.lambda[k] * w * isw * pt.grad;
                    } else {
                        agg[k] -= w * lp;
                        g -= p.lambda[k] * w;
                    }
                }
            }
            g *= inv_k;
            if (ref_logp) {
                const float ref = refv[u];
                nonfinite += !recap_isfinite(ref);
                RecapKlToken kt = recap_kl_token(lp, ref, p.kl_estimator);
                if (EXT && p.kl_is_correction && pol) kt = recap_kl_is_corrected(kt, q);
                /* the KL term's own per-sequence factor when its aggregation differs */
                const float mk = kl_own_mode
                                     ? m * recap_agg_seq_factor(p.agg_mode, p.agg_mode == RECAP_AGG_SEQ_MEAN_TOKEN_MEAN
                                                                                ? recap_inv_norm(seq_tokens[b])
                                                                                : 0.0f)
                                     : mf;
                const float w = mk * s_base[K];
                kl_agg += w * kt.value;
                kl_sum += m * kt.value;
                g += p.beta * w * kt.grad;
            }
            grad[t] = g;
        }
    }

#pragma unroll
    for (int k = 0; k < MAXK; ++k) {
        if (k < K) {
            recap_block_reduce_slot(agg[k], k, S, RECAP_OP_SUM, s_red);
            recap_block_reduce_slot(clip[k], K + k, S, RECAP_OP_SUM, s_red);
            recap_block_reduce_slot(dual[k], 2 * K + k, S, RECAP_OP_SUM, s_red);
        }
    }
    const int e = 3 * K;
    recap_block_reduce_slot(r_sum, e + RECAP_SLOT_RATIO_SUM, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(negd_sum, e + RECAP_SLOT_NEG_LOG_RATIO_SUM, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(p_tok, e + RECAP_SLOT_POLICY_TOKENS, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(r_min, e + RECAP_SLOT_RATIO_MIN, S, RECAP_OP_MIN, s_red);
    recap_block_reduce_slot(r_max, e + RECAP_SLOT_RATIO_MAX, S, RECAP_OP_MAX, s_red);
    recap_block_reduce_slot((float)nonfinite, e + RECAP_SLOT_NONFINITE, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(kl_agg, e + RECAP_SLOT_KL_AGG, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(kl_sum, e + RECAP_SLOT_KL_SUM, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(is_sum, e + RECAP_SLOT_IS_SUM, S, RECAP_OP_SUM, s_red);
    recap_block_reduce_slot(is_min, e + RECAP_SLOT_IS_MIN, S, RECAP_OP_MIN, s_red);
    recap_block_reduce_slot(is_max, e + RECAP_SLOT_IS_MAX, S, RECAP_OP_MAX, s_red);
    recap_block_reduce_slot(is_corr, e + RECAP_SLOT_IS_CORRECTED, S, RECAP_OP_SUM, s_red);
    /* slot-major: statistic j of this block at partials[j * gridDim.x + blockIdx.x] */
    const uint64_t one = 1;
    const uint64_t min_bits = (one << (e + RECAP_SLOT_RATIO_MIN)) | (one << (e + RECAP_SLOT_IS_MIN));
    const uint64_t max_bits = (one << (e + RECAP_SLOT_RATIO_MAX)) | (one << (e + RECAP_SLOT_IS_MAX));
    recap_block_reduce_finish((double*)p.partials + blockIdx.x, gridDim.x, S, min_bits, max_bits, s_red);
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
RECAP_GRPO_INST(8, 4)
RECAP_GRPO_INST(16, 2)
