/* kernels/rollout_is.cu under the SIMT emulator (tests/rollout_is.rs, the emulated driver). */
#include "simt.h"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "rollout_is.cu"
}  // namespace

#define KERNELS(K)                          \
    K(recap_rollout_is_u8, RecapIsParams)   \
    K(recap_rollout_is_f32, RecapIsParams)  \
    K(recap_rollout_is_scale, RecapIsParams)
SIMT_MODULE(rollout_is, KERNELS)
