/*
 * rollout_is.cu — rollout importance-sampling weights as their own op (verl's
 * compute_rollout_correction_weights), with verl's normalization of the weights to mean 1 over the
 * batch (rollout_is_batch_normalize).
 *
 * Math. lr_t = old_t - rollout_t at the unmasked tokens (mask weight m_t; masked tokens are not
 * read). The log-weight is lw_t = lr_t (token level), lw_b = sum_{t in b} m_t lr_t (sequence level,
 * the log of the product of the token ratios) or that sum / n_b with n_b = sum_{t in b} m_t (0 for
 * n_b = 0; geometric level). recap_rollout_is (grpo_math.cuh, the fused loss's formula) gives the
 * raw ratio exp(clamp(lw, +-20)), the applied weight (truncate: min(ratio, upper); mask: the ratio
 * inside [lower, upper], else 0; metrics only: 1) and whether it was corrected. weights[t] is the
 * applied weight of token t (or of its sequence), 0 at masked tokens.
 * The batch mean counts units: at token level each unmasked token with weight m_t, contributing
 * m_t w_t; at the sequence levels each sequence with n_b > 0 once, contributing w_b n_b / (n_b + 1e-8)
 * (verl's per-sequence masked mean of its weights); mean = recap_is_batch_mean of the sums, and with
 * normalization every weight is divided by recap_is_batch_factor(mean) (the mean where > 1e-8).
 *
 * Threads. recap_rollout_is_{f32,u8}: one warp per sequence (RECAP_WARPS per block), lanes stride
 * over its tokens; the sequence's sums in a fixed shuffle tree (double); lane 0 writes the sequence's
 * RECAP_ISW_* statistics into column b of the slot-major partials, which recap_partials_finalize
 * (reduce.cu) reduces in a fixed order (no atomics). recap_rollout_is_scale: elementwise,
 * grid-stride, reading the reduced statistics.
 */
#include "common.cuh"

template <typename MT>
__device__ __forceinline__ void rollout_is_weights(const RecapIsParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t b = (int64_t)blockIdx.x * RECAP_WARPS + (threadIdx.x >> 5);
    if (b >= p.num_seqs) return; /* whole warps leave; nothing below synchronizes the block */
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const MT* mask = (const MT*)p.mask;
    const float* lr = (const float*)p.log_ratio;
    float* w = (float*)p.weights;
    const int64_t s = cu[b], e = cu[b + 1];
    const double inf = 1.0 / 0.0;
    double sum = 0.0, units = 0.0, rmin = inf, rmax = -inf, corr = 0.0, nan = 0.0;
    if (p.level == RECAP_IS_TOKEN) {
        for (int64_t t = s + lane; t < e; t += 32) {
            const float m = recap_load_mask(mask, t);
            if (m == 0.0f) { w[t] = 0.0f; continue; }
            const float x = lr[t];
            const RecapIsWeight iw = recap_rollout_is(x, p.mode, p.lower, p.upper);
            w[t] = iw.weight;
            units += (double)m;
            sum += (double)m * (double)iw.weight;
            if (x == x) {
                rmin = fmin(rmin, (double)iw.ratio);
                rmax = fmax(rmax, (double)iw.ratio);
            } else {
                nan += 1.0;
            }
            corr += iw.corrected ? (double)m : 0.0;
        }
        sum = recap_warp_reduce(sum, RECAP_OP_SUM);
        units = recap_warp_reduce(units, RECAP_OP_SUM);
        rmin = recap_warp_reduce(rmin, RECAP_OP_MIN);
        rmax = recap_warp_reduce(rmax, RECAP_OP_MAX);
        corr = recap_warp_reduce(corr, RECAP_OP_SUM);
        nan = recap_warp_reduce(nan, RECAP_OP_SUM);
    } else {
        double n = 0.0, d = 0.0;
        for (int64_t t = s + lane; t < e; t += 32) {
            const float m = recap_load_mask(mask, t);
            if (m == 0.0f) continue;
            n += (double)m;
            d += (double)m * (double)lr[t];
        }
        n = __shfl_sync(0xffffffffu, recap_warp_reduce(n, RECAP_OP_SUM), 0);
        d = __shfl_sync(0xffffffffu, recap_warp_reduce(d, RECAP_OP_SUM), 0);
        const float lw = (float)(p.level == RECAP_IS_GEOMETRIC ? (n != 0.0 ? d / n : 0.0) : d);
        const RecapIsWeight iw = recap_rollout_is(lw, p.mode, p.lower, p.upper);
        for (int64_t t = s + lane; t < e; t += 32) w[t] = recap_load_mask(mask, t) != 0.0f ? iw.weight : 0.0f;
        if (n > 0.0) {
            units = 1.0;
            sum = (double)iw.weight * (n / (n + 1e-8));
            corr = iw.corrected ? 1.0 : 0.0;
            if (lw == lw) {
                rmin = rmax = (double)iw.ratio;
            } else {
                nan = 1.0;
            }
        }
    }
    if (lane == 0) {
        double* out = (double*)p.partials;
        const int64_t nb = p.num_seqs;
        out[RECAP_ISW_SUM * nb + b] = sum;
        out[RECAP_ISW_UNITS * nb + b] = units;
        out[RECAP_ISW_RATIO_MIN * nb + b] = rmin;
        out[RECAP_ISW_RATIO_MAX * nb + b] = rmax;
        out[RECAP_ISW_CORRECTED * nb + b] = corr;
        out[RECAP_ISW_NAN * nb + b] = nan;
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_rollout_is_f32(const RecapIsParams p) {
    rollout_is_weights<float>(p);
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_rollout_is_u8(const RecapIsParams p) {
    rollout_is_weights<uint8_t>(p);
}

/* weights[t] /= the batch factor (in float, as a caller dividing the weights by it would). */
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_rollout_is_scale(const RecapIsParams p) {
    const double* st = (const double*)p.stats;
    const float f = (float)recap_is_batch_factor(recap_is_batch_mean(st[RECAP_ISW_SUM], st[RECAP_ISW_UNITS], p.level));
    if (f == 1.0f) return;
    float* w = (float*)p.weights;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += stride) w[t] = w[t] / f;
}
