// Row-wise elementwise kernels of the forward pass: RMSNorm fused with the residual add,
// RoPE in both pair conventions, SiLU·mul. One CUDA block per activation row.
#include "common.cuh"

// x[r] += add[r] (when add != nullptr), then out[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w.
// The residual stream keeps f16 storage; the sum of squares is accumulated in f32.
//   x    [rows, d] f16 (updated in place when add is given)
//   add  [rows, d] f16 or nullptr
//   w    [d]       f32
//   out  [rows, d] f16
// Grid: (rows), block (256); d any size (strided loop).
extern "C" __global__ void rmsnorm_residual_f16(__half* __restrict__ x, const __half* __restrict__ add,
                                                const float* __restrict__ w, __half* __restrict__ out,
                                                int d, float eps) {
    __shared__ float scratch[QMTOT_WARP];
    const size_t row = (size_t)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = __half2float(x[row + i]);
        if (add != nullptr) {
            v += __half2float(add[row + i]);
            x[row + i] = __float2half(v);
            v = __half2float(x[row + i]);  // normalize what is stored, as the next layer sees it
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[row + i] = __float2half(__half2float(x[row + i]) * inv * w[i]);
}

// Rotates the Q and K heads of each row of the fused Q|K|V activation by the row's position.
// Pair (a, b) of a head is rotated by angle pos·θ_i: a' = a·cos − b·sin, b' = a·sin + b·cos.
// half_split = 0: pairs (2i, 2i+1) (GGUF); 1: pairs (i, i + hd/2) (Hugging Face).
//   qkv        [rows, (n_heads + 2·n_kv_heads)·hd] f16, Q heads then K heads then V heads
//   positions  [rows] int32
//   cos, sin   [max_pos, hd/2] f32
// Grid: (rows), block (128); threads stride over (head, pair) of the n_heads + n_kv_heads
// rotated heads.
extern "C" __global__ void rope_f16(__half* __restrict__ qkv, const int* __restrict__ positions,
                                    const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    int n_heads, int n_kv_heads, int hd, int half_split) {
    const int half = hd / 2;
    const int width = (n_heads + 2 * n_kv_heads) * hd;
    __half* row = qkv + (size_t)blockIdx.x * width;
    const size_t t = (size_t)positions[blockIdx.x] * half;
    const int pairs = (n_heads + n_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half, i = p % half;
        __half* h = row + head * hd;
        const int ia = half_split ? i : 2 * i;
        const int ib = half_split ? i + half : 2 * i + 1;
        const float a = __half2float(h[ia]), b = __half2float(h[ib]);
        const float c = cos_t[t + i], s = sin_t[t + i];
        h[ia] = __float2half(a * c - b * s);
        h[ib] = __float2half(a * s + b * c);
    }
}

// out[r, j] = silu(gate[r, j]) · up[r, j], silu(g) = g / (1 + e^−g), in f32.
//   gate_up  [rows, 2f] f16: gate columns 0..f, up columns f..2f
//   out      [rows, f]  f16
// Grid: (rows), block (256); f any size.
extern "C" __global__ void silu_mul_f16(const __half* __restrict__ gate_up, __half* __restrict__ out, int f) {
    const __half* gu = gate_up + (size_t)blockIdx.x * 2 * f;
    __half* o = out + (size_t)blockIdx.x * f;
    for (int j = threadIdx.x; j < f; j += blockDim.x) {
        const float g = __half2float(gu[j]), u = __half2float(gu[f + j]);
        o[j] = __float2half(g / (1.f + expf(-g)) * u);
    }
}

// x += y elementwise (the residual add when it is not fused into the next norm).
//   x, y  [n] f16
// Grid: (ceil(n / 256)), block (256).
extern "C" __global__ void add_f16(__half* __restrict__ x, const __half* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __float2half(__half2float(x[i]) + __half2float(y[i]));
}

// x[r, :] += bias (a projection's bias, broadcast over the rows).
//   x [rows, n] f16; bias [n] f32
// Grid (rows), block (256).
extern "C" __global__ void add_bias_f16(__half* __restrict__ x, const float* __restrict__ bias, int n) {
    __half* row = x + (size_t)blockIdx.x * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) row[j] = __float2half(__half2float(row[j]) + bias[j]);
}
