/* Kernels that test the SIMT emulator itself (tests/emulator_selftest.rs): the warp operations'
 * results as CUDA defines them, and the launches it must refuse (a deadlock, a divergent or
 * partial-warp shuffle). Not a kernel file of the crate. */
#include "simt.h"

struct SelfParams {
    int* out;   /* [blockDim.x * gridDim.x] */
    int mode;
};

namespace {
/* mode 0: out[t] = xor-butterfly sum of the lane ids of the warp (496), then + ballot of odd lanes
 * (0xaaaaaaaa) == ballot ? 1 : 0, then the block sum of 1 through shared memory after a barrier;
 * mode 1: lane 0 waits at __syncthreads while the other lanes of its warp wait at __syncwarp for
 *         it (a deadlock; a __syncthreads that only some threads reach is not one when the others
 *         exit, since exited threads drop out of the barrier as on sm_70 and later);
 * mode 2: lane 0 leaves, the others shuffle (an exited lane in a full mask);
 * mode 3: a shuffle with a partial mask. */
void selftest(const SelfParams p) {
    const int t = (int)threadIdx.x, lane = t & 31;
    const int g = (int)(blockIdx.x * blockDim.x) + t;
    if (p.mode == 1) {
        if (lane == 0) __syncthreads();
        else __syncwarp();
        return;
    }
    if (p.mode == 2) {
        if (lane == 0) return;
        p.out[g] = __shfl_down_sync(0xffffffffu, lane, 1);
        return;
    }
    if (p.mode == 3) {
        p.out[g] = __shfl_sync(0x0000ffffu, lane, 0);
        return;
    }
    int v = lane;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
    const int up = __shfl_up_sync(0xffffffffu, lane, 3);   /* lane - 3, or lane below 3 */
    const int idx = __shfl_sync(0xffffffffu, lane * 10, 7); /* lane 7's value, 70 */
    __shared__ int s_count;
    if (t == 0) s_count = 0;
    __syncthreads();
    atomicAdd(&s_count, 1);
    __syncthreads();
    const bool ok = v == 496 && odd == 0xaaaaaaaau && up == (lane >= 3 ? lane - 3 : lane) && idx == 70 &&
                    __all_sync(0xffffffffu, 1) && !__any_sync(0xffffffffu, 0) && s_count == (int)blockDim.x;
    p.out[g] = ok ? 1 : 0;
}
}  // namespace

#define KERNELS(K) K(selftest, SelfParams)
SIMT_MODULE(selftest, KERNELS)
