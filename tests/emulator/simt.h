/*
 * simt.h — runs CUDA kernel source on the host, for tests on machines without a GPU: the kernel
 * file is compiled as C++20 with these definitions, and each launch runs its blocks one after
 * another, each block as blockDim.x std::threads. __syncthreads is a barrier of the block's
 * threads, a warp shuffle an exchange between two barriers of the warp's threads (every lane of the
 * warp must reach it, as in the kernels emulated here), a thread that returns drops out of both
 * barriers (as an exited thread on a GPU), __shared__ variables are statics (one block runs at a
 * time), atomics take a lock. SIMT_EXPORT(kernel, Params) gives the C entry point
 * `simt_<kernel>(const Params*, grid, block)` that tests load (tests/emulator/mod.rs).
 * Emulates semantics, not timing, and covers only what the emulated kernels use.
 */
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::exp;
using std::isfinite;
using std::max;
using std::min;

struct SimtDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local SimtDim3 threadIdx;
inline SimtDim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* simt_barrier = nullptr;
inline std::vector<std::barrier<>*> simt_warp_barriers;
inline std::mutex simt_atomic_lock;

#define __syncthreads() simt_barrier->arrive_and_wait()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

constexpr int SIMT_MAX_BLOCK = 1024;

template <class V>
V* simt_exchange() {
    static V slots[SIMT_MAX_BLOCK];
    return slots;
}

template <class V>
V simt_shuffle(V v, int lane_from) {
    const int t = (int)threadIdx.x;
    std::barrier<>* warp = simt_warp_barriers[t >> 5];
    simt_exchange<V>()[t] = v;
    warp->arrive_and_wait();
    const V r = simt_exchange<V>()[(t & ~31) + lane_from];
    warp->arrive_and_wait();
    return r;
}

template <class V>
V __shfl_up_sync(unsigned, V v, int off) {
    const int lane = (int)threadIdx.x & 31;
    return simt_shuffle(v, lane >= off ? lane - off : lane);
}

template <class V>
V __shfl_down_sync(unsigned, V v, int off) {
    const int lane = (int)threadIdx.x & 31;
    return simt_shuffle(v, lane + off < 32 ? lane + off : lane);
}

template <class V>
V __shfl_sync(unsigned, V v, int src) {
    return simt_shuffle(v, src & 31);
}

inline int atomicMin(int* a, int v) {
    std::lock_guard<std::mutex> g(simt_atomic_lock);
    const int old = *a;
    if (v < old) *a = v;
    return old;
}

inline int atomicAdd(int* a, int v) {
    std::lock_guard<std::mutex> g(simt_atomic_lock);
    const int old = *a;
    *a += v;
    return old;
}

/* Runs kernel k over `grid` blocks of `block` threads (a multiple of 32). */
template <class P>
void simt_launch(void (*k)(const P), int grid, int block, const P& p) {
    gridDim.x = (unsigned)grid;
    blockDim.x = (unsigned)block;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = (unsigned)b;
        std::barrier<> bar(block);
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        simt_warp_barriers.clear();
        for (int w = 0; w < block / 32; ++w) {
            warps.push_back(std::make_unique<std::barrier<>>(32));
            simt_warp_barriers.push_back(warps.back().get());
        }
        simt_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (int t = 0; t < block; ++t) {
            threads.emplace_back([&, t] {
                threadIdx.x = (unsigned)t;
                k(p);
                simt_warp_barriers[t >> 5]->arrive_and_drop();
                simt_barrier->arrive_and_drop();
            });
        }
        for (auto& th : threads) th.join();
    }
}

#define SIMT_EXPORT(kernel, Params) \
    extern "C" void simt_##kernel(const Params* p, int grid, int block) { simt_launch<Params>(kernel, grid, block, *p); }
