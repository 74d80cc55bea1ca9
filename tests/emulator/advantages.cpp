/* kernels/advantages.cu under the SIMT emulator (tests/advantages.rs, the emulated driver). */
#include "simt.h"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "advantages.cu"
}  // namespace

#define KERNELS(K)                        \
    K(recap_adv_prepare, RecapAdvParams)   \
    K(recap_adv_batch_std, RecapAdvParams) \
    K(recap_adv_apply, RecapAdvParams)     \
    K(recap_adv_whiten, RecapAdvParams)
SIMT_MODULE(advantages, KERNELS)
