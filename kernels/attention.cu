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
// The fields of task blockIdx.x for KV head blockIdx.y, as locals of an attention_tile kernel
// (both forms): its rows, keys and part, the query count, the sequence's block table, the
// qkv row width and the score scale.
#define TILE_TASK_FIELDS(HD, G)                                                                                  \
    const int* task = tasks + blockIdx.x * 6;                                                                    \
    const int rows_offset = task[0], n_rows = task[1], key_start = task[3], key_end = task[4], part = task[5];  \
    const int kvh = blockIdx.y;                                                                                  \
    const int n_heads = n_kv_heads * G;                                                                          \
    const int width = (n_heads + 2 * n_kv_heads) * HD;                                                           \
    const int nq = n_rows * G;                                                                                   \
    const int* table = block_tables + (size_t)task[2] * max_blocks;                                              \
    const float scale = rsqrtf((float)HD)

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
    TILE_TASK_FIELDS(HD, G);

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

// ---- attention_tile_mma ------------------------------------------------------------------
//
// attention_tile on tensor cores (mma.sync m16n8k16: f16 inputs, f32 accumulation), chosen by
// the launcher instead of it when asked (QMTOT_ATTENTION_TILE=mma): the same tasks, masking and
// partials, 4 warps instead of 8. Warp w owns queries 16w .. 16w+15 (query i·G + g as above);
// its Q rows stay in registers as A fragments for the whole task. Keys pass through shared
// memory MMA_TILE_KEYS at a time (cp.async, zero-filled past the range; the next tile's K loads
// during this tile's softmax and P·V, its V during the next scores). Per tile a warp
//   1. scores its 16 queries against the 64 keys: S = Q·Kᵀ, K rows as B fragments;
//   2. updates each query's online softmax: a query row lives in the 4 lanes of a quad (t), so
//      its max takes two shuffles; the weights P = e^{S·scale − m} are rounded to f16;
//   3. adds P·V: S's accumulator layout is the A layout of the next product (two 8-key n-tiles
//      make one 16-key k-step), and V comes in as B fragments through ldmatrix.trans.
// Each row's l sums the f16-rounded weights P·V used, so o / l is an exact weighted mean of V.
// Fragment layouts (g = lane / 4, t = lane % 4): A[16 × 16] a0 (g, 2t..2t+1), a1 (g+8, 2t..),
// a2 (g, 2t+8..), a3 (g+8, 2t+8..); B[16 × 8] b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g);
// C[16 × 8] c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1).
#define MMA_TILE_KEYS 64
#define MMA_TILE_THREADS 128

// Four 8 × 8 f16 matrices from shared memory, transposed: lanes 8i .. 8i+7 give the addresses
// of matrix i's 8 rows (16 bytes each, 16-byte aligned); lane (g, t) receives in b[i] matrix i's
// elements (row 2t, col g) and (row 2t + 1, col g), the first low: for a row-major [k][n] tile,
// the B fragment half of an mma (sm_80 and later).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned b[4], const __half* row) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(s));
}
template <int HD, int G, int BS>
__device__ __forceinline__ void attention_tile_mma_body(
    const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ positions, const int* __restrict__ tasks,
    const int* __restrict__ task_rows, float* __restrict__ part_ml, float* __restrict__ part_o, int n_kv_heads,
    int max_blocks, int n_parts) {
    constexpr int KT = MMA_TILE_KEYS;
    constexpr int KS = HD + 8;     // row stride of sm_k / sm_v in halves: 8 rows' 16-byte pieces in 32 banks
    constexpr int KSTEPS = HD / 16;  // k-steps of Q·Kᵀ
    constexpr int NS = KT / 8;       // 8-key n-tiles of S
    constexpr int NO = HD / 8;       // 8-dimension n-tiles of the output
    static_assert(MMA_TILE_THREADS / QMTOT_WARP * 16 == ATT_QUERIES, "a task's queries, 16 per warp");
    __shared__ __align__(16) __half sm_k[KT][KS];
    __shared__ __align__(16) __half sm_v[KT][KS];
    const int tid = threadIdx.x, lane = tid % QMTOT_WARP, warp = tid / QMTOT_WARP;
    const int g = lane / 4, t = lane % 4;
    TILE_TASK_FIELDS(HD, G);

    // Issues the copies of keys k0 .. k0 + KT of `cache` into `tile` (whose previous keys are
    // consumed) as one commit group — an empty one when k0 is past the range, so every thread
    // commits the same groups.
    auto issue = [&](__half(*tile)[KS], const __half* __restrict__ cache, int k0) {
        if (k0 < key_end)
            for (int e = tid; e < KT * (HD / 8); e += MMA_TILE_THREADS) {
                const int j = e / (HD / 8), c8 = e % (HD / 8);
                const bool valid = k0 + j < key_end;
                const size_t at = valid ? (slot_of<BS>(table, k0 + j) * n_kv_heads + kvh) * HD + c8 * 8 : 0;
                cp_async16_or_zero(&tile[j][c8 * 8], cache + at, valid);
            }
        cp_async_commit();
    };
    // K and V of the first tile, two groups; their round trip overlaps the Q loads. In the loop
    // the next tile's K is issued once the scores have read sm_k and its V once P·V has read
    // sm_v, so each load overlaps the other half of the tile's work (two groups in flight).
    issue(sm_k, k_cache, key_start);
    issue(sm_v, v_cache, key_start);

    // This lane's query rows h = 0, 1: query q0 + g + 8h (none past nq: zero Q, every key
    // masked, nothing written).
    const int q0 = warp * 16;
    const __half* qrow[2];
    int qpos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int qi = q0 + g + 8 * h;
        const bool real = qi < nq;
        const int row = real ? task_rows[rows_offset + qi / G] : 0;
        qrow[h] = real ? qkv + (size_t)row * width + (kvh * G + qi % G) * HD : nullptr;
        qpos[h] = real ? positions[row] : -1;
    }
    unsigned qa[KSTEPS][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            // a0 / a1: rows g / g + 8, dimensions 16kk + 2t, +1; a2 / a3: the same + 8.
            qa[kk][h] = qrow[h] ? *reinterpret_cast<const unsigned*>(qrow[h] + 16 * kk + 2 * t) : 0u;
            qa[kk][h + 2] = qrow[h] ? *reinterpret_cast<const unsigned*>(qrow[h] + 16 * kk + 2 * t + 8) : 0u;
        }

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    float m[2] = {QMTOT_NEG_INF, QMTOT_NEG_INF}, l[2] = {0.f, 0.f};  // l: this lane's share

    const bool active = q0 < nq;  // warp-uniform; an idle warp still takes part in the barriers
    for (int k0 = key_start; k0 < key_end; k0 += KT) {
        cp_async_wait<1>();  // this tile's K (its V, the newer group, may be in flight)
        __syncthreads();     // ... for every thread
        float s[NS][4];
        if (active) {
            // 1. S = Q·Kᵀ for keys k0 + 8j + 2t (+1), rows g, g + 8.
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
                for (int j = 0; j < NS; ++j) {
                    const unsigned b[2] = {*reinterpret_cast<const unsigned*>(&sm_k[8 * j + g][16 * kk + 2 * t]),
                                           *reinterpret_cast<const unsigned*>(&sm_k[8 * j + g][16 * kk + 2 * t + 8])};
                    mma_16816(s[j], qa[kk], b);
                }
        }
        __syncthreads();  // every warp is done with sm_k
        issue(sm_k, k_cache, k0 + KT);
        unsigned pa[NS][2];  // f16 weights: [j][h] = (row g + 8h, keys 8j + 2t, +1)
        if (active) {
            // 2. Online softmax per row h (elements e with e / 2 == h).
            float mx[2] = {QMTOT_NEG_INF, QMTOT_NEG_INF};
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + 8 * j + 2 * t + e % 2;
                    const bool visible = key < key_end && key <= qpos[e / 2];
                    s[j][e] = visible ? s[j][e] * scale : QMTOT_NEG_INF;
                    mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
                }
            float corr[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m_new = fmaxf(m[h], mx[h]);
                // All keys so far masked for this row: nothing to add (and no −∞ − −∞).
                corr[h] = m_new == QMTOT_NEG_INF ? 1.f : expf(m[h] - m_new);
                m[h] = m_new;
                l[h] *= corr[h];
            }
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float s0 = s[j][2 * h], s1 = s[j][2 * h + 1];
                    const __half2 p = __floats2half2_rn(s0 == QMTOT_NEG_INF ? 0.f : expf(s0 - m[h]),
                                                        s1 == QMTOT_NEG_INF ? 0.f : expf(s1 - m[h]));
                    const float2 pf = __half22float2(p);
                    l[h] += pf.x + pf.y;
                    pa[j][h] = *reinterpret_cast<const unsigned*>(&p);
                }
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }
        }
        cp_async_wait<1>();  // this tile's V (the next K, the newer group, may be in flight)
        __syncthreads();     // ... for every thread
        if (active) {
            // 3. O += P·V, 16 keys per k-step; ldmatrix.x4.trans brings two 8-dimension n-tiles:
            // lane L addresses row (key) 16kk + L % 8 + 8·((L / 8) % 2), dimensions 16n + 8·(L / 16).
#pragma unroll
            for (int kk = 0; kk < KT / 16; ++kk) {
                const unsigned a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
                const int vrow = 16 * kk + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
                for (int n = 0; n < NO / 2; ++n) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, &sm_v[vrow][16 * n + 8 * (lane / 16)]);
                    const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                    mma_16816(o[2 * n], a, b0);
                    mma_16816(o[2 * n + 1], a, b1);
                }
            }
        }
        __syncthreads();  // every warp is done with sm_v
        issue(sm_v, v_cache, k0 + KT);
    }
    cp_async_wait<0>();  // no copy outlives the block

    // Write each real row's partial: o columns 8n + 2t, +1; m and the quad's l from lane t = 0.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float lt = l[h] + __shfl_xor_sync(0xffffffffu, l[h], 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const int qi = q0 + g + 8 * h;
        if (qi >= nq) continue;
        const int row = task_rows[rows_offset + qi / G];
        const size_t at = ((size_t)row * n_heads + kvh * G + qi % G) * n_parts + part;
#pragma unroll
        for (int n = 0; n < NO; ++n)
            *reinterpret_cast<float2*>(&part_o[at * HD + 8 * n + 2 * t]) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
        if (t == 0) {
            part_ml[at * 2] = m[h];
            part_ml[at * 2 + 1] = lt;
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
// attention_tile_mma: the same arguments as attention_tile. Grid: (n_tasks, n_kv_heads), block
// (MMA_TILE_THREADS = 128). Two blocks per multiprocessor in the register budget: with one,
// ptxas (13.0, sm_80) capped the head_dim 64 instances at 128 registers and spilled.
#define ATTENTION_TILE_MMA_ENTRY(HD, G)                                                                         \
    extern "C" __global__ void __launch_bounds__(MMA_TILE_THREADS, 2) attention_tile_mma_hd##HD##_g##G##_f16(     \
        const __half* __restrict__ qkv, const __half* __restrict__ k_cache, const __half* __restrict__ v_cache, \
        const int* __restrict__ block_tables, const int* __restrict__ positions, const int* __restrict__ tasks, \
        const int* __restrict__ task_rows, float* __restrict__ part_ml, float* __restrict__ part_o,            \
        int n_kv_heads, int max_blocks, int n_parts) {                                                          \
        attention_tile_mma_body<HD, G, 16>(qkv, k_cache, v_cache, block_tables, positions, tasks, task_rows,    \
                                           part_ml, part_o, n_kv_heads, max_blocks, n_parts);                   \
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
ATTENTION_TILE_MMA_ENTRY(64, 1)
ATTENTION_TILE_MMA_ENTRY(64, 3)
ATTENTION_TILE_MMA_ENTRY(128, 1)
ATTENTION_TILE_MMA_ENTRY(128, 4)
ATTENTION_TILE_MMA_ENTRY(128, 8)
ATTENTION_MERGE_ENTRY(64)
ATTENTION_MERGE_ENTRY(128)
