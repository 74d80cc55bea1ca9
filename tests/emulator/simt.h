/*
 * simt.h — runs CUDA kernel source on the host, for tests on machines without a GPU.
 *
 * A kernel file is compiled as C++20 with these definitions (and the bf16/f16 shims cuda_bf16.h,
 * cuda_fp16.h beside this file), with -fno-strict-aliasing (the kernels read vector loads through
 * pointers of the element type, as CUDA allows) and -ffp-contract=off. A launch runs its blocks one
 * after another, from the last to the first (a kernel may not rely on block order); a block's threads are
 * fibers (user-level threads with their own stacks, switched by a few instructions: assembly on
 * x86-64, ucontext elsewhere), all on the launching OS thread. A fiber runs until it reaches a
 * synchronization point, then the next one runs:
 *   __syncthreads()                 a barrier of the block's live threads (an exited thread drops
 *                                   out, as on a GPU since sm_70);
 *   __shfl_{,up_,down_,xor_}sync,   a barrier of the warp's 32 lanes with an exchange of values;
 *   __ballot_sync, __any_sync,      the mask must be the full warp and every lane of it live and
 *   __all_sync, __syncwarp          at the same call with the same mask, else the launch fails
 *                                   (on a GPU that is undefined behaviour).
 * A deadlock (threads waiting at barriers none of the others will reach, e.g. a __syncthreads in a
 * branch only some threads take) fails the launch with a message instead of hanging. __shared__
 * variables are statics (one block runs at a time; they are NOT reset between blocks, so a kernel
 * that reads shared memory before writing it sees the previous block's values, not garbage).
 * Atomics are plain read-modify-writes (fibers never interleave inside one).
 *
 * What this does not model (a GPU run still checks these): timing and occupancy; races between
 * threads that a GPU's scheduling exposes but the fixed fiber order hides, in particular
 * warp-synchronous code that shares memory between lanes without __syncwarp (a fiber runs ahead to
 * its next synchronization point); the memory model's ordering and fences (everything is
 * sequentially consistent here); the rounding of fast-math intrinsics (__expf, __logf, ... are the
 * host's libm, and the kernels are compiled without FMA contraction, where nvcc contracts); and
 * out-of-bounds reads (writes near a buffer are caught by the emulated driver's red zones).
 *
 * SIMT_MODULE(stem, LIST) exports, for each kernel K of LIST, `int simt_K(const Params*, grid,
 * block)` (tests/emulator/mod.rs loads these) and the table `simt_module_<stem>` the emulated CUDA
 * driver (emulator/) maps kernel names with. A launch returns 0, or -1 with the reason in
 * simt_last_error().
 */
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>
/* what the kernel files include, here first: a wrapper includes its kernel file inside an
 * anonymous namespace (each wrapper does), where these, already included, are no-ops */
#include <math.h>
#include <stdint.h>
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#if !defined(__x86_64__) || defined(SIMT_UCONTEXT)
#include <ucontext.h>
#define SIMT_USE_UCONTEXT 1
#endif

using std::exp;
using std::isfinite;
using std::max;
using std::min;

/* ---- CUDA's qualifiers and built-in types ---------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct SimtDim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline SimtDim3 threadIdx, blockIdx, blockDim, gridDim;

constexpr int SIMT_MAX_BLOCK = 1024;
constexpr size_t SIMT_STACK = 256 * 1024;

/* ---- fibers ---------------------------------------------------------------------------------- */
enum SimtState { SIMT_RUNNABLE, SIMT_WAIT_BLOCK, SIMT_WAIT_WARP, SIMT_EXITED };

/* A suspended execution: a ucontext, or the stack pointer simt_switch saved. */
#ifdef SIMT_USE_UCONTEXT
using SimtContext = ucontext_t;
#else
using SimtContext = void*;
#endif

struct SimtFiber {
    SimtContext ctx;
    char* stack;
    int state;
    uint64_t wait_gen;
};

struct SimtBlock {
    int n = 0;                       /* threads of the block */
    int cur = 0;                     /* the running fiber */
    int live = 0;                    /* not exited */
    uint64_t block_gen = 0;
    int block_arrived = 0;
    int warp_live[SIMT_MAX_BLOCK / 32];
    int warp_arrived[SIMT_MAX_BLOCK / 32];
    uint64_t warp_gen[SIMT_MAX_BLOCK / 32];
    unsigned warp_exited[SIMT_MAX_BLOCK / 32]; /* lanes that exited (or do not exist) */
    unsigned warp_mask[SIMT_MAX_BLOCK / 32];   /* the mask of the pending warp operation */
    bool failed = false;
    std::string error;
    const char* kernel = "";
    const void* params = nullptr;
    void (*entry)(const void*) = nullptr;
    void* kfn = nullptr;
    std::vector<SimtFiber> fibers;
    SimtContext sched{}; /* the scheduler's, while a fiber runs */
};
inline SimtBlock simt_blk;
inline std::mutex simt_launch_lock;
inline std::string simt_error_text;

#ifndef SIMT_USE_UCONTEXT
/* simt_switch(save, to): saves the callee-saved registers and the stack pointer into *save and
 * resumes the fiber whose stack pointer is `to` (System V x86-64). Weak: every translation unit
 * that includes this header carries it, the linker keeps one. */
extern "C" void simt_switch(void** save, void* to);
asm(R"(
    .text
    .weak simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
)");
#endif

/* Saves the running execution into *from and resumes *to. A compiler barrier on each side: memory
 * other fibers write while this one is switched out (__shared__ statics, exchange slots) is read
 * again after the switch, never cached across it. */
inline void simt_swap(SimtContext* from, SimtContext* to) {
    asm volatile("" ::: "memory");
#ifdef SIMT_USE_UCONTEXT
    swapcontext(from, to);
#else
    simt_switch(from, *to);
#endif
    asm volatile("" ::: "memory");
}

/* Back to the scheduler (the fiber's state says why). */
inline void simt_yield() { simt_swap(&simt_blk.fibers[simt_blk.cur].ctx, &simt_blk.sched); }

/* Fails the launch: the message is kept, the block is abandoned (its fibers are never resumed). */
[[noreturn]] inline void simt_fail(const std::string& why) {
    if (!simt_blk.failed) {
        simt_blk.failed = true;
        simt_blk.error = std::string(simt_blk.kernel) + " block " + std::to_string(blockIdx.x) + " thread " +
                         std::to_string(threadIdx.x) + ": " + why;
    }
    simt_blk.fibers[simt_blk.cur].state = SIMT_EXITED;
    for (;;) simt_yield();
}

inline void simt_release_warp(int w) {
    simt_blk.warp_arrived[w] = 0;
    ++simt_blk.warp_gen[w];
}

inline void simt_release_block() {
    simt_blk.block_arrived = 0;
    ++simt_blk.block_gen;
}

inline void simt_thread_exit() {
    const int t = simt_blk.cur, w = t >> 5;
    simt_blk.fibers[t].state = SIMT_EXITED;
    --simt_blk.live;
    --simt_blk.warp_live[w];
    simt_blk.warp_exited[w] |= 1u << (t & 31);
    if (simt_blk.block_arrived > 0 && simt_blk.block_arrived == simt_blk.live) simt_release_block();
    if (simt_blk.warp_arrived[w] > 0) {
        /* lanes wait at a warp operation whose mask holds this lane: it can never complete */
        if (simt_blk.warp_mask[w] & (1u << (t & 31)))
            simt_fail("a lane exited while the others of its warp wait at a shuffle/vote with a full mask");
    }
}

inline void simt_fiber_main() {
    simt_blk.entry(simt_blk.params);
    simt_thread_exit();
    for (;;) simt_yield();
}

/* ---- synchronization ------------------------------------------------------------------------- */
inline void simt_syncthreads() {
    SimtFiber& f = simt_blk.fibers[simt_blk.cur];
    f.wait_gen = simt_blk.block_gen;
    f.state = SIMT_WAIT_BLOCK;
    if (++simt_blk.block_arrived == simt_blk.live) simt_release_block();
    simt_yield();
}
#define __syncthreads() simt_syncthreads()

/* Every lane deposits v in its exchange slot and waits for the warp; returns the generation whose
 * slots hold the values (two buffers alternate, so a lane running ahead to the next exchange never
 * overwrites a value another lane has still to read). */
inline uint64_t simt_warp_arrive(unsigned mask) {
    const int t = simt_blk.cur, w = t >> 5;
    if (mask != 0xffffffffu) simt_fail("warp operations with a partial mask are not emulated");
    if (simt_blk.warp_exited[w] != 0u) simt_fail("warp operation with a full mask after lanes of the warp exited");
    if (simt_blk.warp_arrived[w] == 0) simt_blk.warp_mask[w] = mask;
    else if (simt_blk.warp_mask[w] != mask) simt_fail("lanes of one warp at warp operations with different masks");
    SimtFiber& f = simt_blk.fibers[t];
    const uint64_t g = simt_blk.warp_gen[w];
    f.wait_gen = g;
    f.state = SIMT_WAIT_WARP;
    if (++simt_blk.warp_arrived[w] == simt_blk.warp_live[w]) simt_release_warp(w);
    simt_yield();
    return g;
}

template <class V>
V* simt_exchange(uint64_t gen) {
    static V slots[2][SIMT_MAX_BLOCK];
    return slots[gen & 1];
}

template <class V>
V simt_shuffle(unsigned mask, V v, int lane_from) {
    const int t = simt_blk.cur;
    simt_exchange<V>(simt_blk.warp_gen[t >> 5])[t] = v;
    const uint64_t g = simt_warp_arrive(mask);
    return simt_exchange<V>(g)[(t & ~31) + lane_from];
}

template <class V>
V __shfl_up_sync(unsigned mask, V v, int off) {
    const int lane = (int)threadIdx.x & 31;
    return simt_shuffle(mask, v, lane >= off ? lane - off : lane);
}

template <class V>
V __shfl_down_sync(unsigned mask, V v, int off) {
    const int lane = (int)threadIdx.x & 31;
    return simt_shuffle(mask, v, lane + off < 32 ? lane + off : lane);
}

template <class V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    const int lane = (int)threadIdx.x & 31;
    return simt_shuffle(mask, v, (lane ^ lane_mask) & 31);
}

template <class V>
V __shfl_sync(unsigned mask, V v, int src) {
    return simt_shuffle(mask, v, src & 31);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    const int t = simt_blk.cur;
    simt_exchange<int>(simt_blk.warp_gen[t >> 5])[t] = pred != 0;
    const int* s = simt_exchange<int>(simt_warp_arrive(mask)) + (t & ~31);
    unsigned bits = 0;
    for (int i = 0; i < 32; ++i) bits |= (unsigned)(s[i] != 0) << i;
    return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0u; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)simt_warp_arrive(mask); }
/* one OS thread, sequentially consistent: fences order nothing further, and a cache-hinted load
 * is a load */
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T>
T __ldcg(const T* p) { return *p; }

/* ---- atomics (no fiber switch can happen inside one) ----------------------------------------- */
template <class V>
V atomicAdd(V* a, V v) {
    const V old = *a;
    *a = old + v;
    return old;
}
template <class V>
V atomicMin(V* a, V v) {
    const V old = *a;
    if (v < old) *a = v;
    return old;
}
template <class V>
V atomicMax(V* a, V v) {
    const V old = *a;
    if (v > old) *a = v;
    return old;
}
template <class V>
V atomicExch(V* a, V v) {
    const V old = *a;
    *a = v;
    return old;
}
template <class V>
V atomicCAS(V* a, V compare, V v) {
    const V old = *a;
    if (old == compare) *a = v;
    return old;
}

/* ---- arithmetic intrinsics: the host's correctly rounded or libm operations ------------------ */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class V>
V __ldg(const V* p) {
    return *p;
}

/* ---- launches -------------------------------------------------------------------------------- */
inline std::vector<char*>& simt_stacks() {
    static std::vector<char*> stacks;
    return stacks;
}

/* A stack per thread, kept for later launches; a guard page below each turns an overflow into a
 * fault instead of silent corruption. */
inline char* simt_stack(int t) {
    std::vector<char*>& s = simt_stacks();
    while ((int)s.size() <= t) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        char* m = (char*)mmap(nullptr, SIMT_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, page, PROT_NONE);
        s.push_back(m + page);
    }
    return s[t];
}

inline bool simt_runnable(const SimtFiber& f, int t) {
    switch (f.state) {
    case SIMT_RUNNABLE: return true;
    case SIMT_WAIT_BLOCK: return simt_blk.block_gen > f.wait_gen;
    case SIMT_WAIT_WARP: return simt_blk.warp_gen[t >> 5] > f.wait_gen;
    default: return false;
    }
}

/* Runs the current block to completion; false (with simt_blk.error) when it failed. */
inline bool simt_run_block(int n) {
    SimtBlock& s = simt_blk;
    s.n = n;
    s.live = n;
    s.block_gen = 0;
    s.block_arrived = 0;
    const int warps = (n + 31) / 32;
    for (int w = 0; w < warps; ++w) {
        const int lanes = std::min(32, n - 32 * w);
        s.warp_live[w] = lanes;
        s.warp_arrived[w] = 0;
        s.warp_gen[w] = 0;
        s.warp_mask[w] = 0;
        s.warp_exited[w] = lanes == 32 ? 0u : ~((1u << lanes) - 1u);
    }
    s.fibers.resize((size_t)n);
    for (int t = 0; t < n; ++t) {
        SimtFiber& f = s.fibers[t];
        f.stack = simt_stack(t);
        if (!f.stack) {
            s.error = "cannot map a fiber stack";
            return false;
        }
        f.state = SIMT_RUNNABLE;
        f.wait_gen = 0;
#ifdef SIMT_USE_UCONTEXT
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = SIMT_STACK;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, simt_fiber_main, 0);
#else
        /* the stack simt_switch pops: six callee-saved registers, then the return address (the
         * fiber's entry) at a 16-byte boundary, so the entry starts with rsp = 8 mod 16 */
        uintptr_t top = ((uintptr_t)f.stack + SIMT_STACK) & ~(uintptr_t)15;
        void** sp = (void**)(top - 8 * sizeof(void*));
        for (int i = 0; i < 6; ++i) sp[i] = nullptr;
        sp[6] = (void*)&simt_fiber_main;
        sp[7] = nullptr;
        f.ctx = sp;
#endif
    }
    while (s.live > 0) {
        bool ran = false;
        for (int t = 0; t < n; ++t) {
            SimtFiber& f = s.fibers[t];
            if (!simt_runnable(f, t)) continue;
            ran = true;
            f.state = SIMT_RUNNABLE;
            s.cur = t;
            threadIdx.x = (unsigned)t;
            simt_swap(&s.sched, &f.ctx);
            if (s.failed) return false;
        }
        if (!ran) {
            int at_block = 0, at_warp = 0;
            for (int t = 0; t < n; ++t) {
                at_block += s.fibers[t].state == SIMT_WAIT_BLOCK;
                at_warp += s.fibers[t].state == SIMT_WAIT_WARP;
            }
            s.error = std::string(s.kernel) + " block " + std::to_string(blockIdx.x) + ": deadlock: " +
                      std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
                      " at warp operations, " + std::to_string(n - s.live) + " exited";
            return false;
        }
    }
    return true;
}

template <class P>
void simt_entry(const void* p) {
    ((void (*)(const P))simt_blk.kfn)(*(const P*)p);
}

/* Runs kernel `k` over `grid` blocks of `block` threads; 0, or -1 with the reason in
 * simt_last_error(). Launches are serialized (the emulator's state is global). */
template <class P>
int simt_launch(const char* name, void (*k)(const P), unsigned grid, unsigned block, const P& p) {
    std::lock_guard<std::mutex> lock(simt_launch_lock);
    if (block == 0 || block > (unsigned)SIMT_MAX_BLOCK) {
        simt_error_text = std::string(name) + ": block of " + std::to_string(block) + " threads (1 to 1024)";
        return -1;
    }
    simt_blk.kernel = name;
    simt_blk.params = &p;
    simt_blk.kfn = (void*)k;
    simt_blk.entry = &simt_entry<P>;
    simt_blk.failed = false;
    simt_blk.error.clear();
    gridDim = SimtDim3{grid, 1, 1};
    blockDim = SimtDim3{block, 1, 1};
    /* from the last block to the first: a kernel that assumes block 0 runs first, or that the
     * highest block finishes last (instead of taking a ticket), gets a different result here */
    for (unsigned i = 0; i < grid; ++i) {
        const unsigned b = grid - 1 - i;
        blockIdx = SimtDim3{b, 0, 0};
        if (!simt_run_block((int)block)) {
            simt_error_text = simt_blk.error;
            return -1;
        }
    }
    return 0;
}

extern "C" __attribute__((weak)) const char* simt_last_error() { return simt_error_text.c_str(); }

/* One kernel of a module's table: its name, its launch on a parameter struct, the struct's size. */
struct SimtKernel {
    const char* name;
    int (*launch)(const void* params, unsigned grid, unsigned block);
    size_t params_size;
};

#define SIMT_EXPORT_ONE(kernel, Params)                                              \
    extern "C" int simt_##kernel(const Params* p, int grid, int block) {             \
        return simt_launch<Params>(#kernel, kernel, (unsigned)grid, (unsigned)block, *p); \
    }
#define SIMT_ENTRY_ONE(kernel, Params)                                                          \
    SimtKernel{#kernel,                                                                          \
               [](const void* p, unsigned grid, unsigned block) {                                \
                   return simt_launch<Params>(#kernel, kernel, grid, block, *(const Params*)p); \
               },                                                                                \
               sizeof(Params)},
#define SIMT_MODULE(stem, LIST)                                                      \
    LIST(SIMT_EXPORT_ONE)                                                            \
    static const SimtKernel simt_table_##stem[] = {LIST(SIMT_ENTRY_ONE)};            \
    extern "C" const SimtKernel* simt_module_##stem(size_t* n) {                     \
        *n = sizeof(simt_table_##stem) / sizeof(simt_table_##stem[0]);               \
        return simt_table_##stem;                                                    \
    }
