/* kernels/grpo_loss.cu under the SIMT emulator (the emulated driver): every K instantiation of the
 * plain and the ext kernels. */
#include "simt.h"
#pragma GCC diagnostic ignored "-Wsign-compare"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "grpo_loss.cu"
}  // namespace

#define GRPO_K(K, MAXK)                                    \
    K(recap_grpo_loss_k##MAXK##_f32, RecapGrpoParams)      \
    K(recap_grpo_loss_k##MAXK##_u8, RecapGrpoParams)       \
    K(recap_grpo_loss_ext_k##MAXK##_f32, RecapGrpoParams)  \
    K(recap_grpo_loss_ext_k##MAXK##_u8, RecapGrpoParams)
#define KERNELS(K) GRPO_K(K, 1) GRPO_K(K, 2) GRPO_K(K, 4) GRPO_K(K, 8) GRPO_K(K, 16)
SIMT_MODULE(grpo_loss, KERNELS)
