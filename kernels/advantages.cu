/*
 * advantages.cu — group advantages of rewards [B, K] (the math: train_math.cuh, recap_advantage,
 * recap_whiten and recap_difficulty_weight; the CPU reference: src/ops/advantages/mod.rs).
 *
 * Three launches, a fourth for REINFORCE++:
 *   recap_adv_prepare    grid = groups: GRPO-LEAD's length-dependent accuracy reward (mean and
 *                        unbiased std of the lengths of the group's correct responses, then
 *                        exp(-alpha z) or -1) into work[B, K] (double); other rewards copied.
 *   recap_adv_batch_std  grid = K_out: per output column the unbiased std of the batch's values
 *                        (TRL's batch scaling) and the count of its non-zero values (GPG).
 *   recap_adv_apply      grid = groups: per output column the group's mean, unbiased std and sum
 *                        (and, as the mode needs, its largest value, how many hold it and the largest
 *                        below it; the length-weighted mean), the advantage of each member,
 *                        GRPO-LEAD's difficulty weight w(rho) (w(1 - rho) for advantages <= 0, rho the
 *                        group's fraction correct), out[B, K_out] (float), or for REINFORCE++ the value
 *                        before the whitening into pre[B, K_out] (double); counts[g] = members,
 *                        counts[groups] += non-finite rewards, counts[groups + 1] += negative lengths,
 *                        counts[groups + 2] += non-finite ReMax baselines.
 *   recap_adv_whiten     grid = K_out, REINFORCE++ and GDPO columns only: REINFORCE++ the token-weighted
 *                        mean and unbiased variance of pre over the batch (each rollout weighs its
 *                        length); GDPO the mean and unbiased std over the rollouts; out.
 * GDPO with reward weights: pre = sum_j w_j grpo(work[i, j]) with each column's group mean and std
 * (a member's sum accumulates in column order, by the thread that owns the member).
 * With reward weights (TRL's sum-then-normalize) the value of rollout i is sum_k w_k work[i, k] and
 * there is one output column.
 * Threads. One block per group (or column); thread i takes candidates i, i + blockDim, ... : the
 * group's G consecutive rollouts, or every rollout whose group id is g. Sums are fixed-order block
 * reductions in double (no float atomics; the atomics count integers).
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
    double nnz = 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x) nnz += adv_value(p, work, i, k) != 0.0 ? 1.0 : 0.0;
    nnz = recap_block_allreduce(nnz, RECAP_OP_SUM, s_red);
    if (threadIdx.x == 0) {
        ((double*)p.batch_std)[k] = b >= 2 ? sqrt(ss / (double)(b - 1)) : 0.0;
        ((double*)p.batch_std)[p.num_outputs + k] = nnz;
    }
}

/* The response length of rollout i (0 without lengths; negative lengths are counted, then read as 0). */
__device__ __forceinline__ double adv_length(const RecapAdvParams& p, int64_t i) {
    if (!p.lengths) return 0.0;
    const int32_t l = ((const int32_t*)p.lengths)[i];
    return l > 0 ? (double)l : 0.0;
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_adv_apply(const RecapAdvParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int g = blockIdx.x;
    const int k_all = p.num_objectives;
    const float* r = (const float*)p.rewards;
    const double* work = (const double*)p.work;
    float* out = (float*)p.out;
    double* pre = (double*)p.pre;
    const int64_t range = adv_range(p);
    double cnt = 0.0, correct = 0.0;
    int bad = 0, bad_len = 0, bad_base = 0;
    for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
        const int64_t i = adv_member(p, g, j);
        if (i < 0) continue;
        cnt += 1.0;
        if (p.has_difficulty && r[i * k_all + p.correctness] > 0.0f) correct += 1.0;
        for (int k = 0; k < k_all; ++k) bad += !recap_isfinite(r[i * k_all + k]);
        if (p.baselines)
            for (int k = 0; k < p.num_outputs; ++k)
                bad_base += !recap_isfinite(((const float*)p.baselines)[i * p.num_outputs + k]);
        if (p.lengths) bad_len += ((const int32_t*)p.lengths)[i] < 0;
    }
    if (bad) atomicAdd((int*)p.counts + p.num_groups, bad);
    if (bad_len) atomicAdd((int*)p.counts + p.num_groups + 1, bad_len);
    if (bad_base) atomicAdd((int*)p.counts + p.num_groups + 2, bad_base);
    cnt = recap_block_allreduce(cnt, RECAP_OP_SUM, s_red);
    correct = recap_block_allreduce(correct, RECAP_OP_SUM, s_red);
    const int n = (int)cnt;
    if (threadIdx.x == 0) ((int32_t*)p.counts)[g] = n;
    const double rho = n > 0 ? correct / cnt : 0.0;
    const double w_pos = recap_difficulty_weight(rho, p.diff_a, p.diff_b, p.diff_rho0, p.diff_k);
    const double w_neg = recap_difficulty_weight(1.0 - rho, p.diff_a, p.diff_b, p.diff_rho0, p.diff_k);
    const int k_out = p.num_outputs;
    const double* batch = (const double*)p.batch_std;
    for (int k = 0; k < k_out; ++k) {
        const int mode = (int)((p.modes >> (4 * k)) & 15u);
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
        /* Pass@k: the largest value, how many hold it, the largest below it */
        double vmax = 0.0, v2nd = 0.0;
        int n_max = 0;
        if (mode == RECAP_ADV_PASSK || mode == RECAP_ADV_PASSK_DR) {
            double m = -(1.0 / 0.0), c = 0.0, m2 = -(1.0 / 0.0);
            for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                const int64_t i = adv_member(p, g, j);
                if (i >= 0) m = fmax(m, adv_value(p, work, i, k));
            }
            vmax = recap_block_allreduce(m, RECAP_OP_MAX, s_red);
            for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                const int64_t i = adv_member(p, g, j);
                if (i < 0) continue;
                const double v = adv_value(p, work, i, k);
                if (v == vmax) c += 1.0; else m2 = fmax(m2, v);
            }
            c = recap_block_allreduce(c, RECAP_OP_SUM, s_red);
            m2 = recap_block_allreduce(m2, RECAP_OP_MAX, s_red);
            n_max = (int)c;
            v2nd = n_max >= 2 ? vmax : m2;
        }
        /* OPO: the length-weighted mean */
        double len_mean = mu;
        if (mode == RECAP_ADV_OPO) {
            double sl = 0.0, slv = 0.0;
            for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                const int64_t i = adv_member(p, g, j);
                if (i < 0) continue;
                const double l = adv_length(p, i);
                sl += l;
                slv += l * adv_value(p, work, i, k);
            }
            sl = recap_block_allreduce(sl, RECAP_OP_SUM, s_red);
            slv = recap_block_allreduce(slv, RECAP_OP_SUM, s_red);
            if (sl > 0.0) len_mean = slv / sl;
        }
        if (mode == RECAP_ADV_GDPO && p.has_reward_weights) {
            /* normalize each reward column within the group, then the weighted sum */
            for (int c = 0; c < k_all; ++c) {
                double sc = 0.0;
                for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                    const int64_t i = adv_member(p, g, j);
                    if (i >= 0) sc += work[i * k_all + c];
                }
                sc = recap_block_allreduce(sc, RECAP_OP_SUM, s_red);
                const double mc = n > 0 ? sc / cnt : 0.0;
                double ssc = 0.0;
                for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                    const int64_t i = adv_member(p, g, j);
                    if (i >= 0) { const double d = work[i * k_all + c] - mc; ssc += d * d; }
                }
                ssc = recap_block_allreduce(ssc, RECAP_OP_SUM, s_red);
                const double sdc = n >= 2 ? sqrt(ssc / (cnt - 1.0)) : 0.0;
                for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
                    const int64_t i = adv_member(p, g, j);
                    if (i < 0) continue;
                    pre[i * k_out + k] += p.reward_weights[c] *
                                          recap_advantage(RECAP_ADV_GRPO, work[i * k_all + c], mc, sdc, sc, n, 0.0, 0.0,
                                                          0, mc, 0.0, 0.0, p.eps, p.verl_singletons, 0.0);
                }
            }
            continue;
        }
        const double batch_sd = batch[k];
        const double alpha = (double)p.num_rollouts / fmax(1.0, batch[k_out + k]);
        for (int64_t j = threadIdx.x; j < range; j += blockDim.x) {
            const int64_t i = adv_member(p, g, j);
            if (i < 0) continue;
            const double base = p.baselines ? (double)((const float*)p.baselines)[i * k_out + k] : 0.0;
            const double x = recap_advantage(mode, adv_value(p, work, i, k), mu, sd, sum, n, vmax, v2nd, n_max,
                                             len_mean, batch_sd, alpha, p.eps, p.verl_singletons, base);
            if (recap_adv_whitened(mode)) { pre[i * k_out + k] = x; continue; }
            float a = (float)x;
            if (p.has_difficulty) a = (float)((double)a * (a > 0.0f ? w_pos : w_neg));
            out[i * k_out + k] = a;
        }
    }
}

extern "C" __global__ void __launch_bounds__(RECAP_BLOCK) recap_adv_whiten(const RecapAdvParams p) {
    __shared__ double s_red[RECAP_WARPS];
    const int k = blockIdx.x;
    const int k_out = p.num_outputs;
    const int mode = (int)((p.modes >> (4 * k)) & 15u);
    if (!recap_adv_whitened(mode)) return;
    const int64_t b = p.num_rollouts;
    const double* pre = (const double*)p.pre;
    float* out = (float*)p.out;
    if (mode == RECAP_ADV_GDPO) {
        double s = 0.0;
        for (int64_t i = threadIdx.x; i < b; i += blockDim.x) s += pre[i * k_out + k];
        s = recap_block_allreduce(s, RECAP_OP_SUM, s_red);
        const double m = b > 0 ? s / (double)b : 0.0;
        double ss = 0.0;
        for (int64_t i = threadIdx.x; i < b; i += blockDim.x) { const double d = pre[i * k_out + k] - m; ss += d * d; }
        ss = recap_block_allreduce(ss, RECAP_OP_SUM, s_red);
        const double sd = b >= 2 ? sqrt(ss / (double)(b - 1)) : 0.0;
        for (int64_t i = threadIdx.x; i < b; i += blockDim.x)
            out[i * k_out + k] = (float)recap_batch_normalize(pre[i * k_out + k], m, sd, p.eps);
        return;
    }
    double n_tok = 0.0, s = 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
        const double l = adv_length(p, i);
        n_tok += l;
        s += l * pre[i * k_out + k];
    }
    n_tok = recap_block_allreduce(n_tok, RECAP_OP_SUM, s_red);
    s = recap_block_allreduce(s, RECAP_OP_SUM, s_red);
    const double m = s / (n_tok + 1e-8);
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
        const double d = pre[i * k_out + k] - m;
        ss += adv_length(p, i) * d * d;
    }
    ss = recap_block_allreduce(ss, RECAP_OP_SUM, s_red);
    const double var = n_tok >= 2.0 ? ss / (n_tok + 1e-8) * n_tok / (n_tok - 1.0) : 0.0;
    for (int64_t i = threadIdx.x; i < b; i += blockDim.x)
        out[i * k_out + k] = (float)recap_whiten(pre[i * k_out + k], m, var, n_tok);
}
