/*
 * reduce.cu — kernel 3: per-objective weighted loss reduction, and the per-sequence statistics and
 * fixed-order finalization that the fused GRPO loss (grpo_loss.cu) shares.
 *
 * Math. Per-token losses l[t, k] for K objectives, mask weights m[t], sequences [cu[b], cu[b+1]),
 * membership bits mem[b] (bit k: sequence b belongs to objective k), objective weights lambda[k]:
 *   n_b       = sum_{t in b} m_t                          (recap_seq_stats_*; for GSPO also the
 *               sequence's mean log-ratio sum m (logp - old) / n_b, for GMPO the means of
 *               min(d, eh) and max(d, -el))
 *   N_k, S_k  = sum of n_b, count of n_b > 0, over member sequences, or the caller's global
 *               normalizers                                (recap_seq_stats_*'s last block)
 *   w_tk      = m_t * weight(mode; 1/N_k, 1/S_k, 1/n_b, 1/C)  for member tokens, else 0
 *   agg_k     = sum_t w_tk l_tk,  total = (1/K) sum_k lambda_k agg_k
 *   grad[t,k] = d total / d l_tk = lambda_k w_tk / K       (recap_reduce_k*_*)
 *
 * Threads. recap_seq_stats_*: warps_per_seq (1, 2, 4 or 8, more for longer sequences) warps of
 * one block per sequence, lanes stride over its tokens (warp-tree sums, then the warps' sums added
 * in warp order through shared memory); it also records, for each token tile of the pass that follows, the sequence of the tile's first
 * token (tile_seq), so no block of that pass searches cu_seqlens in global memory.
 * Each block then sums its sequences' token weights and counts per normalizer slot, and the block
 * that finishes last (a ticket, common.cuh) reduces those partials in block order into the
 * normalizers, in the same launch. With `validate` (cu_seqlens and membership passed on the
 * device) it also checks them there into RECAP_ERR_* flags. recap_partials_finalize: one block per
 * statistic, over that statistic's slot-major row of block partials; each thread walks a fixed
 * strided subset, then a fixed warp-tree and warp order. recap_reduce_k*_*: a tile of
 * blockDim.x * items tokens per block (common.cuh), one thread per token and objective loop in
 * registers; each block writes its K partial sums into column blockIdx.x of the slot-major
 * partials, reduced by recap_partials_finalize. No atomics: the same inputs and launch shape give
 * the same bits.
 */
#include "common.cuh"

template <typename MT>
__device__ __forceinline__ void seq_stats(const RecapSeqParams& p) {
    __shared__ double s_part[RECAP_WARPS][4];
    __shared__ double s_nb[RECAP_WARPS];  /* n_b of the block's sequences, by their first warp */
    __shared__ int s_bad[RECAP_WARPS][2]; /* their RECAP_ERR_CU_SEQLENS / _MEMBERSHIP findings */
    __shared__ double s_fin[RECAP_SEQ_PARTIAL_ROWS(RECAP_MAX_OBJECTIVES)];
    const int wps = p.warps_per_seq; /* divides RECAP_WARPS: a sequence's warps share a block */
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int sub = warp % wps;      /* this warp's share of the sequence */
    const int seqs_per_block = RECAP_WARPS / wps;
    const int64_t b = ((int64_t)blockIdx.x * RECAP_WARPS + warp) / wps;
    const bool live = b < p.num_seqs; /* no early return: the block synchronizes below */
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const uint32_t* mem = (const uint32_t*)p.membership;
    const MT* mask = (const MT*)p.mask;
    const int64_t T = p.num_tokens;
    /* the boundaries clamped into [0, T] and ordered, so a layout that fails the device checks
     * (reported through the flags) still reads nothing out of bounds */
    const int64_t cs = live ? (int64_t)cu[b] : 0, ce = live ? (int64_t)cu[b + 1] : 0;
    const int64_t s = cs < 0 ? 0 : (cs > T ? T : cs);
    const int64_t e = ce < s ? s : (ce > T ? T : ce);
    const int64_t stride = 32 * (int64_t)wps;
    /* four independent loads per lane and step, summed in a fixed order */
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t t = s + sub * 32 + lane;
    for (; t + 3 * stride < e; t += 4 * stride) {
        const float x0 = recap_load_mask(mask, t), x1 = recap_load_mask(mask, t + stride);
        const float x2 = recap_load_mask(mask, t + 2 * stride), x3 = recap_load_mask(mask, t + 3 * stride);
        a0 += x0; a1 += x1; a2 += x2; a3 += x3;
    }
    for (; t < e; t += stride) a0 += (double)recap_load_mask(mask, t);
    double parts[4] = {recap_warp_reduce((a0 + a1) + (a2 + a3), RECAP_OP_SUM), 0.0, 0.0, 0.0};
    if (p.logp && p.geo_mean) {
        /* GMPO: the means of min(d, eh) (for A > 0) and max(d, -el) (for A < 0), d = logp - old */
        const float* lp = (const float*)p.logp;
        const float* old = (const float*)p.old_logp;
        double up = 0.0, lo = 0.0;
        for (int64_t u = s + sub * 32 + lane; u < e; u += stride) {
            const float m = recap_load_mask(mask, u);
            if (m == 0.0f) continue;
            const double d = (double)lp[u] - (double)old[u];
            up += (double)m * fmin(d, (double)p.clip_high);
            lo += (double)m * fmax(d, -(double)p.clip_low);
        }
        parts[1] = recap_warp_reduce(up, RECAP_OP_SUM);
        parts[3] = recap_warp_reduce(lo, RECAP_OP_SUM);
    } else if (p.logp) {
        /* GSPO: the sequence's mean log-ratio over its unmasked tokens (masked ones are not read) */
        const float* lp = (const float*)p.logp;
        const float* old = (const float*)p.old_logp;
        double d = 0.0;
        for (int64_t u = s + sub * 32 + lane; u < e; u += stride) {
            const float m = recap_load_mask(mask, u);
            if (m != 0.0f) d += (double)m * ((double)lp[u] - (double)old[u]);
        }
        parts[1] = recap_warp_reduce(d, RECAP_OP_SUM);
    }
    if (p.rollout_logp) {
        /* sequence-level rollout IS: sum (or mean) of m (old - rollout) over the unmasked tokens */
        const float* old = (const float*)p.old_logp;
        const float* roll = (const float*)p.rollout_logp;
        double d = 0.0;
        for (int64_t u = s + sub * 32 + lane; u < e; u += stride) {
            const float m = recap_load_mask(mask, u);
            if (m != 0.0f) d += (double)m * ((double)old[u] - (double)roll[u]);
        }
        parts[2] = recap_warp_reduce(d, RECAP_OP_SUM);
    }
    /* the sequence's warps combine their sums in warp order (fixed: the same bits every run) */
    if (lane == 0) {
        s_part[warp][0] = parts[0]; s_part[warp][1] = parts[1]; s_part[warp][2] = parts[2]; s_part[warp][3] = parts[3];
    }
    __syncthreads();
    const int K = p.num_objectives;
    const uint32_t kbits = (K >= 32) ? 0xffffffffu : ((1u << K) - 1u);
    if (sub == 0 && lane == 0) {
        double acc = s_part[warp][0], d1 = s_part[warp][1], d2 = s_part[warp][2], d3 = s_part[warp][3];
        for (int w = 1; w < wps; ++w) {
            acc += s_part[warp + w][0]; d1 += s_part[warp + w][1]; d2 += s_part[warp + w][2]; d3 += s_part[warp + w][3];
        }
        int bad_cu = 0, bad_mem = 0;
        if (live) {
            ((double*)p.seq_tokens)[b] = acc;
            if (p.seq_inv) ((float*)p.seq_inv)[b] = recap_inv_norm(acc);
            if (p.logp) ((double*)p.seq_log_ratio)[b] = acc != 0.0 ? d1 / acc : 0.0;
            if (p.logp && p.geo_mean) ((double*)p.seq_log_ratio)[p.num_seqs + b] = acc != 0.0 ? d3 / acc : 0.0;
            if (p.rollout_logp) ((double*)p.seq_is_log)[b] = p.is_geometric ? (acc != 0.0 ? d2 / acc : 0.0) : d2;
            if (p.validate) {
                bad_cu = (b == 0 && cs != 0) || ce < cs || cs < 0 || ce > T || (b == p.num_seqs - 1 && ce != T);
                bad_mem = mem && (mem[b] & ~kbits) != 0u;
            }
        }
        s_nb[warp / wps] = live ? acc : 0.0;
        s_bad[warp / wps][0] = bad_cu;
        s_bad[warp / wps][1] = bad_mem;
    }
    /* tile_seq[i] = b for every token tile whose first token i * tile_tokens lies in [s, e) */
    if (live && e > s && p.tile_seq) {
        const int64_t first = (s + p.tile_tokens - 1) / p.tile_tokens;
        const int64_t last = (e + p.tile_tokens - 1) / p.tile_tokens; /* exclusive */
        for (int64_t i = first + sub * 32 + lane; i < last && i < p.num_tiles; i += stride) ((int32_t*)p.tile_seq)[i] = (int32_t)b;
    }
    __syncthreads();
    /* this block's partials: token weight and sequence count of each normalizer slot j <= K (slot K:
     * every sequence), summed over the block's sequences in order; then the error counts */
    double* part = (double*)p.partials;
    const int64_t G = gridDim.x;
    if (threadIdx.x <= K) {
        const int j = threadIdx.x;
        double tok = 0.0, seq = 0.0;
        for (int g = 0; g < seqs_per_block; ++g) {
            const int64_t bb = (int64_t)blockIdx.x * seqs_per_block + g;
            if (bb >= p.num_seqs) break;
            const uint32_t bits = mem ? mem[bb] : 0xffffffffu;
            if (j == K || ((bits >> j) & 1u)) {
                tok += s_nb[g];
                seq += s_nb[g] > 0.0 ? 1.0 : 0.0;
            }
        }
        part[(int64_t)(2 * j) * G + blockIdx.x] = tok;
        part[(int64_t)(2 * j + 1) * G + blockIdx.x] = seq;
    } else if (threadIdx.x == K + 1) {
        double bc = 0.0, bm = 0.0;
        for (int g = 0; g < seqs_per_block; ++g) { bc += s_bad[g][0]; bm += s_bad[g][1]; }
        part[(int64_t)(2 * K + 2) * G + blockIdx.x] = bc;
        part[(int64_t)(2 * K + 3) * G + blockIdx.x] = bm;
    }
    if (!recap_last_block((unsigned int*)p.ticket)) return;
    /* the last block: every block's partials reduced in block order, then the normalizers */
    recap_reduce_rows(part, G, RECAP_SEQ_PARTIAL_ROWS(K), s_fin, [](int) { return RECAP_OP_SUM; });
    double* norms = (double*)p.norms;
    if (threadIdx.x < RECAP_NORM_SLOTS) {
        /* every slot written (0 past K), so the output read back is defined memory throughout */
        const int j = threadIdx.x;
        const bool used = j <= K;
        const double tok = used ? s_fin[2 * j] : 0.0, seq = used ? s_fin[2 * j + 1] : 0.0;
        /* the normalizers in use: the local ones, the caller's, or an earlier pass's on the device */
        double ntok = tok, nseq = seq;
        if (used && p.override_dev) {
            const double* od = (const double*)p.override_dev;
            const int src = p.override_slot < 0 ? j : p.override_slot;
            ntok = od[RECAP_NORM_TOKENS * RECAP_NORM_SLOTS + src];
            nseq = od[RECAP_NORM_SEQS * RECAP_NORM_SLOTS + src];
        } else if (used && p.has_override) {
            ntok = p.override_tokens[j];
            nseq = p.override_seqs[j];
        }
        norms[RECAP_NORM_LOCAL_TOKENS * RECAP_NORM_SLOTS + j] = tok;
        norms[RECAP_NORM_LOCAL_SEQS * RECAP_NORM_SLOTS + j] = seq;
        norms[RECAP_NORM_TOKENS * RECAP_NORM_SLOTS + j] = ntok;
        norms[RECAP_NORM_SEQS * RECAP_NORM_SLOTS + j] = nseq;
        if (p.inv_norms) {
            ((float*)p.inv_norms)[j] = recap_inv_norm(ntok);
            ((float*)p.inv_norms)[RECAP_NORM_SLOTS + j] = recap_inv_norm(nseq);
        }
    }
    if (threadIdx.x == 0 && p.flags) {
        int f = 0;
        if (s_fin[2 * K + 2] > 0.0) f |= RECAP_ERR_CU_SEQLENS;
        if (s_fin[2 * K + 3] > 0.0) f |= RECAP_ERR_MEMBERSHIP;
        if (p.validate && p.lambda_dev) {
            const float* lam = (const float*)p.lambda_dev;
            for (int k = 0; k < K; ++k)
                if (!(recap_isfinite(lam[k]) && lam[k] >= 0.0f)) f |= RECAP_ERR_LAMBDA;
        }
        *(double*)p.flags = (double)f;
    }
    recap_ticket_reset((unsigned int*)p.ticket);
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_seq_stats_f32(const RecapSeqParams p) { seq_stats<float>(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_seq_stats_u8(const RecapSeqParams p) { seq_stats<uint8_t>(p); }

/* Grid of num_slots blocks, block j: out[j] = fixed-order reduction of the slot-major row
 * partials[j * num_blocks .. (j + 1) * num_blocks) (a sum, or min / max for those slots). */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_partials_finalize(const RecapFinalizeParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int j = blockIdx.x;
    const int op = recap_slot_op(j, p.min_bits, p.max_bits);
    const double v = recap_block_reduce_array((const double*)p.partials + (int64_t)j * p.num_blocks, p.num_blocks, op, s_red);
    if (threadIdx.x == 0) ((double*)p.out)[j] = v;
}

/* One block: completes the output of a loss from logits or from the last layer. With parts, the
 * chunks' statistic slots are combined in chunk order (sums, or min / max), their flags or-ed, the
 * batch's normalizers copied, and the fused loss recomputed from the merged slots; then the
 * entropy term's aggregate and mean, the labels found out of range (RECAP_ERR_LABELS), and the
 * total loss = fused loss - entropy_coef * agg(entropy), NaN when a check failed. */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_logits_finish(const RecapLogitsFinishParams p) {
    __shared__ double s_slots[3 * RECAP_MAX_OBJECTIVES + RECAP_GRPO_EXTRA_SLOTS];
    __shared__ float s_lambda[RECAP_MAX_OBJECTIVES];
    __shared__ int s_flags;
    const int K = p.num_objectives;
    const int S = 3 * K + RECAP_GRPO_EXTRA_SLOTS;
    const int64_t len = RECAP_OUT_SLOTS + S;
    double* out = (double*)p.out;
    const double* parts = (const double*)p.parts;
    if (threadIdx.x < K) s_lambda[threadIdx.x] = p.lambda_dev ? ((const float*)p.lambda_dev)[threadIdx.x] : p.lambda[threadIdx.x];
    if (threadIdx.x == 0) s_flags = 0;
    __syncthreads();
    if (threadIdx.x < S) {
        const int j = threadIdx.x;
        double acc = parts ? parts[RECAP_OUT_SLOTS + j] : out[RECAP_OUT_SLOTS + j];
        if (parts) {
            const int op = recap_grpo_slot_op(j, K);
            for (int i = 1; i < p.num_parts; ++i) {
                const double x = parts[i * len + RECAP_OUT_SLOTS + j];
                acc = op == RECAP_OP_SUM ? acc + x : (op == RECAP_OP_MIN ? fmin(acc, x) : fmax(acc, x));
            }
            out[RECAP_OUT_SLOTS + j] = acc;
        }
        s_slots[j] = acc;
    }
    if (parts && threadIdx.x < 4 * RECAP_NORM_SLOTS)
        out[RECAP_OUT_NORMS + threadIdx.x] = ((const double*)p.norms)[threadIdx.x];
    if (threadIdx.x == 0) {
        int f = parts ? 0 : (int)out[RECAP_OUT_FLAGS];
        for (int i = 0; parts && i < p.num_parts; ++i) f |= (int)parts[i * len + RECAP_OUT_FLAGS];
        if (p.entropy_agg) f |= (int)((const double*)p.entropy_agg)[RECAP_OUT_FLAGS];
        if (p.entropy_mean) f |= (int)((const double*)p.entropy_mean)[RECAP_OUT_FLAGS];
        s_flags = f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned bad = p.bad_labels ? *(const unsigned*)p.bad_labels : 0u;
        const int flags = s_flags | (bad ? RECAP_ERR_LABELS : 0);
        const double grpo = parts ? recap_grpo_loss_of(s_slots, s_lambda, K, p.has_ref != 0, p.beta) : out[RECAP_OUT_LOSS];
        const double ent = p.entropy_agg ? ((const double*)p.entropy_agg)[RECAP_OUT_SLOTS] : 0.0;
        const double ent_mean = p.entropy_mean ? ((const double*)p.entropy_mean)[RECAP_OUT_SLOTS] : ent;
        double* extra = out + len;
        extra[RECAP_LOGITS_GRPO_LOSS] = grpo;
        extra[RECAP_LOGITS_ENTROPY_LOSS] = ent;
        extra[RECAP_LOGITS_ENTROPY_MEAN] = ent_mean;
        extra[RECAP_LOGITS_BAD_LABELS] = (double)bad;
        out[RECAP_OUT_FLAGS] = (double)flags;
        /* rounded as the host rounds grpo.loss - entropy_coef * entropy_loss */
        out[RECAP_OUT_LOSS] = flags ? (double)NAN : __dsub_rn(grpo, __dmul_rn((double)p.entropy_coef, ent));
    }
}

template <int MAXK, typename MT>
__device__ __forceinline__ void reduce_token_pass(const RecapReduceParams& p) {
    __shared__ int32_t s_cu[RECAP_TILE_SEQ_CAP];
    __shared__ double s_red[RECAP_WARPS * MAXK];
    __shared__ float s_inv_tok[MAXK], s_inv_seq[MAXK];

    const int K = p.num_objectives;
    const double* norms = (const double*)p.norms;
    if (threadIdx.x < K) {
        s_inv_tok[threadIdx.x] = recap_inv_norm(norms[RECAP_NORM_TOKENS * RECAP_NORM_SLOTS + threadIdx.x]);
        s_inv_seq[threadIdx.x] = recap_inv_norm(norms[RECAP_NORM_SEQS * RECAP_NORM_SLOTS + threadIdx.x]);
    }
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const int64_t t0 = recap_tile_start(p.items_per_thread);
    const int64_t tile = (int64_t)blockDim.x * p.items_per_thread;
    const int64_t t1 = (t0 + tile < p.num_tokens) ? t0 + tile : p.num_tokens;
    const RecapTileSeqs ts = recap_tile_setup(cu, (const int32_t*)p.tile_seq, p.num_seqs, s_cu, t0 >= p.num_tokens);

    const MT* mask = (const MT*)p.mask;
    const float* losses = (const float*)p.losses;
    const uint32_t* mem = (const uint32_t*)p.membership;
    const double* seq_tokens = (const double*)p.seq_tokens;
    float* grad = (float*)p.grad;
    const float inv_k = 1.0f / (float)K;
    const float inv_c = (p.sum_norm_const > 0.0f) ? 1.0f / p.sum_norm_const : 0.0f;

    float acc[MAXK];
#pragma unroll
    for (int k = 0; k < MAXK; ++k) acc[k] = 0.0f;

    for (int i = 0; i < p.items_per_thread; ++i) {
        const int64_t t = t0 + (int64_t)i * blockDim.x + threadIdx.x;
        if (t >= t1) break;
        const float m = recap_load_mask(mask, t);
        const int b = recap_tile_find(ts, cu, s_cu, t);
        const uint32_t bits = mem ? mem[b] : 0xffffffffu;
        const float inv_nb = (p.agg_mode == RECAP_AGG_SEQ_MEAN_TOKEN_MEAN) ? recap_inv_norm(seq_tokens[b]) : 0.0f;
#pragma unroll
        for (int k = 0; k < MAXK; ++k) {
            if (k < K) {
                float g = 0.0f;
                if (m != 0.0f && ((bits >> k) & 1u)) {
                    const float w = m * recap_agg_weight(p.agg_mode, s_inv_tok[k], s_inv_seq[k], inv_nb, inv_c);
                    acc[k] += w * losses[t * K + k];
                    g = p.lambda[k] * w * inv_k;
                }
                grad[t * K + k] = g;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < MAXK; ++k)
        if (k < K) recap_block_reduce_slot(acc[k], k, K, RECAP_OP_SUM, s_red);
    recap_block_reduce_finish((double*)p.partials + blockIdx.x, gridDim.x, K, 0, 0, s_red);
}

#define RECAP_REDUCE_INST(MAXK)                                                                                  \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_reduce_k##MAXK##_f32(const RecapReduceParams p) { \
        reduce_token_pass<MAXK, float>(p);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_reduce_k##MAXK##_u8(const RecapReduceParams p) {  \
        reduce_token_pass<MAXK, uint8_t>(p);                                                                     \
    }
RECAP_REDUCE_INST(1)
RECAP_REDUCE_INST(2)
RECAP_REDUCE_INST(4)
RECAP_REDUCE_INST(8)
RECAP_REDUCE_INST(16)
