/*
 * train.cu — the `recap train` driver's device steps (math: train_math.cuh; the CPU backend of the
 * driver, cli/src/train/cpu.rs, computes the same in f64 on the host).
 *
 *   recap_train_row_stats  z = logits[r, :] (f32, from the policy GEMM): max_r = max_j z_j,
 *                          sum_r = sum_j exp(z_j - max_r) (double), lse_r = max_r + log(sum_r).
 *                          One block per row (grid-stride over rows), fixed-order block reductions.
 *   recap_train_sample     inverse-CDF sampling of G tokens from each prompt row r = q L + pos:
 *                          rollout q G + g, position pos, token t = (q G + g) L + pos draws
 *                          u = recap_draw(seed, counter_base + t) * S and takes the first j whose
 *                          running sum of exp(z_j - max_r) exceeds u (V - 1 if none), S the sum.
 *                          One block per row: thread i owns a contiguous segment of the vocabulary,
 *                          a block scan of the segment sums finds the segment holding u, and its
 *                          thread walks it.
 *   recap_train_gather     logp_t = z[feat_t, token_t] - lse[feat_t], one thread per token.
 *   recap_train_adamw      one AdamW step per element (recap_adamw) and the bf16 copy of the new
 *                          weights for the next GEMMs; grid-stride over elements.
 */
#include <cuda_bf16.h>
#include "common.cuh"
#include "train_math.cuh"

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_train_row_stats(const RecapTrainParams p) {
    __shared__ double s_red[RECAP_WARPS];
    for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
        const float* z = (const float*)p.logits + row * p.vocab;
        double mx = -(1.0 / 0.0);
        for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) mx = fmax(mx, (double)z[j]);
        mx = recap_block_allreduce(mx, RECAP_OP_MAX, s_red);
        double s = 0.0;
        for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) s += exp((double)z[j] - mx);
        s = recap_block_allreduce(s, RECAP_OP_SUM, s_red);
        if (threadIdx.x == 0) {
            ((float*)p.row_max)[row] = (float)mx;
            ((double*)p.row_sum)[row] = s;
            ((double*)p.row_lse)[row] = mx + log(s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_train_sample(const RecapTrainParams p) {
    __shared__ double s_prefix[RECAP_BLOCK + 1];
    __shared__ int32_t s_tok;
    const int64_t row = blockIdx.x;
    const int64_t v = p.vocab;
    const float* z = (const float*)p.logits + row * v;
    const double mx = (double)((const float*)p.row_max)[row];
    const int64_t seg = (v + blockDim.x - 1) / blockDim.x;
    const int64_t lo = (int64_t)threadIdx.x * seg;
    const int64_t hi = lo + seg < v ? lo + seg : v;
    double part = 0.0;
    for (int64_t j = lo; j < hi; ++j) part += exp((double)z[j] - mx);
    s_prefix[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (int i = 0; i < (int)blockDim.x; ++i) { const double x = s_prefix[i]; s_prefix[i] = acc; acc += x; }
        s_prefix[blockDim.x] = acc;
    }
    __syncthreads();
    const double start = s_prefix[threadIdx.x], end = s_prefix[threadIdx.x + 1], total = s_prefix[blockDim.x];
    const int64_t q = row / p.resp_len, pos = row % p.resp_len;
    int32_t* tokens = (int32_t*)p.tokens;
    for (int g = 0; g < p.group; ++g) {
        const int64_t t = (q * p.group + g) * p.resp_len + pos;
        const double u = recap_draw(p.seed, (uint64_t)(p.counter_base + t)) * total;
        if (threadIdx.x == 0) s_tok = (int32_t)(v - 1);
        __syncthreads();
        if (start <= u && u < end) {
            double acc = start;
            int64_t tok = hi - 1;
            for (int64_t j = lo; j < hi; ++j) {
                acc += exp((double)z[j] - mx);
                if (u < acc) { tok = j; break; }
            }
            s_tok = (int32_t)tok;
        }
        __syncthreads();
        if (threadIdx.x == 0) tokens[t] = s_tok;
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_train_gather(const RecapTrainParams p) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int32_t* feat = (const int32_t*)p.feat;
    const int32_t* tokens = (const int32_t*)p.tokens;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += stride) {
        const int64_t f = feat[t];
        const double z = (double)((const float*)p.logits)[f * p.vocab + tokens[t]];
        ((float*)p.logp)[t] = (float)(z - ((const double*)p.row_lse)[f]);
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_train_adamw(const RecapTrainParams p) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    float* w = (float*)p.w;
    float* m = (float*)p.m;
    float* v = (float*)p.v;
    const float* g = (const float*)p.grad;
    __nv_bfloat16* wb = (__nv_bfloat16*)p.w_bf16;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        float mi = m[i], vi = v[i];
        const float wi = recap_adamw(w[i], g[i], &mi, &vi, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.bias1,
                                     p.bias2);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
        wb[i] = __float2bfloat16_rn(wi);
    }
}
