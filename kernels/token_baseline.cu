/*
 * token_baseline.cu — verl's optimal token baseline (the CPU reference and the math:
 * src/ops/token_baseline/mod.rs). Per token t of a sequence, m its mask weight:
 *
 *   w_t = (1 - 2 exp(old_logp_t) + sum_pi_squared_t) rho_t^2     (rho: rollout IS weight, or 1)
 *   W_t = sum_{j <= t} m_j w_j        G_t = sum_{j >= t} m_j r_j  (returns)
 *   B_p = sum_i m G W / (sum_i m W + eps)   over the group's members i at aligned position p
 *   A_t = (G_t - B_p(t)) m_t
 *
 * p(t) is the token's index in its sequence, or (multi_turn) its index among the unmasked tokens.
 * A group of one member has B = 0; with multi_turn a sequence without unmasked tokens is no member.
 * zero_tail: when one member is strictly the longest (by unmasked tokens), its positions from the
 * second longest length on get B = 0.
 *
 * Two launches:
 *   recap_otb_scan_*   grid = B, one block per sequence: chunks of blockDim tokens, a block-wide
 *                      inclusive scan (double, fixed order: the warps' shuffle scans, then warp
 *                      order) of m w forward (W) and of m r backward (G), and of the unmasked count
 *                      (the multi-turn positions); writes W, G, returns = G, advantages = 0, the
 *                      aligned token table, the sequence's live count, and atomicMin's the first
 *                      token of each argument with a non-finite value at an unmasked token.
 *   recap_otb_apply_*  grid = groups, one block per group: thread 0 finds the member count, the
 *                      longest aligned length and the zero tail; thread i takes positions
 *                      i, i + blockDim, ...: the sums over the members in ascending order (the
 *                      reference's order), the baseline, and each member's advantage at p.
 * No float atomics; the results are the same bits on every run.
 */
#include "common.cuh"

/* Inclusive scan of one value per thread over the block (blockDim.x == RECAP_BLOCK); *total gets
 * the block's sum. Fixed order. Call from every thread. */
template <typename V>
__device__ __forceinline__ V otb_block_scan(V v, V* s_warp, V* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const V y = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += y;
    }
    __syncthreads(); /* s_warp may still be read by the previous call */
    if (lane == 31) s_warp[warp] = v;
    __syncthreads();
    V before = 0, all = 0;
    for (int w = 0; w < RECAP_WARPS; ++w) {
        if (w < warp) before += s_warp[w];
        all += s_warp[w];
    }
    *total = all;
    return before + v;
}

__device__ __forceinline__ void otb_bad(const RecapOtbParams& p, int slot, int64_t tok) {
    atomicMin((int*)p.bad + slot, (int)tok);
}

template <typename MT>
__device__ void otb_scan(const RecapOtbParams& p) {
    __shared__ double s_w[RECAP_WARPS];
    __shared__ int s_c[RECAP_WARPS];
    const int s = blockIdx.x;
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const int64_t start = cu[s], n = (int64_t)cu[s + 1] - start;
    const MT* mask = (const MT*)p.mask;
    const float* old = (const float*)p.old_logp;
    const float* spp = (const float*)p.sum_pi_squared;
    const float* rho = (const float*)p.rollout_is_weights;
    const float* r = (const float*)p.token_rewards;
    double* cum_w = (double*)p.cum_w;
    double* to_go = (double*)p.to_go;
    int32_t* aligned = (int32_t*)p.aligned;
    float* adv = (float*)p.advantages;
    float* ret = (float*)p.returns;

    double carry = 0.0;
    int count = 0;
    for (int64_t base = 0; base < n; base += blockDim.x) {
        const int64_t i = base + threadIdx.x, tok = start + i;
        double x = 0.0;
        int c = 0;
        if (i < n) {
            const double m = (double)recap_load_mask(mask, tok);
            if (m != 0.0) {
                const float o = old[tok], q = spp[tok];
                if (!isfinite(o)) otb_bad(p, 0, tok);
                if (!isfinite(q)) otb_bad(p, 1, tok);
                double w = 1.0 - 2.0 * exp((double)o) + (double)q;
                if (rho) {
                    const float h = rho[tok];
                    if (!isfinite(h)) otb_bad(p, 2, tok);
                    w *= (double)h * (double)h;
                }
                x = m * w;
                c = 1;
            }
        }
        double x_tot;
        int c_tot;
        const double xs = otb_block_scan(x, s_w, &x_tot);
        const int cs = otb_block_scan(c, s_c, &c_tot);
        if (i < n) {
            cum_w[tok] = carry + xs;
            adv[tok] = 0.0f;
            if (p.multi_turn && c) aligned[start + count + cs - 1] = (int32_t)tok;
        }
        carry += x_tot;
        count += c_tot;
    }
    if (threadIdx.x == 0) ((int32_t*)p.live)[s] = count;

    carry = 0.0;
    for (int64_t base = 0; base < n; base += blockDim.x) {
        const int64_t i = n - 1 - (base + threadIdx.x), tok = start + i;
        double x = 0.0;
        if (i >= 0) {
            const double m = (double)recap_load_mask(mask, tok);
            if (m != 0.0) {
                const float v = r[tok];
                if (!isfinite(v)) otb_bad(p, 3, tok);
                x = m * (double)v;
            }
        }
        double x_tot;
        const double xs = otb_block_scan(x, s_w, &x_tot);
        if (i >= 0) {
            to_go[tok] = carry + xs;
            ret[tok] = (float)(carry + xs);
        }
        carry += x_tot;
    }
}

/* Token of member s at aligned position q (q below its aligned length). */
__device__ __forceinline__ int64_t otb_token(const RecapOtbParams& p, int s, int64_t q) {
    const int64_t start = ((const int32_t*)p.cu_seqlens)[s];
    return p.multi_turn ? (int64_t)((const int32_t*)p.aligned)[start + q] : start + q;
}

template <typename MT>
__device__ void otb_apply(const RecapOtbParams& p) {
    __shared__ int s_n, s_longest, s_who, s_from;
    const int g = blockIdx.x;
    const int32_t* off = (const int32_t*)p.group_offsets;
    const int32_t* members = (const int32_t*)p.group_members;
    const int32_t* cu = (const int32_t*)p.cu_seqlens;
    const int32_t* live = (const int32_t*)p.live;
    const MT* mask = (const MT*)p.mask;
    const double* cum_w = (const double*)p.cum_w;
    const double* to_go = (const double*)p.to_go;
    float* adv = (float*)p.advantages;
    const int lo = off[g], hi = off[g + 1];
    if (threadIdx.x == 0) {
        int n = 0, longest = 0, top = -1, second = -1, who = -1;
        for (int j = lo; j < hi; ++j) {
            const int s = members[j], lv = live[s];
            if (p.multi_turn && lv == 0) continue;
            ++n;
            const int len = p.multi_turn ? lv : cu[s + 1] - cu[s];
            longest = max(longest, len);
            if (lv > top) { second = top; top = lv; who = s; }
            else if (lv == top) { second = top; }
            else if (lv > second) { second = lv; }
        }
        s_n = n;
        s_longest = longest;
        s_who = (p.zero_tail && n > 1 && top > second) ? who : -1;
        s_from = second;
    }
    __syncthreads();
    const int n = s_n, who = s_who, from = s_from;
    for (int64_t q = threadIdx.x; q < s_longest; q += blockDim.x) {
        double base = 0.0;
        if (n > 1) {
            double num = 0.0, den = 0.0;
            for (int j = lo; j < hi; ++j) {
                const int s = members[j], lv = live[s];
                if (p.multi_turn && lv == 0) continue;
                if (q >= (p.multi_turn ? lv : cu[s + 1] - cu[s])) continue;
                const int64_t tok = otb_token(p, s, q);
                const double mw = (double)recap_load_mask(mask, tok) * cum_w[tok];
                num += mw * to_go[tok];
                den += mw;
            }
            base = num / (den + p.eps);
        }
        for (int j = lo; j < hi; ++j) {
            const int s = members[j], lv = live[s];
            if (p.multi_turn && lv == 0) continue;
            if (q >= (p.multi_turn ? lv : cu[s + 1] - cu[s])) continue;
            const int64_t tok = otb_token(p, s, q);
            const double b = (s == who && q >= from) ? 0.0 : base;
            adv[tok] = (float)((to_go[tok] - b) * (double)recap_load_mask(mask, tok));
        }
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_otb_scan_f32(const RecapOtbParams p) {
    otb_scan<float>(p);
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_otb_scan_u8(const RecapOtbParams p) {
    otb_scan<uint8_t>(p);
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_otb_apply_f32(const RecapOtbParams p) {
    otb_apply<float>(p);
}
extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_otb_apply_u8(const RecapOtbParams p) {
    otb_apply<uint8_t>(p);
}
