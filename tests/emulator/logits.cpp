/* kernels/logits.cu under the SIMT emulator (the emulated driver): forward and backward, vectorized
 * and scalar, in every dtype; the tensor-parallel combine and the conversions. */
#include "simt.h"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "logits.cu"
}  // namespace

#define LOGITS_T(K, SUF)                                  \
    K(recap_logprob_fwd_##SUF, RecapLogitsParams)         \
    K(recap_logprob_fwd_vec_##SUF, RecapLogitsParams)     \
    K(recap_logprob_bwd_##SUF, RecapLogitsParams)         \
    K(recap_logprob_bwd_vec_##SUF, RecapLogitsParams)
#define KERNELS(K)                                                   \
    LOGITS_T(K, f32) LOGITS_T(K, f16) LOGITS_T(K, bf16)              \
    K(recap_tp_combine, RecapTpParams)                               \
    K(recap_f32_to_bf16, RecapLogitsParams)                          \
    K(recap_valid_mask, RecapLogitsParams)                           \
    K(recap_move_rows, RecapLogitsParams)
SIMT_MODULE(logits, KERNELS)
