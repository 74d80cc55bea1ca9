/*
 * recap_params.h — the one definition of every kernel-parameter struct and the constants they use.
 *
 * Included by every kernel (nvcc, C++), by the host shim that `build.rs` compiles with `cc` (C), and
 * read by `build.rs` (`build/mirrors.rs`), which generates the `#[repr(C)]` Rust mirror of each
 * struct (`src/cuda/params.rs`) and asserts at compile time, in Rust and in C, that both have the
 * size and field offsets it computed (so the two cannot drift apart), and the Rust constants of the
 * `#define`s below. Plain fields only: one `type name;` or `type name[LEN];` per declaration, of
 * uint64_t, int64_t, double, uint32_t, int32_t or float; a struct the generator cannot read fails the
 * build.
 *
 * Device addresses travel as uint64_t (CUdeviceptr); a zero address means "absent".
 */
#ifndef RECAP_PARAMS_H
#define RECAP_PARAMS_H

#include <stdint.h>

/* Objectives per launch: 1 <= K <= RECAP_MAX_OBJECTIVES. */
#define RECAP_MAX_OBJECTIVES 16
/* Slots of per-objective normalizers: K objectives plus one for the KL term ("all sequences"). */
#define RECAP_NORM_SLOTS (RECAP_MAX_OBJECTIVES + 1)

/* Aggregation modes (verl's loss_agg_mode). */
#define RECAP_AGG_TOKEN_MEAN 0          /* sum(M*l) / N_tokens                                     */
#define RECAP_AGG_SEQ_MEAN_TOKEN_MEAN 1 /* mean over sequences with >= 1 token of their token mean  */
#define RECAP_AGG_SEQ_MEAN_TOKEN_SUM 2  /* sum(M*l) / N_sequences                                  */
#define RECAP_AGG_TOKEN_SUM_NORM 3      /* sum(M*l) / C  (Dr. GRPO)                                */

/* KL estimators (verl's kl_loss_type). The "+" variants: value of kX, gradient of k2. */
#define RECAP_KL_K1 0
#define RECAP_KL_ABS 1
#define RECAP_KL_K2 2
#define RECAP_KL_K3 3
#define RECAP_KL_K1_PLUS 4
#define RECAP_KL_K3_PLUS 5
#define RECAP_KL_K3_UNCLAMPED 6 /* exp(x) - x - 1, x = ref - logp, no clamp (TRL) */

/* Policy-loss variants (RecapGrpoParams.loss_type; formulas in grpo_math.cuh). */
#define RECAP_LOSS_VANILLA 0 /* PPO/GRPO clipped surrogate (+ dual-clip, + two-sided delta)      */
#define RECAP_LOSS_CISPO 1   /* -sg(clip(r, 1 - el, 1 + eh)) A logp                              */
#define RECAP_LOSS_SAPO 2    /* -A (4 / tau) sigmoid(tau (r - 1))                                  */
#define RECAP_LOSS_GSPO 3    /* clipped surrogate on the sequence ratio (GSPO-token form)          */
#define RECAP_LOSS_GPG 4     /* -A logp (verl "gpg")                                               */
#define RECAP_LOSS_DPPO_TV 5 /* -A sg(min(r, c)) logp inside the probability-difference trust region */
#define RECAP_LOSS_DPPO_KL 6 /* likewise inside the binary-KL trust region (verl "dppo_kl")        */
#define RECAP_LOSS_DRO 7     /* -(A logp - beta/2 (logp - old)^2) (verl "dro")                      */
#define RECAP_LOSS_GEO_MEAN 8 /* -A exp(mean of the sign-clipped log-ratio) (GMPO, verl "geo_mean")  */

/* Rollout importance-sampling correction (trainer vs inference-engine log-probs). */
#define RECAP_IS_OFF -1      /* no rollout_logp                                                    */
#define RECAP_IS_TOKEN 0     /* w_t = exp(old_t - rollout_t)                                       */
#define RECAP_IS_SEQUENCE 1  /* w_t = exp(sum over the sequence of m (old - rollout))              */
#define RECAP_IS_GEOMETRIC 2 /* w_t = exp(mean over the sequence of old - rollout)                 */
#define RECAP_IS_METRICS 0   /* mode: weights 1, metrics only                                      */
#define RECAP_IS_TRUNCATE 1  /* mode: min(w, upper)                                                */
#define RECAP_IS_MASK 2      /* mode: w inside [lower, upper], else 0                              */

/*
 * Layout of the normalizer buffer `norms` (double[4 * RECAP_NORM_SLOTS]), slot j < K an objective,
 * slot K the KL term (every sequence):
 *   [0 * S + j]  local token weight   sum of mask over member tokens of this batch
 *   [1 * S + j]  local sequence count member sequences with a mask sum > 0
 *   [2 * S + j]  token normalizer     the local value, or the caller's global override
 *   [3 * S + j]  sequence normalizer  likewise
 * with S = RECAP_NORM_SLOTS.
 */
#define RECAP_NORM_LOCAL_TOKENS 0
#define RECAP_NORM_LOCAL_SEQS 1
#define RECAP_NORM_TOKENS 2
#define RECAP_NORM_SEQS 3

/*
 * Layout of the fused loss's device-resident output (double[RECAP_OUT_SLOTS + recap_grpo_slots(K)]),
 * written by the call's two launches (recap_seq_stats_*'s last block: flags and norms;
 * recap_grpo_loss_*'s last block: the slots and the loss). Reading it back is a separate call.
 *   [RECAP_OUT_LOSS]       L = (1/K) sum_k lambda_k agg_k + beta agg(kl); NaN when flags != 0
 *   [RECAP_OUT_FLAGS]      RECAP_ERR_* bits of the checks made on the device (0: valid)
 *   [RECAP_OUT_NORMS ..]   the normalizers (layout above), 4 * RECAP_NORM_SLOTS values
 *   [RECAP_OUT_SLOTS ..]   the reduction slots (layout below)
 */
#define RECAP_OUT_LOSS 0
#define RECAP_OUT_FLAGS 1
#define RECAP_OUT_NORMS 2
#define RECAP_OUT_SLOTS 70 /* 2 + 4 * RECAP_NORM_SLOTS */
typedef char recap_out_slots_check[(RECAP_OUT_SLOTS == 2 + 4 * RECAP_NORM_SLOTS) ? 1 : -1];
/* Checks of inputs passed on the device (cu_seqlens, membership, lambda), as RECAP_OUT_FLAGS bits. */
#define RECAP_ERR_CU_SEQLENS 1 /* cu_seqlens[0] != 0, a decrease, or cu_seqlens[B] != T             */
#define RECAP_ERR_MEMBERSHIP 2 /* a membership word with bits at or above K                         */
#define RECAP_ERR_LAMBDA 4     /* a lambda that is not finite and >= 0                               */
#define RECAP_ERR_LABELS 8     /* the loss from logits: a label outside [0, V) and not ignore_index   */
/*
 * The losses from logits and from the last layer append to the fused loss's output (at
 * recap_grpo_slots(K) + RECAP_OUT_SLOTS + index) the values below; RECAP_OUT_LOSS then holds the
 * total, the fused loss minus entropy_coef times the entropy term (recap_logits_finish).
 */
#define RECAP_LOGITS_GRPO_LOSS 0    /* the fused loss with its KL term                              */
#define RECAP_LOGITS_ENTROPY_LOSS 1 /* agg(entropy) in the loss's aggregation                       */
#define RECAP_LOGITS_ENTROPY_MEAN 2 /* the masked mean entropy (verl's actor/entropy)               */
#define RECAP_LOGITS_BAD_LABELS 3   /* labels outside [0, V) that are not ignore_index              */
#define RECAP_LOGITS_EXTRA 4
/* Rows of recap_seq_stats_*'s block partials: token weight and sequence count of each normalizer
 * slot j <= K at rows 2j, 2j + 1, then the two error counts. */
#define RECAP_SEQ_PARTIAL_ROWS(K) (2 * ((K) + 1) + 2)

/*
 * Layout of the reduction slots of the fused GRPO loss (double[recap_grpo_slots(K)]), each the sum
 * over unmasked tokens, in a fixed order, of:
 *   [k]            w_tk * l_tk          the objective's aggregate agg(l_k)          (k < K)
 *   [K + k]        m_t * 1[clipped]     pg_clipfrac numerator                        (k < K)
 *   [2K + k]       m_t * 1[dual-clip]   pg_clipfrac_lower numerator                  (k < K)
 * then the RECAP_GRPO_EXTRA_SLOTS slots at 3K + RECAP_SLOT_* below.
 * A "policy token" is an unmasked token of a sequence that is a member of at least one objective of
 * kind policy. This list is the one definition of the slots: the kernels use the names, build.rs
 * generates the Rust constants (`crate::slots`) from these lines for the CPU reference and the
 * output decoder.
 */
#define RECAP_SLOT_RATIO_SUM 0        /* m_t * r_t over policy tokens (ratio mean numerator)        */
#define RECAP_SLOT_NEG_LOG_RATIO_SUM 1 /* m_t * (old - logp) over policy tokens (ppo_kl numerator)  */
#define RECAP_SLOT_POLICY_TOKENS 2    /* m_t over policy tokens (their weight)                      */
#define RECAP_SLOT_RATIO_MIN 3        /* min r_t over policy tokens (a min; +inf if none)           */
#define RECAP_SLOT_RATIO_MAX 4        /* max r_t over policy tokens (a max; -inf if none)           */
#define RECAP_SLOT_NONFINITE 5        /* count of non-finite inputs read at unmasked tokens         */
#define RECAP_SLOT_KL_AGG 6           /* w_t * kl_t: agg(kl) over every unmasked token              */
#define RECAP_SLOT_KL_SUM 7           /* m_t * kl_t: masked kl sum (the kl mean metric)             */
#define RECAP_SLOT_IS_SUM 8           /* m_t * w_t over policy tokens, the rollout IS ratio         */
#define RECAP_SLOT_IS_MIN 9           /* min w_t (a min; +inf if none)                              */
#define RECAP_SLOT_IS_MAX 10          /* max w_t (a max; -inf if none)                              */
#define RECAP_SLOT_IS_CORRECTED 11    /* m_t * 1[the IS weight was truncated or masked]             */
#define RECAP_GRPO_EXTRA_SLOTS 12

/* Per-launch parameters of the fused GRPO loss (kernel 1), passed by value. */
typedef struct RecapGrpoParams {
    uint64_t logp;         /* const float[T]                                  */
    uint64_t old_logp;     /* const float[T]                                  */
    uint64_t ref_logp;     /* const float[T], or 0 without a KL term          */
    uint64_t advantages;   /* const float[B, K] or [T, K] (adv_per_token)     */
    uint64_t mask;         /* const float[T] or const uint8_t[T] (by kernel)  */
    uint64_t cu_seqlens;   /* const int32_t[B + 1]                            */
    uint64_t membership;   /* const uint32_t[B], bit k = member of objective k */
    uint64_t seq_tokens;   /* const double[B], mask sum of each sequence      */
    uint64_t norms;        /* const double[4 * RECAP_NORM_SLOTS]              */
    uint64_t grad;         /* float[T], dL/dlogp                              */
    uint64_t partials;     /* double[slots, num_blocks] (slot-major)          */
    uint64_t tile_seq;     /* const int32_t[num_blocks], from recap_seq_stats */
    int64_t num_tokens;    /* T                                               */
    int32_t num_seqs;      /* B                                               */
    int32_t num_objectives;/* K                                               */
    int32_t items_per_thread; /* tokens per thread (tile = blockDim * items)   */
    int32_t adv_per_token; /* 1: advantages [T, K]; 0: [B, K]                 */
    int32_t agg_mode;      /* RECAP_AGG_*                                     */
    int32_t kl_estimator;  /* RECAP_KL_*                                      */
    int32_t dual_clip;     /* 1: dual-clip on for A < 0                       */
    uint32_t policy_bits;  /* bit k set: objective k is policy; else nll      */
    float clip_low;        /* eps_low                                         */
    float clip_high;       /* eps_high                                        */
    float clip_c;          /* dual-clip constant c > 1                        */
    float log_ratio_clamp; /* 20                                              */
    float beta;            /* KL coefficient                                  */
    float inv_norm_const;  /* 1/C of token-sum-norm (0: no constant)          */
    float lambda[RECAP_MAX_OBJECTIVES]; /* objective weights                  */
    int32_t loss_type;     /* RECAP_LOSS_*                                    */
    int32_t kl_is_correction; /* 1: the KL term is multiplied by r (TRL use_bias_correction_kl) */
    float delta;           /* two-sided clipping: r -> min(r, delta) in -A r; 0: off */
    float tau_pos;         /* SAPO temperature for A > 0                      */
    float tau_neg;         /* SAPO temperature for A <= 0                     */
    float dro_beta;        /* DRO: coefficient of the squared log-ratio       */
    uint64_t seq_log_ratio; /* const double[B], GSPO: mean of logp - old over each sequence's tokens */
    uint64_t rollout_logp;  /* const float[T], or 0 (is_level = RECAP_IS_OFF)                 */
    uint64_t seq_is_log;    /* const double[B]: sum (sequence) or mean (geometric) of old - rollout */
    int32_t is_level;       /* RECAP_IS_OFF / _TOKEN / _SEQUENCE / _GEOMETRIC                    */
    int32_t is_mode;        /* RECAP_IS_METRICS / _TRUNCATE / _MASK                              */
    float is_lower;         /* mask: lower bound of the band                                     */
    float is_upper;         /* truncate: cap; mask: upper bound                                  */
    uint64_t policy_weight; /* const float[T], or 0: multiplies the policy terms (e.g. TRL's entropy mask) */
    int32_t policy_agg_mode; /* RECAP_AGG_* of the objectives' terms (ext kernels; else agg_mode) */
    int32_t pad1;
    uint64_t out;           /* double[RECAP_OUT_SLOTS + slots]: the slots and the loss (written; the
                               flags and norms there by recap_seq_stats_*, norms == out + RECAP_OUT_NORMS) */
    uint64_t ticket;        /* unsigned int: the last-block counter (0 between launches)            */
    uint64_t lambda_dev;    /* const float[K] on the device, or 0: take `lambda` above             */
    uint64_t inv_norms;     /* const float[2 * RECAP_NORM_SLOTS], from recap_seq_stats (its inv_norms) */
    uint64_t seq_inv;       /* const float[B]: recap_inv_norm(seq_tokens[b])                        */
} RecapGrpoParams;

/* Parameters of the per-sequence statistics and normalizer kernels (shared by kernels 1 and 3). */
typedef struct RecapSeqParams {
    uint64_t mask;        /* const float[T] or const uint8_t[T]                      */
    uint64_t cu_seqlens;  /* const int32_t[B + 1]                                    */
    uint64_t membership;  /* const uint32_t[B]                                       */
    uint64_t seq_tokens;  /* double[B], written by recap_seq_stats                   */
    uint64_t norms;       /* double[4 * RECAP_NORM_SLOTS], written by norms_finalize */
    uint64_t tile_seq;    /* int32_t[num_tiles]: sequence of each token tile's first token (written) */
    int64_t num_tokens;
    int64_t tile_tokens;  /* tokens per tile of the token pass that follows                */
    int32_t num_seqs;
    int32_t num_objectives;
    int32_t has_override; /* 1: take the normalizers below instead of the local ones */
    int32_t num_tiles;
    double override_tokens[RECAP_NORM_SLOTS];
    double override_seqs[RECAP_NORM_SLOTS];
    uint64_t logp;          /* const float[T], or 0: no per-sequence log-ratio is needed (GSPO, GMPO) */
    uint64_t old_logp;      /* const float[T]                                                     */
    uint64_t seq_log_ratio; /* double[B] (written when logp): sum m (logp - old) / sum m, 0 if empty;
                               GMPO (geo_mean): double[2B], sum m min(d, clip_high) / sum m, then
                               sum m max(d, -clip_low) / sum m, d = logp - old                     */
    uint64_t rollout_logp;  /* const float[T], or 0: no sequence-level IS weight needed          */
    uint64_t seq_is_log;    /* double[B] (written when rollout_logp): sum m (old - rollout), divided
                               by sum m when is_geometric                                         */
    int32_t is_geometric;
    int32_t warps_per_seq;  /* 1, 2, 4 or 8 warps (of one block) share a sequence's tokens          */
    int32_t geo_mean;       /* 1: seq_log_ratio holds GMPO's two sign-clipped means                */
    float clip_low;         /* GMPO: el                                                            */
    float clip_high;        /* GMPO: eh                                                            */
    int32_t validate;       /* 1: check cu_seqlens, membership (and lambda_dev) on the device      */
    uint64_t partials;      /* double[RECAP_SEQ_PARTIAL_ROWS(K), gridDim.x] (slot-major), scratch  */
    uint64_t ticket;        /* unsigned int: the last-block counter (0 between launches)          */
    uint64_t flags;         /* double: RECAP_ERR_* bits (written by the last block), or 0          */
    uint64_t lambda_dev;    /* const float[K] to check (validate), or 0                            */
    uint64_t inv_norms;     /* float[2 * RECAP_NORM_SLOTS] (written by the last block): recap_inv_norm
                               of the token normalizers, then of the sequence normalizers (slot j at
                               j, RECAP_NORM_SLOTS + j), so the token pass divides nothing          */
    uint64_t seq_inv;       /* float[B] (written): recap_inv_norm(seq_tokens[b])                     */
    uint64_t override_dev;  /* const double[4 * RECAP_NORM_SLOTS] of an earlier pass on the device, or
                               0: its token and sequence normalizers (rows RECAP_NORM_TOKENS and
                               RECAP_NORM_SEQS) replace the local ones, as has_override does       */
    int32_t override_slot;  /* with override_dev: -1, slot j takes its slot j; else every slot takes
                               slot override_slot (the entropy term: the KL slot of the loss's)   */
    int32_t pad0;
} RecapSeqParams;

/* Parameters of the standalone weighted reduction (kernel 3) over per-token losses [T, K]. */
typedef struct RecapReduceParams {
    uint64_t losses;      /* const float[T, K]                  */
    uint64_t mask;        /* const float[T] or const uint8_t[T] */
    uint64_t cu_seqlens;  /* const int32_t[B + 1]               */
    uint64_t membership;  /* const uint32_t[B]                  */
    uint64_t seq_tokens;  /* const double[B]                    */
    uint64_t norms;       /* const double[4 * RECAP_NORM_SLOTS] */
    uint64_t grad;        /* float[T, K], dTotal/dl_tk          */
    uint64_t partials;    /* double[K, num_blocks] (slot-major) */
    uint64_t tile_seq;    /* const int32_t[num_blocks]          */
    int64_t num_tokens;
    int32_t num_seqs;
    int32_t num_objectives;
    int32_t items_per_thread;
    int32_t agg_mode;
    float sum_norm_const;
    float pad0;
    float lambda[RECAP_MAX_OBJECTIVES];
} RecapReduceParams;

/* Parameters of the standalone KL kernel (kernel 2). */
typedef struct RecapKlParams {
    uint64_t logp;       /* const float[T]                      */
    uint64_t ref_logp;   /* const float[T]                      */
    uint64_t mask;       /* const float[T] / uint8_t[T], or 0   */
    uint64_t kl;         /* float[T]: the estimator's value      */
    uint64_t grad;       /* float[T]: d kl_t / d logp_t          */
    int64_t num_tokens;
    int32_t kl_estimator;
    int32_t pad0;
} RecapKlParams;

/*
 * Rollout rejection sampling (verl's rollout_rs), kl.cu: criteria on the log-ratio
 * lr = clamp(old_logp - rollout_logp, -20, 20) at the token or over the sequence's unmasked tokens.
 */
#define RECAP_RS_MAX_CRITERIA 16 /* criteria per call (bit i of the flags: criterion i rejects)      */
#define RECAP_RS_TOKEN 0         /* level: the token's own statistic                                */
#define RECAP_RS_SEQ_SUM 1       /* level: sum over the sequence's unmasked tokens                  */
#define RECAP_RS_SEQ_MEAN 2      /* level: that sum over (their weight + 1e-8)                      */
#define RECAP_RS_SEQ_MAX 3       /* level: max over them (0 for an empty sequence)                  */
#define RECAP_RS_K1 0            /* statistic: -lr, kept inside [lower, upper]                      */
#define RECAP_RS_K2 1            /* statistic: lr^2 / 2, kept at most upper                         */
#define RECAP_RS_K3 2            /* statistic: exp(lr) - 1 - lr, kept at most upper                 */

/* Parameters of the rollout rejection kernel (kl.cu). */
typedef struct RecapRejectParams {
    uint64_t log_ratio;  /* const float[T]: old_logp - rollout_logp                              */
    uint64_t mask;       /* const float[T] / uint8_t[T]                                          */
    uint64_t cu_seqlens; /* const int32_t[B + 1]                                                 */
    uint64_t flags;      /* int32_t[T] (written): bit i where criterion i rejects the token; 0 masked */
    int64_t num_tokens;
    int32_t num_seqs;
    int32_t num_criteria;
    int32_t level[RECAP_RS_MAX_CRITERIA];     /* RECAP_RS_TOKEN ... RECAP_RS_SEQ_MAX         */
    int32_t statistic[RECAP_RS_MAX_CRITERIA]; /* RECAP_RS_K1 ... RECAP_RS_K3                 */
    double lower[RECAP_RS_MAX_CRITERIA];      /* K1: the lower bound (of -lr); else unused   */
    double upper[RECAP_RS_MAX_CRITERIA];      /* the upper bound                             */
} RecapRejectParams;

/* Parameters of the final fixed-order reduction of block partials. */
/* Parameters of recap_logits_finish (one block): completes the output of a loss from logits. */
typedef struct RecapLogitsFinishParams {
    uint64_t out;          /* double[RECAP_OUT_SLOTS + recap_grpo_slots(K) + RECAP_LOGITS_EXTRA]     */
    uint64_t parts;        /* const double[num_parts, RECAP_OUT_SLOTS + recap_grpo_slots(K)]: the
                              chunks' outputs, merged into out in chunk order; 0: out already holds
                              the fused loss's output                                             */
    uint64_t norms;        /* const double[4 * RECAP_NORM_SLOTS]: the batch's normalizers (with parts) */
    uint64_t entropy_agg;  /* const double[RECAP_OUT_SLOTS + 1]: the entropy term's reduction, or 0 */
    uint64_t entropy_mean; /* likewise, token-mean (the mean entropy), or 0: entropy_agg's value   */
    uint64_t bad_labels;   /* const uint32_t: labels the forward found outside [0, V), or 0        */
    uint64_t lambda_dev;   /* const float[K] on the device, or 0: take `lambda`                     */
    int32_t num_objectives;
    int32_t num_parts;
    int32_t has_ref;       /* the KL term is in the loss                                             */
    float beta;            /* its coefficient                                                        */
    float entropy_coef;    /* the entropy bonus's coefficient                                        */
    float pad0;
    float lambda[RECAP_MAX_OBJECTIVES];
} RecapLogitsFinishParams;

typedef struct RecapFinalizeParams {
    uint64_t partials;   /* const double[num_slots, num_blocks] (slot-major) */
    uint64_t out;        /* double[num_slots]                             */
    int32_t num_blocks;
    int32_t num_slots;
    uint64_t min_bits;   /* bit j set: slot j is reduced with min (j < 64)  */
    uint64_t max_bits;   /* bit j set: slot j is reduced with max           */
} RecapFinalizeParams;

/*
 * Parameters of the log-probability / entropy kernels (kernels 4 and 5, logits.cu). Logits are
 * [T, V] rows of `ld` elements (ld >= V) in the kernel's dtype; dlogits rows have `out_ld` elements
 * (equal to logits and ld for the in-place backward).
 */
typedef struct RecapLogitsParams {
    uint64_t logits;     /* const bf16/f16/f32 [T, ld]                                        */
    uint64_t labels;     /* const int32_t[T]                                                  */
    uint64_t logp;       /* float[T] out (forward), or 0 (sharded partials)                     */
    uint64_t entropy;    /* float[T] out (forward, or 0); in (backward with g_entropy)        */
    uint64_t lse;        /* float[T] out (forward); in (backward): logsumexp of logits / tau  */
    uint64_t bad_labels; /* uint32_t counter of labels outside [0, V) and not ignore_index    */
    uint64_t mask;       /* const float[T] or uint8_t[T] (mask_u8), or 0 (forward)             */
    uint64_t valid;      /* float[T] out, or 0: mask weight, 0 where the label is ignored     */
    uint64_t g_logp;     /* const float[T] upstream gradient of logp (backward), or 0          */
    uint64_t g_entropy;  /* const float[T] upstream gradient of entropy (backward), or 0       */
    uint64_t dlogits;    /* bf16/f16/f32 [T, out_ld] out (backward)                            */
    int64_t num_rows;    /* T                                                                 */
    int64_t vocab;       /* V                                                                 */
    int64_t ld;          /* row stride of logits, elements                                    */
    int64_t out_ld;      /* row stride of dlogits, elements                                   */
    int32_t ignore_index;
    int32_t mask_u8;     /* 1: mask is uint8_t                                                 */
    float inv_temperature;
    float g_entropy_scale; /* multiplies g_entropy                                            */
    /* Vocabulary shards (tensor parallelism): the logits are the columns [label_offset,
     * label_offset + V) of the whole vocabulary; a label is local at y - label_offset. */
    uint64_t label_logit; /* float[T] out (forward), or 0: x_y, -inf where the label is elsewhere */
    int64_t label_offset; /* the shard's first vocabulary index (0 unsharded)                   */
    int32_t sharded;      /* 1: a label outside the shard is another shard's (not bad): no      */
                          /* logp (forward); g_logp kept, no one-hot (backward)                 */
    int32_t pad0;
    uint64_t sum_pi_squared;   /* float[T]: sum_j p_j^2 of the row, out (forward, or 0); in (backward
                                  with g_sum_pi_squared)                                          */
    uint64_t g_sum_pi_squared; /* const float[T] upstream gradient of sum_pi_squared (backward), or 0 */
} RecapLogitsParams;

/*
 * Parameters of recap_tp_combine (logits.cu): the P shards' partial statistics of each row, in
 * ascending order of their vocab_start, into the whole vocabulary's log-probability, entropy and LSE.
 */
typedef struct RecapTpParams {
    uint64_t partials;   /* const float[P, planes, T]: lse, entropy, label logit (or -inf), and
                            with 4 planes the shard's sum_j p_j^2                              */
    uint64_t logp;       /* float[T] out                                                      */
    uint64_t entropy;    /* float[T] out                                                      */
    uint64_t lse;        /* float[T] out                                                      */
    uint64_t labels;     /* const int32_t[T]: ignore_index gives logp 0                        */
    uint64_t missing;    /* uint32_t counter of rows with a label in no shard (and not ignored) */
    uint64_t sum_pi_squared; /* float[T] out (sum_j p_j^2 of the whole vocabulary), or 0; needs 4 planes */
    int64_t num_rows;    /* T                                                                 */
    int32_t num_shards;  /* P                                                                 */
    int32_t ignore_index;
    int32_t planes;      /* 3, or 4 with the shards' sum_j p_j^2                               */
    int32_t pad0;
} RecapTpParams;

/* Advantage modes (4 bits per objective in RecapAdvParams.modes). n: group size, mu: group mean. */
#define RECAP_ADV_GRPO 0      /* (r - mu) / (std_g + eps), unbiased std; a group of one gives 0       */
#define RECAP_ADV_DR_GRPO 1   /* r - mu                                                               */
#define RECAP_ADV_RLOO 2      /* r - mean of the others; a group of one gives 0                       */
#define RECAP_ADV_BATCH_STD 3 /* (r - mu) / (std of the batch + eps)                                  */
#define RECAP_ADV_PASSK 4     /* the group's unique best: (r_max - r_2nd) / (std_g + eps), others 0   */
#define RECAP_ADV_PASSK_DR 5  /* as PASSK without the std: r_max - r_2nd                              */
#define RECAP_ADV_OPO 6       /* r - sum_g(len r) / sum_g(len), the length-weighted group baseline    */
#define RECAP_ADV_GPG 7       /* (B / max(1, nonzero rewards of the batch)) (r - mu)                  */
#define RECAP_ADV_RFPP 8      /* REINFORCE++ (gamma 1): r whitened over the batch's tokens            */
#define RECAP_ADV_RFPP_BASELINE 9 /* REINFORCE++ baseline: r - mu whitened over the batch's tokens    */
#define RECAP_ADV_GDPO 10     /* GDPO: sum_k w_k (r_k - mu_k) / (std_k + eps), normalized over the batch */
#define RECAP_ADV_REMAX 11    /* ReMax: r - b, b the rollout's baseline reward (the greedy response's)  */
#define RECAP_ADV_MODES 12    /* number of modes                                                      */

/*
 * Parameters of the group-advantage kernels (advantages.cu). Rollout i belongs to group
 * i / group_size (group_ids == 0) or group_ids[i] (dense ids in [0, num_groups)). With reward
 * weights the K reward columns are combined, sum_k w_k r_k, into one column before the advantage
 * (out is then [B, 1] and modes bits 0..3 apply).
 */
typedef struct RecapAdvParams {
    uint64_t rewards;    /* const float[B, K]                                                  */
    uint64_t group_ids;  /* const int32_t[B], or 0: consecutive groups of group_size           */
    uint64_t lengths;    /* const int32_t[B] response lengths (tokens), or 0                    */
    uint64_t work;       /* double[B, K]: rewards after the GRPO-LEAD length reward (written)  */
    uint64_t batch_std;  /* double[2 K_out]: per output column the unbiased std of the batch's
                            values, then the count of its non-zero values (written)             */
    uint64_t pre;        /* double[B, K_out]: REINFORCE++ / GDPO values before the batch step (written) */
    uint64_t out;        /* float[B, K] advantages                                              */
    uint64_t counts;     /* int32_t[num_groups + 3]: members of each group, then the non-finite
                            rewards, the negative lengths, the non-finite baselines (written)   */
    int32_t num_rollouts;
    int32_t num_objectives;
    int32_t num_groups;
    int32_t group_size;  /* for consecutive groups                                               */
    uint64_t modes;      /* bits 4k..4k+3: RECAP_ADV_* of output column k                        */
    int32_t correctness; /* GRPO-LEAD correctness objective, or -1                              */
    int32_t has_length;  /* 1: length-dependent accuracy reward on objective `correctness`      */
    int32_t has_difficulty; /* 1: difficulty-aware reweighting                                  */
    int32_t verl_singletons; /* 1: a group of one rollout has mean 0 and std 1 (verl), else 0   */
    double eps;
    double length_alpha;
    double diff_a;
    double diff_b;
    double diff_rho0;
    double diff_k;
    int32_t num_outputs;        /* K, or 1 with reward weights                                   */
    int32_t has_reward_weights; /* 1: the advantage of sum_k w_k r_k (TRL's sum-then-normalize)  */
    double reward_weights[16];  /* w_k of the K reward columns                                   */
    uint64_t baselines;         /* const float[B, K_out] ReMax baselines, or 0                    */
} RecapAdvParams;

/*
 * Parameters of verl's optimal token baseline (token_baseline.cu). The sequences of group g are
 * group_members[group_offsets[g] .. group_offsets[g + 1]) in ascending order (built on the host).
 */
#define RECAP_OTB_BAD_SLOTS 4 /* first bad token of old_logp, sum_pi_squared, rollout_is_weights, token_rewards */
typedef struct RecapOtbParams {
    uint64_t token_rewards;      /* const float[T]                                              */
    uint64_t old_logp;           /* const float[T]                                              */
    uint64_t sum_pi_squared;     /* const float[T]                                              */
    uint64_t rollout_is_weights; /* const float[T], or 0: 1                                     */
    uint64_t mask;               /* const float[T] / uint8_t[T] (the kernel's suffix)           */
    uint64_t cu_seqlens;         /* const int32_t[B + 1]                                        */
    uint64_t group_offsets;      /* const int32_t[num_groups + 1]                               */
    uint64_t group_members;      /* const int32_t[B]                                            */
    uint64_t cum_w;              /* double[T] W: the masked cumulative sum of w (written)       */
    uint64_t to_go;              /* double[T] G: the masked reward to go (written)              */
    uint64_t aligned;            /* int32_t[T]: multi-turn, the token at aligned position p of
                                    sequence s is aligned[cu[s] + p] (written)                  */
    uint64_t live;               /* int32_t[B]: unmasked tokens of each sequence (written)      */
    uint64_t bad;                /* int32_t[RECAP_OTB_BAD_SLOTS]: the smallest token index with a
                                    non-finite value at an unmasked token (atomicMin; INT32_MAX) */
    uint64_t advantages;         /* float[T] (written)                                          */
    uint64_t returns;            /* float[T] (written)                                          */
    int64_t num_tokens;
    int32_t num_seqs;
    int32_t num_groups;
    int32_t multi_turn;          /* 1: positions count unmasked tokens only                      */
    int32_t zero_tail;           /* 1: verl's handle_zero_tail                                   */
    double eps;
} RecapOtbParams;

/*
 * Parameters of the `recap train` driver kernels (train.cu): policy logits of feature rows, their
 * row statistics, sampling, gathered log-probabilities and the AdamW update.
 */
typedef struct RecapTrainParams {
    uint64_t logits;     /* const float[num_rows, vocab]                                        */
    uint64_t row_max;    /* float[num_rows]                                                     */
    uint64_t row_sum;    /* double[num_rows]: sum_j exp(z_j - max)                              */
    uint64_t row_lse;    /* double[num_rows]: max + log(sum)                                    */
    uint64_t tokens;     /* int32_t[num_tokens]: sampled (written) or given tokens              */
    uint64_t feat;       /* const int32_t[num_tokens]: feature row of each token                */
    uint64_t logp;       /* float[num_tokens]: z[feat, token] - lse[feat] (written)             */
    uint64_t w;          /* float[n] master weights (AdamW)                                     */
    uint64_t m;          /* float[n] first moment                                               */
    uint64_t v;          /* float[n] second moment                                              */
    uint64_t grad;       /* const float[n] gradient                                             */
    uint64_t w_bf16;     /* bf16[n] copy of the updated weights (written)                       */
    uint64_t seed;       /* sampling seed                                                       */
    int64_t num_rows;
    int64_t vocab;
    int64_t num_tokens;
    int64_t n;           /* AdamW elements                                                      */
    int64_t counter_base; /* draw counter of the first rollout token of this step              */
    int32_t group;       /* rollouts per prompt (G); row r = q * resp_len + pos                 */
    int32_t resp_len;    /* L                                                                   */
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bias1;         /* 1 - beta1^t                                                         */
    float bias2;         /* 1 - beta2^t                                                         */
    float pad0;
} RecapTrainParams;

/*
 * Rollout importance-sampling weights as their own op (rollout_is.cu; verl's
 * compute_rollout_correction_weights). Statistic slots, each reduced over the weights' units (token
 * level: the unmasked tokens, with their mask weight; sequence levels: the sequences with a mask sum
 * > 0, one each), written per sequence into column b of the slot-major partials and reduced by
 * recap_partials_finalize:
 */
#define RECAP_ISW_SUM 0       /* sum of the units' applied weights (token: m w; sequence: w n / (n + 1e-8)) */
#define RECAP_ISW_UNITS 1     /* their weight: sum of m (token level) or the count of sequences    */
#define RECAP_ISW_RATIO_MIN 2 /* min raw ratio exp(clamp(lw, +-20)) (a min; +inf if none)          */
#define RECAP_ISW_RATIO_MAX 3 /* max raw ratio (a max; -inf if none)                               */
#define RECAP_ISW_CORRECTED 4 /* units whose weight was truncated or masked (their weight)         */
#define RECAP_ISW_NAN 5       /* units whose log-weight is NaN                                     */
#define RECAP_ISW_SLOTS 6

/* Parameters of the rollout IS weight kernels (rollout_is.cu). */
typedef struct RecapIsParams {
    uint64_t log_ratio;  /* const float[T]: old_logp - rollout_logp                              */
    uint64_t mask;       /* const float[T] / uint8_t[T] (the kernel's suffix)                    */
    uint64_t cu_seqlens; /* const int32_t[B + 1]                                                 */
    uint64_t weights;    /* float[T] (written): the applied weight, 0 at masked tokens           */
    uint64_t partials;   /* double[RECAP_ISW_SLOTS, B] (slot-major, written per sequence)        */
    uint64_t stats;      /* const double[RECAP_ISW_SLOTS]: the reduced slots (recap_rollout_is_scale) */
    int64_t num_tokens;
    int32_t num_seqs;
    int32_t level;       /* RECAP_IS_TOKEN / _SEQUENCE / _GEOMETRIC                              */
    int32_t mode;        /* RECAP_IS_METRICS / _TRUNCATE / _MASK                                 */
    int32_t pad0;
    float lower;         /* mask: lower bound of the band                                        */
    float upper;         /* truncate: cap; mask: upper bound                                     */
} RecapIsParams;

/*
 * Parameters of generalized advantage estimation (gae.cu; the math and the CPU reference:
 * src/ops/gae.rs). One warp per sequence of the packed [T] arrays.
 */
#define RECAP_GAE_BAD_SLOTS 2 /* first bad token of token_rewards, values */
typedef struct RecapGaeParams {
    uint64_t token_rewards; /* const float[T]                                                   */
    uint64_t values;        /* const float[T]                                                   */
    uint64_t mask;          /* const float[T] / uint8_t[T] (the kernel's suffix)                */
    uint64_t cu_seqlens;    /* const int32_t[B + 1]                                             */
    uint64_t advantages;    /* float[T] (written; whitened in place by recap_gae_whiten)        */
    uint64_t returns;       /* float[T] (written)                                               */
    uint64_t row_stats;     /* double[3 B]: per sequence sum m, sum m x, sum m (x - mean_b)^2 of
                               its unwhitened advantages x (written with whiten only)           */
    uint64_t scale;         /* double[2]: the batch's mean and 1 / sqrt(var + 1e-8), or 0 and 0
                               when the mask sums to at most 1 (written)                        */
    uint64_t bad;           /* int32_t[RECAP_GAE_BAD_SLOTS]: the smallest token index with a
                               non-finite value at an unmasked token (atomicMin; INT32_MAX)     */
    int64_t num_tokens;
    int32_t num_seqs;
    int32_t whiten;         /* 1: whiten the advantages over the batch (verl's masked_whiten)    */
    double gamma;
    double lam;
} RecapGaeParams;

#endif /* RECAP_PARAMS_H */
