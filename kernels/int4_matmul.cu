// INT4 × f16 (and f16 × f16) matmul on tensor cores: out[M, N] = x[M, K] · W[N, K]ᵀ for any M
// (decode, sibling batches, prefill), f16 inputs, f32 accumulation, deterministic split-K.
// One partitioning, two weight formats (`Int4Fragments`, `F16Fragments`).
//
// Orientation. `mma.sync.m16n8k16` computes D[16, 8] += A[16, 16] · B[16, 8]. The weights are A
// (16 output rows × 16 inputs) and the activations B (16 inputs × 8 batch rows), so a batch of
// up to 8 rows wastes nothing of the weight stream, and NT tiles of 8 cover up to 8·NT rows.
//
// Weight layout (repacked at upload, src/backend/cuda/fragments.rs; rows padded to a multiple
// of 16 and inputs to a multiple of 64, with zeros). The weights are cut into 16 × 16 tiles;
// lane l = 4·g + t (g = l / 4, t = l % 4) of a warp holds the A fragment of a tile, the eight
// elements (row, input)
//     (g, 2t) (g, 2t+1) | (g+8, 2t) (g+8, 2t+1) | (g, 2t+8) (g, 2t+9) | (g+8, 2t+8) (g+8, 2t+9)
// i.e. element e = (row-half h, input-half c, pair p) at index h + 2c + 4p ... in the order
// the fragment's four registers want them.
//   INT4: a tile is one u32 per lane, element (h, c, p) in nibble h + 2c + 4p (so
//         `(word >> 4i) & 0x000f000f` holds register i's two elements); four k-tiles (64
//         inputs) make one uint4 per lane, and a warp reads 512 contiguous bytes:
//         qweight  [N/16, K/64, 32 lanes] uint4
//   F16:  a tile is one uint4 per lane (8 halves, element (h, c, p) at half 2(h + 2c) + p):
//         w        [N/16, K/16, 32 lanes] uint4
// INT4 scales and mins follow the row blocks: [N/16, K/group, 16] (f16, f32), w = s·q + m.
//
// INT4 arithmetic. A nibble becomes the f16 integer q exactly (the exponent trick: the bits of
// 1024 + q, minus 1024), the tensor cores sum q·x over one group in f32 (exact products), and
// the group is then scaled in f32: Σ w·x = s·Σ q·x + m·Σ x, with Σ x per (batch row, group)
// computed from the staged activations. So the weights are exactly the canonical w = s·q + m;
// nothing is rounded to f16 but the output.
//
// Partitioning. Grid (ceil(N / 64), S, ceil(M / (8·NT))): block (b, s, z) has 4 warps, warp w
// the row block 4b + w, over the K-slice s of `slice` inputs (a multiple of 256), for batch
// rows 8·NT·z .. 8·NT·(z+1). The slice is walked in stages (256 inputs for INT4, 64 for f16:
// 4 uint4 of weights per lane either way): the block stages x for the stage in shared memory,
// and each warp computes its stage from registers while its loads for the next stage are in
// flight. Partial sums go to partial[s, m, n]; `splitk_reduce_*` adds the S partials in order
// (deterministic; no atomics).
#include "common.cuh"

#define MMA_WARPS 4
// Inputs per K-slice granule: slices are multiples of this (and so of every stage and group).
#define SLICE_K 256

// D[16×8] += A[16×16] · B[16×8], f16 × f16 → f32.
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The A fragment of one INT4 tile: register i = half2(nibble i, nibble i + 4) as exact f16
// integers 0..15.
__device__ __forceinline__ void int4_fragment(unsigned word, unsigned a[4]) {
    const __half2 bias = __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400));  // 1024
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned v = ((word >> (4 * i)) & 0x000f000fu) | 0x64006400u;  // 1024 + q, two halves
        const __half2 q = __hsub2(*reinterpret_cast<const __half2*>(&v), bias);
        a[i] = *reinterpret_cast<const unsigned*>(&q);
    }
}

// INT4 weights in the fragment layout above. A stage is 256 inputs: 4 uint4 per lane (each 4
// k-tiles), whole groups.
struct Int4Fragments {
    const uint4* __restrict__ qweight;  // [N/16, Kp/64, 32]
    const __half* __restrict__ scales;  // [N/16, Kp/group, 16]
    const float* __restrict__ mins;     // [N/16, Kp/group, 16]
    int kp, group;
    static constexpr int STAGE_K = 256;
    static constexpr int LOADS = STAGE_K / 64;
    static constexpr bool GROUPED = true;
    // Loads of stage inputs k0 .. k0 + STAGE_K (those below kp) of row block rb.
    __device__ __forceinline__ void load(int rb, int k0, int lane, uint4 q[LOADS]) const {
#pragma unroll
        for (int c = 0; c < LOADS; ++c) {
            const int kc = k0 / 64 + c;
            q[c] = kc * 64 < kp ? qweight[((size_t)rb * (kp / 64) + kc) * 32 + lane] : make_uint4(0, 0, 0, 0);
        }
    }
    // The A fragment of k-tile j of the stage.
    __device__ __forceinline__ void fragment(const uint4 q[LOADS], int j, unsigned a[4]) const {
        const uint4 v = q[j / 4];
        const unsigned word = (j % 4 == 0) ? v.x : (j % 4 == 1) ? v.y : (j % 4 == 2) ? v.z : v.w;
        int4_fragment(word, a);
    }
};

// f16 weights in the fragment layout above. A stage is 64 inputs: 4 uint4 per lane, one per
// k-tile (the same bytes in flight per warp as an INT4 stage).
struct F16Fragments {
    const uint4* __restrict__ w;  // [N/16, Kp/16, 32]
    int kp;
    static constexpr int STAGE_K = 64;
    static constexpr int LOADS = STAGE_K / 16;
    static constexpr bool GROUPED = false;
    __device__ __forceinline__ void load(int rb, int k0, int lane, uint4 q[LOADS]) const {
#pragma unroll
        for (int c = 0; c < LOADS; ++c) {
            const int kt = k0 / 16 + c;
            q[c] = kt * 16 < kp ? w[((size_t)rb * (kp / 16) + kt) * 32 + lane] : make_uint4(0, 0, 0, 0);
        }
    }
    __device__ __forceinline__ void fragment(const uint4 q[LOADS], int j, unsigned a[4]) const {
        a[0] = q[j].x;
        a[1] = q[j].y;
        a[2] = q[j].z;
        a[3] = q[j].w;
    }
};

// The partitioning described at the top, for weight format W and NT batch tiles of 8 rows.
//   x        [m_rows, k] f16 (row stride k; k a multiple of 32)
//   partial  [S, m_rows, n] f32
// Pipelining: a warp's weight loads for stage s + 1 are issued before stage s is computed (two
// register buffers), so every warp always has a stage of weights in flight; barriers and the
// staging of x overlap them.
template <int NT, class W>
__device__ __forceinline__ void mma_matmul(const __half* __restrict__ x, const W& weights, float* __restrict__ partial,
                                           int m_rows, int n, int k, int slice) {
    constexpr int MT = 8 * NT;              // batch rows of this block
    constexpr int SK = W::STAGE_K;          // inputs per stage
    constexpr int XS_STRIDE = SK + 8;       // halves: 4 words past a multiple of 32 banks, so the
                                            // 32 lanes' fragment loads hit 32 banks
    __shared__ __align__(16) __half xs[MT][XS_STRIDE];  // x[m0 + m, k0 + kk] at xs[m][kk]
    __shared__ float sum_x[MT][SK / 32];                // Σ x over each group of the stage (INT4)
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int g = lane / 4, t = lane % 4;
    const int rb = blockIdx.x * MMA_WARPS + warp;  // this warp's row block
    const bool active = rb * 16 < n;
    const int m0 = blockIdx.z * MT;
    const int ks = blockIdx.y * slice, ke = min(ks + slice, weights.kp);

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

    uint4 q[W::LOADS], q_next[W::LOADS];
    if (active) weights.load(rb, ks, lane, q);
    for (int k0 = ks; k0 < ke; k0 += SK) {
        __syncthreads();  // the previous stage's readers of xs and sum_x are done
        if constexpr (W::GROUPED) {
            // One warp per batch row, lane = 8-input chunk (SK = 256 = 32 × 8): stage x and sum
            // each group's chunks across its g/8 lanes.
            static_assert(SK == 8 * QMTOT_WARP, "INT4 stage = one chunk of 8 inputs per lane");
            const int chunks = weights.group / 8;  // lanes per group: 4, 8 or 16
            for (int m = warp; m < MT; m += MMA_WARPS) {
                const int kk = k0 + 8 * lane;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (m0 + m < m_rows && kk < k) v = *reinterpret_cast<const uint4*>(x + (size_t)(m0 + m) * k + kk);
                *reinterpret_cast<uint4*>(&xs[m][8 * lane]) = v;
                const __half2* h = reinterpret_cast<const __half2*>(&v);
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 f = __half22float2(h[i]);
                    s += f.x + f.y;
                }
                for (int o = 1; o < chunks; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (lane % chunks == 0) sum_x[m][lane / chunks] = s;
            }
        } else {
            for (int i = threadIdx.x; i < MT * (SK / 8); i += blockDim.x) {
                const int m = i / (SK / 8), c = i % (SK / 8);
                const int kk = k0 + 8 * c;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (m0 + m < m_rows && kk < k) v = *reinterpret_cast<const uint4*>(x + (size_t)(m0 + m) * k + kk);
                *reinterpret_cast<uint4*>(&xs[m][8 * c]) = v;
            }
        }
        __syncthreads();
        if (!active) continue;
        if (k0 + SK < ke) weights.load(rb, k0 + SK, lane, q_next);  // in flight during this stage

        float part[NT][4];  // Σ q·x of the current group (INT4)
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[i][e] = 0.f;
        // Stages are whole groups (256 is a multiple of every group size), so a stage that
        // ends early (the last one, at kp, a multiple of the group) still ends on a group
        // boundary.
        const int tiles = min(SK, ke - k0) / 16;
#pragma unroll
        for (int j = 0; j < SK / 16; ++j) {
            if (j < tiles) {
                unsigned a[4];
                weights.fragment(q, j, a);
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    // B fragment: x[8i + g, 16j + 2t .. +1] and x[8i + g, 16j + 2t + 8 .. +9].
                    const unsigned b[2] = {*reinterpret_cast<const unsigned*>(&xs[8 * i + g][16 * j + 2 * t]),
                                           *reinterpret_cast<const unsigned*>(&xs[8 * i + g][16 * j + 2 * t + 8])};
                    if constexpr (W::GROUPED) mma_16816(part[i], a, b);
                    else mma_16816(acc[i], a, b);
                }
            }
            if constexpr (W::GROUPED) {
                const int group = weights.group;
                if (j < tiles && (16 * (j + 1)) % group == 0) {
                    // Group end: acc += s·Σq·x + m·Σx, rows g and g + 8, batch columns 2t, 2t + 1.
                    const int gi = (k0 + 16 * j) / group;
                    const size_t si = ((size_t)rb * (weights.kp / group) + gi) * 16 + g;
                    const float s_lo = __half2float(weights.scales[si]), s_hi = __half2float(weights.scales[si + 8]);
                    const float n_lo = weights.mins[si], n_hi = weights.mins[si + 8];
                    const int gs = (16 * j) / group;  // group within the stage
#pragma unroll
                    for (int i = 0; i < NT; ++i) {
                        const float x0 = sum_x[8 * i + 2 * t][gs], x1 = sum_x[8 * i + 2 * t + 1][gs];
                        acc[i][0] += fmaf(s_lo, part[i][0], n_lo * x0);
                        acc[i][1] += fmaf(s_lo, part[i][1], n_lo * x1);
                        acc[i][2] += fmaf(s_hi, part[i][2], n_hi * x0);
                        acc[i][3] += fmaf(s_hi, part[i][3], n_hi * x1);
#pragma unroll
                        for (int e = 0; e < 4; ++e) part[i][e] = 0.f;
                    }
                }
            }
        }
#pragma unroll
        for (int c = 0; c < W::LOADS; ++c) q[c] = q_next[c];
    }
    if (!active) return;
    // D layout: acc[i][0..1] = rows g, columns 8i + 2t, +1; acc[i][2..3] = row g + 8.
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = rb * 16 + g + 8 * (e / 2), m = m0 + 8 * i + 2 * t + e % 2;
            if (row < n && m < m_rows) partial[((size_t)blockIdx.y * m_rows + m) * n + row] = acc[i][e];
        }
}

// One entry point per batch width NT (tiles of 8 rows: M ≤ 8, 16, 32, 64 per block; larger M
// takes more blocks along z, each reading the weights again through L2).
//   x        [m_rows, k] f16
//   qweight  [N/16, kp/64, 32] uint4 (fragment layout above; kp = k rounded up to 64)
//   scales   [N/16, kp/group, 16] f16
//   mins     [N/16, kp/group, 16] f32
//   partial  [S, m_rows, n] f32, S = ceil(kp / slice)
// Grid: (ceil(n / 64), S, ceil(m_rows / (8·NT))), block (128). slice a multiple of SLICE_K (256).
#define INT4_MATMUL_ENTRY(NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128, 4) int4_matmul_n##NT##_f16(                                 \
        const __half* __restrict__ x, const uint4* __restrict__ qweight, const __half* __restrict__ scales,        \
        const float* __restrict__ mins, float* __restrict__ partial, int m_rows, int n, int k, int kp, int group,  \
        int slice) {                                                                                              \
        mma_matmul<NT>(x, Int4Fragments{qweight, scales, mins, kp, group}, partial, m_rows, n, k, slice);          \
    }
INT4_MATMUL_ENTRY(1)
INT4_MATMUL_ENTRY(2)
INT4_MATMUL_ENTRY(4)
INT4_MATMUL_ENTRY(8)

// The same for f16 weights (the lm_head, INT8 and dense parts uploaded as f16).
//   x        [m_rows, k] f16
//   w        [N/16, kp/16, 32] uint4 (fragment layout above)
//   partial  [S, m_rows, n] f32
// Grid: (ceil(n / 64), S, ceil(m_rows / (8·NT))), block (128). slice a multiple of SLICE_K (256).
#define DENSE_MATMUL_ENTRY(NT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128, 4) dense_matmul_n##NT##_f16(                                \
        const __half* __restrict__ x, const uint4* __restrict__ w, float* __restrict__ partial, int m_rows, int n, \
        int k, int kp, int slice) {                                                                               \
        mma_matmul<NT>(x, F16Fragments{w, kp}, partial, m_rows, n, k, slice);                                     \
    }
DENSE_MATMUL_ENTRY(1)
DENSE_MATMUL_ENTRY(2)
DENSE_MATMUL_ENTRY(4)
DENSE_MATMUL_ENTRY(8)

// out[m, j] = Σ_s partial[s, m, j] in s order (f16 activations).
//   partial  [splits, rows, n] f32
//   out      [rows, n] f16, row stride ldo (so tiles of a larger M land in place)
// Grid: (ceil(rows·n / 256)), block (256).
extern "C" __global__ void splitk_reduce_f16(const float* __restrict__ partial, __half* __restrict__ out, int splits,
                                             int rows, int n, int ldo) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[(size_t)s * rows * n + i];
    out[(size_t)(i / n) * ldo + i % n] = __float2half(v);
}

// Same, f32 output (logits).
//   partial  [splits, rows, n] f32
//   out      [rows, n] f32, row stride ldo
// Grid: (ceil(rows·n / 256)), block (256).
extern "C" __global__ void splitk_reduce_f32(const float* __restrict__ partial, float* __restrict__ out, int splits,
                                             int rows, int n, int ldo) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[(size_t)s * rows * n + i];
    out[(size_t)(i / n) * ldo + i % n] = v;
}

// Activations gathered into a layer's stored input order (GPTQ act-order):
//   out[r, j] = x[r, order[j]]     x, out [rows, k] f16; order [k] u32, a permutation of 0..k
// Grid (rows), block (256).
extern "C" __global__ void gather_cols_f16(const __half* __restrict__ x, const unsigned* __restrict__ order,
                                           __half* __restrict__ out, int k) {
    const size_t row = (size_t)blockIdx.x * k;
    for (int j = threadIdx.x; j < k; j += blockDim.x) out[row + j] = x[row + order[j]];
}
