/*
 * host_shim.c — compiled for the host by build.rs (with `cc`), never by nvcc.
 *
 * It exposes the device's per-token formulas (grpo_math.cuh, the very functions the kernels inline)
 * and the layout of the kernel-parameter structs (recap_params.h) to Rust, so that tests check the
 * device arithmetic against the f64 reference and the `#[repr(C)]` mirrors against the C layout on
 * machines without a GPU.
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

#define F(S, f) offsetof(S, f)
static const size_t grpo_layout[] = {
    sizeof(RecapGrpoParams), F(RecapGrpoParams, logp), F(RecapGrpoParams, old_logp), F(RecapGrpoParams, ref_logp),
    F(RecapGrpoParams, advantages), F(RecapGrpoParams, mask), F(RecapGrpoParams, cu_seqlens),
    F(RecapGrpoParams, membership), F(RecapGrpoParams, seq_tokens), F(RecapGrpoParams, norms),
    F(RecapGrpoParams, grad), F(RecapGrpoParams, partials), F(RecapGrpoParams, tile_seq), F(RecapGrpoParams, num_tokens),
    F(RecapGrpoParams, num_seqs), F(RecapGrpoParams, num_objectives), F(RecapGrpoParams, items_per_thread),
    F(RecapGrpoParams, adv_per_token), F(RecapGrpoParams, agg_mode), F(RecapGrpoParams, kl_estimator),
    F(RecapGrpoParams, dual_clip), F(RecapGrpoParams, policy_bits), F(RecapGrpoParams, clip_low),
    F(RecapGrpoParams, clip_high), F(RecapGrpoParams, clip_c), F(RecapGrpoParams, log_ratio_clamp),
    F(RecapGrpoParams, beta), F(RecapGrpoParams, inv_norm_const), F(RecapGrpoParams, lambda),
    F(RecapGrpoParams, loss_type), F(RecapGrpoParams, kl_is_correction), F(RecapGrpoParams, delta),
    F(RecapGrpoParams, tau_pos), F(RecapGrpoParams, tau_neg), F(RecapGrpoParams, dro_beta),
    F(RecapGrpoParams, seq_log_ratio), F(RecapGrpoParams, rollout_logp), F(RecapGrpoParams, seq_is_log),
    F(RecapGrpoParams, is_level), F(RecapGrpoParams, is_mode), F(RecapGrpoParams, is_lower), F(RecapGrpoParams, is_upper),
    F(RecapGrpoParams, policy_weight), F(RecapGrpoParams, policy_agg_mode), F(RecapGrpoParams, pad1),
    F(RecapGrpoParams, out), F(RecapGrpoParams, ticket), F(RecapGrpoParams, lambda_dev),
    F(RecapGrpoParams, inv_norms), F(RecapGrpoParams, seq_inv)};
static const size_t seq_layout[] = {
    sizeof(RecapSeqParams), F(RecapSeqParams, mask), F(RecapSeqParams, cu_seqlens), F(RecapSeqParams, membership),
    F(RecapSeqParams, seq_tokens), F(RecapSeqParams, norms), F(RecapSeqParams, tile_seq),
    F(RecapSeqParams, num_tokens), F(RecapSeqParams, tile_tokens), F(RecapSeqParams, num_seqs),
    F(RecapSeqParams, num_objectives), F(RecapSeqParams, has_override), F(RecapSeqParams, num_tiles),
    F(RecapSeqParams, override_tokens), F(RecapSeqParams, override_seqs), F(RecapSeqParams, logp),
    F(RecapSeqParams, old_logp), F(RecapSeqParams, seq_log_ratio), F(RecapSeqParams, rollout_logp),
    F(RecapSeqParams, seq_is_log), F(RecapSeqParams, is_geometric), F(RecapSeqParams, warps_per_seq),
    F(RecapSeqParams, geo_mean), F(RecapSeqParams, clip_low), F(RecapSeqParams, clip_high), F(RecapSeqParams, validate),
    F(RecapSeqParams, partials), F(RecapSeqParams, ticket), F(RecapSeqParams, flags), F(RecapSeqParams, lambda_dev),
    F(RecapSeqParams, inv_norms), F(RecapSeqParams, seq_inv), F(RecapSeqParams, override_dev),
    F(RecapSeqParams, override_slot), F(RecapSeqParams, pad0)};
static const size_t finish_layout[] = {
    sizeof(RecapLogitsFinishParams), F(RecapLogitsFinishParams, out), F(RecapLogitsFinishParams, parts),
    F(RecapLogitsFinishParams, norms), F(RecapLogitsFinishParams, entropy_agg), F(RecapLogitsFinishParams, entropy_mean),
    F(RecapLogitsFinishParams, bad_labels), F(RecapLogitsFinishParams, lambda_dev),
    F(RecapLogitsFinishParams, num_objectives), F(RecapLogitsFinishParams, num_parts),
    F(RecapLogitsFinishParams, has_ref), F(RecapLogitsFinishParams, beta), F(RecapLogitsFinishParams, entropy_coef),
    F(RecapLogitsFinishParams, pad0), F(RecapLogitsFinishParams, lambda)};
static const size_t reduce_layout[] = {
    sizeof(RecapReduceParams), F(RecapReduceParams, losses), F(RecapReduceParams, mask),
    F(RecapReduceParams, cu_seqlens), F(RecapReduceParams, membership), F(RecapReduceParams, seq_tokens),
    F(RecapReduceParams, norms), F(RecapReduceParams, grad), F(RecapReduceParams, partials), F(RecapReduceParams, tile_seq),
    F(RecapReduceParams, num_tokens), F(RecapReduceParams, num_seqs), F(RecapReduceParams, num_objectives),
    F(RecapReduceParams, items_per_thread), F(RecapReduceParams, agg_mode), F(RecapReduceParams, sum_norm_const),
    F(RecapReduceParams, pad0), F(RecapReduceParams, lambda)};
static const size_t kl_layout[] = {
    sizeof(RecapKlParams), F(RecapKlParams, logp), F(RecapKlParams, ref_logp), F(RecapKlParams, mask),
    F(RecapKlParams, kl), F(RecapKlParams, grad), F(RecapKlParams, num_tokens), F(RecapKlParams, kl_estimator),
    F(RecapKlParams, pad0)};
static const size_t finalize_layout[] = {
    sizeof(RecapFinalizeParams), F(RecapFinalizeParams, partials), F(RecapFinalizeParams, out),
    F(RecapFinalizeParams, num_blocks), F(RecapFinalizeParams, num_slots), F(RecapFinalizeParams, min_bits),
    F(RecapFinalizeParams, max_bits)};
static const size_t logits_layout[] = {
    sizeof(RecapLogitsParams), F(RecapLogitsParams, logits), F(RecapLogitsParams, labels), F(RecapLogitsParams, logp),
    F(RecapLogitsParams, entropy), F(RecapLogitsParams, lse), F(RecapLogitsParams, bad_labels),
    F(RecapLogitsParams, mask), F(RecapLogitsParams, valid), F(RecapLogitsParams, g_logp),
    F(RecapLogitsParams, g_entropy), F(RecapLogitsParams, dlogits), F(RecapLogitsParams, num_rows),
    F(RecapLogitsParams, vocab), F(RecapLogitsParams, ld), F(RecapLogitsParams, out_ld),
    F(RecapLogitsParams, ignore_index), F(RecapLogitsParams, mask_u8), F(RecapLogitsParams, inv_temperature),
    F(RecapLogitsParams, g_entropy_scale), F(RecapLogitsParams, label_logit), F(RecapLogitsParams, label_offset),
    F(RecapLogitsParams, sharded), F(RecapLogitsParams, pad0),
    F(RecapLogitsParams, sum_pi_squared), F(RecapLogitsParams, g_sum_pi_squared)};
static const size_t tp_layout[] = {
    sizeof(RecapTpParams), F(RecapTpParams, partials), F(RecapTpParams, logp), F(RecapTpParams, entropy),
    F(RecapTpParams, lse), F(RecapTpParams, labels), F(RecapTpParams, missing), F(RecapTpParams, sum_pi_squared),
    F(RecapTpParams, num_rows), F(RecapTpParams, num_shards), F(RecapTpParams, ignore_index),
    F(RecapTpParams, planes), F(RecapTpParams, pad0)};
static const size_t adv_layout[] = {
    sizeof(RecapAdvParams), F(RecapAdvParams, rewards), F(RecapAdvParams, group_ids), F(RecapAdvParams, lengths),
    F(RecapAdvParams, work), F(RecapAdvParams, batch_std), F(RecapAdvParams, pre), F(RecapAdvParams, out),
    F(RecapAdvParams, counts), F(RecapAdvParams, num_rollouts), F(RecapAdvParams, num_objectives),
    F(RecapAdvParams, num_groups), F(RecapAdvParams, group_size), F(RecapAdvParams, modes),
    F(RecapAdvParams, correctness), F(RecapAdvParams, has_length), F(RecapAdvParams, has_difficulty),
    F(RecapAdvParams, verl_singletons), F(RecapAdvParams, eps), F(RecapAdvParams, length_alpha),
    F(RecapAdvParams, diff_a), F(RecapAdvParams, diff_b), F(RecapAdvParams, diff_rho0), F(RecapAdvParams, diff_k),
    F(RecapAdvParams, num_outputs), F(RecapAdvParams, has_reward_weights), F(RecapAdvParams, reward_weights),
    F(RecapAdvParams, baselines)};
static const size_t train_layout[] = {
    sizeof(RecapTrainParams), F(RecapTrainParams, logits), F(RecapTrainParams, row_max), F(RecapTrainParams, row_sum),
    F(RecapTrainParams, row_lse), F(RecapTrainParams, tokens), F(RecapTrainParams, feat), F(RecapTrainParams, logp),
    F(RecapTrainParams, w), F(RecapTrainParams, m), F(RecapTrainParams, v), F(RecapTrainParams, grad),
    F(RecapTrainParams, w_bf16), F(RecapTrainParams, seed), F(RecapTrainParams, num_rows), F(RecapTrainParams, vocab),
    F(RecapTrainParams, num_tokens), F(RecapTrainParams, n), F(RecapTrainParams, counter_base),
    F(RecapTrainParams, group), F(RecapTrainParams, resp_len), F(RecapTrainParams, lr), F(RecapTrainParams, beta1),
    F(RecapTrainParams, beta2), F(RecapTrainParams, eps), F(RecapTrainParams, weight_decay), F(RecapTrainParams, bias1),
    F(RecapTrainParams, bias2), F(RecapTrainParams, pad0)};
static const size_t reject_layout[] = {
    sizeof(RecapRejectParams), F(RecapRejectParams, log_ratio), F(RecapRejectParams, mask),
    F(RecapRejectParams, cu_seqlens), F(RecapRejectParams, flags), F(RecapRejectParams, num_tokens),
    F(RecapRejectParams, num_seqs), F(RecapRejectParams, num_criteria), F(RecapRejectParams, level),
    F(RecapRejectParams, statistic), F(RecapRejectParams, lower), F(RecapRejectParams, upper)};
static const size_t otb_layout[] = {
    sizeof(RecapOtbParams), F(RecapOtbParams, token_rewards), F(RecapOtbParams, old_logp),
    F(RecapOtbParams, sum_pi_squared), F(RecapOtbParams, rollout_is_weights), F(RecapOtbParams, mask),
    F(RecapOtbParams, cu_seqlens), F(RecapOtbParams, group_offsets), F(RecapOtbParams, group_members),
    F(RecapOtbParams, cum_w), F(RecapOtbParams, to_go), F(RecapOtbParams, aligned), F(RecapOtbParams, live),
    F(RecapOtbParams, bad), F(RecapOtbParams, advantages), F(RecapOtbParams, returns),
    F(RecapOtbParams, num_tokens), F(RecapOtbParams, num_seqs), F(RecapOtbParams, num_groups),
    F(RecapOtbParams, multi_turn), F(RecapOtbParams, zero_tail), F(RecapOtbParams, eps)};
static const size_t is_layout[] = {
    sizeof(RecapIsParams), F(RecapIsParams, log_ratio), F(RecapIsParams, mask), F(RecapIsParams, cu_seqlens),
    F(RecapIsParams, weights), F(RecapIsParams, partials), F(RecapIsParams, stats), F(RecapIsParams, num_tokens),
    F(RecapIsParams, num_seqs), F(RecapIsParams, level), F(RecapIsParams, mode), F(RecapIsParams, pad0),
    F(RecapIsParams, lower), F(RecapIsParams, upper)};
#undef F

/* Size then field offsets (declaration order) of struct `which`: 0 grpo, 1 seq, 2 reduce, 3 kl,
 * 4 finalize, 5 logits, 6 advantages, 7 train, 8 tensor-parallel combine, 9 rollout rejection,
 * 10 optimal token baseline, 11 rollout IS weights, 12 the logits losses' finish. Returns the number of entries, writes at most `cap` of them. */

size_t recap_host_params_layout(int which, size_t* out, size_t cap) {
    const size_t* src;
    size_t n;
    switch (which) {
    case 0: src = grpo_layout; n = sizeof(grpo_layout) / sizeof(size_t); break;
    case 1: src = seq_layout; n = sizeof(seq_layout) / sizeof(size_t); break;
    case 2: src = reduce_layout; n = sizeof(reduce_layout) / sizeof(size_t); break;
    case 3: src = kl_layout; n = sizeof(kl_layout) / sizeof(size_t); break;
    case 4: src = finalize_layout; n = sizeof(finalize_layout) / sizeof(size_t); break;
    case 5: src = logits_layout; n = sizeof(logits_layout) / sizeof(size_t); break;
    case 6: src = adv_layout; n = sizeof(adv_layout) / sizeof(size_t); break;
    case 7: src = train_layout; n = sizeof(train_layout) / sizeof(size_t); break;
    case 8: src = tp_layout; n = sizeof(tp_layout) / sizeof(size_t); break;
    case 9: src = reject_layout; n = sizeof(reject_layout) / sizeof(size_t); break;
    case 10: src = otb_layout; n = sizeof(otb_layout) / sizeof(size_t); break;
    case 11: src = is_layout; n = sizeof(is_layout) / sizeof(size_t); break;
    case 12: src = finish_layout; n = sizeof(finish_layout) / sizeof(size_t); break;
    default: return 0;
    }
    for (size_t i = 0; i < n && i < cap; ++i) out[i] = src[i];
    return n;
}

/* Constants of recap_params.h, in this order: max objectives, norm slots, extra GRPO slots. */
void recap_host_constants(int* out) {
    out[0] = RECAP_MAX_OBJECTIVES;
    out[1] = RECAP_NORM_SLOTS;
    out[2] = RECAP_GRPO_EXTRA_SLOTS;
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
