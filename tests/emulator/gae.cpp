/* kernels/gae.cu under the SIMT emulator (tests/gae.rs, the emulated driver). */
#include "simt.h"
namespace {
#include "gae.cu"
}  // namespace

#define KERNELS(K)                        \
    K(recap_gae_scan_f32, RecapGaeParams) \
    K(recap_gae_scan_u8, RecapGaeParams)  \
    K(recap_gae_stats, RecapGaeParams)    \
    K(recap_gae_whiten, RecapGaeParams)
SIMT_MODULE(gae, KERNELS)
