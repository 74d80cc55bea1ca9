/* kernels/reduce.cu under the SIMT emulator (tests/rollout_is.rs, the emulated driver). */
#include "simt.h"
/* reduce.cu compares threadIdx.x (unsigned, as in CUDA) with int counts; nvcc does not warn */
#pragma GCC diagnostic ignored "-Wsign-compare"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "reduce.cu"
}  // namespace

#define REDUCE_K(K, MAXK)                                   \
    K(recap_reduce_k##MAXK##_f32, RecapReduceParams)        \
    K(recap_reduce_k##MAXK##_u8, RecapReduceParams)
#define KERNELS(K)                                    \
    K(recap_seq_stats_f32, RecapSeqParams)            \
    K(recap_seq_stats_u8, RecapSeqParams)             \
    K(recap_partials_finalize, RecapFinalizeParams)   \
    K(recap_logits_finish, RecapLogitsFinishParams)   \
    REDUCE_K(K, 1) REDUCE_K(K, 2) REDUCE_K(K, 4) REDUCE_K(K, 8) REDUCE_K(K, 16)
SIMT_MODULE(reduce, KERNELS)
