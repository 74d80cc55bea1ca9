/*
 * host_shim.c — compiled for the host by build.rs (with `cc`), never by nvcc.
 *
 * It exposes the device's per-token formulas (grpo_math.cuh, the very functions the kernels inline)
 * to Rust, so that tests check the device arithmetic against the f64 reference on machines without a
 * GPU. (The layouts of the C structs are checked at compile time by the generated struct_layouts.c.)
 */
#include <stddef.h>
#include "grpo_math.cuh"
#include "train_math.cuh"

void recap_host_ratio(float logp, float old_logp, float clamp, RecapRatio* out) {
    *out = recap_ratio(logp, old_logp, clamp);
}

void recap_host_policy_token(const RecapRatio* q, float adv, float logp, float old_logp,
                             const RecapPolicyOpts* o, RecapPolicyToken* out) {
    *out = recap_policy_token(*q, adv, logp, old_logp, *o);
}

void recap_host_gspo_ratio(float lr, RecapRatio* out) { *out = recap_gspo_ratio(lr); }

void recap_host_geo_mean_ratio(float d, float mean, RecapRatio* out) { *out = recap_geo_mean_ratio(d, mean); }

void recap_host_rollout_is(float log_w, int mode, float lower, float upper, RecapIsWeight* out) {
    *out = recap_rollout_is(log_w, mode, lower, upper);
}

double recap_host_is_batch_mean(double sum, double units, int level) {
    return recap_is_batch_mean(sum, units, level);
}

double recap_host_is_batch_factor(double mean) { return recap_is_batch_factor(mean); }

void recap_host_kl_is_corrected(const RecapKlToken* kt, const RecapRatio* q, RecapKlToken* out) {
    *out = recap_kl_is_corrected(*kt, *q);
}

void recap_host_kl_token(float logp, float ref_logp, int estimator, RecapKlToken* out) {
    *out = recap_kl_token(logp, ref_logp, estimator);
}

double recap_host_rs_stat(double lr, int statistic) { return recap_rs_stat(lr, statistic); }

int recap_host_rs_keep(double v, int statistic, double lower, double upper) {
    return recap_rs_keep(v, statistic, lower, upper);
}

float recap_host_agg_weight(int mode, float inv_tokens, float inv_seqs, float inv_seq_tokens, float inv_const) {
    return recap_agg_weight(mode, inv_tokens, inv_seqs, inv_seq_tokens, inv_const);
}

/* The device's online state folded over x[lo..hi), element by element in order. */
static RecapSoftmaxState fold_range(const float* x, long lo, long hi) {
    RecapSoftmaxState st = recap_softmax_init();
    for (long i = lo; i < hi; ++i) {
        if (x[i] > st.m) st = recap_softmax_rebase(st, x[i]);
        if (st.m == RECAP_NEG_INF) continue;
        st = recap_softmax_add(st, x[i]);
    }
    return st;
}

/* The device's row statistics for one row x[0..n) (already divided by tau), folded element by
 * element in order (the device folds per thread and merges; the arithmetic per step is the same). */
void recap_host_softmax_row(const float* x, long n, float* lse, float* entropy) {
    RecapSoftmaxState st = fold_range(x, 0, n);
    *lse = st.m + logf(st.s);
    *entropy = logf(st.s) - st.a / st.s;
}

/* sum_j p_j^2 of a row by the device's online state: folded in order, or (split > 0) two halves
 * merged as the warp tree merges them. */
float recap_host_softmax_sum_sq(const float* x, long n, long split) {
    const long mid = split > 0 ? split : n;
    return recap_softmax_sum_sq(recap_softmax_merge(fold_range(x, 0, mid), fold_range(x, mid, n)));
}

/* Merges the states of two halves of a row, as the device's warp tree does. */
void recap_host_softmax_split(const float* x, long n, long split, float* lse, float* entropy) {
    RecapSoftmaxState st = recap_softmax_merge(fold_range(x, 0, split), fold_range(x, split, n));
    *lse = st.m + logf(st.s);
    *entropy = logf(st.s) - st.a / st.s;
}

double recap_host_div_small(double a, int k) { return recap_div_small(a, k); }

float recap_host_inv_norm(double x) { return recap_inv_norm(x); }

float recap_host_logit_grad(float x, int is_label, float lse, float entropy, float g_logp, float g_ent, float inv_tau) {
    return recap_logit_grad(x, is_label, lse, entropy, g_logp, g_ent, inv_tau);
}

float recap_host_logit_grad_sum_sq(float x, float lse, float sum_sq, float g_spp, float inv_tau) {
    return recap_logit_grad_sum_sq(x, lse, sum_sq, g_spp, inv_tau);
}

/* train_math.cuh for the host: the driver's counter-based draw and AdamW (the CPU backend of
 * `recap train` calls these, so both backends run one definition), and the advantage formulas. */
double recap_host_draw(uint64_t seed, uint64_t counter) { return recap_draw(seed, counter); }

double recap_host_advantage(int mode, double v, double mu, double sd, double sum, int n, double vmax, double v2nd,
                            int n_max, double len_mean, double batch_sd, double batch_alpha, double eps,
                            int verl_singletons, double baseline) {
    return recap_advantage(mode, v, mu, sd, sum, n, vmax, v2nd, n_max, len_mean, batch_sd, batch_alpha, eps,
                           verl_singletons, baseline);
}

double recap_host_whiten(double x, double m, double var, double n_tokens) { return recap_whiten(x, m, var, n_tokens); }

double recap_host_batch_normalize(double x, double m, double sd, double eps) { return recap_batch_normalize(x, m, sd, eps); }

double recap_host_difficulty_weight(double rho, double a, double b, double rho0, double k) {
    return recap_difficulty_weight(rho, a, b, rho0, k);
}

void recap_host_adamw(float* w, float* m, float* v, const float* g, size_t n, float lr, float b1, float b2, float eps,
                      float wd, float c1, float c2) {
    for (size_t i = 0; i < n; ++i) w[i] = recap_adamw(w[i], g[i], &m[i], &v[i], lr, b1, b2, eps, wd, c1, c2);
}
