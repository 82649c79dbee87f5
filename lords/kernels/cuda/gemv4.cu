// One row of activations times a 4-bit LoRDS weight, on Hopper's asynchronous tensor cores (sm_90a).
//
// y[n] = sum_k x[k] W[n,k] with W = (B A) * C[codes] regroups as
//     y[n] = sum_r B[n,r] Z[n,r],    Z = C[codes] @ XA^T,    XA[r,k] = x[k] A[r,k],
// so the per-weight work is a code-to-level conversion feeding wgmma.m64nNk16 (the weight tile is the A operand, from
// registers; XA the B operand, from shared memory; the rank the N dimension), with no per-weight scale at all. The
// sum over k may run in any order, as long as XA's columns follow the same order: each thread loads 16 bytes of
// packed codes per row and step and takes its registers straight from them; XA is laid out in the order the
// registers imply (common.cuh: the code layout and its fragments).
//
// XA is formed once per call by a small kernel (xa_kernel) in wgmma's 8 x 8 core matrices, and reaches each block's
// shared memory by cp.async, two steps ahead of its use, so that every warpgroup of a block reads the same copy.
//
// A grid of (row blocks) x (K splits); a split's partial sums meet in a float32 workspace, and the last program of a
// row block to finish (counted on a per-block counter, which it sets back to zero) adds them in split order and
// writes the output and zeros the slots (lords.kernels.stream_k's workspace, shared with the Triton kernels): no
// zero-fill before, no conversion after, the same result every call.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

// One build of this file serves one configuration, chosen at compile time (lords/kernels/cuda/__init__.py compiles
// the ones a model needs, each in a few seconds, and keeps them on disk).
#ifndef LORDS_RANK_TILES
#define LORDS_RANK_TILES 7
#define LORDS_TABLE 0
#endif

namespace {

// y[row] = sum_r B[row, r] Z[row, r] for the warp's 16 rows; with several splits, the partial sums meet in the
// workspace. A thread holds rank columns 8p + 2t, 8p + 2t + 1 of rows g and g + 8.
template <int RANK_TILES>
__device__ __forceinline__ void write_rows(const float (&acc)[RANK_TILES][4], int row0, int block_rows,
                                           const __nv_bfloat16* __restrict__ scale_b,
                                           const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y,
                                           float* __restrict__ partial, int* __restrict__ counters, int n, int rank,
                                           float out_scale) {
    __shared__ int last_flag;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int splits = gridDim.y;
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + g + 8 * half;
        if (row0 >= n) continue;
#pragma unroll
        for (int p = 0; p < RANK_TILES; ++p) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int r = 8 * p + 2 * t + c;
                if (r < rank) sum[half] += __bfloat162float(scale_b[(size_t)row * rank + r]) * acc[p][2 * half + c];
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        sum[half] += __shfl_xor_sync(0xffffffff, sum[half], 1);
        sum[half] += __shfl_xor_sync(0xffffffff, sum[half], 2);
        const int row = row0 + g + 8 * half;
        if (t == 0 && row0 < n) {
            float value = sum[half] * out_scale;
            if (splits == 1) {
                if (bias) value += __bfloat162float(bias[row]);
                y[row] = __float2bfloat16(value);
            } else {
                partial[(size_t)blockIdx.y * n + row] = value;
            }
        }
    }
    if (splits == 1) return;

    // The last program of this row block to arrive adds the splits' partial sums. The fence makes this program's
    // partial sums visible to every other program before its arrival is counted.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_flag = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
    for (int row = blockIdx.x * block_rows + threadIdx.x; row < min(n, (blockIdx.x + 1) * block_rows);
         row += blockDim.x) {
        float value = 0.f;
        for (int split = 0; split < splits; ++split) {
            value += __ldcg(&partial[(size_t)split * n + row]);
            partial[(size_t)split * n + row] = 0.f;  // the workspace is shared with the Triton kernels: left zero
        }
        if (bias) value += __bfloat162float(bias[row]);
        y[row] = __float2bfloat16(value);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// XA, formed once per call, in 8 x 8 core matrices (wgmma's K-major B operand without swizzle): for step s, tile T,
// rank tile p and K half h, 8 rank rows x 8 slots (128 bytes, a row's 8 slots contiguous), at
// ((s * 8 + T) * RANK_TILES + p) * 2 + h.
template <int RANK_TILES, bool TABLE>
__global__ void xa_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ scale_a,
                          uint32_t* __restrict__ xa, int k, int rank, int words) {
    const int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= words) return;
    const int row = (index >> 2) & 7, p = (index >> 6) % RANK_TILES;
    const int tile = (index / (64 * RANK_TILES)) & 7, step = index / (512 * RANK_TILES);
    const int r = 8 * p + row, slot = 8 * ((index >> 5) & 1) + 2 * (index & 3);
    float value[2] = {0.f, 0.f};
    if (r < rank) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int column = step * STEP_BYTES + slot_column<TABLE>(tile, slot + c, k / 2);
            value[c] = __bfloat162float(scale_a[(size_t)r * k + column]) * __bfloat162float(x[column]);
        }
    }
    xa[index] = pack_bf16(value[0], value[1]);
}

constexpr int STAGES = 3;  // XA in shared memory: the step being multiplied, the next, and the one being copied

// One k16 tile times every rank tile. One instruction where its shape was measured on the GPU (m64n56k16 took 24.5 us
// where n32 + n16 + n8 took 27.7, 14336 x 4096 INT on the H200: small wgmmas run below the tensor cores' rate);
// elsewhere chunks of 64, 32, 16 and 8 columns, whose descriptors start FIRST rank tiles (`stride` bytes each)
// further.
template <int RANK_TILES, int FIRST = 0>
__device__ __forceinline__ void wgmma_rank_tiles(float (&acc)[RANK_TILES][4], const uint32_t* a, uint64_t desc,
                                                 int stride, int accumulate) {
    constexpr int LEFT = RANK_TILES - FIRST;
    if constexpr (LEFT > 0) {
        constexpr bool WHOLE = FIRST == 0 && (RANK_TILES == 7 || RANK_TILES == 13);
        constexpr int CHUNK = WHOLE ? RANK_TILES : LEFT >= 8 ? 8 : LEFT >= 4 ? 4 : LEFT >= 2 ? 2 : 1;
        wgmma_bf16<CHUNK>(&acc[FIRST][0], a, desc + static_cast<uint64_t>((FIRST * stride) >> 4), accumulate);
        wgmma_rank_tiles<RANK_TILES, FIRST + CHUNK>(acc, a, desc, stride, accumulate);
    }
}

template <int RANK_TILES, bool TABLE, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) gemv4_kernel(
    const uint8_t* __restrict__ codes, const uint32_t* __restrict__ xa, const __nv_bfloat16* __restrict__ scale_b,
    const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y, float* __restrict__ partial,
    int* __restrict__ counters, int n, int k, int rank, int steps, Levels levels, uint32_t integer_bias,
    float out_scale, int leading, int stride) {
    constexpr int XA_BYTES = 2048 * RANK_TILES;  // XA of one step
    constexpr int THREADS = WARPS * 32;
    __shared__ uint32_t table[TABLE ? TABLE_WORDS : 1];
    extern __shared__ __align__(128) uint4 ring[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int half_k = k / 2;
    constexpr int block_rows = WARPS * 16;
    const int row0 = blockIdx.x * block_rows + warp * 16;
    const int splits = gridDim.y;
    const int first_step = blockIdx.y * steps / splits, end_step = (blockIdx.y + 1) * steps / splits;
    fill_table<TABLE>(table, levels);
    const uint32_t* my_table = table + lane;
    const uint32_t ring_base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
    const uint64_t ring_descriptor = descriptor(ring_base, leading, stride);

    float acc[RANK_TILES][4];
#pragma unroll
    for (int r = 0; r < RANK_TILES; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;

    const char* xa_source = reinterpret_cast<const char*>(xa) + threadIdx.x * 16;
    const uint32_t xa_target = ring_base + threadIdx.x * 16;
    auto copy_step = [&](int step, int slot) {  // one cp.async group per step, empty past the end
        if (step < end_step)
            copy_async<XA_BYTES, THREADS>(xa_target + slot * XA_BYTES, xa_source + (size_t)step * XA_BYTES);
        asm volatile("cp.async.commit_group;\n" ::);
    };
    const bool rows_valid = row0 < n;
    const uint8_t* my_codes = codes + (size_t)(row0 + g) * half_k + t * 16;
    auto fetch = [&](uint4 (&into)[2], int step) {
        load_step_codes(into, my_codes, half_k, step, rows_valid && step < end_step);
    };
    uint4 codes0[2], codes1[2], codes2[2];
    fetch(codes0, first_step);
    fetch(codes1, first_step + 1);
    copy_step(first_step, 0);
    copy_step(first_step + 1, 1);
    // One step: its XA in shared memory (waited for), the copies two steps ahead started, the codes turned into the
    // eight tiles' register operands, eight wgmmas issued and waited for. Waiting for only the step before's (so
    // that this step's conversions overlap them) makes ptxas serialise every wgmma (C7513): the overlap comes from
    // the other warpgroups of the multiprocessor instead. The loop runs three steps a turn so that the ring slot
    // (SLOT), its descriptors and the three code registers are fixed at compile time: computing them and moving the
    // codes along took a third of the instructions of a step.
    uint32_t a[8][4];
    auto run_step = [&](int step, auto slot_constant, uint4 (&current)[2], uint4 (&later)[2]) {
        constexpr int SLOT = decltype(slot_constant)::value;
        fetch(later, step + 2);
        asm volatile("cp.async.wait_group 1;\n" ::);
        asm volatile("fence.proxy.async.shared::cta;\n" ::);
        __syncthreads();
        copy_step(step + 2, (SLOT + 2) % STAGES);
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            uint32_t g_first[2], g_second[2], h_first[2], h_second[2];
            levels_of<TABLE>(word(current[0], i), g_first, g_second, integer_bias, my_table);
            levels_of<TABLE>(word(current[1], i), h_first, h_second, integer_bias, my_table);
            a[2 * i][0] = g_first[0], a[2 * i][1] = h_first[0], a[2 * i][2] = g_first[1], a[2 * i][3] = h_first[1];
            a[2 * i + 1][0] = g_second[0], a[2 * i + 1][1] = h_second[0], a[2 * i + 1][2] = g_second[1];
            a[2 * i + 1][3] = h_second[1];
        }
        // every input of the eight wgmmas is defined before the fence, or ptxas serialises them
        uint64_t tiles[8];
#pragma unroll
        for (int tile = 0; tile < 8; ++tile) {
            tiles[tile] = ring_descriptor + ((SLOT * XA_BYTES + tile * RANK_TILES * 256) >> 4);
            asm volatile("" : "+l"(tiles[tile])::"memory");
        }
        fence_registers(a);
        fence_accumulators(acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int tile = 0; tile < 8; ++tile) wgmma_rank_tiles<RANK_TILES>(acc, a[tile], tiles[tile], stride, 1);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_accumulators(acc);
    };
    for (int step = first_step; step < end_step; step += 3) {
        run_step(step, std::integral_constant<int, 0>{}, codes0, codes2);
        if (step + 1 < end_step) run_step(step + 1, std::integral_constant<int, 1>{}, codes1, codes0);
        if (step + 2 < end_step) run_step(step + 2, std::integral_constant<int, 2>{}, codes2, codes1);
    }

    write_rows<RANK_TILES>(acc, row0, block_rows, scale_b, bias, y, partial, counters, n, rank, out_scale);
}

}  // namespace

extern "C" {

// The 32-bit words of XA scratch a call needs for K = k.
int lords_gemv4_xa_words(int k) { return k / STEP_COLS * 512 * LORDS_RANK_TILES; }

// Returns a cudaError_t (0: launched). xa: lords_gemv4_xa_words(k) words of scratch. levels: the codebook's 16
// levels, read when the build has a table; integer_offset: the integer codebook's offset (levels = (code + offset) *
// out_scale) otherwise. leading, stride: the shared-memory descriptor's offsets between XA's core matrices (bytes).
int lords_gemv4(const void* codes, const void* x, const void* scale_a, const void* scale_b, const void* bias, void* y,
                float* partial, int* counters, void* xa, int n, int k, int rank, int warps, int splits,
                const float* levels, int integer_offset, float out_scale, int leading, int stride, void* stream) {
    auto s = static_cast<cudaStream_t>(stream);
    const int words = lords_gemv4_xa_words(k);
    xa_kernel<LORDS_RANK_TILES, LORDS_TABLE><<<(words + 255) / 256, 256, 0, s>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(scale_a), static_cast<uint32_t*>(xa),
        k, rank, words);
    Levels table;
    for (int i = 0; i < 16; ++i) table.value[i] = levels[i];
    // code + 128 sits in the bf16's mantissa; subtracting 128 - offset leaves code + offset exactly
    __nv_bfloat162 bias_pair = __floats2bfloat162_rn(128.f - integer_offset, 128.f - integer_offset);
    const int block_rows = warps * 16;
    dim3 grid((n + block_rows - 1) / block_rows, splits);
    if (warps != 4 && warps != 8) return cudaErrorInvalidValue;
    auto kernel = warps == 4 ? gemv4_kernel<LORDS_RANK_TILES, LORDS_TABLE, 4>
                             : gemv4_kernel<LORDS_RANK_TILES, LORDS_TABLE, 8>;
    const int ring_bytes = STAGES * 2048 * LORDS_RANK_TILES;
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_bytes);
    if (error != cudaSuccess) return error;
    kernel<<<grid, warps * 32, ring_bytes, s>>>(
        static_cast<const uint8_t*>(codes), static_cast<const uint32_t*>(xa),
        static_cast<const __nv_bfloat16*>(scale_b), static_cast<const __nv_bfloat16*>(bias),
        static_cast<__nv_bfloat16*>(y), partial, counters, n, k, rank, k / STEP_COLS, table,
        *reinterpret_cast<uint32_t*>(&bias_pair), out_scale, leading, stride);
    return cudaGetLastError();
}
}
