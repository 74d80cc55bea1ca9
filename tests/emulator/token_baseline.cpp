/* kernels/token_baseline.cu under the SIMT emulator (tests/token_baseline.rs, the emulated driver). */
#include "simt.h"
/* the kernel file in a namespace of its own: its helpers never meet another file's (one
 * module per file, as on the GPU) */
namespace {
#include "token_baseline.cu"
}  // namespace

#define KERNELS(K)                         \
    K(recap_otb_scan_u8, RecapOtbParams)   \
    K(recap_otb_scan_f32, RecapOtbParams)  \
    K(recap_otb_apply_u8, RecapOtbParams)  \
    K(recap_otb_apply_f32, RecapOtbParams)
SIMT_MODULE(token_baseline, KERNELS)
