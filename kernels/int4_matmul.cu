// INT4 × f16 (and f16 × f16) matmul on tensor cores: out[M, N] = x[M, K] · W[N, K]ᵀ for any M
// (decode, sibling batches, prefill), f16 inputs, f32 accumulation, deterministic split-K.
// One partitioning and pipeline, two weight formats (`Int4Fragments`, `F16Fragments`).
//
// Orientation. `mma.sync.m16n8k16` computes D[16, 8] += A[16, 16] · B[16, 8]. The weights are A
// (16 output rows × 16 inputs) and the activations B (16 inputs × 8 batch rows), so a batch of
// up to 8 rows wastes nothing of the weight stream, and NT tiles of 8 cover up to 8·NT rows.
//
// Weight layout (repacked at upload, src/backend/cuda/fragments.rs; rows padded to a multiple
// of 16 and inputs to a multiple of 64, with zeros). The weights are cut into 16 × 16 tiles;
// lane l = 4·g + t (g = l / 4, t = l % 4) of a warp holds the A fragment of a tile, the eight
// elements (row, input)
//     (g, 2t) (g, 2t+1) | (g+8, 2t) (g+8, 2t+1) | (g, 2t+8) (g, 2t+9) | (g+8, 2t+8) (g+8, 2t+9)
// i.e. element e = (row-half h, input-half c, pair p) at index h + 2c + 4p ... in the order
// the fragment's four registers want them.
//   INT4: a tile is one u32 per lane, element (h, c, p) in nibble h + 2c + 4p (so
//         `(word >> 4i) & 0x000f000f` holds register i's two elements); four k-tiles (64
//         inputs) make one uint4 per lane, and a warp reads 512 contiguous bytes:
//         qweight    [N/16, K/64, 32 lanes] uint4
//         scale_min  [N/16, K/group, 8 (g)] float4 = (s[g], s[g+8], m[g], m[g+8]): the
//                    scales and mins of rows g and g + 8 of a row block, w = s·q + m, the
//                    four numbers one lane needs at a group's end in one 16-byte load
//   F16:  a tile is one uint4 per lane (8 halves, element (h, c, p) at half 2(h + 2c) + p):
//         w          [N/16, K/16, 32 lanes] uint4
//
// INT4 arithmetic. A nibble becomes the f16 integer q exactly (the exponent trick: the bits of
// 1024 + q, minus 1024), the tensor cores sum q·x over one group in f32 (exact products), and
// the group is then scaled in f32: Σ w·x = s·Σ q·x + m·Σ x, with Σ x per (batch row, group)
// computed from the staged activations. So the weights are exactly the canonical w = s·q + m
// (f16 scales held in f32); nothing is rounded to f16 but the output.
//
// Partitioning. Grid (ceil(N / 64), S, ceil(M / (8·NT))): block (b, s, z) has 4 warps, warp w
// the row block 4b + w, over the K-slice s of `slice` inputs (a multiple of 256), for batch
// rows 8·NT·z .. 8·NT·(z+1). With S = 1 a block writes its sums to out directly. Otherwise
// partial sums go to partial[s, m, n], and the last block of each output tile (b, z) to finish
// — a per-tile arrival counter, atomically incremented after the block's partials are fenced —
// adds the tile's S partials in slice order and writes out (deterministic: the order never
// depends on which block came last), then sets its counter back to 0 for the next launch.
//
// Pipeline. A warp walks its slice in stages (256 inputs for INT4, 64 for f16: 4 uint4 of
// weights per lane either way, plus the stage's scale_min quads for INT4). Each warp streams
// its own weights through a ring of RING stage slots in shared memory with cp.async: stages
// s + 1 .. s + RING − 1 are in flight while stage s is computed, and a warp never waits for
// another warp's weights. The activations are staged per block in chunks of XC inputs (x and
// Σ x per group, one pair of barriers per chunk, not per stage). Dynamic shared memory, per
// block (`mma_smem_bytes`; the launcher allocates the same and the kernel traps if it did not):
//     ring   [4 warps][RING][LOADS + AUX][32 lanes] uint4
//     xs     [8·NT][XC + 8] f16       x[m0 + m, c0 + kk] at xs[m][kk]
//     sum_x  [8·NT][XC / 32] f32      Σ x over each group of the chunk (INT4 only)
#include "common.cuh"

#define MMA_WARPS 4
// Stage slots per warp: RING − 1 stages in flight behind the one being computed. Three keep
// 4 KB of weights in flight per warp, and leave shared memory for 4 blocks (16 warps) per SM.
// (The pipeline variants at the end of the file try other depths.)
constexpr int DEFAULT_RING = 3;
// Inputs per K-slice granule: slices are multiples of this (and so of every stage and group).
#define SLICE_K 256

// (v & mask) | magic in one instruction (LOP3 with truth table 0xea = (a & b) | c).
__device__ __forceinline__ unsigned and_or(unsigned v, unsigned mask, unsigned magic) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(v), "r"(mask), "r"(magic));
    return r;
}

__device__ __forceinline__ unsigned h2_bits(__half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ __half2 bits_h2(unsigned u) { return *reinterpret_cast<__half2*>(&u); }

// The A fragment of one INT4 tile: register i = half2(nibble i, nibble i + 4) as exact f16
// integers 0..15. Nibbles at bits 0 and 16 become the f16 1024 + q (mantissa bits; the
// exponent trick), minus 1024; nibbles at bits 4 and 20 become 1024 + 16q, times 1/16 minus 64
// (one fused multiply-add, exact: every value involved is an f16 integer or a power of two).
// Registers 2 and 3 take the same from the word shifted by 8: 9 instructions per tile.
__device__ __forceinline__ void int4_fragment(unsigned word, unsigned a[4]) {
    const unsigned magic = 0x64006400u;                          // 1024 in both halves
    const __half2 k1024 = bits_h2(0x64006400u);                  // 1024
    const __half2 k1_16 = bits_h2(0x2c002c00u);                  // 1/16
    const __half2 k64 = bits_h2(0xd400d400u);                    // −64
    const unsigned hi = word >> 8;
    a[0] = h2_bits(__hsub2(bits_h2(and_or(word, 0x000f000fu, magic)), k1024));
    a[1] = h2_bits(__hfma2(bits_h2(and_or(word, 0x00f000f0u, magic)), k1_16, k64));
    a[2] = h2_bits(__hsub2(bits_h2(and_or(hi, 0x000f000fu, magic)), k1024));
    a[3] = h2_bits(__hfma2(bits_h2(and_or(hi, 0x00f000f0u, magic)), k1_16, k64));
}

// INT4 weights in the fragment layout above. A stage is 256 inputs: LOADS = 4 uint4 per lane
// (each 4 k-tiles), then AUX uint4 per lane for the stage's 8·256/G scale_min quads (64 at
// G = 32: two per lane; 32 or 16 at G = 64, 128: one per lane at most).
// The group size is a template parameter (one entry point per group size), so a stage's
// group ends are known at compile time and a full stage is straight-line code.
template <int G>
struct Int4Fragments {
    const uint4* __restrict__ qweight;     // [N/16, Kp/G, 32]
    const float4* __restrict__ scale_min;  // [N/16, Kp/G, 8]
    int kp;
    static constexpr int GROUP = G;
    static_assert(G == 32 || G == 64 || G == 128, "group sizes 32, 64, 128");
    static constexpr int STAGE_K = 256;
    static constexpr int LOADS = STAGE_K / 64;
    static constexpr int AUX = (8 * (STAGE_K / G) + 31) / 32;
    static constexpr bool GROUPED = true;
    // Starts the copies of stage inputs k0 .. k0 + STAGE_K (those below kp) of row block rb into
    // `slot` ([LOADS + AUX][32] uint4).
    __device__ __forceinline__ void issue(int rb, int k0, int lane, uint4* slot) const {
#pragma unroll
        for (int c = 0; c < LOADS; ++c) {
            const int kc = k0 / 64 + c;
            if (kc * 64 < kp) cp_async16(&slot[c * 32 + lane], &qweight[((size_t)rb * (kp / 64) + kc) * 32 + lane]);
        }
        // Quads of groups k0/group .. : index (group in stage)·8 + g, contiguous in scale_min.
        const int quads = 8 * (min(STAGE_K, kp - k0) / G);
        const size_t first = ((size_t)rb * (kp / G) + k0 / G) * 8;
#pragma unroll
        for (int a = 0; a < AUX; ++a) {
            const int qi = a * 32 + lane;
            if (qi < quads) cp_async16(&slot[(LOADS + a) * 32 + lane], &scale_min[first + qi]);
        }
    }
    // The A fragment of k-tile j of the stage (q: this lane's LOADS uint4 of the stage).
    __device__ __forceinline__ void fragment(const uint4 q[LOADS], int j, unsigned a[4]) const {
        const uint4 v = q[j / 4];
        const unsigned word = (j % 4 == 0) ? v.x : (j % 4 == 1) ? v.y : (j % 4 == 2) ? v.z : v.w;
        int4_fragment(word, a);
    }
};

// f16 weights in the fragment layout above. A stage is 64 inputs: 4 uint4 per lane, one per
// k-tile (the same bytes in flight per warp as an INT4 stage).
struct F16Fragments {
    const uint4* __restrict__ w;  // [N/16, Kp/16, 32]
    int kp;
    static constexpr int STAGE_K = 64;
    static constexpr int LOADS = STAGE_K / 16;
    static constexpr int AUX = 0;
    static constexpr bool GROUPED = false;
    static constexpr int GROUP = 0;
    __device__ __forceinline__ void issue(int rb, int k0, int lane, uint4* slot) const {
#pragma unroll
        for (int c = 0; c < LOADS; ++c) {
            const int kt = k0 / 16 + c;
            if (kt * 16 < kp) cp_async16(&slot[c * 32 + lane], &w[((size_t)rb * (kp / 16) + kt) * 32 + lane]);
        }
    }
    __device__ __forceinline__ void fragment(const uint4 q[LOADS], int j, unsigned a[4]) const {
        a[0] = q[j].x;
        a[1] = q[j].y;
        a[2] = q[j].z;
        a[3] = q[j].w;
    }
};

// Inputs per activation chunk: about 16 KB of x per block (8·NT rows), at least one INT4 stage.
template <int NT>
struct XChunk {
    static constexpr int XC = NT == 1 ? 1024 : NT == 2 ? 512 : 256;
};

// Dynamic shared memory of one block, in bytes (the layout at the top; mirrored by the
// launcher's `matmul_smem_bytes` in src/backend/cuda/mod.rs), for RING slots per warp and
// activation chunks of XC inputs.
template <int NT, class W, int RING, int XC>
__host__ __device__ constexpr int mma_smem_bytes() {
    return MMA_WARPS * RING * (W::LOADS + W::AUX) * 32 * 16 + 8 * NT * (XC + 8) * 2 +
           (W::GROUPED ? 8 * NT * (XC / 32) * 4 : 0);
}

// The k-tiles of one stage: acc += W[rows of this warp, stage] · x[batch tile, stage]ᵀ.
//   q      this lane's W::LOADS uint4 of the stage; slot: the stage's ring slot (scale quads)
//   xs     the activation chunk, the stage at column kx; sum_x: Σ x per group of the chunk
//   tiles  k-tiles to compute (all SK/16 when FULL)
// INT4 sums q·x per group in two alternating accumulator sets (even and odd k-tiles: two
// independent mma chains, NT ≤ 4), then scales the group into acc.
template <int NT, bool FULL, class W, int XS_STRIDE, int SUMS>
__device__ __forceinline__ void stage_tiles(const W& weights, const uint4 q[W::LOADS], const uint4* slot,
                                            const __half (*xs)[XS_STRIDE], const float (*sum_x)[SUMS], int kx,
                                            int tiles, int g, int t, float acc[NT][4]) {
    constexpr int SK = W::STAGE_K;
    constexpr int CHAINS = W::GROUPED && NT <= 4 ? 2 : 1;
    float part[CHAINS][NT][4];  // Σ q·x of the current group (INT4)
#pragma unroll
    for (int c = 0; c < CHAINS; ++c)
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[c][i][e] = 0.f;
#pragma unroll
    for (int j = 0; j < SK / 16; ++j) {
        if (!FULL && j >= tiles) break;
        unsigned a[4];
        weights.fragment(q, j, a);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            // B fragment: x[8i + g, 16j + 2t .. +1] and x[8i + g, 16j + 2t + 8 .. +9].
            const unsigned b[2] = {*reinterpret_cast<const unsigned*>(&xs[8 * i + g][kx + 16 * j + 2 * t]),
                                   *reinterpret_cast<const unsigned*>(&xs[8 * i + g][kx + 16 * j + 2 * t + 8])};
            if constexpr (W::GROUPED) mma_16816(part[j % CHAINS][i], a, b);
            else mma_16816(acc[i], a, b);
        }
        if constexpr (W::GROUPED) {
            constexpr int TILES_PER_GROUP = W::GROUP / 16;  // 2, 4 or 8
            if ((j + 1) % TILES_PER_GROUP == 0) {
                // Group end: acc += s·Σq·x + m·Σx, rows g and g + 8, batch columns 2t, 2t + 1.
                const int gs = j / TILES_PER_GROUP;  // the group within the stage
                const float4 sm = reinterpret_cast<const float4*>(slot + W::LOADS * 32)[gs * 8 + g];
                const int gc = kx / W::GROUP + gs;  // the group within the chunk
#pragma unroll
                for (int i = 0; i < NT; ++i) {
                    float p[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        p[e] = part[0][i][e];
                        if constexpr (CHAINS == 2) p[e] += part[CHAINS - 1][i][e];
                    }
                    const float x0 = sum_x[8 * i + 2 * t][gc], x1 = sum_x[8 * i + 2 * t + 1][gc];
                    acc[i][0] += fmaf(sm.x, p[0], sm.z * x0);
                    acc[i][1] += fmaf(sm.x, p[1], sm.z * x1);
                    acc[i][2] += fmaf(sm.y, p[2], sm.w * x0);
                    acc[i][3] += fmaf(sm.y, p[3], sm.w * x1);
#pragma unroll
                    for (int c = 0; c < CHAINS; ++c)
#pragma unroll
                        for (int e = 0; e < 4; ++e) part[c][i][e] = 0.f;
                }
            }
        }
    }
}

// The output of a matmul launch: one of out16 / out32 non-null, row stride ldo (a part of a
// stacked matrix writes its columns of a wider output in place).
struct MatmulOut {
    __half* out16;  // [m_rows, ldo] f16, or nullptr
    float* out32;   // [m_rows, ldo] f32, or nullptr
    int ldo;
    __device__ __forceinline__ void store(int m, int col, float v) const {
        if (out16 != nullptr) out16[(size_t)m * ldo + col] = __float2half(v);
        else out32[(size_t)m * ldo + col] = v;
    }
};

// The last block of output tile (blockIdx.x, blockIdx.z) adds its S = gridDim.y partials in
// slice order and stores the sums: columns row0 .. row0 + 64, batch rows m0 .. m0 + 8·NT.
// Each thread takes 4 adjacent columns (16-byte loads when n is a multiple of 4) and issues
// every slice's loads of them before adding, so the reads overlap rather than chain.
template <int NT>
__device__ __forceinline__ void splitk_fixup(const float* __restrict__ partial, const MatmulOut out, int m_rows,
                                             int n) {
    constexpr int COLS = MMA_WARPS * 16, MT = 8 * NT;
    const int row0 = blockIdx.x * COLS, m0 = blockIdx.z * MT, splits = gridDim.y;
    const int rows = min(COLS, n - row0), ms = min(MT, m_rows - m0);
    const bool vec = n % 4 == 0;  // then row0 + 4j is 16-byte aligned in every partial row
    const size_t plane = (size_t)m_rows * n;
    for (int e = threadIdx.x; e < ms * (COLS / 4); e += blockDim.x) {
        const int m = m0 + e / (COLS / 4), r = 4 * (e % (COLS / 4));
        if (r >= rows) continue;
        const float* p = partial + (size_t)m * n + row0 + r;
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        if (vec) {
#pragma unroll 4
            for (int sl = 0; sl < splits; ++sl) {
                const float4 a = __ldcg(reinterpret_cast<const float4*>(p + sl * plane));
                v[0] += a.x;
                v[1] += a.y;
                v[2] += a.z;
                v[3] += a.w;
            }
        } else {
            const int w = min(4, rows - r);
#pragma unroll 4
            for (int sl = 0; sl < splits; ++sl)
                for (int u = 0; u < w; ++u) v[u] += __ldcg(p + sl * plane + u);
        }
        for (int u = 0; u < min(4, rows - r); ++u) out.store(m, row0 + r + u, v[u]);
    }
}

// The partitioning and pipeline described at the top, for weight format W, NT batch tiles,
// RING weight slots per warp and activation chunks of XC inputs.
//   x         [m_rows, k] f16 (row stride k; k a multiple of 32)
//   partial   [S, m_rows, n] f32 (unused when S = 1)
//   counters  [gridDim.z, gridDim.x] u32, zero before the launch and after it
template <int NT, class W, int RING = DEFAULT_RING, int XC = XChunk<NT>::XC>
__device__ __forceinline__ void mma_matmul(const __half* __restrict__ x, const W& weights, float* __restrict__ partial,
                                           const MatmulOut out, unsigned* __restrict__ counters, int m_rows, int n,
                                           int k, int slice) {
    constexpr int MT = 8 * NT;              // batch rows of this block
    constexpr int SK = W::STAGE_K;          // inputs per stage
    constexpr int SLOT = (W::LOADS + W::AUX) * 32;  // uint4 per ring slot
    constexpr int XS_STRIDE = XC + 8;       // halves: 4 words past a multiple of 32 banks, so the
                                            // 32 lanes' B-fragment loads hit 32 banks
    static_assert(XC % SK == 0 && XC % SLICE_K == 0, "chunks hold whole stages and slice granules");
    static_assert(RING >= 2, "at least one stage in flight");
    extern __shared__ uint4 smem[];
    uint4* ring = smem;
    __half(*xs)[XS_STRIDE] = reinterpret_cast<__half(*)[XS_STRIDE]>(smem + MMA_WARPS * RING * SLOT);
    float(*sum_x)[XC / 32] = reinterpret_cast<float(*)[XC / 32]>(&xs[MT][0]);
    {
        unsigned have;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (have < (unsigned)mma_smem_bytes<NT, W, RING, XC>()) __trap();  // launched with too little
    }
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int g = lane / 4, t = lane % 4;
    const int rb = blockIdx.x * MMA_WARPS + warp;  // this warp's row block
    const bool active = rb * 16 < n;
    const int m0 = blockIdx.z * MT;
    const int ks = blockIdx.y * slice, ke = min(ks + slice, weights.kp);
    const int n_stages = (ke - ks + SK - 1) / SK;
    uint4* my_ring = ring + warp * RING * SLOT;

    // Prologue: stages 0 .. RING − 2 in flight (one commit group per stage, empty or not, so
    // the group count is the stage count).
#pragma unroll
    for (int s = 0; s < RING - 1; ++s) {
        if (active && s < n_stages) weights.issue(rb, ks + s * SK, lane, my_ring + s * SLOT);
        cp_async_commit();
    }

    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

    int s = 0;  // stage index within the slice
    for (int c0 = ks; c0 < ke; c0 += XC) {
        const int cend = min(c0 + XC, ke);
        __syncthreads();  // the previous chunk's readers of xs and sum_x are done
        {
            // Stage x[m0 .., c0 .. cend] (zeros past m_rows and k) and, for INT4, Σ x per group.
            // Thread i of each pass takes 8 inputs (one uint4) of one row; a warp's 32 lanes
            // hold 32 consecutive chunks of one row (XC / 8 ≥ 32), so a group's chunks sit in
            // group / 8 adjacent lanes and are summed by shuffles.
            constexpr int XCH = XC / 8;
            constexpr int PASSES = MT * XCH / (MMA_WARPS * QMTOT_WARP);
            static_assert(PASSES * MMA_WARPS * QMTOT_WARP == MT * XCH, "whole passes");
            uint4 v[PASSES];
#pragma unroll
            for (int u = 0; u < PASSES; ++u) {
                const int i = u * MMA_WARPS * QMTOT_WARP + threadIdx.x;
                const int m = i / XCH, kk = c0 + 8 * (i % XCH);
                v[u] = make_uint4(0, 0, 0, 0);
                if (m0 + m < m_rows && kk < cend && kk < k)
                    v[u] = *reinterpret_cast<const uint4*>(x + (size_t)(m0 + m) * k + kk);
            }
#pragma unroll
            for (int u = 0; u < PASSES; ++u) {
                const int i = u * MMA_WARPS * QMTOT_WARP + threadIdx.x;
                const int m = i / XCH, c = i % XCH;
                *reinterpret_cast<uint4*>(&xs[m][8 * c]) = v[u];
                if constexpr (W::GROUPED) {
                    const __half2* h = reinterpret_cast<const __half2*>(&v[u]);
                    float sum = 0.f;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 f = __half22float2(h[e]);
                        sum += f.x + f.y;
                    }
                    constexpr int LANES = W::GROUP / 8;  // chunks per group: 4, 8 or 16
#pragma unroll
                    for (int o = 1; o < LANES; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                    if (c % LANES == 0) sum_x[m][c / LANES] = sum;
                }
            }
        }
        __syncthreads();

        for (int k0 = c0; k0 < cend; k0 += SK, ++s) {
            // Refill: stage s + RING − 1 goes into the slot stage s − 1 used, which every lane
            // has finished reading (the scale quads are read across lanes).
            __syncwarp();
            if (active && s + RING - 1 < n_stages)
                weights.issue(rb, ks + (s + RING - 1) * SK, lane, my_ring + ((s + RING - 1) % RING) * SLOT);
            cp_async_commit();
            cp_async_wait<RING - 1>();  // this lane's copies of stage s have landed
            __syncwarp();               // and every lane's
            if (!active) continue;
            const uint4* slot = my_ring + (s % RING) * SLOT;
            uint4 q[W::LOADS];
#pragma unroll
            for (int c = 0; c < W::LOADS; ++c) q[c] = slot[c * 32 + lane];

            // Stages are whole groups (256 is a multiple of every group size), so a stage that
            // ends early (the last one, at kp, a multiple of the group) still ends on a group
            // boundary. A full stage (every stage when kp is a multiple of 256) takes the
            // branch-free path, so the compiler can hoist its shared loads and interleave
            // independent work; only a short last stage checks each tile.
            const int tiles = min(SK, ke - k0) / 16;
            const int kx = k0 - c0;  // the stage's offset in the chunk
            if (tiles == SK / 16) stage_tiles<NT, true>(weights, q, slot, xs, sum_x, kx, tiles, g, t, acc);
            else stage_tiles<NT, false>(weights, q, slot, xs, sum_x, kx, tiles, g, t, acc);
        }
    }
    cp_async_wait<0>();  // no copy outlives the block
    // D layout: acc[i][0..1] = rows g, columns 8i + 2t, +1; acc[i][2..3] = row g + 8.
    const bool one_slice = gridDim.y == 1;
    if (active) {
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = rb * 16 + g + 8 * (e / 2), m = m0 + 8 * i + 2 * t + e % 2;
                if (row >= n || m >= m_rows) continue;
                if (one_slice) out.store(m, row, acc[i][e]);
                else partial[((size_t)blockIdx.y * m_rows + m) * n + row] = acc[i][e];
            }
    }
    if (one_slice) return;

    // Split-K fix-up: the tile's last block sums the S partials (see the top).
    __shared__ unsigned is_last;
    if constexpr (NT == 1) {
        // Every thread fences its own partials. (With the one-fence form below, ptxas (13.0,
        // sm_90a) allocates the NT = 1 kernels differently and their main loop ran 5-10% slower
        // on an H200, runs 8b/8c of bench/results/2026-11-26-h200; the two forms were compared
        // SASS-for-SASS against the measured builds.)
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned* counter = counters + (size_t)blockIdx.z * gridDim.x + blockIdx.x;
            is_last = atomicAdd(counter, 1u) == gridDim.y - 1;
            if (is_last) *counter = 0;  // every block of the tile has arrived: reset for the next launch
        }
        __syncthreads();
        if (!is_last) return;
        __threadfence();  // order the partial reads after the arrivals seen
        const int row0 = blockIdx.x * MMA_WARPS * 16;
        const int rows = min(MMA_WARPS * 16, n - row0), ms = min(MT, m_rows - m0);
        for (int e = threadIdx.x; e < ms * MMA_WARPS * 16; e += blockDim.x) {
            const int m = m0 + e / (MMA_WARPS * 16), r = e % (MMA_WARPS * 16);
            if (r >= rows) continue;
            float v = 0.f;
            for (int sl = 0; sl < (int)gridDim.y; ++sl)
                v += __ldcg(&partial[((size_t)sl * m_rows + m) * n + row0 + r]);
            out.store(m, row0 + r, v);
        }
    } else {
        // The barrier makes the block's partial stores visible to thread 0, whose device-scope
        // fence (cumulative) orders them all before its arrival: one fence per block.
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned* counter = counters + (size_t)blockIdx.z * gridDim.x + blockIdx.x;
            __threadfence();
            is_last = atomicAdd(counter, 1u) == gridDim.y - 1;
            if (is_last) *counter = 0;  // every block of the tile has arrived: reset for the next launch
            __threadfence();            // the arrivals seen are ordered before the reads below
        }
        __syncthreads();
        if (!is_last) return;
        splitk_fixup<NT>(partial, out, m_rows, n);
    }
}

// One entry point per batch width NT (tiles of 8 rows: M ≤ 8, 16, 32, 64 per block; larger M
// takes more blocks along z, each reading the weights again through L2) and group size G.
//   x          [m_rows, k] f16
//   qweight    [N/16, kp/64, 32] uint4 (fragment layout above; kp = k rounded up to 64)
//   scale_min  [N/16, kp/G, 8] float4
//   partial    [S, m_rows, n] f32, S = ceil(kp / slice) (unused when S = 1)
//   out16      [m_rows, ldo] f16 or out32 [m_rows, ldo] f32: the one that is not null
//   counters   [ceil(m_rows / (8·NT)), ceil(n / 64)] u32, zero (and left zero)
// Grid: (ceil(n / 64), S, ceil(m_rows / (8·NT))), block (128), dynamic shared memory
// mma_smem_bytes<NT, Int4Fragments<G>, DEFAULT_RING, XChunk<NT>::XC>(). slice a multiple of SLICE_K (256).
#define INT4_MATMUL_ENTRY(NT, G)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 2) int4_matmul_n##NT##_g##G##_f16(                          \
        const __half* __restrict__ x, const uint4* __restrict__ qweight, const float4* __restrict__ scale_min,     \
        float* __restrict__ partial, __half* __restrict__ out16, float* __restrict__ out32, int ldo,              \
        unsigned* __restrict__ counters, int m_rows, int n, int k, int kp, int slice) {                           \
        mma_matmul<NT>(x, Int4Fragments<G>{qweight, scale_min, kp}, partial, MatmulOut{out16, out32, ldo},       \
                       counters, m_rows, n, k, slice);                                                            \
    }
INT4_MATMUL_ENTRY(1, 32)
INT4_MATMUL_ENTRY(2, 32)
INT4_MATMUL_ENTRY(4, 32)
INT4_MATMUL_ENTRY(8, 32)
INT4_MATMUL_ENTRY(1, 64)
INT4_MATMUL_ENTRY(2, 64)
INT4_MATMUL_ENTRY(4, 64)
INT4_MATMUL_ENTRY(8, 64)
INT4_MATMUL_ENTRY(1, 128)
INT4_MATMUL_ENTRY(2, 128)
INT4_MATMUL_ENTRY(4, 128)
INT4_MATMUL_ENTRY(8, 128)

// Pipeline variants of the INT4 g128 kernels, for measuring (`QMTOT_MATMUL_VARIANTS`, see
// src/backend/cuda/mod.rs): R weight slots per warp, activation chunks of XC inputs, and at
// least MINB blocks per multiprocessor in the register budget. Deeper rings keep more weights
// in flight per warp; smaller chunks leave shared memory (and with MINB, registers) for more
// warps per multiprocessor. Same arguments, grid and block as INT4_MATMUL_ENTRY; dynamic shared
// memory mma_smem_bytes<NT, Int4Fragments<128>, R, XC>().
#define INT4_MATMUL_VARIANT(NT, R, XC, MINB)                                                                       \
    extern "C" __global__ void __launch_bounds__(128, MINB) int4_matmul_n##NT##_g128_r##R##_x##XC##_f16(           \
        const __half* __restrict__ x, const uint4* __restrict__ qweight, const float4* __restrict__ scale_min,     \
        float* __restrict__ partial, __half* __restrict__ out16, float* __restrict__ out32, int ldo,              \
        unsigned* __restrict__ counters, int m_rows, int n, int k, int kp, int slice) {                           \
        mma_matmul<NT, Int4Fragments<128>, R, XC>(x, Int4Fragments<128>{qweight, scale_min, kp}, partial,          \
                                                   MatmulOut{out16, out32, ldo}, counters, m_rows, n, k, slice);   \
    }
INT4_MATMUL_VARIANT(1, 4, 1024, 3)
INT4_MATMUL_VARIANT(1, 3, 512, 5)
INT4_MATMUL_VARIANT(1, 4, 512, 4)
INT4_MATMUL_VARIANT(1, 6, 512, 3)
INT4_MATMUL_VARIANT(1, 3, 256, 6)
INT4_MATMUL_VARIANT(1, 5, 256, 4)
INT4_MATMUL_VARIANT(2, 3, 256, 4)
INT4_MATMUL_VARIANT(2, 4, 256, 4)
// The default NT = 2 pipeline under a 128-register cap (4 blocks per SM instead of 3): run 10
// saw 8B gate_up at M = 16 take 2.26 waves at 145 registers; this tells the cap from the chunk.
INT4_MATMUL_VARIANT(2, 3, 512, 4)

// The same for f16 weights (the lm_head, INT8 and dense parts uploaded as f16).
//   x        [m_rows, k] f16
//   w        [N/16, kp/16, 32] uint4 (fragment layout above)
//   partial, out16 / out32, counters: as above
// Grid: (ceil(n / 64), S, ceil(m_rows / (8·NT))), block (128), dynamic shared memory
// mma_smem_bytes<NT, F16Fragments, DEFAULT_RING, XChunk<NT>::XC>(). slice a multiple of SLICE_K (256).
#define DENSE_MATMUL_ENTRY(NT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128, 2) dense_matmul_n##NT##_f16(                                \
        const __half* __restrict__ x, const uint4* __restrict__ w, float* __restrict__ partial,                   \
        __half* __restrict__ out16, float* __restrict__ out32, int ldo, unsigned* __restrict__ counters,          \
        int m_rows, int n, int k, int kp, int slice) {                                                            \
        mma_matmul<NT>(x, F16Fragments{w, kp}, partial, MatmulOut{out16, out32, ldo}, counters, m_rows, n, k,     \
                       slice);                                                                                    \
    }
DENSE_MATMUL_ENTRY(1)
DENSE_MATMUL_ENTRY(2)
DENSE_MATMUL_ENTRY(4)
DENSE_MATMUL_ENTRY(8)

// Activations gathered into a layer's stored input order (GPTQ act-order):
//   out[r, j] = x[r, order[j]]     x, out [rows, k] f16; order [k] u32, a permutation of 0..k
// Grid (rows), block (256).
extern "C" __global__ void gather_cols_f16(const __half* __restrict__ x, const unsigned* __restrict__ order,
                                           __half* __restrict__ out, int k) {
    const size_t row = (size_t)blockIdx.x * k;
    for (int j = threadIdx.x; j < k; j += blockDim.x) out[row + j] = x[row + order[j]];
}
