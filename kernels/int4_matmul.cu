// INT4 × f16 (and f16 × f16) matmul for small batches (decode and sibling batches, M ≤ 16 per
// launch): out[M, N] = x[M, K] · W[N, K]ᵀ, f32 accumulation, deterministic split-K. One
// partitioning, two weight formats (`Int4Weights`, `F16Weights`).
//
// Weight layout (repacked at upload; see src/backend/cuda): W is stored row by row.
//   qweight [N, K/8] u32   word i of a row holds inputs 8i..8i+7, input 8i+j in bits 4j..4j+3
//                          (the canonical host layout read as little-endian u32)
//   scales  [N, K/g] f16   per (row, group of g inputs), g ∈ {32, 64, 128}
//   mins    [N, K/g] f32   w = s·q + m, exactly the canonical form
// A lane loads one 16-byte `uint4` = 32 consecutive inputs of one row per step (a warp reads
// 512 contiguous bytes: fully coalesced), and all 32 lie in one group (g ≥ 32, chunks aligned).
//
// Partitioning. Grid (N / ROWS, S): block (b, s) computes ROWS = 4 warps × RW rows over the
// K-slice s of KS = 1024 inputs (32 lanes × 32 inputs), so even M = 1 at N = 4096 runs
// (4096 / 16) × (K / 1024) blocks — enough to fill every SM (split-K). The block stages its
// slice of x (f16 → f32) in shared memory transposed — input k at [k % 32][k / 32] — so that
// at every step the 32 lanes read 32 different banks. Each lane keeps RW × MT accumulators;
// warp sums give the (row, m) partial, written to partial[s, m, n]. `splitk_reduce_*` then
// adds the S partials in order (deterministic; no atomics).
//
// This is the correct-first kernel of the CUDA backend; the asynchronous multi-stage pipeline
// and the tensor-core path for M ≥ 16 come next (the launcher tiles larger M by 8 for now).
#include "common.cuh"

#define KS 1024  // inputs per K-slice (= 32 lanes × 32 inputs)

// The 32 weights of row `row`, inputs e .. e+31, for each weight format.
struct Int4Weights {
    const uint4* __restrict__ qweight;  // [n, k/32] (= [n, k/8] u32)
    const __half* __restrict__ scales;  // [n, k/group]
    const float* __restrict__ mins;     // [n, k/group]
    int k, group;
    __device__ __forceinline__ void load(int row, int e, float w[32]) const {
        const uint4 q = qweight[((size_t)row * k + e) / 32];
        const int gi = row * (k / group) + e / group;  // one group: g ≥ 32 and e % 32 == 0
        const float s = __half2float(scales[gi]), mn = mins[gi];
        const unsigned words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int wi = 0; wi < 4; ++wi)
#pragma unroll
            for (int j = 0; j < 8; ++j) w[wi * 8 + j] = fmaf((float)((words[wi] >> (4 * j)) & 0xfu), s, mn);
    }
};

struct F16Weights {
    const uint4* __restrict__ data;  // [n, k/8]: 8 halves per uint4
    int k;
    __device__ __forceinline__ void load(int row, int e, float w[32]) const {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const uint4 v = data[((size_t)row * k + e) / 8 + c];
            const __half* h = reinterpret_cast<const __half*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) w[c * 8 + j] = __half2float(h[j]);
        }
    }
};

// Staged activations as f32 (tiles up to 8 rows) or f16 (16 rows: 16 × 1024 f32 would
// exceed the 48 KB of static shared memory; the values are f16 already, so nothing is lost).
__device__ __forceinline__ float staged(float v) { return v; }
__device__ __forceinline__ float staged(__half v) { return __half2float(v); }
__device__ __forceinline__ void stage(float& dst, __half v) { dst = __half2float(v); }
__device__ __forceinline__ void stage(__half& dst, __half v) { dst = v; }

// The partitioning described at the top, for any weight format W, staging type XS.
template <int MT, int RW, class XS, class W>
__device__ __forceinline__ void small_batch_matmul(const __half* __restrict__ x, const W& weights,
                                                   float* __restrict__ partial, int m_rows, int n, int k) {
    __shared__ XS xs[MT][32][33];  // [m][k % 32][k / 32], padded: transposed staging
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int k0 = blockIdx.y * KS;
    const int kl = min(KS, k - k0);  // a multiple of 32
    for (int i = threadIdx.x; i < MT * KS; i += blockDim.x) {
        const int m = i / KS, kk = i % KS;
        stage(xs[m][kk % 32][kk / 32], (m < m_rows && kk < kl) ? x[(size_t)m * k + k0 + kk] : __float2half(0.f));
    }
    __syncthreads();

    const int row0 = (blockIdx.x * 4 + warp) * RW;
    float acc[RW][MT];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    if (lane * 32 < kl) {
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            const int row = row0 + r;
            if (row >= n) break;
            float w[32];
            weights.load(row, k0 + lane * 32, w);  // inputs k0 + lane·32 + kk
#pragma unroll
            for (int kk = 0; kk < 32; ++kk)
#pragma unroll
                for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(w[kk], staged(xs[m][kk][lane]), acc[r][m]);
        }
    }
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        const int row = row0 + r;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float v = warp_sum(acc[r][m]);
            if (lane == 0 && row < n && m < m_rows) partial[((size_t)blockIdx.y * m_rows + m) * n + row] = v;
        }
    }
}

// One entry point per batch tile MT (rows of x per launch) — the instantiations in use:
// MT = 1 (decode), 2, 4, 8, 16 (sibling batches; larger M runs in tiles of 16, each reading the
// weights again until the tensor-core path exists); RW = rows per warp, fewer for larger MT to
// keep the RW × MT accumulators in registers; XS = the staging type (above).
//   x        [m_rows, k] f16, m_rows ≤ MT
//   qweight  [n, k/8] u32 (as uint4: [n, k/32])
//   scales   [n, k/group] f16
//   mins     [n, k/group] f32
//   partial  [ceil(k/1024), m_rows, n] f32
// Grid: (ceil(n / (4·RW)), ceil(k / 1024)), block (128). k a multiple of 32 and of group.
#define INT4_MATMUL_ENTRY(MT, RW, XS)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) int4_matmul_m##MT##_f16(                             \
        const __half* __restrict__ x, const uint4* __restrict__ qweight, const __half* __restrict__ scales, \
        const float* __restrict__ mins, float* __restrict__ partial, int m_rows, int n, int k, int group) { \
        small_batch_matmul<MT, RW, XS>(x, Int4Weights{qweight, scales, mins, k, group}, partial, m_rows, n, k); \
    }
INT4_MATMUL_ENTRY(1, 4, float)
INT4_MATMUL_ENTRY(2, 4, float)
INT4_MATMUL_ENTRY(4, 2, float)
INT4_MATMUL_ENTRY(8, 1, float)
INT4_MATMUL_ENTRY(16, 1, __half)

// The same for f16 weights (the tied lm_head, INT8 and dense parts uploaded as f16).
//   x        [m_rows, k] f16, m_rows ≤ MT
//   w        [n, k] f16 (as uint4: [n, k/8])
//   partial  [ceil(k/1024), m_rows, n] f32
// Grid: (ceil(n / (4·RW)), ceil(k / 1024)), block (128). k a multiple of 32.
#define DENSE_MATMUL_ENTRY(MT, RW, XS)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) dense_matmul_m##MT##_f16(                        \
        const __half* __restrict__ x, const uint4* __restrict__ w, float* __restrict__ partial, int m_rows, \
        int n, int k) {                                                                                 \
        small_batch_matmul<MT, RW, XS>(x, F16Weights{w, k}, partial, m_rows, n, k);                     \
    }
DENSE_MATMUL_ENTRY(1, 4, float)
DENSE_MATMUL_ENTRY(2, 4, float)
DENSE_MATMUL_ENTRY(4, 2, float)
DENSE_MATMUL_ENTRY(8, 1, float)
DENSE_MATMUL_ENTRY(16, 1, __half)

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
