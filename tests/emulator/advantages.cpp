/* kernels/advantages.cu under the SIMT emulator (tests/advantages.rs). */
#include "simt.h"
#include "advantages.cu"

SIMT_EXPORT(recap_adv_prepare, RecapAdvParams)
SIMT_EXPORT(recap_adv_batch_std, RecapAdvParams)
SIMT_EXPORT(recap_adv_apply, RecapAdvParams)
SIMT_EXPORT(recap_adv_whiten, RecapAdvParams)
