// What the CUDA kernels of lords share: the 4-bit code fragments, wgmma from registers, shared-memory
// descriptors.
//
// Codes are lords.packing's 4-bit layout: byte j of a row holds column j (low nibble) and column S + j (high
// nibble), S = K / 2. A step is 64 bytes of every row: 128 columns, eight k16 tiles. Each warp of a warpgroup holds
// 16 of its 64 rows, in the register layout of mma.m16n8k16's A operand, which wgmma shares. Thread t (lane % 4) of
// a group g (lane / 4) reads bytes 16t .. 16t+15 of the step from rows g and g+8; word i of those holds bytes
// b = 16t + 4i + e, e = 0..3. Integer codebooks put code + 128 in the mantissa of a bf16 (no table); the fragment
// pairs two bytes' nibbles of the same half: tile 2i + h (h: low or high nibble), slots 2t + {0, 8, 1, 9}[e].
// Other codebooks look up a byte's two levels at once in a 256-entry table of level pairs (one copy per lane, so
// that lanes never share a bank): tile 2i + e / 2, slots 2t + 8 (e % 2) + h. slot_column inverts this: a
// kernel lays out its other operands' columns of K in the same order.

#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int STEP_BYTES = 64;   // packed bytes of a row per step
constexpr int STEP_COLS = 128;   // columns (k) per step
constexpr int TABLE_WORDS = 256 * 32;
constexpr int PAIRS = 4;         // pairs of k16 tiles per step

struct Levels {
    float value[16];
};

__device__ __forceinline__ uint32_t pack_bf16(float low, float high) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<uint32_t*>(&pair);
}

__device__ __forceinline__ uint4 load_codes(const uint8_t* address, bool valid) {
    if (!valid) return make_uint4(0, 0, 0, 0);
    return __ldcs(reinterpret_cast<const uint4*>(address));  // streamed once: evict first
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// (v & 0x000F000F) | 0x43004300 in one LOP3 (given both constants as immediates, the compiler emits two)
__device__ __forceinline__ uint32_t magic_or(uint32_t v) {
    uint32_t out;
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(out) : "r"(v), "r"(0x43004300u));
    return out;
}

// The level pairs of one word of codes as the fragment registers of its two k16 tiles: a[0] for row g, slots 2t..;
// a[2] for row g, slots 2t+8..; the caller fills a[1], a[3] from row g+8.
template <bool TABLE>
__device__ __forceinline__ void levels_of(uint32_t w, uint32_t* first, uint32_t* second, uint32_t integer_bias,
                                          const uint32_t* table) {
    if (TABLE) {
        first[0] = table[(w & 0xFF) << 5];
        first[1] = table[((w >> 8) & 0xFF) << 5];
        second[0] = table[((w >> 16) & 0xFF) << 5];
        second[1] = table[(w >> 24) << 5];
    } else {
        const __nv_bfloat162 bias = *reinterpret_cast<const __nv_bfloat162*>(&integer_bias);
        uint32_t q[4];
        q[0] = magic_or(w);
        q[1] = magic_or(w >> 8);
        q[2] = magic_or(w >> 4);
        q[3] = magic_or(w >> 12);
        __nv_bfloat162 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&q[j]), bias);
        first[0] = *reinterpret_cast<uint32_t*>(&v[0]);
        first[1] = *reinterpret_cast<uint32_t*>(&v[1]);
        second[0] = *reinterpret_cast<uint32_t*>(&v[2]);
        second[1] = *reinterpret_cast<uint32_t*>(&v[3]);
    }
}

// The column of K behind slot `slot` of k16 tile `tile` of a step: the inverse of the code layout above.
template <bool TABLE>
__device__ __forceinline__ int slot_column(int tile, int slot, int half_k) {
    const int t = (slot & 7) >> 1, i = tile >> 1;
    int e, h;
    if (TABLE) {
        e = (tile & 1) * 2 + (slot >> 3), h = slot & 1;
    } else {
        e = (slot & 1) * 2 + (slot >> 3), h = tile & 1;
    }
    return 16 * t + 4 * i + e + h * half_k;
}

// The pair table: level pairs of every byte, one copy per lane (word byte * 32 + lane).
template <bool TABLE>
__device__ __forceinline__ void fill_table(uint32_t* table, const Levels& levels) {
    if (!TABLE) return;
    __shared__ float level[16];  // indexing the parameter struct by a variable would copy it to local memory
#pragma unroll
    for (int j = 0; j < 16; ++j)
        if (threadIdx.x == j) level[j] = levels.value[j];
    __syncthreads();
    for (int i = threadIdx.x; i < TABLE_WORDS; i += blockDim.x) {
        const int byte = i >> 5;
        table[i] = pack_bf16(level[byte & 15], level[byte >> 4]);
    }
    __syncthreads();
}

// wgmma.m64nNk16, N = 8 * TILES, accumulating into d (4 * TILES registers a thread) with the weight tile a from
// registers and XA from shared memory (desc). LORDS_ACCn: the accumulators as operands; LORDS_NAMESn: their names in
// the template.
template <int TILES>
__device__ __forceinline__ void wgmma_bf16(float* d, const uint32_t* a, uint64_t desc, int scale_d);

#define LORDS_ACC1 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define LORDS_NAMES1 "%0,%1,%2,%3"
#define LORDS_ACC2 LORDS_ACC1, "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define LORDS_NAMES2 LORDS_NAMES1 ",%4,%5,%6,%7"
#define LORDS_ACC3 LORDS_ACC2, "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
#define LORDS_NAMES3 LORDS_NAMES2 ",%8,%9,%10,%11"
#define LORDS_ACC4 LORDS_ACC3, "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define LORDS_NAMES4 LORDS_NAMES3 ",%12,%13,%14,%15"
#define LORDS_ACC5 LORDS_ACC4, "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19])
#define LORDS_NAMES5 LORDS_NAMES4 ",%16,%17,%18,%19"
#define LORDS_ACC6 LORDS_ACC5, "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define LORDS_NAMES6 LORDS_NAMES5 ",%20,%21,%22,%23"
#define LORDS_ACC7 LORDS_ACC6, "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27])
#define LORDS_NAMES7 LORDS_NAMES6 ",%24,%25,%26,%27"
#define LORDS_ACC8 LORDS_ACC7, "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define LORDS_NAMES8 LORDS_NAMES7 ",%28,%29,%30,%31"
#define LORDS_ACC9 LORDS_ACC8, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
#define LORDS_NAMES9 LORDS_NAMES8 ",%32,%33,%34,%35"
#define LORDS_ACC10 LORDS_ACC9, "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define LORDS_NAMES10 LORDS_NAMES9 ",%36,%37,%38,%39"
#define LORDS_ACC11 LORDS_ACC10, "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43])
#define LORDS_NAMES11 LORDS_NAMES10 ",%40,%41,%42,%43"
#define LORDS_ACC12 LORDS_ACC11, "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define LORDS_NAMES12 LORDS_NAMES11 ",%44,%45,%46,%47"
#define LORDS_ACC13 LORDS_ACC12, "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51])
#define LORDS_NAMES13 LORDS_NAMES12 ",%48,%49,%50,%51"

#define LORDS_WGMMA(TILES, N, A0, A1, A2, A3, DESC, SCALE)                                                      \
    template <>                                                                                                \
    __device__ __forceinline__ void wgmma_bf16<TILES>(float* d, const uint32_t* a, uint64_t desc, int scale_d) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                         \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" LORDS_NAMES##TILES "}, {" A0  \
                     "," A1 "," A2 "," A3 "}, " DESC ", p, 1, 1, 0;\n}\n"                                         \
                     : LORDS_ACC##TILES                                                                         \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));                    \
    }

LORDS_WGMMA(1, 8, "%4", "%5", "%6", "%7", "%8", "%9")
LORDS_WGMMA(2, 16, "%8", "%9", "%10", "%11", "%12", "%13")
LORDS_WGMMA(4, 32, "%16", "%17", "%18", "%19", "%20", "%21")
LORDS_WGMMA(7, 56, "%28", "%29", "%30", "%31", "%32", "%33")
LORDS_WGMMA(8, 64, "%32", "%33", "%34", "%35", "%36", "%37")
LORDS_WGMMA(13, 104, "%52", "%53", "%54", "%55", "%56", "%57")

// cp.async of BYTES (a multiple of 16) from global memory to shared memory by a block of THREADS, 16 bytes a thread
// a turn: `target` and `source` are the block's addresses plus 16 x threadIdx.x.
template <int BYTES, int THREADS>
__device__ __forceinline__ void copy_async(uint32_t target, const char* source) {
    constexpr int CHUNKS = BYTES / 16;
#pragma unroll
    for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i)
        if (CHUNKS % THREADS == 0 || threadIdx.x + i * THREADS < CHUNKS)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(target + i * THREADS * 16),
                         "l"(source + i * THREADS * 16));
}

// A thread's 16 bytes of a step from rows g and g + 8 (the layout above); `codes` points at its bytes of row g.
__device__ __forceinline__ void load_step_codes(uint4 (&into)[2], const uint8_t* codes, int half_k, int step,
                                                bool valid) {
    into[0] = load_codes(codes + step * STEP_BYTES, valid);
    into[1] = load_codes(codes + (size_t)8 * half_k + step * STEP_BYTES, valid);
}

// Shared-memory matrix descriptor, no swizzle: start address, then the byte offsets between core matrices along K
// (leading) and along N (stride), each in units of 16 bytes.
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride) {
    return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | static_cast<uint64_t>(leading >> 4) << 16 |
           static_cast<uint64_t>(stride >> 4) << 32;
}

template <int TILES>
__device__ __forceinline__ void fence_accumulators(float (&acc)[TILES][4]) {
#pragma unroll
    for (int p = 0; p < TILES; ++p)
#pragma unroll
        for (int c = 0; c < 4; ++c) asm volatile("" : "+f"(acc[p][c])::"memory");
}

// Keeps the compiler from reusing registers that a wgmma in flight still reads (it does not see the asynchrony).
template <int TILES>
__device__ __forceinline__ void fence_registers(uint32_t (&a)[TILES][4]) {
#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

}  // namespace
