// Row-wise elementwise kernels of the forward pass: RMSNorm fused with the residual add,
// RoPE in both pair conventions (alone, or fused with the K/V cache write), SiLU·mul. Decode rows are short, so a row's work is spread
// over the threads of a block (norm) or over several blocks (RoPE, SiLU·mul) with 16-byte
// accesses: these kernels are latency-bound at batch 1.
#include "common.cuh"

// Halves per vector access: one uint4.
#define VEC_HALVES 8
// Vector chunks a norm thread keeps in registers: rows of up to NORM_BLOCK·8·NORM_CHUNKS
// halves (16384 at 512 threads) are read once; longer or unaligned rows take the strided
// path.
#define NORM_CHUNKS 4

__device__ __forceinline__ void unpack8(const uint4& v, float f[VEC_HALVES]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __half22float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float f[VEC_HALVES]) {
    uint4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// x[r] += add[r] (when add != nullptr), then out[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w.
// The residual stream keeps f16 storage (the sum is rounded to f16 and the rounded value is
// normalized, as the next layer sees it); the sum of squares is accumulated in f32.
//   x    [rows, d] f16 (updated in place when add is given)
//   add  [rows, d] f16 or nullptr
//   w    [d]       f32
//   out  [rows, d] f16
// Grid: (rows), block (any multiple of 32; the launcher uses 512). When d % 8 == 0 and
// d ≤ 8·NORM_CHUNKS·blockDim.x, each thread loads its ≤ NORM_CHUNKS uint4 chunks at once and
// keeps them in registers (one memory round trip for a decode row, not one per element);
// otherwise a strided loop over single elements.
extern "C" __global__ void rmsnorm_residual_f16(__half* __restrict__ x, const __half* __restrict__ add,
                                                const float* __restrict__ w, __half* __restrict__ out,
                                                int d, float eps) {
    __shared__ float scratch[QMTOT_WARP];
    const size_t row = (size_t)blockIdx.x * d;
    float ss = 0.f;
    if (d % VEC_HALVES == 0 && d <= VEC_HALVES * NORM_CHUNKS * (int)blockDim.x) {
        const int chunks = d / VEC_HALVES;
        uint4* xv = reinterpret_cast<uint4*>(x + row);
        float v[NORM_CHUNKS][VEC_HALVES];
#pragma unroll
        for (int u = 0; u < NORM_CHUNKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c >= chunks) continue;
            unpack8(xv[c], v[u]);
            if (add != nullptr) {
                float a[VEC_HALVES];
                unpack8(reinterpret_cast<const uint4*>(add + row)[c], a);
#pragma unroll
                for (int e = 0; e < VEC_HALVES; ++e) v[u][e] = __half2float(__float2half(v[u][e] + a[e]));
                xv[c] = pack8(v[u]);  // exact: every v is an f16 value
            }
#pragma unroll
            for (int e = 0; e < VEC_HALVES; ++e) ss += v[u][e] * v[u][e];
        }
        const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
#pragma unroll
        for (int u = 0; u < NORM_CHUNKS; ++u) {
            const int c = threadIdx.x + u * blockDim.x;
            if (c >= chunks) continue;
            const float4 w0 = reinterpret_cast<const float4*>(w)[2 * c];
            const float4 w1 = reinterpret_cast<const float4*>(w)[2 * c + 1];
            const float wc[VEC_HALVES] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            float o[VEC_HALVES];
#pragma unroll
            for (int e = 0; e < VEC_HALVES; ++e) o[e] = v[u][e] * inv * wc[e];
            reinterpret_cast<uint4*>(out + row)[c] = pack8(o);
        }
        return;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = __half2float(x[row + i]);
        if (add != nullptr) {
            v = __half2float(__float2half(v + __half2float(add[row + i])));
            x[row + i] = __float2half(v);
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[row + i] = __float2half(__half2float(x[row + i]) * inv * w[i]);
}

// Pair (a, b) of a head is rotated by angle pos·θ_i: a' = a·cos − b·sin, b' = a·sin + b·cos.
// half_split = 0: pairs (2i, 2i+1) (GGUF); 1: pairs (i, i + hd/2) (Hugging Face).
struct RopePair {
    int ia, ib;  // the pair's element indices in its head
    __device__ __forceinline__ RopePair(int i, int hd, int half_split)
        : ia(half_split ? i : 2 * i), ib(half_split ? i + hd / 2 : 2 * i + 1) {}
    // Rotates head h's pair in place by table row t (= position · hd/2) and returns it.
    __device__ __forceinline__ __half2 rotate(__half* h, const float* cos_t, const float* sin_t, size_t t,
                                              int i) const {
        const float a = __half2float(h[ia]), b = __half2float(h[ib]);
        const float c = cos_t[t + i], s = sin_t[t + i];
        const __half2 r = __floats2half2_rn(a * c - b * s, a * s + b * c);
        h[ia] = __low2half(r);
        h[ib] = __high2half(r);
        return r;
    }
};

// Rotates the Q and K heads of each row of the fused Q|K|V activation by the row's position
// (pairs: RopePair).
//   qkv        [rows, (n_heads + 2·n_kv_heads)·hd] f16, Q heads then K heads then V heads
//   positions  [rows] int32
//   cos, sin   [max_pos, hd/2] f32
// Grid: (rows, ceil((n_heads + n_kv_heads)·hd/2 / 128)), block (128); one thread per
// (head, pair) of the rotated heads, so a decode row is spread over many blocks.
extern "C" __global__ void rope_f16(__half* __restrict__ qkv, const int* __restrict__ positions,
                                    const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    int n_heads, int n_kv_heads, int hd, int half_split) {
    const int half = hd / 2;
    const int width = (n_heads + 2 * n_kv_heads) * hd;
    const int p = blockIdx.y * blockDim.x + threadIdx.x;
    if (p >= (n_heads + n_kv_heads) * half) return;
    const int head = p / half, i = p % half;
    __half* h = qkv + (size_t)blockIdx.x * width + head * hd;
    RopePair(i, hd, half_split).rotate(h, cos_t, sin_t, (size_t)positions[blockIdx.x] * half, i);
}

// rope_f16, and the row's rotated K heads and its V heads written into its cache slot (the
// kv_write of kernels/kv_cache.cu) in the same pass: one launch per layer instead of two.
//   qkv        [rows, (n_heads + 2·n_kv_heads)·hd] f16 (Q and K rotated in place)
//   positions  [rows] int32, slots [rows] int32
//   cos, sin   [max_pos, hd/2] f32
//   k, v       [n_slots, n_kv_heads·hd] f16 (one layer)
// Grid: (rows, ceil((n_heads + 2·n_kv_heads)·hd/2 / 128)), block (128); one thread per
// (head, pair) of every head, V heads only copied.
extern "C" __global__ void rope_kv_write_f16(__half* __restrict__ qkv, const int* __restrict__ positions,
                                             const int* __restrict__ slots, const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, __half* __restrict__ k,
                                             __half* __restrict__ v, int n_heads, int n_kv_heads, int hd,
                                             int half_split) {
    const int half = hd / 2;
    const int width = (n_heads + 2 * n_kv_heads) * hd;
    const int p = blockIdx.y * blockDim.x + threadIdx.x;
    if (p >= (n_heads + 2 * n_kv_heads) * half) return;
    const int head = p / half, i = p % half;
    __half* h = qkv + (size_t)blockIdx.x * width + head * hd;
    const RopePair pair(i, hd, half_split);
    const size_t slot = (size_t)slots[blockIdx.x] * n_kv_heads * hd;
    if (head >= n_heads + n_kv_heads) {  // a V head: copied as is
        __half* dst = v + slot + (head - n_heads - n_kv_heads) * hd;
        dst[pair.ia] = h[pair.ia];
        dst[pair.ib] = h[pair.ib];
        return;
    }
    const __half2 r = pair.rotate(h, cos_t, sin_t, (size_t)positions[blockIdx.x] * half, i);
    if (head >= n_heads) {  // a K head: its rotated pair goes to the cache too
        __half* dst = k + slot + (head - n_heads) * hd;
        dst[pair.ia] = __low2half(r);
        dst[pair.ib] = __high2half(r);
    }
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.f + expf(-g)) * u; }

// out[r, j] = silu(gate[r, j]) · up[r, j], silu(g) = g / (1 + e^−g), in f32.
//   gate_up  [rows, 2f] f16: gate columns 0..f, up columns f..2f
//   out      [rows, f]  f16
// Grid: (rows, ceil(f / (8·256))), block (256); thread (y, t) computes outputs 8c .. 8c + 7
// of its row, c = 256·y + t (one uint4 of gate, up and out when f % 8 == 0).
extern "C" __global__ void silu_mul_f16(const __half* __restrict__ gate_up, __half* __restrict__ out, int f) {
    const __half* gu = gate_up + (size_t)blockIdx.x * 2 * f;
    __half* o = out + (size_t)blockIdx.x * f;
    const int j0 = VEC_HALVES * (blockIdx.y * blockDim.x + threadIdx.x);
    if (j0 >= f) return;
    if (f % VEC_HALVES == 0) {
        float g[VEC_HALVES], u[VEC_HALVES], r[VEC_HALVES];
        unpack8(*reinterpret_cast<const uint4*>(gu + j0), g);
        unpack8(*reinterpret_cast<const uint4*>(gu + f + j0), u);
#pragma unroll
        for (int e = 0; e < VEC_HALVES; ++e) r[e] = silu_times(g[e], u[e]);
        *reinterpret_cast<uint4*>(o + j0) = pack8(r);
        return;
    }
    for (int j = j0; j < min(j0 + VEC_HALVES, f); ++j)
        o[j] = __float2half(silu_times(__half2float(gu[j]), __half2float(gu[f + j])));
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
