/*
 * common.cuh — device helpers shared by the kernel families: the packed variable-length layout
 * (token -> sequence lookup), mask loading, and fixed-order (deterministic) block reductions.
 *
 * Layout: T tokens in B sequences, sequence b holds tokens [cu[b], cu[b+1]). Every token kernel gives
 * each block a tile of blockDim.x * items_per_thread consecutive tokens; thread i of the block takes
 * tokens tile_start + i, tile_start + i + blockDim.x, ... (coalesced). The sequences a tile overlaps
 * are found once per block (two binary searches by thread 0) and their boundaries staged in shared
 * memory, where each thread finds its token's sequence by a short binary search.
 */
#ifndef RECAP_COMMON_CUH
#define RECAP_COMMON_CUH

#include <stdint.h>
#include "recap_params.h"
#include "grpo_math.cuh"

#define RECAP_BLOCK 256
#define RECAP_WARPS (RECAP_BLOCK / 32)
/* Sequence boundaries a tile can stage in shared memory; more fall back to global searches. */
#define RECAP_TILE_SEQ_CAP 1024

#define RECAP_OP_SUM 0
#define RECAP_OP_MIN 1
#define RECAP_OP_MAX 2

__device__ __forceinline__ float recap_load_mask(const float* m, int64_t t) { return m[t]; }
__device__ __forceinline__ float recap_load_mask(const uint8_t* m, int64_t t) { return m[t] ? 1.0f : 0.0f; }

/* Largest b in [lo, hi] with cu[b] <= t (cu non-decreasing, cu[lo] <= t). */
__device__ __forceinline__ int recap_find_seq(const int32_t* cu, int lo, int hi, int64_t t) {
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if ((int64_t)cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* Per-block lookup of the sequences a tile overlaps. */
struct RecapTileSeqs {
    int b_lo;    /* sequence of the tile's first token                               */
    int b_hi;    /* a bound >= the sequence of its last token (that of the next tile) */
    int staged;  /* 1: boundaries cu[b_lo .. b_hi + 1] are in s_cu                   */
};

/* Must be called by every thread of the block (it synchronizes). tile_seq[i] is the sequence of
 * tile i's first token (written by recap_seq_stats_*); `empty`: this tile has no tokens (then
 * tile_seq is not read and the tile spans no sequence: b_hi = b_lo - 1). The bounds are clamped
 * into [0, B - 1], so a layout that failed the device-side checks reads nothing out of bounds. */
__device__ __forceinline__ RecapTileSeqs recap_tile_setup(const int32_t* __restrict__ cu,
                                                          const int32_t* __restrict__ tile_seq, int num_seqs,
                                                          int32_t* s_cu, bool empty = false) {
    RecapTileSeqs ts;
    const int last = num_seqs - 1;
    if (empty || last < 0) {
        ts.b_lo = 0;
        ts.b_hi = -1;
    } else {
        int lo = tile_seq[blockIdx.x];
        int hi = (blockIdx.x + 1 < gridDim.x) ? tile_seq[blockIdx.x + 1] : last;
        lo = lo < 0 ? 0 : (lo > last ? last : lo);
        hi = hi < lo ? lo : (hi > last ? last : hi);
        ts.b_lo = lo;
        ts.b_hi = hi;
    }
    ts.staged = (ts.b_hi - ts.b_lo + 2) <= RECAP_TILE_SEQ_CAP;
    if (ts.staged) {
        const int n = ts.b_hi - ts.b_lo + 2;
        for (int i = threadIdx.x; i < n; i += blockDim.x) s_cu[i] = cu[ts.b_lo + i];
    }
    __syncthreads();
    return ts;
}

__device__ __forceinline__ int recap_tile_find(const RecapTileSeqs& ts, const int32_t* cu,
                                               const int32_t* s_cu, int64_t t) {
    if (ts.staged) {
        int lo = 0, hi = ts.b_hi - ts.b_lo;
        while (lo < hi) {
            int mid = lo + (hi - lo + 1) / 2;
            if ((int64_t)s_cu[mid] <= t) lo = mid; else hi = mid - 1;
        }
        return ts.b_lo + lo;
    }
    return recap_find_seq(cu, ts.b_lo, ts.b_hi, t);
}

__device__ __forceinline__ double recap_combine(double a, double b, int op) {
    return op == RECAP_OP_MIN ? fmin(a, b) : (op == RECAP_OP_MAX ? fmax(a, b) : a + b);
}

__device__ __forceinline__ double recap_identity_op(int op) {
    return op == RECAP_OP_MIN ? (1.0 / 0.0) : (op == RECAP_OP_MAX ? -(1.0 / 0.0) : 0.0);
}

__device__ __forceinline__ float recap_combine(float a, float b, int op) {
    return op == RECAP_OP_MIN ? fminf(a, b) : (op == RECAP_OP_MAX ? fmaxf(a, b) : a + b);
}

/* Warp reduction in a fixed tree order; the result is in lane 0. */
template <typename V>
__device__ __forceinline__ V recap_warp_reduce(V v, int op) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = recap_combine(v, __shfl_down_sync(0xffffffffu, v, off), op);
    return v;
}

/* Stage 1 of a block reduction of one slot: lane 0 of each warp leaves its warp's result in
 * s_red[warp * num_slots + slot] (as a double; the 32-lane tree runs in the type of v: float for the
 * token passes' per-thread sums, double where the inputs are double). Call for every slot, then
 * recap_block_reduce_finish. */
template <typename V>
__device__ __forceinline__ void recap_block_reduce_slot(V v, int slot, int num_slots, int op, double* s_red) {
    v = recap_warp_reduce(v, op);
    if ((threadIdx.x & 31) == 0) s_red[(threadIdx.x >> 5) * num_slots + slot] = (double)v;
}

/* Stage 2: thread j < num_slots combines the warps' results for slot j in warp order (with min for
 * the slots whose bit is set in min_bits, max for max_bits, else a sum) and writes out[j * stride]
 * (stride = number of blocks for the slot-major partials of a token pass). */
__device__ __forceinline__ int recap_slot_op(int j, uint64_t min_bits, uint64_t max_bits) {
    if (j >= 64) return RECAP_OP_SUM;
    return ((min_bits >> j) & 1u) ? RECAP_OP_MIN : (((max_bits >> j) & 1u) ? RECAP_OP_MAX : RECAP_OP_SUM);
}

__device__ __forceinline__ void recap_block_reduce_finish(double* out, int64_t stride, int num_slots, uint64_t min_bits,
                                                          uint64_t max_bits, const double* s_red) {
    __syncthreads();
    for (int j = threadIdx.x; j < num_slots; j += blockDim.x) {
        int op = recap_slot_op(j, min_bits, max_bits);
        double acc = s_red[j];
        for (int w = 1; w < RECAP_WARPS; ++w) acc = recap_combine(acc, s_red[w * num_slots + j], op);
        out[(int64_t)j * stride] = acc;
    }
}

/* Reduces x[0..n) (stride 1) with `op` across the whole block in a fixed order: four interleaved
 * accumulators per thread, then the warp tree and warp order. The result is valid in thread 0. */
__device__ __forceinline__ double recap_block_reduce_array(const double* __restrict__ x, int64_t n, int op,
                                                           double* s_red) {
    double a0 = recap_identity_op(op), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = threadIdx.x;
    const int64_t step = blockDim.x;
    for (; i + 3 * step < n; i += 4 * step) {
        const double x0 = x[i], x1 = x[i + step], x2 = x[i + 2 * step], x3 = x[i + 3 * step];
        a0 = recap_combine(a0, x0, op); a1 = recap_combine(a1, x1, op);
        a2 = recap_combine(a2, x2, op); a3 = recap_combine(a3, x3, op);
    }
    for (; i < n; i += step) a0 = recap_combine(a0, x[i], op);
    double v = recap_warp_reduce(recap_combine(recap_combine(a0, a1, op), recap_combine(a2, a3, op), op), op);
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
    __syncthreads();
    double acc = s_red[0];
    if (threadIdx.x == 0)
        for (int w = 1; w < RECAP_WARPS; ++w) acc = recap_combine(acc, s_red[w], op);
    return acc;
}

/* Reduces one double per thread over the whole block (blockDim.x == RECAP_BLOCK) in a fixed order
 * (the warp tree, then warp order); every thread gets the result. Call from every thread. */
__device__ __forceinline__ double recap_block_allreduce(double v, int op, double* s_red) {
    v = recap_warp_reduce(v, op);
    __syncthreads(); /* s_red may still be read from a previous call */
    if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
    __syncthreads();
    double acc = s_red[0];
    for (int w = 1; w < RECAP_WARPS; ++w) acc = recap_combine(acc, s_red[w], op);
    return acc;
}

/* Items per thread a token kernel uses for tile t0 (the host chooses; at least 1). */
__device__ __forceinline__ int64_t recap_tile_start(int items) {
    return (int64_t)blockIdx.x * (int64_t)blockDim.x * (int64_t)items;
}

/* ---- last-block finalization ------------------------------------------------------------------
 * A grid reduces its per-block partials in the same launch: every block writes its row of the
 * slot-major partials, then takes a ticket (an integer counter, no float atomics); the block that
 * takes the last ticket reduces all rows in a fixed order (the same bits whichever block is last)
 * and resets the counter to 0 for the next launch (or the next replay of a CUDA graph). */

/* Call from every thread after this block's partials are written. True, in every thread, only in
 * the block that arrives last; its reads of the other blocks' partials must use recap_ld_cg. */
__device__ __forceinline__ bool recap_last_block(unsigned int* ticket) {
    __shared__ int s_last;
    __threadfence(); /* this thread's partials are visible device-wide before the ticket */
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    return s_last != 0;
}

/* The last block's reset of the counter (after its last read of the partials). */
__device__ __forceinline__ void recap_ticket_reset(unsigned int* ticket) {
    if (threadIdx.x == 0) *ticket = 0u;
}

/* A load that bypasses L1 (another block wrote it in this launch). */
__device__ __forceinline__ double recap_ld_cg(const double* p) { return __ldcg(p); }

/* The RECAP_OP_* of slot j of the fused loss's statistics (3K per-objective sums, then the extra
 * slots: the ratio's and rollout IS weight's min and max, sums otherwise). */
__device__ __forceinline__ int recap_grpo_slot_op(int j, int K) {
    const int x = j - 3 * K;
    return (x == RECAP_SLOT_RATIO_MIN || x == RECAP_SLOT_IS_MIN)   ? RECAP_OP_MIN
           : (x == RECAP_SLOT_RATIO_MAX || x == RECAP_SLOT_IS_MAX) ? RECAP_OP_MAX
                                                                   : RECAP_OP_SUM;
}

/* The fused loss from its statistic slots, (1/K) sum_k lambda_k slots[k] + beta slots[3K + KL_AGG]
 * with the KL term, rounded as the host's finish_grpo rounds it (no fused multiply-add). */
__device__ __forceinline__ double recap_grpo_loss_of(const double* slots, const float* lambda, int K, bool has_ref,
                                                     float beta) {
    double weighted = 0.0;
#pragma unroll 1
    for (int k = 0; k < K; ++k) weighted = __dadd_rn(weighted, __dmul_rn((double)lambda[k], slots[k]));
    double loss = recap_div_small(weighted, K);
    if (has_ref) loss = __dadd_rn(loss, __dmul_rn((double)beta, slots[3 * K + RECAP_SLOT_KL_AGG]));
    return loss;
}

/* Reductions whose op is chosen at run time: a max enters negated (max(x) = -min(-x), exact) so two
 * code paths remain, a sum and a min; each loop below is written twice, one per path, behind a
 * branch (a select between the two would execute both for every value). */
__device__ __forceinline__ double recap_op_sign(int op) { return op == RECAP_OP_MAX ? -1.0 : 1.0; }

/* The block reductions below synchronize with __syncthreads only (no warp-synchronous code: after
 * the block-divergent branch into the last block the compiler would emit a non-converged fallback
 * for every __syncwarp or shuffle), so every thread of the block calls them, with block-uniform
 * arguments. */

/* Each warp's 32 values s[32 w .. 32 w + 32) combined in lane order, four lanes at a time, then the
 * eight results in order; the result is valid in lane 0 of each warp. `sum` is warp-uniform; `s`
 * holds RECAP_BLOCK + RECAP_BLOCK / 4 doubles; call after every thread wrote its s[threadIdx.x]. */
__device__ __forceinline__ double recap_lanes_combine(double* s, bool sum) {
    const int lane = threadIdx.x & 31, quad = RECAP_BLOCK + (threadIdx.x >> 5) * 8;
    __syncthreads();
    if (lane < 8) {
        const double* x = s + (threadIdx.x - lane) + 4 * lane;
        s[quad + lane] = sum ? (x[0] + x[1]) + (x[2] + x[3]) : fmin(fmin(x[0], x[1]), fmin(x[2], x[3]));
    }
    __syncthreads();
    double acc = s[quad];
    if (lane == 0) {
        if (sum)
            for (int i = 1; i < 8; ++i) acc += s[quad + i];
        else
            for (int i = 1; i < 8; ++i) acc = fmin(acc, s[quad + i]);
    }
    return acc;
}

/* Fixed-order reduction of the slot-major rows partials[j * cols .. + cols) for j < rows, in the
 * last block: in rounds of RECAP_WARPS rows, warp w takes row r + w; lane l combines columns l,
 * l + 32, ... into four accumulators in turn (four loads in flight), then the accumulators and the
 * lanes in a fixed order; lane 0 writes dst[j]. op_of(j) gives the row's RECAP_OP_*. Ends with a
 * __syncthreads (dst is then visible to the block). */
template <typename OpOf>
__device__ __forceinline__ void recap_reduce_rows(const double* partials, int64_t cols, int rows, double* dst,
                                                  OpOf op_of) {
    __shared__ double s_red[RECAP_BLOCK + RECAP_BLOCK / 4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll 1
    for (int r = 0; r < rows; r += RECAP_WARPS) {
        const int j = r + warp;
        const bool live = j < rows;
        const int op = live ? op_of(j) : RECAP_OP_SUM;
        const bool sum = op == RECAP_OP_SUM;
        const double sg = recap_op_sign(op);
        const double* row = partials + (int64_t)j * cols;
        double a0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        int64_t c = lane;
        if (!live) {
            a0 = 0.0;
        } else if (sum) {
            a0 = 0.0;
#pragma unroll 1
            for (; c + 96 < cols; c += 128) {
                a0 += recap_ld_cg(row + c);
                a1 += recap_ld_cg(row + c + 32);
                a2 += recap_ld_cg(row + c + 64);
                a3 += recap_ld_cg(row + c + 96);
            }
#pragma unroll 1
            for (; c < cols; c += 32) a0 += recap_ld_cg(row + c);
            a0 = (a0 + a1) + (a2 + a3);
        } else {
            a0 = (double)INFINITY;
#pragma unroll 1
            for (; c < cols; c += 32) a0 = fmin(a0, sg * recap_ld_cg(row + c));
        }
        s_red[threadIdx.x] = a0;
        const double acc = recap_lanes_combine(s_red, sum);
        if (live && lane == 0) dst[j] = sg * acc;
        __syncthreads(); /* s_red is reused by the next round; dst is visible */
    }
}

/* Row stride (floats) of the staging buffer of recap_stage_reduce: one more than a block, so the
 * reduction's reads (a position per lane) fall in distinct banks. */
#define RECAP_STAGE_LD (RECAP_BLOCK + 1)

/* Block reduction of a token pass's per-thread statistics, staged through shared memory: the
 * block's threads store position q's value at stage[(q - base) * RECAP_STAGE_LD + thread] for the
 * positions of one pass [base, base + n), n <= 32; then lane l of warp w combines position l's
 * values of threads 32 w .. 32 w + 31 in order (sums in double, four accumulators in turn; a min or
 * max in float, which is exact), and thread l < n combines the warps' results in warp order and
 * writes the block's value of position l's slot at partials[slot * gridDim.x + blockIdx.x].
 * slot_of(q) < 0: an unused position. */
template <typename SlotOf, typename OpOf>
__device__ __forceinline__ void recap_stage_reduce(const float* stage, int base, int n, double* partials,
                                                   SlotOf slot_of, OpOf op_of) {
    __shared__ double s_mid[RECAP_WARPS][32];
    __syncthreads(); /* the pass's values are stored */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane < n) {
        const int op = op_of(base + lane);
        const float* x = stage + lane * RECAP_STAGE_LD + warp * 32;
        double v;
        if (op == RECAP_OP_SUM) {
            double a0 = x[0], a1 = x[1], a2 = x[2], a3 = x[3];
#pragma unroll 1
            for (int i = 4; i < 32; i += 4) {
                a0 += x[i];
                a1 += x[i + 1];
                a2 += x[i + 2];
                a3 += x[i + 3];
            }
            v = (a0 + a1) + (a2 + a3);
        } else {
            const float sg = op == RECAP_OP_MAX ? -1.0f : 1.0f;
            float a = sg * x[0];
#pragma unroll 4
            for (int i = 1; i < 32; ++i) a = fminf(a, sg * x[i]);
            v = (double)a; /* negated for a max: undone below */
        }
        s_mid[warp][lane] = v;
    }
    __syncthreads();
    if (threadIdx.x < n) {
        const int q = base + threadIdx.x, slot = slot_of(q);
        if (slot >= 0) {
            const int op = op_of(q);
            double acc = s_mid[0][threadIdx.x];
            if (op == RECAP_OP_SUM)
                for (int w = 1; w < RECAP_WARPS; ++w) acc += s_mid[w][threadIdx.x];
            else
                for (int w = 1; w < RECAP_WARPS; ++w) acc = fmin(acc, s_mid[w][threadIdx.x]);
            partials[(int64_t)slot * gridDim.x + blockIdx.x] = recap_op_sign(op) * acc;
        }
    }
}

#endif /* RECAP_COMMON_CUH */
