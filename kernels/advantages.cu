/*
 * advantages.cu — group advantages of rewards [B, K] (the math: train_math.cuh, recap_advantage and
 * recap_difficulty_weight; the CPU reference: src/advantages.rs).
 *
 * Three launches:
 *   recap_adv_prepare    grid = groups: GRPO-LEAD's length-dependent accuracy reward (mean and
 *                        unbiased std of the lengths of the group's correct responses, then
 *                        exp(-alpha z) or -1) into work[B, K] (double); other rewards copied.
 *   recap_adv_batch_std  grid = K: the unbiased std of each column of work (TRL's batch scaling).
 *   recap_adv_apply      grid = groups: per objective the group's mean, unbiased std and sum, the
 *                        advantage of each member, GRPO-LEAD's difficulty weight w(rho) (w(1 - rho)
 *                        for advantages <= 0, rho the group's fraction correct), out[B, K] (float);
 *                        counts[g] = members, counts[groups] += non-finite rewards.
 * With reward weights (TRL's sum-then-normalize) the value of rollout i is sum_k w_k work[i, k] and
 * there is one output column.
 * Threads. One block per group (or column); thread i takes candidates i, i + blockDim, ... : the
 * group's G consecutive rollouts, or every rollout whose group id is g. Sums are fixed-order block
 * reductions in double (no float atomics; the one atomic counts integers).
 */
#include "common.cuh"
#include "train_math.cuh"

/* Candidates of a group: G consecutive rollouts, or all B rollouts filtered by id. */
__device__ __forceinline__ int64_t adv_range(const RecapAdvParams& p) {
    return p.group_ids ? (int64_t)p.num_rollouts : (int64_t)p.group_size;
}

/* Rollout index of candidate j of group g, or -1 when it is not a member. */
__device__ __forceinline__ int64_t adv_member(const RecapAdvParams& p, int g, int64_t j) {
    if (p.group_ids) return ((const int32_t*)p.group_ids)[j] == g ? j : -1;
    return (int64_t)g * p.group_size + j;
}

/* The value output column k of rollout i is the advantage of: work[i, k], or with reward weights
 * sum_j w_j work[i, j] (fixed order). */
__device__ __forceinline__ double adv_value(const RecapAdvParams& p, const double* work, int64_t i, int k) {
    const int k_all = p.num_objectives;
    if (!p.has_reward_weights) return work[i * k_all + k];
    double x = 0.0;
    for (int j = 0; j < k_all; ++j) x += p.reward_weights[j] * work[i * k_all + j];
    return x;
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_adv_prepare(const RecapAdvParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int g = blockIdx.x;
    const int k_all = p.num_objectives;
    const float* r = (const float*)p.rewards;
    const int32_t* len = (const int32_t*)p.lengths;
    double* work = (double*)p.work;
    const int64_t range = adv_range(p);
    const int c = p.correctness;
    double mu = 0.0, sd = 0.0;
    if (p.has_length) {
        double cnt = 0.0, sum = 0.0;
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i >= 0 && r[i * k_all + c] > 0.0f) { cnt += 1.0; sum += (double)len[i]; }
        }
        cnt = recap_block_allreduce(cnt, RECAP_OP_SUM, s_red);
        sum = recap_block_allreduce(sum, RECAP_OP_SUM, s_red);
        mu = cnt > 0.0 ? sum / cnt : 0.0;
        double ss = 0.0;
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i >= 0 && r[i * k_all + c] > 0.0f) { const double d = (double)len[i] - mu; ss += d * d; }
        }
        ss = recap_block_allreduce(ss, RECAP_OP_SUM, s_red);
        sd = cnt >= 2.0 ? sqrt(ss / (cnt - 1.0)) : 0.0;
    }
    for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
        const int64_t i = adv_member(p, g, j);
        if (i < 0) continue;
        for (int k = 0; k < k_all; ++k) {
            double x = (double)r[i * k_all + k];
            if (p.has_length && k == c) {
                const double z = sd > 0.0 ? ((double)len[i] - mu) / sd : 0.0;
                x = x > 0.0 ? exp(-p.length_alpha * z) : -1.0;
            }
            work[i * k_all + k] = x;
        }
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_adv_batch_std(const RecapAdvParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int k = blockIdx.x;
    const int64_t b = p.num_rollouts;
    const double* work = (const double*)p.work;
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x) sum += adv_value(p, work, i, k);
    sum = recap_block_allreduce(sum, RECAP_OP_SUM, s_red);
    const double mu = b > 0 ? sum / (double)b : 0.0;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x) { const double d = adv_value(p, work, i, k) - mu; ss += d * d; }
    ss = recap_block_allreduce(ss, RECAP_OP_SUM, s_red);
    if (threadIdx.x == 0) ((double*)p.batch_std)[k] = b >= 2 ? sqrt(ss / (double)(b - 1)) : 0.0;
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_adv_apply(const RecapAdvParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int g = blockIdx.x;
    const int k_all = p.num_objectives;
    const float* r = (const float*)p.rewards;
    const double* work = (const double*)p.work;
    float* out = (float*)p.out;
    const int64_t range = adv_range(p);
    double cnt = 0.0, correct = 0.0;
    int bad = 0;
    for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
        const int64_t i = adv_member(p, g, j);
        if (i < 0) continue;
        cnt += 1.0;
        if (p.has_difficulty && r[i * k_all + p.correctness] > 0.0f) correct += 1.0;
        for (int k = 0; k < k_all; ++k) bad += !recap_isfinite(r[i * k_all + k]);
    }
    if (bad) atomicAdd((int*)p.counts + p.num_groups, bad);
    cnt = recap_block_allreduce(cnt, RECAP_OP_SUM, s_red);
    correct = recap_block_allreduce(correct, RECAP_OP_SUM, s_red);
    const int n = (int)cnt;
    if (threadIdx.x == 0) ((int32_t*)p.counts)[g] = n;
    const double rho = n > 0 ? correct / cnt : 0.0;
    const double w_pos = recap_difficulty_weight(rho, p.diff_a, p.diff_b, p.diff_rho0, p.diff_k);
    const double w_neg = recap_difficulty_weight(1.0 - rho, p.diff_a, p.diff_b, p.diff_rho0, p.diff_k);
    const int k_out = p.num_outputs;
    for (int k = 0; k < k_out; ++k) {
        double sum = 0.0;
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i >= 0) sum += adv_value(p, work, i, k);
        }
        sum = recap_block_allreduce(sum, RECAP_OP_SUM, s_red);
        const double mu = n > 0 ? sum / cnt : 0.0;
        double ss = 0.0;
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i >= 0) { const double d = adv_value(p, work, i, k) - mu; ss += d * d; }
        }
        ss = recap_block_allreduce(ss, RECAP_OP_SUM, s_red);
        const double sd = n >= 2 ? sqrt(ss / (cnt - 1.0)) : 0.0;
        const int mode = (int)((p.modes >> (2 * k)) & 3u);
        const double batch_sd = mode == RECAP_ADV_BATCH_STD ? ((const double*)p.batch_std)[k] : 0.0;
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i < 0) continue;
            float a = (float)recap_advantage(mode, adv_value(p, work, i, k), mu, sd, sum, n, batch_sd, p.eps,
                                               p.verl_singletons);
            if (p.has_difficulty) a = (float)((double)a * (a > 0.0f ? w_pos : w_neg));
            out[i * k_out + k] = a;
        }
    }
}
