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
// The positions go through shared memory SPLIT_KEYS at a time, every 16-byte piece of a tile's
// K and V issued at once (cp.async; the first tile's before the queries are staged), so a
// tile costs about one memory round trip rather than one per position. Per tile, three phases split by barriers:
//   1. scores: thread (g, j) takes q_g · k_j (q pre-scaled by 1/sqrt(HD), f32);
//   2. softmax: warp w owns query heads w, w+4, …: the tile's max, the weights
//      p_j = e^{s_j − m_new}, the correction e^{m_old − m_new} and the running sum l;
//   3. output: thread owns (g, dimension pair) columns: o = o · corr_g + Σ_j p_j · v_j.
// The CTA's (m, l, o) is written unnormalized as part split_part0[i] + c. A chunk that starts
// after pos has nothing to do (the grid is sized for the longest row) and writes nothing: its
// part is not counted for r. Positions past the range are zero-filled in shared memory (their
// slots may hold NaN) and get weight 0.
#define SPLIT_KEYS 64
#define SPLIT_THREADS 128
template <int HD, int G, int BS>
__device__ __forceinline__ void attention_split_body(
    const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ row_seq, const int* __restrict__ positions,
    const int* __restrict__ split_rows, const int* __restrict__ split_from, const int* __restrict__ split_part0,
    float* __restrict__ part_ml, float* __restrict__ part_o, int n_kv_heads, int max_blocks, int chunk, int n_parts) {
    constexpr int T = SPLIT_KEYS;
    constexpr int KS = HD + 8;               // K row stride in halves: 16-byte reads of 8 rows hit 32 banks
    constexpr int PAIRS = G * HD / 2;        // output columns (query head, dimension pair)
    constexpr int PER = (PAIRS + SPLIT_THREADS - 1) / SPLIT_THREADS;
    constexpr int WARPS = SPLIT_THREADS / QMTOT_WARP;
    static_assert(T == 2 * QMTOT_WARP, "the softmax phase takes two positions per lane");
    __shared__ __align__(16) __half sm_k[T][KS];
    __shared__ __align__(16) __half sm_v[T][HD];
    __shared__ __align__(16) float sm_q[G][HD];
    __shared__ float sm_p[G][T];
    __shared__ float sm_m[G], sm_l[G], sm_corr[G];
    const int tid = threadIdx.x, lane = tid % QMTOT_WARP, warp = tid / QMTOT_WARP;
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

    // Issues the copies of the tile at t0 into sm_k / sm_v (the previous tile is consumed).
    auto issue_tile = [&](int t0) {
        const int n = min(T, end - t0);
        for (int e = tid; e < T * (HD / 8); e += SPLIT_THREADS) {
            const int j = e / (HD / 8), c8 = e % (HD / 8);
            const bool valid = j < n;
            const size_t at = valid ? (slot_of<BS>(table, t0 + j) * n_kv_heads + kvh) * HD + c8 * 8 : 0;
            cp_async16_or_zero(&sm_k[j][c8 * 8], k_cache + at, valid);
            cp_async16_or_zero(&sm_v[j][c8 * 8], v_cache + at, valid);
        }
        cp_async_commit();
    };
    issue_tile(start);  // the first tile's round trip overlaps the query staging
    for (int e = tid; e < G * HD; e += SPLIT_THREADS)
        sm_q[e / HD][e % HD] = __half2float(qkv[(size_t)row * width + kvh * G * HD + e]) * scale;
    if (tid < G) {
        sm_m[tid] = QMTOT_NEG_INF;
        sm_l[tid] = 0.f;
    }
    float2 o[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) o[k] = make_float2(0.f, 0.f);

    for (int t0 = start; t0 < end; t0 += T) {
        const int n = min(T, end - t0);
        if (t0 != start) {
            __syncthreads();  // the previous tile is consumed
            issue_tile(t0);
        }
        cp_async_wait<0>();
        __syncthreads();  // every thread's copies have landed (and q, m, l are staged)
        // 1. Scores (a warp's threads share g: its q words are broadcasts).
        for (int e = tid; e < G * T; e += SPLIT_THREADS) {
            const int g = e / T, j = e % T;
            float s = 0.f;
#pragma unroll
            for (int c8 = 0; c8 < HD / 8; ++c8) {
                const uint4 kq = *reinterpret_cast<const uint4*>(&sm_k[j][c8 * 8]);
                const __half2* kh = reinterpret_cast<const __half2*>(&kq);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const float2 kf = __half22float2(kh[u]);
                    s = fmaf(sm_q[g][c8 * 8 + 2 * u], kf.x, fmaf(sm_q[g][c8 * 8 + 2 * u + 1], kf.y, s));
                }
            }
            sm_p[g][j] = j < n ? s : QMTOT_NEG_INF;
        }
        __syncthreads();
        // 2. Online softmax per query head (position j of the tile: lanes j and j − 32).
        for (int g = warp; g < G; g += WARPS) {
            const float a = sm_p[g][lane], b = sm_p[g][lane + QMTOT_WARP];
            const float m_old = sm_m[g];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(a, b)));  // finite: position t0 is valid
            const float pa = expf(a - m_new), pb = expf(b - m_new);
            const float sum = warp_sum(pa + pb);
            sm_p[g][lane] = pa;
            sm_p[g][lane + QMTOT_WARP] = pb;
            if (lane == 0) {
                const float corr = expf(m_old - m_new);  // 0 on the first tile (m_old = −∞)
                sm_corr[g] = corr;
                sm_l[g] = sm_l[g] * corr + sum;
                sm_m[g] = m_new;
            }
        }
        __syncthreads();
        // 3. Output columns (zero-filled positions add 0 · 0).
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int col = tid + k * SPLIT_THREADS;
            if (col >= PAIRS) break;
            const int g = col / (HD / 2), d2 = col % (HD / 2);
            const float corr = sm_corr[g];
            float2 acc = make_float2(o[k].x * corr, o[k].y * corr);
#pragma unroll 8
            for (int j = 0; j < T; ++j) {
                const float pj = sm_p[g][j];
                const float2 vf = __half22float2(reinterpret_cast<const __half2*>(sm_v[j])[d2]);
                acc.x = fmaf(pj, vf.x, acc.x);
                acc.y = fmaf(pj, vf.y, acc.y);
            }
            o[k] = acc;
        }
    }
    // The last tile's phase 2 is behind a barrier: sm_m and sm_l are final.
    const int part = split_part0[i] + c;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int col = tid + k * SPLIT_THREADS;
        if (col >= PAIRS) break;
        const int g = col / (HD / 2), d2 = col % (HD / 2);
        const size_t at = ((size_t)row * n_heads + kvh * G + g) * n_parts + part;
        reinterpret_cast<float2*>(part_o + at * HD)[d2] = o[k];
        if (d2 == 0) {
            part_ml[at * 2] = sm_m[g];
            part_ml[at * 2 + 1] = sm_l[g];
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
// position, first part). Grid: (n_split, n_kv_heads, max chunks), block (SPLIT_THREADS = 128).
#define ATTENTION_SPLIT_ENTRY(HD, G)                                                                            \
    extern "C" __global__ void __launch_bounds__(SPLIT_THREADS) attention_split_hd##HD##_g##G##_f16(                     \
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
