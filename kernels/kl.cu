/*
 * kl.cu — kernel 2: KL to the reference policy, per token, value and gradient; and the rollout
 * rejection mask (verl's rollout_rs) from the KL estimators between the trainer and the rollout.
 *
 * Math (grpo_math.cuh, recap_kl_token): for diff = logp - ref_logp, estimators k1, abs, k2, k3
 * (low_var_kl: x = clamp(-diff, -20, 20), clamp(exp(x) - x - 1, -10, 10)) and the straight-through
 * k1+ / k3+ (value of kX, gradient of k2). Masked tokens (mask weight 0) give kl = grad = 0 and are
 * not read; without a mask every token is computed.
 *
 * Threads. Elementwise, one thread per token, grid-stride loop.
 */
#include "common.cuh"

template <typename MT>
__device__ __forceinline__ void kl_tokens(const RecapKlParams& p) {
    const MT* mask = (const MT*)p.mask;
    const float* logp = (const float*)p.logp;
    const float* ref = (const float*)p.ref_logp;
    float* kl = (float*)p.kl;
    float* grad = (float*)p.grad;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += stride) {
        const float m = mask ? recap_load_mask(mask, t) : 1.0f;
        if (m == 0.0f) { kl[t] = 0.0f; grad[t] = 0.0f; continue; }
        const RecapKlToken kt = recap_kl_token(logp[t], ref[t], p.kl_estimator);
        kl[t] = kt.value;
        grad[t] = kt.grad;
    }
}

/*
 * Rollout rejection. Math (grpo_math.cuh, recap_rs_stat / recap_rs_keep): per unmasked token the
 * statistics k1, k2, k3 of lr = old - rollout; per sequence their sums s_k, the mask weight n, the
 * maxima and the count of NaN log-ratios. Criterion i (level, statistic, bounds) rejects a token when
 * the token's statistic fails (token level), or, for the sequence levels, when s_k, s_k / (n + 1e-8)
 * or max_k (0 for an empty sequence) fails or the sequence holds a NaN (every token of it);
 * flags[t] has bit i set when criterion i rejects token t, 0 at masked tokens (which are not read).
 *
 * Threads. One warp per sequence (RECAP_WARPS per block); lanes stride over its tokens, the warp's
 * sums in a fixed shuffle tree (double), broadcast from lane 0; a second pass writes the flags.
 */
template <typename MT>
__device__ __forceinline__ void rejection(const RecapRejectParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t b = (int64_t)blockIdx.x * RECAP_WARPS + (threadIdx.x >> 5);
    if (b >= p.num_seqs) return; /* whole warps leave; nothing below synchronizes the block */
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const MT* mask = (const MT*)p.mask;
    const float* lr = (const float*)p.log_ratio;
    int32_t* flags = (int32_t*)p.flags;
    const int64_t s = cu[b], e = cu[b + 1];
    const double ninf = -1.0 / 0.0;
    double sum[3] = {0.0, 0.0, 0.0}, mx[3] = {ninf, ninf, ninf}, n = 0.0, nan = 0.0;
    for (int64_t t = s + lane; t < e; t += 32) {
        const float m = recap_load_mask(mask, t);
        if (m == 0.0f) continue;
        const double x = (double)lr[t];
        n += (double)m;
        if (x != x) { nan += 1.0; continue; }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
            const double v = recap_rs_stat(x, k);
            sum[k] += (double)m * v;
            mx[k] = fmax(mx[k], v);
        }
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
        sum[k] = __shfl_sync(0xffffffffu, recap_warp_reduce(sum[k], RECAP_OP_SUM), 0);
        mx[k] = __shfl_sync(0xffffffffu, recap_warp_reduce(mx[k], RECAP_OP_MAX), 0);
    }
    n = __shfl_sync(0xffffffffu, recap_warp_reduce(n, RECAP_OP_SUM), 0);
    nan = __shfl_sync(0xffffffffu, recap_warp_reduce(nan, RECAP_OP_SUM), 0);
    int32_t seq_bits = 0, token_crit = 0;
    for (int i = 0; i < p.num_criteria; ++i) {
        const int st = p.statistic[i];
        double v;
        switch (p.level[i]) {
        case RECAP_RS_TOKEN: token_crit |= 1 << i; continue;
        case RECAP_RS_SEQ_SUM: v = sum[st]; break;
        case RECAP_RS_SEQ_MEAN: v = sum[st] / (n + 1e-8); break;
        default: v = mx[st] == ninf ? 0.0 : mx[st]; break;
        }
        if (nan > 0.0 || !recap_rs_keep(v, st, p.lower[i], p.upper[i])) seq_bits |= 1 << i;
    }
    for (int64_t t = s + lane; t < e; t += 32) {
        const float m = recap_load_mask(mask, t);
        if (m == 0.0f) { flags[t] = 0; continue; }
        int32_t bits = seq_bits;
        if (token_crit) {
            const double x = (double)lr[t];
            for (int i = 0; i < p.num_criteria; ++i)
                if (((token_crit >> i) & 1) && !recap_rs_keep(recap_rs_stat(x, p.statistic[i]), p.statistic[i],
                                                              p.lower[i], p.upper[i]))
                    bits |= 1 << i;
        }
        flags[t] = bits;
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_rejection_f32(const RecapRejectParams p) {
    rejection<float>(p);
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_rejection_u8(const RecapRejectParams p) {
    rejection<uint8_t>(p);
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_kl_f32(const RecapKlParams p) { kl_tokens<float>(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_kl_u8(const RecapKlParams p) { kl_tokens<uint8_t>(p); }
