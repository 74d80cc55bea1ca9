/*
 * kl.cu — kernel 2: KL to the reference policy, per token, value and gradient.
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

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_kl_f32(const RecapKlParams p) { kl_tokens<float>(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_kl_u8(const RecapKlParams p) { kl_tokens<uint8_t>(p); }
