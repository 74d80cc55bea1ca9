/*
 * logits.cu — kernels 4 and 5: log-probabilities and entropy straight from logits, and their
 * gradient back into the logits, with no [T, V] temporaries.
 *
 * Math (grpo_math.cuh). Row t of logits z (V entries, row stride ld >= V, dtype bf16/f16/f32), label
 * y_t, temperature tau, x = z / tau:
 *   forward:  LSE_t = log sum_j exp(x_j);  logp_t = x_y - LSE_t;  H_t = LSE_t - sum_j p_j x_j
 *             (computed as log s - a / s from the online state, see RecapSoftmaxState), and on
 *             request sum_j p_j^2 = q / s^2 (verl's sum_pi_squared) from the same read; a label
 *             equal to ignore_index gives logp = 0 (and valid = 0), one outside [0, V) counts in
 *             bad_labels and gives logp = 0.
 *   backward: dz_j = (1/tau) (g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H)
 *                             + 2 g_spp p_j (p_j - sum_k p_k^2)),  p_j = exp(x_j - LSE)
 *             written in the logits' dtype, into a separate buffer or over the logits themselves.
 * Rows without loss are not read: in the loss paths (a mask and `valid` given) the forward skips a
 * row whose mask weight is 0 (outputs 0); the backward writes a row with no upstream gradient
 * (g_logp = g_ent = g_spp = 0) as zeros without reading it.
 * Vocabulary shards (tensor parallelism, `sharded`): the logits are columns [label_offset,
 * label_offset + V) of the whole vocabulary; the forward gives each row's partial statistics
 * (LSE and entropy of the shard, the label's logit x_y or -inf when it is another shard's), which
 * recap_tp_combine merges over the P shards into the whole vocabulary's logp, entropy and LSE:
 *   M = max_r lse_r,  LSE = M + log sum_r exp(lse_r - M),  w_r = exp(lse_r - LSE),
 *   H = sum_r w_r (H_r - log w_r),  logp = x_y - LSE;
 * the backward on a shard is the formula above with the combined LSE and H (no one-hot where the
 * label is elsewhere), so each shard gets its slice of the whole gradient without a collective.
 * fp32 arithmetic throughout; 64-bit row offsets, so T * V beyond 2^31 elements is fine.
 *
 * Threads. One block per row. Each thread walks the row in groups of 16 bytes (8 bf16/f16 or 4
 * f32), loaded as one vector when every row start is 16-byte aligned, else element by element, with
 * the same arithmetic either way; the forward keeps an online (max, sum, sum of shifted x) state per
 * thread, merged in a fixed warp-tree and warp order, so the result is deterministic and a row's
 * bits do not depend on the batch that holds it, its position, or its layout
 * (tests/batch_invariance.rs). The backward reads each element once and writes it once, in place or not:
 * the same thread reads z_j before writing dz_j, so in-place equals out-of-place bit for bit.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

__device__ __forceinline__ float recap_to_float(float v) { return v; }
__device__ __forceinline__ float recap_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float recap_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T recap_from_float(float v);
template <> __device__ __forceinline__ float recap_from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half recap_from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 recap_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

/* x = z / tau as a rounded product (__fmul_rn: never contracted into a later FMA), so the forward's
 * LSE and the backward's x - LSE see the same x. */
template <typename T>
__device__ __forceinline__ float recap_scaled(T z, float inv_tau) { return __fmul_rn(recap_to_float(z), inv_tau); }

__device__ __forceinline__ RecapSoftmaxState recap_shfl_state(RecapSoftmaxState st, int off) {
    RecapSoftmaxState o;
    o.m = __shfl_down_sync(0xffffffffu, st.m, off);
    o.s = __shfl_down_sync(0xffffffffu, st.s, off);
    o.a = __shfl_down_sync(0xffffffffu, st.a, off);
    o.q = __shfl_down_sync(0xffffffffu, st.q, off);
    return o;
}

/* Folds values v[0..n) (already divided by tau) into the state: one rebase to their maximum. */
template <int N>
__device__ __forceinline__ RecapSoftmaxState recap_softmax_add_vec(RecapSoftmaxState st, const float* v) {
    float mx = v[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = fmaxf(mx, v[i]);
    if (mx > st.m) st = recap_softmax_rebase(st, mx);
    if (st.m == RECAP_NEG_INF) return st; /* every value so far is -inf */
#pragma unroll
    for (int i = 0; i < N; ++i) st = recap_softmax_add(st, v[i]);
    return st;
}

/* Row `row`'s mask weight: the f32 weight, 1 or 0 for a u8 mask, 1 without a mask. */
__device__ __forceinline__ float recap_mask_weight(const RecapLogitsParams& p, int64_t row) {
    if (!p.mask) return 1.0f;
    return p.mask_u8 ? (((const uint8_t*)p.mask)[row] ? 1.0f : 0.0f) : ((const float*)p.mask)[row];
}

/* A label counted in bad_labels: not ignore_index, outside the logits' columns, and not another
 * shard's (unsharded logits hold every column). */
__device__ __forceinline__ bool recap_label_bad(const RecapLogitsParams& p, int y, int64_t V) {
    const int64_t yl = (int64_t)y - p.label_offset;
    return y != p.ignore_index && !(yl >= 0 && yl < V) && !p.sharded;
}

template <typename T, bool VEC>
__device__ __forceinline__ void logprob_forward(const RecapLogitsParams& p) {
    __shared__ RecapSoftmaxState s_warp[RECAP_WARPS];
    const int64_t row = blockIdx.x;
    const T* __restrict__ z = (const T*)p.logits + row * p.ld;
    const float inv_tau = p.inv_temperature;
    const int64_t V = p.vocab;
    /* The loss paths (`valid` out, a mask in) do not read a row whose mask weight is 0: logp,
     * entropy, LSE and sum_pi_squared 0, valid 0 (its label is still checked). Block-uniform. */
    if (p.valid && p.mask) {
        if (recap_mask_weight(p, row) == 0.0f) {
            if (threadIdx.x == 0) {
                if (recap_label_bad(p, ((const int32_t*)p.labels)[row], V)) atomicAdd((unsigned*)p.bad_labels, 1u);
                if (p.logp) ((float*)p.logp)[row] = 0.0f;
                if (p.label_logit) ((float*)p.label_logit)[row] = RECAP_NEG_INF;
                ((float*)p.lse)[row] = 0.0f;
                if (p.entropy) ((float*)p.entropy)[row] = 0.0f;
                if (p.sum_pi_squared) ((float*)p.sum_pi_squared)[row] = 0.0f;
                ((float*)p.valid)[row] = 0.0f;
            }
            return;
        }
    }
    RecapSoftmaxState st = recap_softmax_init();
    /* Thread i takes the groups of W = 16 / sizeof(T) values i, i + blockDim, ... and the tail
     * V % W values one each, in both variants: VEC loads a group in one 16-byte load (rows 16-byte
     * aligned), the other element by element, and the arithmetic is the same, so a row's results
     * do not depend on its layout (leading dimension, alignment) or its batch. */
    constexpr int W = 16 / sizeof(T);
    const int64_t nvec = V / W;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
        float v[W];
        if (VEC) {
            const uint4 raw = ((const uint4*)z)[i];
            const T* e = (const T*)&raw;
#pragma unroll
            for (int k = 0; k < W; ++k) v[k] = recap_scaled(e[k], inv_tau);
        } else {
#pragma unroll
            for (int k = 0; k < W; ++k) v[k] = recap_scaled(z[i * W + k], inv_tau);
        }
        st = recap_softmax_add_vec<W>(st, v);
    }
    for (int64_t j = nvec * W + threadIdx.x; j < V; j += blockDim.x) {
        float v = recap_scaled(z[j], inv_tau);
        st = recap_softmax_add_vec<1>(st, &v);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = recap_softmax_merge(st, recap_shfl_state(st, off));
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        RecapSoftmaxState acc = s_warp[0];
        for (int w = 1; w < RECAP_WARPS; ++w) acc = recap_softmax_merge(acc, s_warp[w]);
        const float log_s = logf(acc.s);
        const float lse = acc.m + log_s;
        const int y = ((const int32_t*)p.labels)[row];
        const bool ignored = y == p.ignore_index;
        const int64_t yl = (int64_t)y - p.label_offset;
        const bool here = yl >= 0 && yl < V;
        if (recap_label_bad(p, y, V)) atomicAdd((unsigned*)p.bad_labels, 1u); /* an integer count: order does not matter */
        const bool use = !ignored && here;
        const float x_y = use ? recap_scaled(z[yl], inv_tau) : RECAP_NEG_INF;
        if (p.logp) ((float*)p.logp)[row] = use ? x_y - lse : 0.0f;
        if (p.label_logit) ((float*)p.label_logit)[row] = x_y;
        ((float*)p.lse)[row] = lse;
        if (p.entropy) ((float*)p.entropy)[row] = log_s - acc.a / acc.s;
        if (p.sum_pi_squared) ((float*)p.sum_pi_squared)[row] = recap_softmax_sum_sq(acc);
        if (p.valid) ((float*)p.valid)[row] = use ? recap_mask_weight(p, row) : 0.0f;
    }
}

/* One logit's gradient: the log-prob and entropy terms, plus the sum_pi_squared term only when it
 * has an upstream gradient (so the other gradients keep their bits, signed zeros included). */
__device__ __forceinline__ float recap_grad_x(float x, int is_label, float lse, float h, float g, float ge, float sq,
                                              float gs, float inv_tau) {
    const float d = recap_logit_grad(x, is_label, lse, h, g, ge, inv_tau);
    return gs != 0.0f ? d + recap_logit_grad_sum_sq(x, lse, sq, gs, inv_tau) : d;
}

template <typename T, bool VEC>
__device__ __forceinline__ void logprob_backward(const RecapLogitsParams& p) {
    const int64_t row = blockIdx.x;
    const T* z = (const T*)p.logits + row * p.ld;  /* may alias dz (in place): no __restrict__ */
    T* dz = (T*)p.dlogits + row * p.out_ld;
    const float inv_tau = p.inv_temperature;
    const int64_t V = p.vocab;
    const int y0 = ((const int32_t*)p.labels)[row];
    const int64_t yl = (int64_t)y0 - p.label_offset;
    const bool here = yl >= 0 && yl < V;
    /* the one-hot column (none when the label is another shard's) */
    const int64_t y = here ? yl : -1;
    const bool use = y0 != p.ignore_index && (here || p.sharded);
    const float g = (use && p.g_logp) ? ((const float*)p.g_logp)[row] : 0.0f;
    const float ge = p.g_entropy ? p.g_entropy_scale * ((const float*)p.g_entropy)[row] : 0.0f;
    const float lse = ((const float*)p.lse)[row];
    const float h = (ge != 0.0f) ? ((const float*)p.entropy)[row] : 0.0f;
    /* the gradient of sum_pi_squared (callers that differentiate it, e.g. through verl's OTB) */
    const float gs = p.g_sum_pi_squared ? ((const float*)p.g_sum_pi_squared)[row] : 0.0f;
    const float sq = (gs != 0.0f) ? ((const float*)p.sum_pi_squared)[row] : 0.0f;
    if (g == 0.0f && ge == 0.0f && gs == 0.0f) {
        /* no upstream gradient (a masked or ignored row): the row's gradient is exactly 0 (what
         * recap_grad_x gives), written without reading the logits. Block-uniform. */
        constexpr int W = 16 / sizeof(T);
        int64_t z0 = 0;
        if (VEC) {
            const uint4 zero = {0u, 0u, 0u, 0u};
            for (int64_t i = threadIdx.x; i < V / W; i += blockDim.x) ((uint4*)dz)[i] = zero;
            z0 = V / W * W;
        }
        for (int64_t j = z0 + threadIdx.x; j < V; j += blockDim.x) dz[j] = recap_from_float<T>(0.0f);
        return;
    }
    int64_t j0 = 0;
    if (VEC) {
        constexpr int W = 16 / sizeof(T);
        const int64_t nvec = V / W;
        for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
            uint4 raw = ((const uint4*)z)[i];
            const T* e = (const T*)&raw;
            uint4 out;
            T* o = (T*)&out;
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const int64_t j = i * W + k;
                o[k] = recap_from_float<T>(recap_grad_x(recap_scaled(e[k], inv_tau), j == y, lse, h, g, ge, sq, gs, inv_tau));
            }
            ((uint4*)dz)[i] = out;
        }
        j0 = nvec * W;
    }
    for (int64_t j = j0 + threadIdx.x; j < V; j += blockDim.x) {
        dz[j] = recap_from_float<T>(recap_grad_x(recap_scaled(z[j], inv_tau), j == y, lse, h, g, ge, sq, gs, inv_tau));
    }
}

#define RECAP_LOGITS_INST(T, SUF)                                                                                   \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_logprob_fwd_##SUF(const RecapLogitsParams p) {  \
        logprob_forward<T, false>(p);                                                                               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_logprob_fwd_vec_##SUF(const RecapLogitsParams p) { \
        logprob_forward<T, true>(p);                                                                                \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_logprob_bwd_##SUF(const RecapLogitsParams p) {  \
        logprob_backward<T, false>(p);                                                                              \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_logprob_bwd_vec_##SUF(const RecapLogitsParams p) { \
        logprob_backward<T, true>(p);                                                                               \
    }
RECAP_LOGITS_INST(float, f32)
RECAP_LOGITS_INST(__half, f16)
RECAP_LOGITS_INST(__nv_bfloat16, bf16)

/* The combine of the P shards' partials (ascending vocab_start) into each row's logp, entropy and
 * LSE, and with 4 planes sum_j p_j^2 = sum_r w_r^2 q_r (q_r the shard's own, w_r = exp(lse_r - LSE)),
 * in shard order (so the same partials give the same bits whatever order the collective delivered
 * them in, once sorted). One thread per row, grid-stride. */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_tp_combine(const RecapTpParams p) {
    const float* __restrict__ part = (const float*)p.partials;
    const int64_t T = p.num_rows;
    const int P = p.num_shards;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t planes = p.planes;
    /* shard r's planes: lse at (planes r) T, entropy at (planes r + 1) T, label logit at
     * (planes r + 2) T, sum_j p_j^2 at (planes r + 3) T */
#define RECAP_TP_AT(r, c, t) part[((int64_t)(r) * planes + (c)) * T + (t)]
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < T; t += stride) {
        float m = RECAP_NEG_INF, x_y = RECAP_NEG_INF;
        for (int r = 0; r < P; ++r) {
            m = fmaxf(m, RECAP_TP_AT(r, 0, t));
            const float xr = RECAP_TP_AT(r, 2, t);
            if (xr > RECAP_NEG_INF) x_y = xr;
        }
        float s = 0.0f;
        for (int r = 0; r < P; ++r) s += expf(RECAP_TP_AT(r, 0, t) - m);
        const float lse = m + logf(s);
        float h = 0.0f, sq = 0.0f;
        for (int r = 0; r < P; ++r) {
            const float lw = RECAP_TP_AT(r, 0, t) - lse;
            const float w = expf(lw);
            if (w > 0.0f) {
                h += w * (RECAP_TP_AT(r, 1, t) - lw);
                if (p.sum_pi_squared) sq += w * w * RECAP_TP_AT(r, 3, t);
            }
        }
#undef RECAP_TP_AT
        if (p.sum_pi_squared) ((float*)p.sum_pi_squared)[t] = sq;
        const int y = ((const int32_t*)p.labels)[t];
        const bool ignored = y == p.ignore_index;
        if (!ignored && !(x_y > RECAP_NEG_INF)) atomicAdd((unsigned*)p.missing, 1u);
        ((float*)p.logp)[t] = (ignored || !(x_y > RECAP_NEG_INF)) ? 0.0f : x_y - lse;
        ((float*)p.entropy)[t] = h;
        ((float*)p.lse)[t] = lse;
    }
}

/* f32 -> bf16 rounding of a [T, V] gradient chunk, for the GEMMs of the fused-linear path when the
 * logits are kept in f32. Params: logits = const float* in, dlogits = bf16* out, num_rows = number of
 * elements. One thread per element, grid-stride. */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_f32_to_bf16(const RecapLogitsParams p) {
    const float* __restrict__ in = (const float*)p.logits;
    __nv_bfloat16* __restrict__ out = (__nv_bfloat16*)p.dlogits;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.num_rows; i += stride)
        out[i] = __float2bfloat16_rn(in[i]);
}

/* The fused-linear path's rows that carry loss (its synchronous call): gather, dst row i = src row
 * idx[i], or with `sharded` = 1 scatter, dst row idx[i] = src row i. Params: logits = src, dlogits =
 * dst, labels = idx (int32, n entries), num_rows = n, vocab = units per row, ld = the unit's bytes
 * (1, 2 or 4). One thread per unit, grid-stride; a plain copy (bit for bit). */
template <typename U>
__device__ __forceinline__ void recap_move_rows(const RecapLogitsParams& p) {
    const U* __restrict__ src = (const U*)p.logits;
    U* __restrict__ dst = (U*)p.dlogits;
    const int32_t* __restrict__ idx = (const int32_t*)p.labels;
    const int64_t len = p.vocab, total = p.num_rows * len;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int64_t r = i / len, c = i - r * len, other = idx[r];
        if (p.sharded)
            dst[other * len + c] = src[r * len + c];
        else
            dst[r * len + c] = src[other * len + c];
    }
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_move_rows(const RecapLogitsParams p) {
    if (p.ld == 4)
        recap_move_rows<uint32_t>(p);
    else if (p.ld == 2)
        recap_move_rows<uint16_t>(p);
    else
        recap_move_rows<uint8_t>(p);
}

/* valid[t] = mask weight of token t, or 0 where labels[t] == ignore_index (the fused-linear path
 * needs the whole batch's mask before any logits exist). Params: labels, mask (+ mask_u8), valid,
 * num_rows = T, ignore_index. One thread per token, grid-stride. */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_valid_mask(const RecapLogitsParams p) {
    const int32_t* __restrict__ y = (const int32_t*)p.labels;
    float* __restrict__ valid = (float*)p.valid;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < p.num_rows; t += stride) {
        valid[t] = (y[t] == p.ignore_index) ? 0.0f : recap_mask_weight(p, t);
    }
}
