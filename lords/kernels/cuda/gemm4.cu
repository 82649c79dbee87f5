// A few rows of activations times a 4-bit LoRDS weight, on Hopper's asynchronous tensor cores (sm_90a): the weight
// tile is formed in registers and goes from there into the tensor cores, never through memory.
//
// Y = X W^T with W = (B A) * C[codes]. For 64 weight rows and half a step (64 columns of K):
//     S = B[rows] @ A[:, columns]        wgmma.m64n64k16 per 16 of the padded rank: B's fragments from registers
//                                        (loaded once), A's columns from shared memory;
//     W = bf16(S) * C[codes]             in registers: S's accumulator layout is the A-operand layout of the next
//                                        wgmma (as FlashAttention-3 feeds P to P V), and the codes are read in that
//                                        layout (common.cuh);
//     Y^T[rows] += W @ X[:, columns]^T   wgmma.m64nMk16, W from registers, X's columns from shared memory.
// Per weight that is (rank + M) tensor-core products and a few instructions; the dense weight is never written, so
// its cost does not grow with M as the one-row kernel's (gemv4.cu: M x rank products a weight) does.
//
// prep_kernel lays A and X out once per call in wgmma's 8 x 8 core matrices, their columns in the order of the code
// fragments (slot_column), zero past the rank and past M; each block copies a step of both into shared memory by
// cp.async, two steps ahead of its use.
//
// A grid of (row blocks) x (K splits) x (M tiles); a split's partial sums meet in the float32 workspace as in
// gemv4.cu: the last block of a row block and M tile adds them in split order, writes Y and zeros its slots.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

// One build per configuration: LORDS_RANK_GROUPS = the rank padded to 16, over 16; LORDS_M_CORES = the M tile over 8.
#ifndef LORDS_RANK_GROUPS
#define LORDS_RANK_GROUPS 4
#define LORDS_M_CORES 2
#define LORDS_TABLE 0
#endif

namespace {

constexpr int WARPS = 8;  // two warpgroups of 64 rows
constexpr int BLOCK_ROWS = WARPS * 16;
constexpr int STAGES = 3;

// Bytes a step of the scratch holds: A's 128 columns by the padded rank, and X's by the M tile.
__host__ __device__ constexpr int a_step_bytes(int rank_groups) { return rank_groups * 4096; }
__host__ __device__ constexpr int x_step_bytes(int m_cores) { return m_cores * 2048; }

// A and X in core matrices (K-major B operands, no swizzle; 16 bytes of K a row, 128 bytes a core matrix):
//   A: for step s, half H (tiles 4H .. 4H+3), rank group q, column core c (8 of the half's 64 columns) and rank half
//      h: 8 columns x 8 ranks at ((s * 2 + H) * RANK_GROUPS + q) * 16 + c * 2 + h;
//   X: for M tile z, step s, tile T, row core c and slot half h: 8 rows x 8 slots at
//      ((z * steps + s) * 8 + T) * M_CORES * 2 + c * 2 + h.
// One thread a 32-bit word (two bf16 along K).
template <int RANK_GROUPS, int M_CORES, bool TABLE>
__global__ void prep_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ scale_a,
                            uint32_t* __restrict__ a_out, uint32_t* __restrict__ x_out, int m, int k, int rank,
                            int steps, int a_words, int x_words) {
    const int index = blockIdx.x * blockDim.x + threadIdx.x;
    // a 128-byte core matrix is 32 words: 8 rows of 4; its K half is the lowest bit of its index
    const int pair = index & 3, row = (index >> 2) & 7;
    float value[2] = {0.f, 0.f};
    if (index < a_words) {
        const int core = index >> 5, half = core & 1;
        const int column_core = (core >> 1) & 7, group = (core >> 4) % RANK_GROUPS;
        const int step_half = (core >> 4) / RANK_GROUPS;
        const int column = 8 * column_core + row;  // of the half's 64
        const int tile = 4 * (step_half & 1) + column / 16, slot = column % 16;
        const int r = 16 * group + 8 * half + 2 * pair;
        const int source = (step_half >> 1) * STEP_BYTES + slot_column<TABLE>(tile, slot, k / 2);
#pragma unroll
        for (int c = 0; c < 2; ++c)
            if (r + c < rank) value[c] = __bfloat162float(scale_a[(size_t)(r + c) * k + source]);
        a_out[index] = pack_bf16(value[0], value[1]);
    } else if (index < a_words + x_words) {
        const int i = index - a_words, core = i >> 5, half = core & 1;
        const int row_core = (core >> 1) % M_CORES, tile = ((core >> 1) / M_CORES) & 7;
        const int tile_step = (core >> 1) / (M_CORES * 8);  // M tile * steps + step
        const int mi = (tile_step / steps) * M_CORES * 8 + 8 * row_core + row;
        const int slot = 8 * half + 2 * pair;
        if (mi < m) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int source = (tile_step % steps) * STEP_BYTES + slot_column<TABLE>(tile, slot + c, k / 2);
                value[c] = __bfloat162float(x[(size_t)mi * k + source]);
            }
        }
        x_out[i] = pack_bf16(value[0], value[1]);
    }
}

template <int RANK_GROUPS, int M_CORES, bool TABLE>
__global__ void __launch_bounds__(WARPS * 32) gemm4_kernel(
    const uint8_t* __restrict__ codes, const uint32_t* __restrict__ a_prep, const uint32_t* __restrict__ x_prep,
    const __nv_bfloat16* __restrict__ scale_b, const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y,
    float* __restrict__ partial, int* __restrict__ counters, int n, int k, int m, int rank, int steps, Levels levels,
    uint32_t integer_bias, float out_scale) {
    constexpr int A_BYTES = a_step_bytes(RANK_GROUPS), X_BYTES = x_step_bytes(M_CORES);
    constexpr int SLOT_BYTES = A_BYTES + X_BYTES, THREADS = WARPS * 32;
    __shared__ uint32_t table[TABLE ? TABLE_WORDS : 1];
    extern __shared__ __align__(128) uint4 ring[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int half_k = k / 2;
    const int row0 = blockIdx.x * BLOCK_ROWS + warp * 16;
    const int splits = gridDim.y, m_tile = blockIdx.z;
    const int first_step = blockIdx.y * steps / splits, end_step = (blockIdx.y + 1) * steps / splits;
    fill_table<TABLE>(table, levels);
    const uint32_t* my_table = table + lane;
    const uint32_t ring_base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));

    // B's rows of this warp as the A operand of S = B A: group q holds ranks 16q .. 16q + 15
    uint32_t b_frag[RANK_GROUPS][4];
#pragma unroll
    for (int q = 0; q < RANK_GROUPS; ++q)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int row = row0 + g + 8 * (j & 1), r = 16 * q + 8 * (j >> 1) + 2 * t;
            float value[2] = {0.f, 0.f};
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (row < n && r + c < rank) value[c] = __bfloat162float(scale_b[(size_t)row * rank + r + c]);
            b_frag[q][j] = pack_bf16(value[0], value[1]);
        }

    float y_acc[M_CORES][4];
#pragma unroll
    for (int c = 0; c < M_CORES; ++c) y_acc[c][0] = y_acc[c][1] = y_acc[c][2] = y_acc[c][3] = 0.f;

    const char* a_source = reinterpret_cast<const char*>(a_prep) + threadIdx.x * 16;
    const char* x_source = reinterpret_cast<const char*>(x_prep) + (size_t)m_tile * steps * X_BYTES + threadIdx.x * 16;
    auto copy_step = [&](int step, int slot) {  // one cp.async group per step, empty past the end
        if (step < end_step) {
            const uint32_t target = ring_base + slot * SLOT_BYTES + threadIdx.x * 16;
            copy_async<A_BYTES, THREADS>(target, a_source + (size_t)step * A_BYTES);
            copy_async<X_BYTES, THREADS>(target + A_BYTES, x_source + (size_t)step * X_BYTES);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    const bool rows_valid = row0 < n;
    const uint8_t* my_codes = codes + (size_t)(row0 + g) * half_k + t * 16;
    auto fetch = [&](uint4 (&into)[2], int step) {
        load_step_codes(into, my_codes, half_k, step, rows_valid && step < end_step);
    };

    // Half a step: S for its 64 columns, W in registers, Y^T += W X^T. Each wgmma batch is waited for before its
    // results or inputs are touched (waiting later makes ptxas serialise the wgmmas, gemv4.cu): the overlap comes
    // from the other warpgroups of the multiprocessor.
    auto run_half = [&](const uint4 (&current)[2], auto half_constant, uint32_t slot_address) {
        constexpr int H = decltype(half_constant)::value;
        float s[8][4];
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int q = 0; q < RANK_GROUPS; ++q)
            wgmma_bf16<8>(&s[0][0], b_frag[q], descriptor(slot_address + (H * RANK_GROUPS + q) * 2048, 128, 256),
                          q > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_accumulators(s);
        uint32_t w[4][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            uint32_t level[2][4], g_second[2], h_second[2];
            levels_of<TABLE>(word(current[0], 2 * H + i), level[0], g_second, integer_bias, my_table);
            levels_of<TABLE>(word(current[1], 2 * H + i), level[1], h_second, integer_bias, my_table);
            // fragment order (gemv4.cu): row g slots 2t.., row g+8 slots 2t.., row g slots 2t+8.., row g+8 ...
            const uint32_t first[4] = {level[0][0], level[1][0], level[0][1], level[1][1]};
            const uint32_t second[4] = {g_second[0], h_second[0], g_second[1], h_second[1]};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                // tile 2i of the half is S's column blocks 4i, 4i + 1; tile 2i + 1 is 4i + 2, 4i + 3
                const int block = 4 * i + (j >> 1), c = 2 * (j & 1);
                __nv_bfloat162 s_low = __floats2bfloat162_rn(s[block][c], s[block][c + 1]);
                __nv_bfloat162 s_high = __floats2bfloat162_rn(s[block + 2][c], s[block + 2][c + 1]);
                __nv_bfloat162 w_low = __hmul2(s_low, *reinterpret_cast<const __nv_bfloat162*>(&first[j]));
                __nv_bfloat162 w_high = __hmul2(s_high, *reinterpret_cast<const __nv_bfloat162*>(&second[j]));
                w[2 * i][j] = *reinterpret_cast<uint32_t*>(&w_low);
                w[2 * i + 1][j] = *reinterpret_cast<uint32_t*>(&w_high);
            }
        }
        fence_registers(w);
        fence_accumulators(y_acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int tile = 0; tile < 4; ++tile)
            wgmma_bf16<M_CORES>(&y_acc[0][0], w[tile],
                                descriptor(slot_address + A_BYTES + (4 * H + tile) * M_CORES * 256, 128, 256), 1);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_accumulators(y_acc);
    };
    // three steps a loop turn, so that the ring slot and the code registers are fixed at compile time (gemv4.cu)
    auto run_step = [&](int step, auto slot_constant, uint4 (&current)[2], uint4 (&later)[2]) {
        constexpr int SLOT = decltype(slot_constant)::value;
        fetch(later, step + 2);
        asm volatile("cp.async.wait_group 1;\n" ::);
        asm volatile("fence.proxy.async.shared::cta;\n" ::);
        __syncthreads();
        copy_step(step + 2, (SLOT + 2) % STAGES);
        const uint32_t slot_address = ring_base + SLOT * SLOT_BYTES;
        run_half(current, std::integral_constant<int, 0>{}, slot_address);
        run_half(current, std::integral_constant<int, 1>{}, slot_address);
    };
    uint4 codes0[2], codes1[2], codes2[2];
    fetch(codes0, first_step);
    fetch(codes1, first_step + 1);
    copy_step(first_step, 0);
    copy_step(first_step + 1, 1);
    for (int step = first_step; step < end_step; step += 3) {
        run_step(step, std::integral_constant<int, 0>{}, codes0, codes2);
        if (step + 1 < end_step) run_step(step + 1, std::integral_constant<int, 1>{}, codes1, codes0);
        if (step + 2 < end_step) run_step(step + 2, std::integral_constant<int, 2>{}, codes2, codes1);
    }

    // Y^T's accumulator: y_acc[c][2 * half + e] is weight row g + 8 * half, activation row 8c + 2t + e of the tile
    const int m0 = m_tile * M_CORES * 8;
#pragma unroll
    for (int c = 0; c < M_CORES; ++c)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int row = row0 + g + 8 * half, mi = m0 + 8 * c + 2 * t + e;
                if (row >= n || mi >= m) continue;
                const float value = y_acc[c][2 * half + e] * out_scale;
                if (splits == 1) {
                    y[(size_t)mi * n + row] = __float2bfloat16(bias ? value + __bfloat162float(bias[row]) : value);
                } else {
                    partial[((size_t)blockIdx.y * m + mi) * n + row] = value;
                }
            }
    if (splits == 1) return;

    // The last block of this row block and M tile adds the splits' partial sums (as gemv4.cu's write_rows).
    __shared__ int last_flag;
    const int counter = m_tile * gridDim.x + blockIdx.x;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_flag = atomicAdd(&counters[counter], 1) == splits - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
    for (int i = threadIdx.x; i < BLOCK_ROWS * M_CORES * 8; i += THREADS) {
        const int row = blockIdx.x * BLOCK_ROWS + i % BLOCK_ROWS, mi = m0 + i / BLOCK_ROWS;
        if (row >= n || mi >= m) continue;
        float value = 0.f;
        for (int split = 0; split < splits; ++split) {
            const size_t at = ((size_t)split * m + mi) * n + row;
            value += __ldcg(&partial[at]);
            partial[at] = 0.f;  // the workspace is shared with the Triton kernels: left zero
        }
        if (bias) value += __bfloat162float(bias[row]);
        y[(size_t)mi * n + row] = __float2bfloat16(value);
    }
    if (threadIdx.x == 0) counters[counter] = 0;
}

}  // namespace

extern "C" {

// The 32-bit words of scratch a call needs for K = k and M = m: A's prepared columns, then X's.
int lords_gemm4_a_words(int k) { return k / STEP_COLS * a_step_bytes(LORDS_RANK_GROUPS) / 4; }
int lords_gemm4_x_words(int k, int m) {
    const int m_tiles = (m + 8 * LORDS_M_CORES - 1) / (8 * LORDS_M_CORES);
    return m_tiles * (k / STEP_COLS) * x_step_bytes(LORDS_M_CORES) / 4;
}

// How many blocks of this build a multiprocessor holds at once (registers and shared memory allowing), for the
// launch's split count.
int lords_gemm4_blocks_per_sm() {
    auto kernel = gemm4_kernel<LORDS_RANK_GROUPS, LORDS_M_CORES, LORDS_TABLE>;
    const int ring_bytes = STAGES * (a_step_bytes(LORDS_RANK_GROUPS) + x_step_bytes(LORDS_M_CORES));
    int blocks = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_bytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, WARPS * 32, ring_bytes) != cudaSuccess)
        return 1;
    return blocks;
}

// Returns a cudaError_t (0: launched). scratch: lords_gemm4_a_words(k) + lords_gemm4_x_words(k, m) words. levels,
// integer_offset, out_scale: as lords_gemv4.
int lords_gemm4(const void* codes, const void* x, const void* scale_a, const void* scale_b, const void* bias, void* y,
                float* partial, int* counters, void* scratch, int n, int k, int m, int rank, int splits,
                const float* levels, int integer_offset, float out_scale, void* stream) {
    auto s = static_cast<cudaStream_t>(stream);
    const int steps = k / STEP_COLS, a_words = lords_gemm4_a_words(k), x_words = lords_gemm4_x_words(k, m);
    auto a_prep = static_cast<uint32_t*>(scratch), x_prep = a_prep + a_words;
    prep_kernel<LORDS_RANK_GROUPS, LORDS_M_CORES, LORDS_TABLE><<<(a_words + x_words + 255) / 256, 256, 0, s>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(scale_a), a_prep, x_prep, m, k, rank,
        steps, a_words, x_words);
    Levels table;
    for (int i = 0; i < 16; ++i) table.value[i] = levels[i];
    __nv_bfloat162 bias_pair = __floats2bfloat162_rn(128.f - integer_offset, 128.f - integer_offset);
    const int m_tiles = (m + 8 * LORDS_M_CORES - 1) / (8 * LORDS_M_CORES);
    dim3 grid((n + BLOCK_ROWS - 1) / BLOCK_ROWS, splits, m_tiles);
    auto kernel = gemm4_kernel<LORDS_RANK_GROUPS, LORDS_M_CORES, LORDS_TABLE>;
    const int ring_bytes = STAGES * (a_step_bytes(LORDS_RANK_GROUPS) + x_step_bytes(LORDS_M_CORES));
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_bytes);
    if (error != cudaSuccess) return error;
    kernel<<<grid, WARPS * 32, ring_bytes, s>>>(
        static_cast<const uint8_t*>(codes), a_prep, x_prep, static_cast<const __nv_bfloat16*>(scale_b),
        static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters, n, k, m, rank,
        steps, table, *reinterpret_cast<uint32_t*>(&bias_pair), out_scale);
    return cudaGetLastError();
}
}
