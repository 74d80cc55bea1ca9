/* kernels/kl.cu under the SIMT emulator (tests/rejection.rs). */
#include "simt.h"
#include "kl.cu"

SIMT_EXPORT(recap_rejection_u8, RecapRejectParams)
SIMT_EXPORT(recap_rejection_f32, RecapRejectParams)
