// Data movement around the paged K/V store: embedding gather, K/V write into slots, batched
// block copy (copy-on-write) and logit-row gather.
//
// K/V store layout per layer: [n_blocks, block_size, n_kv_heads, hd] f16, K and V separate;
// slot s = block · block_size + offset addresses one token's [n_kv_heads, hd] values.
#include "common.cuh"

// Where element (row, input) of a weight matrix lives in the tensor-core fragment layout of
// int4_matmul.cu: row block, k-tile, lane, and h + 2c + 4p (its nibble in an INT4 word; an f16
// tile keeps it at half 2(h + 2c) + p).
struct FragmentPosition {
    int rb, kt, lane, hc, p;
    __device__ __forceinline__ FragmentPosition(int row, int input) {
        const int i = row % 16, kk = input % 16, j = kk % 8;
        rb = row / 16;
        kt = input / 16;
        lane = 4 * (i % 8) + j / 2;
        hc = i / 8 + 2 * (kk / 8);
        p = j % 2;
    }
};

// out[r] = table[tokens[r]] (an f16 embedding table, in the fragment layout: a tied lm_head
// is the same buffer).
//   table   [ceil(vocab/16), kp/16, 32, 8] f16 (fragment layout, kp = d rounded up to 64)
//   tokens  [rows] int32 (checked < vocab by the launcher)
//   out     [rows, d] f16
// Grid: (rows), block (256).
extern "C" __global__ void embed_f16(const __half* __restrict__ table, const int* __restrict__ tokens,
                                     __half* __restrict__ out, int d, int kp) {
    const int t = tokens[blockIdx.x];
    __half* dst = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const FragmentPosition f(t, i);
        dst[i] = table[(((size_t)f.rb * (kp / 16) + f.kt) * 32 + f.lane) * 8 + 2 * f.hc + f.p];
    }
}

// Writes the K and V heads of each row of the fused Q|K|V activation into the row's slot.
//   qkv    [rows, (n_heads + 2·n_kv_heads)·hd] f16
//   slots  [rows] int32
//   k, v   [n_slots, n_kv_heads·hd] f16 (one layer)
// Grid: (rows), block (128).
extern "C" __global__ void kv_write_f16(const __half* __restrict__ qkv, const int* __restrict__ slots,
                                        __half* __restrict__ k, __half* __restrict__ v,
                                        int n_heads, int n_kv_heads, int hd) {
    const int kvw = n_kv_heads * hd;
    const __half* row = qkv + (size_t)blockIdx.x * (n_heads + 2 * n_kv_heads) * hd;
    const size_t dst = (size_t)slots[blockIdx.x] * kvw;
    for (int i = threadIdx.x; i < kvw; i += blockDim.x) {
        k[dst + i] = row[n_heads * hd + i];
        v[dst + i] = row[(n_heads + n_kv_heads) * hd + i];
    }
}

// Copies whole blocks src → dst in every layer, K and V: one launch for all of a step's
// copy-on-write copies. Sources and destinations are distinct blocks (the engine keeps
// sources alive until the copies are applied), so the copies are independent.
//   store   [n_layers, 2, n_blocks, block_elems] f16 (K then V per layer)
//   pairs   [n_copies, 2] int32 (src, dst)
// Grid: (n_copies, 2·n_layers), block (256); 16-byte vector copies (block_elems is a
// multiple of 8: block_size·n_kv_heads·hd with hd a multiple of 8).
extern "C" __global__ void copy_blocks_f16(__half* __restrict__ store, const int* __restrict__ pairs,
                                           int n_blocks, int block_elems) {
    const size_t plane = (size_t)blockIdx.y * n_blocks * block_elems;
    const uint4* src = reinterpret_cast<const uint4*>(store + plane + (size_t)pairs[2 * blockIdx.x] * block_elems);
    uint4* dst = reinterpret_cast<uint4*>(store + plane + (size_t)pairs[2 * blockIdx.x + 1] * block_elems);
    for (int i = threadIdx.x; i < block_elems / 8; i += blockDim.x) dst[i] = src[i];
}

// out[i] = x[rows[i]] (the rows whose logits the step returns, before the output norm and
// head).
//   x     [T, d] f16
//   rows  [R] int32
//   out   [R, d] f16
// Grid: (R), block (256).
extern "C" __global__ void gather_rows_f16(const __half* __restrict__ x, const int* __restrict__ rows,
                                           __half* __restrict__ out, int d) {
    const __half* src = x + (size_t)rows[blockIdx.x] * d;
    __half* dst = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// out[r] = dequantized row tokens[r] of an INT4 embedding table (w = s·q + m) in the fragment
// layout of int4_matmul.cu.
//   qweight    [ceil(vocab/16), kp/64, 32, 4] u32
//   scale_min  [ceil(vocab/16), kp/group, 8, 4] f32: (s[g], s[g+8], m[g], m[g+8]) per row block,
//              group and g = row % 8
//   tokens     [rows] int32 (checked < vocab by the launcher)
//   out        [rows, d] f16
// Grid: (rows), block (256).
extern "C" __global__ void embed_int4_f16(const unsigned* __restrict__ qweight, const float* __restrict__ scale_min,
                                          const int* __restrict__ tokens, __half* __restrict__ out, int d, int kp,
                                          int group) {
    const int t = tokens[blockIdx.x];
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const FragmentPosition f(t, i);
        const unsigned word = qweight[(((size_t)f.rb * (kp / 64) + f.kt / 4) * 32 + f.lane) * 4 + f.kt % 4];
        const unsigned q = (word >> (4 * (f.hc + 4 * f.p))) & 0xfu;
        const size_t quad = (((size_t)f.rb * (kp / group) + i / group) * 8 + t % 8) * 4;
        const int h = (t % 16) / 8;
        out[(size_t)blockIdx.x * d + i] = __float2half(fmaf((float)q, scale_min[quad + h], scale_min[quad + 2 + h]));
    }
}

// x[i] = value for i < n (poisons unused K/V slots with NaN in tests; zeroes buffers).
//   x  [n] f16
// Grid: (ceil(n / 256)), block (256).
extern "C" __global__ void fill_f16(__half* __restrict__ x, size_t n, float value) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __float2half(value);
}
