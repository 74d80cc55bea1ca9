/*
 * gae.cu — generalized advantage estimation (verl's compute_gae_advantage_return, PPO's default
 * estimator). The CPU reference and the math: src/ops/gae.rs.
 *
 * Math. Per sequence, backward over its tokens t with mask weight m, reward r and value v, from
 * nv = lg = 0 (the next value and the running advantage):
 *
 *   delta = r + gamma nv - v;   lg <- m (delta + gamma lam lg) + (1 - m) lg;   nv <- m v + (1 - m) nv
 *   adv_t = lg,   ret_t = adv_t + v_t
 *
 * so masked tokens (tool output between turns, padding) carry the state through. Whitening (verl's
 * masked_whiten over the batch): mean = sum m adv / (sum m + 1e-8), var the unbiased masked variance,
 * adv <- (adv - mean) / sqrt(var + 1e-8) at every token; a batch whose mask sums to at most 1 gets 0
 * (verl raises). A masked token's (m = 0) reward is not read, nor its value but for its return.
 *
 * Threads. recap_gae_scan_{f32,u8}: one warp per sequence (RECAP_WARPS per block). Each token's
 * update is an affine map of the state (nv, lg):
 *   nv' = a nv + c,   lg' = d nv + e lg + f,
 *   a = 1 - m, c = m v, d = m gamma, e = m gamma lam + 1 - m, f = m (r - v)
 * The warp takes chunks of 32 tokens from the end; lane l holds token chunk_end - 32 + l. A
 * shuffle-down suffix scan composes each lane's map with the later lanes' (5 steps, double, fixed
 * order), applied to the carried state gives every lane its state; lane 0's is the next carry.
 * With whitening, the sequence's statistics: per-lane sums in double, a fixed shuffle tree, a
 * second pass over the written advantages for the centred squares (this warp wrote them;
 * __syncwarp orders it).
 * recap_gae_stats: one block merges the sequences' statistics in a fixed order (Chan's update, per
 * thread over sequences i, i + 256, ..., then a fixed tree) into the mean and 1 / sqrt(var + 1e-8).
 * recap_gae_whiten: elementwise, grid-stride. No float atomics; the same bits on every run.
 */
#include "common.cuh"

struct GaeMap {
    double a, c, d, e, f;
};

/* p o q: q first (the later token), then p. */
__device__ __forceinline__ GaeMap gae_compose(const GaeMap& p, const GaeMap& q) {
    GaeMap r;
    r.a = p.a * q.a;
    r.c = p.a * q.c + p.c;
    r.d = p.d * q.a + p.e * q.d;
    r.e = p.e * q.e;
    r.f = p.d * q.c + p.e * q.f + p.f;
    return r;
}

__device__ __forceinline__ GaeMap gae_shfl_down(const GaeMap& m, int off) {
    GaeMap r;
    r.a = __shfl_down_sync(0xffffffffu, m.a, off);
    r.c = __shfl_down_sync(0xffffffffu, m.c, off);
    r.d = __shfl_down_sync(0xffffffffu, m.d, off);
    r.e = __shfl_down_sync(0xffffffffu, m.e, off);
    r.f = __shfl_down_sync(0xffffffffu, m.f, off);
    return r;
}

__device__ __forceinline__ double gae_warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ void gae_bad(const RecapGaeParams& p, int slot, int64_t tok) {
    atomicMin((int*)p.bad + slot, (int)tok);
}

template <typename MT>
__device__ __forceinline__ void gae_scan(const RecapGaeParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t s = (int64_t)blockIdx.x * RECAP_WARPS + (threadIdx.x >> 5);
    if (s >= p.num_seqs) return; /* whole warps leave; nothing below synchronizes the block */
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const int64_t start = cu[s], n = (int64_t)cu[s + 1] - start;
    const MT* mask = (const MT*)p.mask;
    const float* rew = (const float*)p.token_rewards;
    const float* val = (const float*)p.values;
    float* adv = (float*)p.advantages;
    float* ret = (float*)p.returns;
    double nv = 0.0, lg = 0.0;  /* the state after the chunk (every lane holds it) */
    double w_sum = 0.0, x_sum = 0.0;
    for (int64_t end = n; end > 0; end -= 32) {
        const int64_t i = end - 32 + lane, tok = start + i;
        GaeMap m = {1.0, 0.0, 0.0, 1.0, 0.0};
        double mw = 0.0, v = 0.0;
        if (i >= 0) {
            mw = (double)recap_load_mask(mask, tok);
            if (mw != 0.0) {
                const float r = rew[tok], vf = val[tok];
                if (!isfinite(r)) gae_bad(p, 0, tok);
                if (!isfinite(vf)) gae_bad(p, 1, tok);
                v = (double)vf;
                m.a = 1.0 - mw;
                m.c = mw * v;
                m.d = mw * p.gamma;
                m.e = mw * p.gamma * p.lam + (1.0 - mw);
                m.f = mw * ((double)r - v);
            }
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const GaeMap later = gae_shfl_down(m, off);
            if (lane + off < 32) m = gae_compose(m, later);
        }
        const double lg_t = m.d * nv + m.e * lg + m.f;
        const double nv_t = m.a * nv + m.c;
        if (i >= 0) {
            const float x = (float)lg_t;
            adv[tok] = x;
            ret[tok] = (float)(lg_t + (double)val[tok]); /* every token, as verl */
            w_sum += mw;
            x_sum += mw * (double)x;
        }
        nv = __shfl_sync(0xffffffffu, nv_t, 0);
        lg = __shfl_sync(0xffffffffu, lg_t, 0);
    }
    if (!p.whiten) return; /* warp-uniform: the statistics feed only the whitening */
    w_sum = gae_warp_sum(w_sum);
    x_sum = gae_warp_sum(x_sum);
    const double mean = w_sum > 0.0 ? x_sum / w_sum : 0.0;
    __syncwarp();
    double m2 = 0.0;
    for (int64_t i = lane; i < n; i += 32) {
        const double mw = (double)recap_load_mask(mask, start + i);
        if (mw != 0.0) {
            const double dx = (double)adv[start + i] - mean;
            m2 += mw * dx * dx;
        }
    }
    m2 = gae_warp_sum(m2);
    if (lane == 0) {
        double* st = (double*)p.row_stats + 3 * s;
        st[0] = w_sum;
        st[1] = x_sum;
        st[2] = m2;
    }
}

/* Merges (w, sum, m2) of a group of tokens into (W, S, M2) (Chan et al.'s parallel update, in sums:
 * the means' difference squared times W w / (W + w) is (sum W - S w)^2 / (W w (W + w))). */
__device__ __forceinline__ void gae_merge(double& W, double& S, double& M2, double w, double sum, double m2) {
    if (w == 0.0) return;
    if (W == 0.0) {
        W = w; S = sum; M2 = m2;
        return;
    }
    const double tot = W + w, d = sum * W - S * w;
    M2 += m2 + d * d / (W * w * tot);
    W = tot;
    S += sum;
}

__device__ __forceinline__ void gae_stats(const RecapGaeParams& p) {
    __shared__ double s_st[3 * RECAP_BLOCK];
    const double* rows = (const double*)p.row_stats;
    double W = 0.0, S = 0.0, M2 = 0.0;
    for (int64_t s = threadIdx.x; s < p.num_seqs; s += blockDim.x)
        gae_merge(W, S, M2, rows[3 * s], rows[3 * s + 1], rows[3 * s + 2]);
    s_st[3 * threadIdx.x] = W;
    s_st[3 * threadIdx.x + 1] = S;
    s_st[3 * threadIdx.x + 2] = M2;
    for (int half = RECAP_BLOCK / 2; half > 0; half >>= 1) {
        __syncthreads();
        if (threadIdx.x < half) {
            const int o = 3 * (threadIdx.x + half);
            gae_merge(W, S, M2, s_st[o], s_st[o + 1], s_st[o + 2]);
            s_st[3 * threadIdx.x] = W;
            s_st[3 * threadIdx.x + 1] = S;
            s_st[3 * threadIdx.x + 2] = M2;
        }
    }
    if (threadIdx.x == 0) {
        double* out = (double*)p.scale;
        if (W > 1.0) {
            const double var = M2 / (W + 1e-8) * (W / (W - 1.0));
            out[0] = S / (W + 1e-8);
            out[1] = 1.0 / sqrt(var + 1e-8);
        } else {
            out[0] = 0.0;
            out[1] = 0.0;
        }
    }
}

__device__ __forceinline__ void gae_whiten(const RecapGaeParams& p) {
    const double* sc = (const double*)p.scale;
    const double mean = sc[0], inv = sc[1];
    float* adv = (float*)p.advantages;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens;
         t += (int64_t)gridDim.x * blockDim.x)
        adv[t] = inv == 0.0 ? 0.0f : (float)(((double)adv[t] - mean) * inv);
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_gae_scan_f32(const RecapGaeParams p) { gae_scan<float>(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_gae_scan_u8(const RecapGaeParams p) { gae_scan<uint8_t>(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_gae_stats(const RecapGaeParams p) { gae_stats(p); }
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_gae_whiten(const RecapGaeParams p) { gae_whiten(p); }
