/* kernels/train.cu under the SIMT emulator (the emulated driver: `recap train --device cuda`). */
#include "simt.h"
#pragma GCC diagnostic ignored "-Wsign-compare"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "train.cu"
}  // namespace

#define KERNELS(K)                              \
    K(recap_train_row_stats, RecapTrainParams)  \
    K(recap_train_sample, RecapTrainParams)     \
    K(recap_train_gather, RecapTrainParams)     \
    K(recap_train_adamw, RecapTrainParams)
SIMT_MODULE(train, KERNELS)
