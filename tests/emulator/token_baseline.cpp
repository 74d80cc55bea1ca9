/* kernels/token_baseline.cu under the SIMT emulator (tests/token_baseline.rs). */
#include "simt.h"
#include "token_baseline.cu"

SIMT_EXPORT(recap_otb_scan_u8, RecapOtbParams)
SIMT_EXPORT(recap_otb_scan_f32, RecapOtbParams)
SIMT_EXPORT(recap_otb_apply_u8, RecapOtbParams)
SIMT_EXPORT(recap_otb_apply_f32, RecapOtbParams)
