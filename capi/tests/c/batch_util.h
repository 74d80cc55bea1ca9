/* The tests' batch: T tokens in B sequences, one objective of kind kinds[0], advantages [B, 1],
 * every other field zero (no KL, no rollout correction, this batch's own normalizers). */
#ifndef RECAP_TEST_BATCH_UTIL_H
#define RECAP_TEST_BATCH_UTIL_H
#include <string.h>
#include "recap_kernels.h"

static RecapGrpoBatch test_batch(int64_t t, int64_t b, const float* old_logp, const float* adv, const void* mask,
                                 int32_t mask_is_u8, const int32_t* cu, const float* lambda, const int32_t* kinds) {
    RecapGrpoBatch x;
    memset(&x, 0, sizeof x);
    x.num_tokens = t;
    x.num_seqs = b;
    x.num_objectives = 1;
    x.mask_is_u8 = mask_is_u8;
    x.old_logp = old_logp;
    x.advantages = adv;
    x.mask = mask;
    x.cu_seqlens = cu;
    x.lambda = lambda;
    x.objectives = kinds;
    return x;
}

/* Unsharded logits `data` [rows, ld] of `dtype` scoring `labels` at `temperature`, ignore_index -100,
 * as the address of a compound literal (valid in the enclosing block). */
#define TEST_LOGITS(data, dtype, rows, vocab, ld, labels, temperature) \
    (&(RecapLogits){(void*)(data), (dtype), -100, (rows), (vocab), (ld), 0, (labels), (temperature)})

#endif
