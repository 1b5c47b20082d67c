// Paged attention: causal, grouped-query, over the paged K/V store, as three kernels that share
// one partial-result format, so decode rows, prefill tiles and shared prefixes (cascade) are
// all planned by the host (src/backend/cuda/attention_plan.rs) and merged the same way.
//
// K/V layout per layer: [n_slots, n_kv_heads, HD] f16 with slot = block · BS + offset; position
// p of sequence s lives in slot block_tables[s][p / BS] · BS + p % BS. BS (tokens per block) is
// a template parameter so the slot arithmetic is shifts; only BS = 16, the engine's block size,
// is instantiated (DESIGN "Style" 10) — the launcher refuses another.
//
// Partials. Every kernel leaves, for each (row, query head, part) it covers, the unnormalized
// softmax state of its share of the keys:
//   part_ml [rows, n_heads, P, 2] f32   (m = max score, l = Σ exp(score − m))
//   part_o  [rows, n_heads, P, HD] f32  (Σ exp(score − m) · v)
// and `attention_merge` rescales a row's parts to their common max and normalizes
// (log-sum-exp), so the result does not depend on how the keys were cut. A part whose keys
// were all masked has m = −∞, l = 0 and is skipped. Scores are q·k/sqrt(HD) in f32 from f16
// inputs; everything after is f32 until the f16 output.
//
// * `attention_split` (flash-decoding): one CTA per (single row, KV head, chunk of `chunk`
//   positions) — a decode row over a 32k context spreads over 128 CTAs per KV head.
// * `attention_tile`: one CTA per (task, KV head); a task is up to 64 (row, query head)
//   queries over one key range of one block table. The range's K/V pass through shared
//   memory once for all the task's queries: a shared prefix of a sibling group (cascade) or
//   the keys of a prefill tile (causal mask per query row).
// * `attention_merge`: one CTA per (row, query head).
#include "common.cuh"

// Keys staged in shared memory per step of `attention_tile` (one per lane).
#define ATT_KEYS 32
// Queries (row, query head) per `attention_tile` task, and per warp of it.
#define ATT_QUERIES 64
#define ATT_WARP_QUERIES 8

// Slot of position p of a sequence whose block table is `table`.
template <int BS>
__device__ __forceinline__ size_t slot_of(const int* __restrict__ table, int p) {
    return (size_t)table[p / BS] * BS + p % BS;
}

// Max of `v` over the 32 lanes of a warp (every lane gets it).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = QMTOT_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- attention_split ---------------------------------------------------------------------
//
// CTA (i, kvh, c): row r = split_rows[i] over positions [from + c·chunk, min(from + (c+1)·chunk,
// pos + 1)), the G query heads of KV head kvh together (each K/V vector read once for all G).
// Its 4 warps take positions round-robin; within a warp each lane holds HD/32 dimensions of
// every query and of the running output. Per position: G dot products (warp sums) and an
// online-softmax update per query head. The warps' (m, l, o) are combined through shared
// memory into part split_part0[i] + c. A chunk that starts after pos has nothing to do (the
// grid is sized for the longest row) and writes nothing: its part is not counted for r.
template <int HD, int G, int BS>
__device__ __forceinline__ void attention_split_body(
    const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ row_seq, const int* __restrict__ positions,
    const int* __restrict__ split_rows, const int* __restrict__ split_from, const int* __restrict__ split_part0,
    float* __restrict__ part_ml, float* __restrict__ part_o, int n_kv_heads, int max_blocks, int chunk, int n_parts) {
    constexpr int D = HD / QMTOT_WARP;  // dimensions per lane
    constexpr int WARPS = 4;
    __shared__ float sm_m[WARPS][G], sm_l[WARPS][G], sm_o[WARPS][G][HD];
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int i = blockIdx.x, kvh = blockIdx.y, c = blockIdx.z;
    const int row = split_rows[i];
    const int pos = positions[row];
    const int start = split_from[i] + c * chunk;
    if (start > pos) return;  // uniform over the CTA, before any barrier
    const int end = min(start + chunk, pos + 1);
    const int n_heads = n_kv_heads * G;
    const int width = (n_heads + 2 * n_kv_heads) * HD;
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
    for (int p = start + warp; p < end; p += WARPS) {
        const size_t base = (slot_of<BS>(table, p) * n_kv_heads + kvh) * HD;
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
            const float corr = expf(m[g] - m_new);  // 0 on the first position (m = −∞)
            const float w = expf(s[g] - m_new);
            l[g] = l[g] * corr + w;
#pragma unroll
            for (int d = 0; d < D; ++d) o[g][d] = fmaf(w, kv[d], o[g][d] * corr);
            m[g] = m_new;
        }
    }
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
    // Combine the warps (a warp that saw no position has m = −∞) into one unnormalized part.
    const int part = split_part0[i] + c;
    for (int e = threadIdx.x; e < G * HD; e += blockDim.x) {
        const int g = e / HD, d = e % HD;
        float mx = QMTOT_NEG_INF;
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (sm_m[w][g] == QMTOT_NEG_INF) continue;
            const float cw = expf(sm_m[w][g] - mx);
            num = fmaf(cw, sm_o[w][g][d], num);
            den = fmaf(cw, sm_l[w][g], den);
        }
        const size_t at = ((size_t)row * n_heads + kvh * G + g) * n_parts + part;
        part_o[at * HD + d] = num;
        if (d == 0) {
            part_ml[at * 2] = mx;
            part_ml[at * 2 + 1] = den;
        }
    }
}

// ---- attention_tile ----------------------------------------------------------------------
//
// Task t = tasks[t·6 .. t·6+6] = (rows_offset, n_rows, seq, key_start, key_end, part): rows
// task_rows[rows_offset .. rows_offset + n_rows] (n_rows·G ≤ 64), all reading keys
// [key_start, key_end) through block table `seq`; query (i, g) — row i of the task, query
// head kvh·G + g — is query number i·G + g, and sees key p only when p ≤ positions[row i]
// (causal; always true over a shared prefix, which lies before every member's row).
//
// CTA (t, kvh), 8 warps. The task's queries are staged in shared memory (f16, unscaled); warp
// w owns queries 8w .. 8w+7. Keys go through shared memory 32 at a time (K rows padded by one
// word so lanes reading different rows hit different banks). Per step, lane j scores key j
// against the warp's 8 queries (the query words are shared-memory broadcasts), the warp
// updates each query's online softmax (max and sum by shuffles), and then every lane, owning
// HD/32 output dimensions, accumulates Σ_j p_j · v_j with p_j broadcast from lane j.
template <int HD, int G, int BS>
__device__ __forceinline__ void attention_tile_body(
    const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ positions, const int* __restrict__ tasks,
    const int* __restrict__ task_rows, float* __restrict__ part_ml, float* __restrict__ part_o, int n_kv_heads,
    int max_blocks, int n_parts) {
    constexpr int D = HD / QMTOT_WARP;
    constexpr int KW = HD / 2 + 1;  // K row stride in 32-bit words (padded)
    constexpr int QW = ATT_WARP_QUERIES;
    __shared__ __half2 sm_q[ATT_QUERIES][HD / 2];
    __shared__ __half2 sm_k[ATT_KEYS][KW];
    __shared__ __align__(16) __half sm_v[ATT_KEYS][HD];
    __shared__ int sm_qpos[ATT_QUERIES];
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int* task = tasks + blockIdx.x * 6;
    const int rows_offset = task[0], n_rows = task[1], key_start = task[3], key_end = task[4], part = task[5];
    const int kvh = blockIdx.y;
    const int n_heads = n_kv_heads * G;
    const int width = (n_heads + 2 * n_kv_heads) * HD;
    const int nq = n_rows * G;
    const int* table = block_tables + (size_t)task[2] * max_blocks;
    const float scale = rsqrtf((float)HD);

    // Stage the queries (rows beyond the task's are zero and never written back).
    for (int e = threadIdx.x; e < ATT_QUERIES * (HD / 2); e += blockDim.x) {
        const int qi = e / (HD / 2), w = e % (HD / 2);
        __half2 v = __floats2half2_rn(0.f, 0.f);
        if (qi < nq) {
            const int row = task_rows[rows_offset + qi / G];
            v = reinterpret_cast<const __half2*>(qkv + (size_t)row * width + (kvh * G + qi % G) * HD)[w];
        }
        sm_q[qi][w] = v;
    }
    for (int qi = threadIdx.x; qi < ATT_QUERIES; qi += blockDim.x)
        sm_qpos[qi] = qi < nq ? positions[task_rows[rows_offset + qi / G]] : -1;

    const int q0 = warp * QW;
    float m[QW], l[QW], o[QW][D];
#pragma unroll
    for (int a = 0; a < QW; ++a) {
        m[a] = QMTOT_NEG_INF;
        l[a] = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) o[a][d] = 0.f;
    }
    for (int k0 = key_start; k0 < key_end; k0 += ATT_KEYS) {
        __syncthreads();  // the previous step's keys are consumed (and the queries staged)
        // Stage keys k0 .. k0+31 (zeros past key_end: those slots may be unwritten NaN).
        for (int e = threadIdx.x; e < ATT_KEYS * (HD / 8); e += blockDim.x) {
            const int j = e / (HD / 8), c8 = e % (HD / 8);
            uint4 kq = make_uint4(0, 0, 0, 0), vq = make_uint4(0, 0, 0, 0);
            if (k0 + j < key_end) {
                const size_t base = (slot_of<BS>(table, k0 + j) * n_kv_heads + kvh) * HD;
                kq = reinterpret_cast<const uint4*>(k_cache + base)[c8];
                vq = reinterpret_cast<const uint4*>(v_cache + base)[c8];
            }
            const __half2* kh = reinterpret_cast<const __half2*>(&kq);
#pragma unroll
            for (int u = 0; u < 4; ++u) sm_k[j][c8 * 4 + u] = kh[u];
            *reinterpret_cast<uint4*>(&sm_v[j][c8 * 8]) = vq;
        }
        __syncthreads();
        if (q0 >= nq) continue;  // an idle warp still takes part in the barriers
        // Scores of key k0 + lane against the warp's queries.
        float s[QW];
#pragma unroll
        for (int a = 0; a < QW; ++a) s[a] = 0.f;
#pragma unroll 4
        for (int w = 0; w < HD / 2; ++w) {
            const float2 kf = __half22float2(sm_k[lane][w]);
#pragma unroll
            for (int a = 0; a < QW; ++a) {
                const float2 qf = __half22float2(sm_q[q0 + a][w]);
                s[a] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[a]));
            }
        }
        const int key = k0 + lane;
        float p[QW];
#pragma unroll
        for (int a = 0; a < QW; ++a) {
            const bool visible = key < key_end && key <= sm_qpos[q0 + a];
            const float sa = visible ? s[a] * scale : QMTOT_NEG_INF;
            const float m_new = fmaxf(m[a], warp_max(sa));
            // All keys so far masked for this query: nothing to add (and no −∞ − −∞).
            const bool none = m_new == QMTOT_NEG_INF;
            const float corr = none ? 1.f : expf(m[a] - m_new);
            p[a] = visible ? expf(sa - m_new) : 0.f;
            l[a] = l[a] * corr + warp_sum(p[a]);
#pragma unroll
            for (int d = 0; d < D; ++d) o[a][d] *= corr;
            m[a] = m_new;
        }
        // o[a][d] += Σ_j p_j · v_j[d], p_j from lane j.
// Unrolled by 2, not 4: at 4, ptxas (13.0, sm_80) spills the head_dim 64 instances.
#pragma unroll 2
        for (int j = 0; j < ATT_KEYS; ++j) {
            float vj[D];
#pragma unroll
            for (int d = 0; d < D; ++d) vj[d] = __half2float(sm_v[j][lane + 32 * d]);
#pragma unroll
            for (int a = 0; a < QW; ++a) {
                const float pj = __shfl_sync(0xffffffffu, p[a], j);
#pragma unroll
                for (int d = 0; d < D; ++d) o[a][d] = fmaf(pj, vj[d], o[a][d]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < QW; ++a) {
        const int qi = q0 + a;
        if (qi >= nq) break;
        const int row = task_rows[rows_offset + qi / G];
        const size_t at = ((size_t)row * n_heads + kvh * G + qi % G) * n_parts + part;
#pragma unroll
        for (int d = 0; d < D; ++d) part_o[at * HD + lane + 32 * d] = o[a][d];
        if (lane == 0) {
            part_ml[at * 2] = m[a];
            part_ml[at * 2 + 1] = l[a];
        }
    }
}

// ---- attention_merge ---------------------------------------------------------------------
//
// CTA (row, head), HD threads (one output dimension each): out = Σ_p e^{m_p − M} o_p /
// Σ_p e^{m_p − M} l_p over the row's parts 0 .. row_parts[row], M = max_p m_p; parts with
// m = −∞ (every key masked) are skipped.
template <int HD>
__device__ __forceinline__ void attention_merge_body(const float* __restrict__ part_ml,
                                                     const float* __restrict__ part_o,
                                                     const int* __restrict__ row_parts, __half* __restrict__ out,
                                                     int n_heads, int n_parts) {
    const int row = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    const size_t at = ((size_t)row * n_heads + head) * n_parts;
    const int np = row_parts[row];
    float mx = QMTOT_NEG_INF;
    for (int p = 0; p < np; ++p) mx = fmaxf(mx, part_ml[(at + p) * 2]);
    float num = 0.f, den = 0.f;
    for (int p = 0; p < np; ++p) {
        const float mp = part_ml[(at + p) * 2];
        if (mp == QMTOT_NEG_INF) continue;
        const float c = expf(mp - mx);
        num = fmaf(c, part_o[(at + p) * HD + d], num);
        den = fmaf(c, part_ml[(at + p) * 2 + 1], den);
    }
    out[((size_t)row * n_heads + head) * HD + d] = __float2half(num / den);
}

// ---- entry points ------------------------------------------------------------------------
//
// (head_dim, GQA group) pairs of the models we run — SmolLM2-135M (64, 3), LLaMA-3.x-8B
// (128, 4), LLaMA-2-70B (128, 8) — plus (64, 1) and (128, 1) for multi-head models and the
// tests' odd shapes; block size 16 only (see the top).
//
// Arguments shared by the entry points:
//   qkv           [rows, (n_heads + 2·n_kv_heads)·HD] f16 (Q heads read; rotated already)
//   k_cache       [n_slots, n_kv_heads, HD] f16 (one layer), v_cache likewise
//   block_tables  [n_seqs, max_blocks] int32 (each sequence's physical blocks, padded)
//   row_seq       [rows] int32 (index into block_tables), positions [rows] int32
//   part_ml       [rows, n_heads, n_parts, 2] f32, part_o [rows, n_heads, n_parts, HD] f32
//
// attention_split: split_rows / split_from / split_part0 [n_split] int32 (row, first key
// position, first part). Grid: (n_split, n_kv_heads, max chunks), block (128). At least 4 CTAs
// per multiprocessor: without that bound ptxas (13.0, sm_90a) picks 56 registers and spills.
#define ATTENTION_SPLIT_ENTRY(HD, G)                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 4) attention_split_hd##HD##_g##G##_f16(                     \
        const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache, \
        const int* __restrict__ block_tables, const int* __restrict__ row_seq,                                  \
        const int* __restrict__ positions, const int* __restrict__ split_rows,                                 \
        const int* __restrict__ split_from, const int* __restrict__ split_part0, float* __restrict__ part_ml,  \
        float* __restrict__ part_o, int n_kv_heads, int max_blocks, int chunk, int n_parts) {                   \
        attention_split_body<HD, G, 16>(qkv, k_cache, v_cache, block_tables, row_seq, positions, split_rows,   \
                                        split_from, split_part0, part_ml, part_o, n_kv_heads, max_blocks, chunk, \
                                        n_parts);                                                               \
    }
// attention_tile: tasks [n_tasks, 6] int32 (see above), task_rows [Σ n_rows] int32.
// Grid: (n_tasks, n_kv_heads), block (256).
#define ATTENTION_TILE_ENTRY(HD, G)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) attention_tile_hd##HD##_g##G##_f16(                      \
        const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache, \
        const int* __restrict__ block_tables, const int* __restrict__ positions, const int* __restrict__ tasks, \
        const int* __restrict__ task_rows, float* __restrict__ part_ml, float* __restrict__ part_o,            \
        int n_kv_heads, int max_blocks, int n_parts) {                                                          \
        attention_tile_body<HD, G, 16>(qkv, k_cache, v_cache, block_tables, positions, tasks, task_rows,        \
                                       part_ml, part_o, n_kv_heads, max_blocks, n_parts);                       \
    }
// attention_merge: row_parts [rows] int32, out [rows, n_heads·HD] f16.
// Grid: (rows, n_heads), block (HD).
#define ATTENTION_MERGE_ENTRY(HD)                                                                         \
    extern "C" __global__ void __launch_bounds__(HD) attention_merge_hd##HD##_f16(                         \
        const float* __restrict__ part_ml, const float* __restrict__ part_o, const int* __restrict__ row_parts, \
        __half* __restrict__ out, int n_heads, int n_parts) {                                               \
        attention_merge_body<HD>(part_ml, part_o, row_parts, out, n_heads, n_parts);                        \
    }
ATTENTION_SPLIT_ENTRY(64, 1)
ATTENTION_SPLIT_ENTRY(64, 3)
ATTENTION_SPLIT_ENTRY(128, 1)
ATTENTION_SPLIT_ENTRY(128, 4)
ATTENTION_SPLIT_ENTRY(128, 8)
ATTENTION_TILE_ENTRY(64, 1)
ATTENTION_TILE_ENTRY(64, 3)
ATTENTION_TILE_ENTRY(128, 1)
ATTENTION_TILE_ENTRY(128, 4)
ATTENTION_TILE_ENTRY(128, 8)
ATTENTION_MERGE_ENTRY(64)
ATTENTION_MERGE_ENTRY(128)
