/*
 * recap_kernels.h — the C ABI of recap-kernels (librecap_kernels.so, built by `cargo build`).
 *
 * The ops take raw pointers and sizes: device pointers in the primary context of `device` (the one
 * PyTorch uses) and a CUstream (NULL: the context's default stream), or, with device < 0, host
 * pointers (the CPU reference computes; the stream is ignored). The small per-batch arrays
 * (cu_seqlens, lambda, objectives, membership, normalizers, modes) are host pointers. Work is
 * enqueued on the stream; the fused loss, the normalizers and group advantages synchronize it to
 * read their statistics back. An output may not overlap another array of the same call.
 * Every function returns a status code; recap_last_error() gives the message of the last failure
 * on the calling thread. Arguments are checked before anything touches the device; no panic
 * crosses this boundary. Written by hand; tests/c_abi.rs compiles tests/c/abi_test.c against it and
 * checks the struct sizes against the Rust definitions (src/ffi.rs).
 */
#ifndef RECAP_KERNELS_H
#define RECAP_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RECAP_OK 0
#define RECAP_ERR_ARGUMENT 1  /* an argument has the wrong shape or value; nothing was launched */
#define RECAP_ERR_NONFINITE 2 /* NaN/Inf inputs at unmasked tokens (allow_nonfinite off)        */
#define RECAP_ERR_DEVICE 3    /* no kernels, driver or device, or a CUDA error                  */
#define RECAP_ERR_INTERNAL 4  /* a caught panic: please report                                  */

/* The message of the last failed call on this thread ("" after a success). */
const char* recap_last_error(void);
/* The library version, e.g. "0.1.0". */
const char* recap_version(void);

/* Loss options; recap_grpo_config_default fills verl's defaults. See README "Loss variants". */
typedef struct RecapGrpoConfig {
    float clip_low;            /* 0.2                                                  */
    float clip_high;           /* 0.2                                                  */
    float dual_clip;           /* 3.0; <= 0: off                                       */
    float log_ratio_clamp;     /* 20                                                   */
    int32_t agg_mode;          /* 0 token-mean, 1 seq-mean-token-mean, 2 seq-mean-token-sum, 3 token-sum-norm */
    float norm_constant;       /* C of token-sum-norm                                  */
    float kl_coef;             /* 0                                                    */
    int32_t kl_estimator;      /* 0 k1, 1 abs, 2 k2, 3 k3 (low_var_kl), 4 k1+, 5 k3+   */
    float entropy_coef;        /* 0                                                    */
    int32_t allow_nonfinite;   /* 0                                                    */
    int32_t policy_loss;       /* 0 vanilla, 1 CISPO, 2 SAPO, 3 GSPO                   */
    float tau_pos;             /* SAPO, 1.0                                            */
    float tau_neg;             /* SAPO, 1.05                                           */
    float delta;               /* two-sided clipping; <= 0: off                        */
    int32_t kl_is_correction;  /* TRL use_bias_correction_kl                           */
    float top_entropy_quantile;/* 1.0 (loss from logits only)                          */
    int32_t rollout_level;     /* -1 off, 0 token, 1 sequence, 2 geometric             */
    int32_t rollout_mode;      /* 0 truncate, 1 mask, 2 metrics only                   */
    float rollout_upper;       /* 2.0                                                  */
    float rollout_lower;       /* <= 0: 1 / upper                                      */
} RecapGrpoConfig;

/* Scalar results of the fused loss (verl's metric names in the README). */
typedef struct RecapGrpoResult {
    double loss, kl_loss, ppo_kl, ratio_mean, ratio_min, ratio_max, kl_mean;
    double num_tokens, num_seqs, policy_tokens, nonfinite;
    double rollout_is_mean, rollout_is_min, rollout_is_max, rollout_is_corrected_fraction;
} RecapGrpoResult;

int recap_grpo_config_default(RecapGrpoConfig* cfg);

/* The flat statistics array of the fused loss for K objectives: its length, and field `index`'s
 * name (verl's, e.g. "actor/pg_clipfrac"; static storage), offset and length (1, or K per
 * objective: actor/pg_loss, actor/pg_clipfrac, actor/pg_clipfrac_lower, ...). */
int64_t recap_grpo_stats_len(int32_t num_objectives);
int recap_grpo_stat_field(int32_t num_objectives, int32_t index, const char** name, int64_t* offset, int64_t* len);

/* The fused GRPO loss and dL/dlogp. Per-token arrays on the device (device >= 0), or on the host
 * for device < 0 (the CPU reference computes): logp, old_logp, ref_logp / rollout_logp /
 * policy_weight (nullable) [T], mask [T] (uint8 when mask_is_u8, else float), advantages [B, K]
 * ([T, K] with adv_per_token), grad [T] (written). Host: cu_seqlens [B + 1], lambda [K],
 * objectives [K] (0 policy, 1 nll), membership [B] (nullable), normalizers [2, K + 1] (the whole
 * batch's token weights then sequence counts, summed from recap_count_normalizers over the
 * micro-batches / ranks; nullable), seq_tokens [B] (nullable), stats [recap_grpo_stats_len(K)]
 * (nullable, written). On a device this synchronizes the stream to read the statistics back. */
int recap_grpo_loss(int32_t device, void* stream, int64_t num_tokens, const float* logp, const float* old_logp,
                    const float* ref_logp, const float* rollout_logp, const float* policy_weight,
                    const float* advantages, int32_t adv_per_token, const void* mask, int32_t mask_is_u8,
                    const int32_t* cu_seqlens, int64_t num_seqs, const float* lambda, const int32_t* objectives,
                    const uint32_t* membership, int32_t num_objectives, const double* normalizers,
                    const double* seq_tokens, const RecapGrpoConfig* cfg, float* grad, RecapGrpoResult* result,
                    double* stats);

/* This part's normalizers from its mask [T] (device, or host for device < 0): normalizers
 * [2, K + 1] (host, written: token weights then sequence counts, the KL slot last in each) and
 * seq_tokens [B] (host, nullable, written). Synchronizes the stream. */
int recap_count_normalizers(int32_t device, void* stream, int64_t num_tokens, const void* mask, int32_t mask_is_u8,
                            const int32_t* cu_seqlens, int64_t num_seqs, const uint32_t* membership,
                            int32_t num_objectives, double* normalizers, double* seq_tokens);

/* Log-probabilities, entropy (nullable) and log-sum-exp of logits [rows, ld] (dtype 0 f32, 1 f16,
 * 2 bf16) at `temperature`; labels equal to ignore_index give 0. Device arrays (host: device < 0). */
int recap_logprob_forward(int32_t device, void* stream, const void* logits, int32_t dtype, int64_t rows,
                          int64_t vocab, int64_t ld, const int32_t* labels, float temperature,
                          int32_t ignore_index, float* logp, float* entropy, float* lse);

/* d(g_logp . logp + g_entropy . entropy)/d logits, written over the logits (g_entropy nullable). */
int recap_logprob_backward_inplace(int32_t device, void* stream, void* logits, int32_t dtype, int64_t rows,
                                   int64_t vocab, int64_t ld, const int32_t* labels, const float* lse,
                                   const float* entropy, const float* g_logp, const float* g_entropy,
                                   float temperature, int32_t ignore_index);

/* Vocabulary (tensor) parallelism in three steps, the collective between 1 and 2 (README
 * "Tensor parallelism"). 1: one shard's partials [3, T] (LSE, entropy, label logit or -inf) of
 * logits holding the vocabulary columns [vocab_start, vocab_start + vocab); labels are global. */
int recap_tp_partials(int32_t device, void* stream, const void* logits, int32_t dtype, int64_t rows, int64_t vocab,
                      int64_t ld, const int32_t* labels, int64_t vocab_start, float temperature, int32_t ignore_index,
                      float* partials);
/* 2: the combine of P shards' partials [P, 3, T], in ascending vocab_start, into logp, entropy and
 * lse [T] over the whole vocabulary (the same bits on every rank). */
int recap_tp_combine(int32_t device, void* stream, const float* partials, int32_t shards, int64_t rows,
                     const int32_t* labels, int32_t ignore_index, float* logp, float* entropy, float* lse);
/* 3: the shard's slice of the whole gradient, over its logits, from the combined lse and entropy. */
int recap_tp_backward_inplace(int32_t device, void* stream, void* logits, int32_t dtype, int64_t rows, int64_t vocab,
                              int64_t ld, const int32_t* labels, int64_t vocab_start, const float* lse,
                              const float* entropy, const float* g_logp, const float* g_entropy, float temperature,
                              int32_t ignore_index);

/* Group advantages of rewards [B, K] into out [B, K]: groups of group_size consecutive rollouts,
 * or group_ids [B] (nullable; dense ids in [0, num_groups) on a device, any ids on the host);
 * modes [K] host (0 grpo, 1 dr_grpo, 2 rloo, 3 batch std). */
int recap_group_advantages(int32_t device, void* stream, const float* rewards, int64_t num_rollouts,
                           int32_t num_objectives, int64_t group_size, const int32_t* group_ids,
                           int64_t num_groups, const int32_t* modes, double eps, float* out);

/* Per-token KL value and d kl / d logp ([T] each); mask nullable (every token);
 * estimator 0 k1, 1 abs, 2 k2, 3 k3 (low_var_kl), 4 k1+, 5 k3+. */
int recap_kl(int32_t device, void* stream, int64_t num_tokens, const float* logp, const float* ref_logp,
             const void* mask, int32_t mask_is_u8, int32_t estimator, float* kl, float* grad);

/* Per-objective weighted reduction of losses [T, K]: grad [T, K] (written), total and
 * objective_loss [K] (nullable) on the host; normalizers / seq_tokens as recap_grpo_loss;
 * aggregation from cfg. */
int recap_weighted_reduce(int32_t device, void* stream, int64_t num_tokens, const float* losses, const void* mask,
                          int32_t mask_is_u8, const int32_t* cu_seqlens, int64_t num_seqs, const float* lambda,
                          const uint32_t* membership, int32_t num_objectives, const double* normalizers,
                          const double* seq_tokens, const RecapGrpoConfig* cfg, float* grad, double* total,
                          double* objective_loss);

/* The chunked fused-linear GRPO loss from hidden [T, H] and weight [V, H] (bf16): d_hidden [T, H]
 * (bf16) and d_weight [V, H] (float, overwritten); labels, old_logp, ref_logp (nullable),
 * advantages, mask (uint8), normalizers (nullable), stats (nullable) as recap_grpo_loss.
 * chunk_tokens <= 0: from memory_budget bytes (<= 0: 512 MiB); on the host (device < 0) the
 * reference materializes the logits. result->loss includes the entropy bonus. */
int recap_fused_linear_grpo_loss(int32_t device, void* stream, int64_t num_tokens, int64_t hidden_size, int64_t vocab,
                                 const void* hidden, const void* weight, const int32_t* labels,
                                 const float* old_logp, const float* ref_logp, const float* advantages,
                                 int32_t adv_per_token, const uint8_t* mask, const int32_t* cu_seqlens,
                                 int64_t num_seqs, const float* lambda, const int32_t* objectives,
                                 const uint32_t* membership, int32_t num_objectives, const double* normalizers,
                                 const RecapGrpoConfig* cfg, float temperature, int64_t chunk_tokens,
                                 int64_t memory_budget, int32_t fp32_logits, void* d_hidden, float* d_weight,
                                 RecapGrpoResult* result, double* stats);

/* The RECAP scheduler (host). orientations [K]: 0 loss, 1 reward; options_json: the fields of
 * RecapConfig as JSON (NULL or "": the paper's equations), e.g. {"window": 10, "priority":
 * "alpha_mix", "alpha": 0.5} (README, "RECAP weights"). NULL on error. */
typedef struct RecapSchedulerHandle RecapScheduler;
RecapScheduler* recap_scheduler_new(const int32_t* orientations, int32_t k, const char* options_json);
int recap_scheduler_observe(RecapScheduler* s, const double* values, int32_t k);
int recap_scheduler_weights(RecapScheduler* s, float* out, int32_t k);
/* JSON state into buf (cap bytes, NUL-terminated); *needed = its length + 1 (RECAP_ERR_ARGUMENT
 * when buf is NULL or too small: call again with *needed bytes). */
int recap_scheduler_to_json(RecapScheduler* s, char* buf, int64_t cap, int64_t* needed);
RecapScheduler* recap_scheduler_from_json(const char* json);
void recap_scheduler_free(RecapScheduler* s);

#ifdef __cplusplus
}
#endif

#endif /* RECAP_KERNELS_H */
