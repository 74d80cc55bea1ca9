/* kernels/rollout_is.cu and the final reduction of reduce.cu under the SIMT emulator
 * (tests/rollout_is.rs). */
#include "simt.h"
/* reduce.cu compares threadIdx.x (unsigned, as in CUDA) with int counts; nvcc does not warn */
#pragma GCC diagnostic ignored "-Wsign-compare"
#include "reduce.cu"
#include "rollout_is.cu"

SIMT_EXPORT(recap_rollout_is_u8, RecapIsParams)
SIMT_EXPORT(recap_rollout_is_f32, RecapIsParams)
SIMT_EXPORT(recap_rollout_is_scale, RecapIsParams)
SIMT_EXPORT(recap_partials_finalize, RecapFinalizeParams)
