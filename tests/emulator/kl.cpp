/* kernels/kl.cu under the SIMT emulator (tests/rejection.rs, the emulated driver). */
#include "simt.h"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "kl.cu"
}  // namespace

#define KERNELS(K)                            \
    K(recap_rejection_u8, RecapRejectParams)  \
    K(recap_rejection_f32, RecapRejectParams) \
    K(recap_kl_u8, RecapKlParams)             \
    K(recap_kl_f32, RecapKlParams)
SIMT_MODULE(kl, KERNELS)
