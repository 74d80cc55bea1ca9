/*
 * train_math.cuh — the per-element formulas of group advantages and of the `recap train` driver,
 * one definition for the GPU (advantages.cu, train.cu) and the host (host_shim.c, compiled by `cc`
 * and called by the CPU backend of the driver and by the tests).
 *
 * Counter-based draw (SplitMix64 of seed and counter), a uniform double in [0, 1):
 *   z = seed * 0x9E3779B97F4A7C15 ^ (counter + 0x632BE59BD9B4E019), two xor-shift-multiply rounds,
 *   a final xor-shift, then the top 53 bits / 2^53. The same (seed, counter) gives the same draw
 *   on every backend, so a seed reproduces a run.
 * Advantage of reward v in a group of n rollouts with mean mu, unbiased std sd and sum s:
 *   grpo (v - mu) / (sd + eps) (0 when n < 2); dr_grpo v - mu; rloo v - (s - v) / (n - 1)
 *   (0 when n < 2); batch_std (v - mu) / (batch_sd + eps); grpo_passk (vmax - v2nd) / (sd + eps)
 *   for the group's unique best, 0 for the others; opo v - sum(len v) / sum(len); gpg
 *   B / max(1, nonzero) (v - mu); reinforce_plus_plus v and its baseline v - mu, whitened over the
 *   batch's tokens (recap_whiten); gdpo the grpo value of each reward column, their weighted sum
 *   normalized over the batch (recap_batch_normalize); remax v - b, b the rollout's baseline.
 * GRPO-LEAD difficulty weight: w(rho) = a + (b - a) / (1 + exp(k (rho - rho0))).
 * AdamW (decoupled weight decay, as torch.optim.AdamW):
 *   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
 *   w -= lr * ((m / c1) / (sqrt(v / c2) + eps) + wd * w),  c1 = 1 - b1^t, c2 = 1 - b2^t.
 */
#ifndef RECAP_TRAIN_MATH_CUH
#define RECAP_TRAIN_MATH_CUH

#include "grpo_math.cuh"

RECAP_HD double recap_draw(uint64_t seed, uint64_t counter) {
    uint64_t z = (seed * 0x9E3779B97F4A7C15ull) ^ (counter + 0x632BE59BD9B4E019ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0; /* 2^53 */
}

/* The advantage of value v in a group of n with mean mu, unbiased std sd, sum `sum`, largest value
 * vmax held by n_max members, largest value below it v2nd (vmax when n_max >= 2) and length-weighted
 * mean len_mean (sum len v / sum len; mu when the lengths sum to 0); batch_sd is the unbiased std of
 * the batch's values, batch_alpha = B / max(1, non-zero values of the batch) (GPG). REINFORCE++'s
 * modes return the value before the whitening (recap_whiten). A group of one gives 0 in the
 * group-relative modes (its own mean is its baseline), or with verl_singletons verl's convention:
 * mean 0 and std 1, so GRPO gives v / (1 + eps), Dr. GRPO, RLOO and OPO v, batch std
 * v / (batch_sd + eps), GPG batch_alpha v, the REINFORCE++ baseline v before the whitening; Pass@k
 * gives 0 either way (verl raises). ReMax gives v - baseline whatever the group. */
RECAP_HD double recap_advantage(int mode, double v, double mu, double sd, double sum, int n, double vmax,
                                double v2nd, int n_max, double len_mean, double batch_sd, double batch_alpha,
                                double eps, int verl_singletons, double baseline) {
    if (mode == RECAP_ADV_RFPP) return v;
    if (mode == RECAP_ADV_REMAX) return v - baseline;
    if (mode == RECAP_ADV_GDPO) mode = RECAP_ADV_GRPO; /* per reward column, before the weighted sum */
    if (n == 1 && verl_singletons) {
        switch (mode) {
        case RECAP_ADV_GRPO: return v / (1.0 + eps);
        case RECAP_ADV_BATCH_STD: return v / (batch_sd + eps);
        case RECAP_ADV_PASSK:
        case RECAP_ADV_PASSK_DR: return 0.0;
        case RECAP_ADV_GPG: return batch_alpha * v;
        default: return v; /* dr_grpo, rloo, opo, the REINFORCE++ baseline */
        }
    }
    switch (mode) {
    case RECAP_ADV_GRPO: return n < 2 ? 0.0 : (v - mu) / (sd + eps);
    case RECAP_ADV_DR_GRPO: return v - mu;
    case RECAP_ADV_RLOO: return n < 2 ? 0.0 : v - (sum - v) / (double)(n - 1);
    case RECAP_ADV_BATCH_STD: return (v - mu) / (batch_sd + eps);
    case RECAP_ADV_PASSK:
    case RECAP_ADV_PASSK_DR: {
        if (n < 2 || n_max != 1 || v != vmax) return 0.0;
        const double gap = vmax - v2nd;
        return mode == RECAP_ADV_PASSK ? gap / (sd + eps) : gap;
    }
    case RECAP_ADV_OPO: return v - len_mean;
    case RECAP_ADV_GPG: return batch_alpha * (v - mu);
    default: return v - mu; /* the REINFORCE++ baseline, before the whitening */
    }
}

/* 1: the mode's advantages take a second, batch-wide step (REINFORCE++'s whitening over the
 * tokens, GDPO's normalization over the rollouts). */
RECAP_HD int recap_adv_whitened(int mode) {
    return mode == RECAP_ADV_RFPP || mode == RECAP_ADV_RFPP_BASELINE || mode == RECAP_ADV_GDPO;
}

/* verl's masked_whiten of a value x constant over each rollout's tokens: with N = sum len, the token
 * mean m = S / (N + 1e-8) (S = sum len x) and the unbiased token variance
 * var = (sum len (x - m)^2) / (N + 1e-8) * N / (N - 1), (x - m) / sqrt(var + 1e-8); 0 when N < 2. */
RECAP_HD double recap_whiten(double x, double m, double var, double n_tokens) {
    return n_tokens < 2.0 ? 0.0 : (x - m) / sqrt(var + 1e-8);
}

/* GDPO's (TRL's normalize_then_sum) last step: (x - m) / (sd + eps), m and sd the mean and unbiased
 * std of the batch's combined values (sd 0 for fewer than two rollouts). */
RECAP_HD double recap_batch_normalize(double x, double m, double sd, double eps) { return (x - m) / (sd + eps); }

RECAP_HD double recap_difficulty_weight(double rho, double a, double b, double rho0, double k) {
    return a + (b - a) / (1.0 + exp(k * (rho - rho0)));
}

/* One AdamW step of one element; returns the new weight and updates *m, *v. */
RECAP_HD float recap_adamw(float w, float g, float* m, float* v, float lr, float b1, float b2, float eps, float wd,
                           float c1, float c2) {
    *m = b1 * *m + (1.0f - b1) * g;
    *v = b2 * *v + (1.0f - b2) * g * g;
    const float update = (*m / c1) / (sqrtf(*v / c2) + eps);
    return w - lr * (update + wd * w);
}

#endif /* RECAP_TRAIN_MATH_CUH */
