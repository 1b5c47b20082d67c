// Paged attention, correct first: causal, grouped-query, over the paged K/V store, for decode
// rows and prefill rows alike (each row attends to positions 0..=pos of its sequence).
// Flash-decoding split-K, cascade (shared-prefix) and tiled prefill kernels come with the
// CUDA part-2 issue; this one is the reference the GPU tests hold them to.
//
// K/V layout per layer: [n_slots, n_kv_heads, HD] f16 with slot = block · block_size + offset;
// position p of sequence s lives in slot block_tables[s][p / block_size] · block_size +
// p % block_size.
//
// Partitioning: one CUDA block per (row, KV head) computes the G = n_heads / n_kv_heads query
// heads that share that KV head, so each K/V vector is read once for all G (GQA). Its 4 warps
// take positions round-robin; within a warp each lane holds HD/32 dimensions of every query
// and of the running output. Per position: G dot products (warp sums), an online-softmax
// update per query head (running max m, sum l, rescaled output), all in f32. The 4 warps'
// (m, l, o) are merged through shared memory at the end.
#include "common.cuh"

template <int HD, int G>
__device__ __forceinline__ void paged_attention_tile(const __half* __restrict__ qkv, const __half* __restrict__ k_cache,
                                                     const __half* __restrict__ v_cache,
                                                     const int* __restrict__ block_tables,
                                                     const int* __restrict__ row_seq, const int* __restrict__ positions,
                                                     __half* __restrict__ out, int n_kv_heads, int block_size,
                                                     int max_blocks) {
    constexpr int D = HD / QMTOT_WARP;  // dimensions per lane
    constexpr int WARPS = 4;
    __shared__ float sm_m[WARPS][G], sm_l[WARPS][G], sm_o[WARPS][G][HD];
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int row = blockIdx.x, kvh = blockIdx.y;
    const int n_heads = n_kv_heads * G;
    const int width = (n_heads + 2 * n_kv_heads) * HD;
    const int pos = positions[row];
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const float scale = rsqrtf((float)HD);

    float q[G][D], o[G][D], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = QMTOT_NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) {
            q[g][d] = __half2float(qkv[(size_t)row * width + (kvh * G + g) * HD + lane + 32 * d]) * scale;
            o[g][d] = 0.f;
        }
    }
    for (int p = warp; p <= pos; p += WARPS) {
        const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const size_t base = (slot * n_kv_heads + kvh) * HD;
        float kv[D];
#pragma unroll
        for (int d = 0; d < D; ++d) kv[d] = __half2float(k_cache[base + lane + 32 * d]);
        float s[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < D; ++d) dot = fmaf(q[g][d], kv[d], dot);
            s[g] = warp_sum(dot);
        }
#pragma unroll
        for (int d = 0; d < D; ++d) kv[d] = __half2float(v_cache[base + lane + 32 * d]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float m_new = fmaxf(m[g], s[g]);
            const float corr = expf(m[g] - m_new);  // 0 on the first position (m = −inf)
            const float w = expf(s[g] - m_new);
            l[g] = l[g] * corr + w;
#pragma unroll
            for (int d = 0; d < D; ++d) o[g][d] = fmaf(w, kv[d], o[g][d] * corr);
            m[g] = m_new;
        }
    }
    // Merge the warps: rescale each to the common max, add, normalize.
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int d = 0; d < D; ++d) sm_o[warp][g][lane + 32 * d] = o[g][d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float mx = QMTOT_NEG_INF;
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (sm_m[w][g] == QMTOT_NEG_INF) continue;  // a warp that saw no position
            const float c = expf(sm_m[w][g] - mx);
            num = fmaf(c, sm_o[w][g][d], num);
            den = fmaf(c, sm_l[w][g], den);
        }
        out[(size_t)row * n_heads * HD + (kvh * G + g) * HD + d] = __float2half(num / den);
    }
}

// Entry points for the (head_dim, GQA group) pairs of the models we run — SmolLM2-135M
// (64, 3), LLaMA-3.x-8B (128, 4), LLaMA-2-70B (128, 8) — plus (64, 1) and (128, 1) for
// multi-head-attention models and the tests' odd shapes.
//   qkv           [rows, (n_heads + 2·n_kv_heads)·HD] f16 (Q heads used; rotated already)
//   k_cache       [n_slots, n_kv_heads, HD] f16 (one layer)
//   v_cache       [n_slots, n_kv_heads, HD] f16
//   block_tables  [n_seqs, max_blocks] int32 (each sequence's physical blocks, padded)
//   row_seq       [rows] int32 (index into block_tables)
//   positions     [rows] int32 (the row attends 0..=positions[row])
//   out           [rows, n_heads·HD] f16
// Grid: (rows, n_kv_heads), block (128).
#define PAGED_ATTENTION_ENTRY(HD, G)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_hd##HD##_g##G##_f16(                 \
        const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache, \
        const int* __restrict__ block_tables, const int* __restrict__ row_seq,                              \
        const int* __restrict__ positions, __half* __restrict__ out, int n_kv_heads, int block_size,       \
        int max_blocks) {                                                                                   \
        paged_attention_tile<HD, G>(qkv, k_cache, v_cache, block_tables, row_seq, positions, out, n_kv_heads, \
                                    block_size, max_blocks);                                                \
    }
PAGED_ATTENTION_ENTRY(64, 1)
PAGED_ATTENTION_ENTRY(64, 3)
PAGED_ATTENTION_ENTRY(128, 1)
PAGED_ATTENTION_ENTRY(128, 4)
PAGED_ATTENTION_ENTRY(128, 8)
