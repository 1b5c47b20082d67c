// INT4 × f16 matmul for small batches (decode and sibling batches, M ≤ 8 per launch):
// out[M, N] = x[M, K] · W[N, K]ᵀ, f32 accumulation, deterministic split-K.
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

template <int MT, int RW>
__device__ __forceinline__ void int4_matmul_tile(const __half* __restrict__ x, const uint4* __restrict__ qweight,
                                                 const __half* __restrict__ scales, const float* __restrict__ mins,
                                                 float* __restrict__ partial, int m_rows, int n, int k, int group) {
    __shared__ float xs[MT][32][33];  // [m][k % 32][k / 32], padded: transposed staging
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int k0 = blockIdx.y * KS;
    const int kl = min(KS, k - k0);  // a multiple of 32
    for (int i = threadIdx.x; i < MT * KS; i += blockDim.x) {
        const int m = i / KS, kk = i % KS;
        const float v = (m < m_rows && kk < kl) ? __half2float(x[(size_t)m * k + k0 + kk]) : 0.f;
        xs[m][kk % 32][kk / 32] = v;
    }
    __syncthreads();

    const int row0 = (blockIdx.x * 4 + warp) * RW;
    const int words = k / 8, gpr = k / group;
    float acc[RW][MT];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    if (lane * 32 < kl) {
        const int e = k0 + lane * 32;  // this lane's first input
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            const int row = row0 + r;
            if (row >= n) break;
            const uint4 q = qweight[((size_t)row * words + e / 8) / 4];
            const float s = __half2float(scales[(size_t)row * gpr + e / group]);
            const float mn = mins[(size_t)row * gpr + e / group];
            const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float wv = fmaf((float)((w[wi] >> (4 * j)) & 0xfu), s, mn);
                    const int kk = wi * 8 + j;  // input e + kk = k0 + lane·32 + kk
#pragma unroll
                    for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(wv, xs[m][kk][lane], acc[r][m]);
                }
            }
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
// MT = 1 (decode), 2, 4, 8 (sibling batches); RW = rows per warp, fewer for larger MT to keep
// the RW × MT accumulators in registers.
//   x        [m_rows, k] f16, m_rows ≤ MT
//   qweight  [n, k/8] u32 (as uint4: [n, k/32])
//   scales   [n, k/group] f16
//   mins     [n, k/group] f32
//   partial  [ceil(k/1024), m_rows, n] f32
// Grid: (ceil(n / (4·RW)), ceil(k / 1024)), block (128). k a multiple of 32 and of group.
#define INT4_MATMUL_ENTRY(MT, RW)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) int4_matmul_m##MT##_f16(                             \
        const __half* __restrict__ x, const uint4* __restrict__ qweight, const __half* __restrict__ scales, \
        const float* __restrict__ mins, float* __restrict__ partial, int m_rows, int n, int k, int group) { \
        int4_matmul_tile<MT, RW>(x, qweight, scales, mins, partial, m_rows, n, k, group);                \
    }
INT4_MATMUL_ENTRY(1, 4)
INT4_MATMUL_ENTRY(2, 4)
INT4_MATMUL_ENTRY(4, 2)
INT4_MATMUL_ENTRY(8, 1)

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
