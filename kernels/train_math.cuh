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
 *   (0 when n < 2); batch_std (v - mu) / (batch_sd + eps).
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

/* The advantage of value v in a group of n with mean mu, unbiased std sd and sum `sum`. A group of one
 * gives 0 (no baseline to compare with), or with verl_singletons verl's convention: mean 0 and std 1,
 * so GRPO gives v / (1 + eps), Dr. GRPO and RLOO v, batch std v / (batch_sd + eps). */
RECAP_HD double recap_advantage(int mode, double v, double mu, double sd, double sum, int n, double batch_sd,
                                double eps, int verl_singletons) {
    if (n == 1 && verl_singletons) {
        switch (mode) {
        case RECAP_ADV_GRPO: return v / (1.0 + eps);
        case RECAP_ADV_DR_GRPO:
        case RECAP_ADV_RLOO: return v;
        default: return v / (batch_sd + eps);
        }
    }
    switch (mode) {
    case RECAP_ADV_GRPO: return n < 2 ? 0.0 : (v - mu) / (sd + eps);
    case RECAP_ADV_DR_GRPO: return v - mu;
    case RECAP_ADV_RLOO: return n < 2 ? 0.0 : v - (sum - v) / (double)(n - 1);
    default: return (v - mu) / (batch_sd + eps);
    }
}

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
