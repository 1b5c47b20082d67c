// f16 × f16 matmul for small batches (the tied lm_head, embeddings used as output, dense
// parts): out[M, N] = x[M, K] · W[N, K]ᵀ, f32 accumulation, the same deterministic split-K
// partitioning as int4_matmul.cu (block = 4 warps × RW rows over a K-slice of 1024 inputs; a
// lane takes 32 consecutive inputs of a row as four 16-byte loads). cuBLAS f16 GEMM is the
// benchmark baseline; this kernel keeps the backend free of a cuBLAS dependency for
// correctness and gives f32 partials for f32 logits.
#include "common.cuh"

#define KS 1024

template <int MT, int RW>
__device__ __forceinline__ void dense_matmul_tile(const __half* __restrict__ x, const uint4* __restrict__ w,
                                                  float* __restrict__ partial, int m_rows, int n, int k) {
    __shared__ float xs[MT][32][33];  // [m][k % 32][k / 32]: conflict-free reads, as in int4_matmul.cu
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int k0 = blockIdx.y * KS;
    const int kl = min(KS, k - k0);
    for (int i = threadIdx.x; i < MT * KS; i += blockDim.x) {
        const int m = i / KS, kk = i % KS;
        xs[m][kk % 32][kk / 32] = (m < m_rows && kk < kl) ? __half2float(x[(size_t)m * k + k0 + kk]) : 0.f;
    }
    __syncthreads();
    const int row0 = (blockIdx.x * 4 + warp) * RW;
    float acc[RW][MT];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    if (lane * 32 < kl) {
        const int e = k0 + lane * 32;
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            const int row = row0 + r;
            if (row >= n) break;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const uint4 v = w[((size_t)row * k + e) / 8 + c];  // 8 halves
                const __half* h = reinterpret_cast<const __half*>(&v);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float wv = __half2float(h[j]);
#pragma unroll
                    for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(wv, xs[m][c * 8 + j][lane], acc[r][m]);
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

//   x        [m_rows, k] f16, m_rows ≤ MT
//   w        [n, k] f16 (as uint4: [n, k/8])
//   partial  [ceil(k/1024), m_rows, n] f32, reduced by splitk_reduce_{f16,f32} (int4_matmul.cu)
// Grid: (ceil(n / (4·RW)), ceil(k / 1024)), block (128). k a multiple of 32.
#define DENSE_MATMUL_ENTRY(MT, RW)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) dense_matmul_m##MT##_f16(                        \
        const __half* __restrict__ x, const uint4* __restrict__ w, float* __restrict__ partial, int m_rows, \
        int n, int k) {                                                                                 \
        dense_matmul_tile<MT, RW>(x, w, partial, m_rows, n, k);                                         \
    }
DENSE_MATMUL_ENTRY(1, 4)
DENSE_MATMUL_ENTRY(2, 4)
DENSE_MATMUL_ENTRY(4, 2)
DENSE_MATMUL_ENTRY(8, 1)
