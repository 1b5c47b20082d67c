// On-device sampling: one row of f32 logits in, one token id (and requested log-probabilities)
// out, so a decode step copies a few bytes per sequence back to the host instead of the logits.
// The semantics are those of `draw_with_uniform` / `kept_weights` in src/engine/sampler.rs, the
// host oracle the GPU tests (tests/cuda_sampling.rs) hold these kernels to:
//
//   greedy (temperature 0): argmax, ties to the lowest id (±0 compare equal), NaN never wins;
//   otherwise, over the non-NaN tokens, in the order (logit descending, id ascending) with the
//   logit order of `f32::total_cmp` (−0 below +0):
//     top-k  keep the first k (so exactly k, ties at the k-th value go to the lower ids);
//     weight w = exp((l − max) / T) (w = 1 where l == max, so ±inf maxima stay defined);
//     min-p  drop w < min_p;
//     top-p  keep the shortest first-in-order prefix whose mass reaches top_p × (mass left);
//   the draw: with the host's u ∈ [0, 1), the first kept token in ASCENDING ID order whose
//   cumulative weight exceeds u × (kept mass). The host `Sampler` walks in another order when
//   top-k (a selection) or top-p (a sort by probability) is on, so there the same u may give
//   another token, from the same distribution. Nothing random lives on the device.
//   log-probabilities are those of the raw logits (log-softmax at temperature 1), as the host
//   reports them: NaN anywhere in the row makes them NaN, as on the host.
//
// Partitioning: one CUDA block of 1024 threads per row, no sort of the vocabulary. The row
// (≤ 513 KB at a 128k vocabulary) is read many times and stays in L2:
//   1. argmax and max M (block max of a 64-bit rank: order key · 2³² + ~id);
//   2. log-sum-exp (f64 sum of f32 expf terms) for the drawn token's log-probability;
//   3. top-k: the k-th key τ by a binary search over the 32 bits of the order-preserving u32
//      key of the f32 logit (one block-wide count per bit), then the tie rule: the m-th token
//      with key τ in id order (per-warp ballot counts over contiguous segments);
//   4. top-p: the same search over block-wide masses (f64) of the tokens kept so far, then the
//      number of equal-weight ties at the last key that reach the target, and their ids;
//   5. the draw: each warp owns a contiguous id segment; per-warp kept masses, a sequential
//      prefix over the 32 warps picks the warp holding u × mass, which walks its segment with
//      warp scans in id order.
// Every reduction has a fixed order (shuffle trees, sequential prefixes), so a row and u give
// the same token on every run, and every block-wide value is bitwise the same in all threads
// (control flow stays uniform). A sampled row with top-k and top-p makes ~75 passes over its
// row: correct first; a radix-histogram search would cut that when decode latency needs it.
//
// Precision. Weights are f32: expf((l − M)·(1/T)) has a relative error ≤ ~(3|x|·2⁻²⁴ + 2⁻²²)
// at x = (l − M)/T (three roundings: 1/T, l − M, their product; expf's 2 ulp), i.e. ≤ 4e-6 for
// |x| ≤ 20; masses, prefix sums and the target u × mass are f64, so their own rounding (~1e-16
// relative) is negligible. The kept set and the drawn token therefore equal the oracle's (f64
// weights) except when u, a min-p threshold or a top-p target lies within ~1e-5 (relative) of a
// boundary. Weights below ~1.4e-45 underflow to 0 and are never drawn (the oracle's f64 weights
// go lower; such tokens carry < 1e-38 of the mass). The log-sum-exp adds f32 expf(l − M) terms
// in f64: its error is ≤ ~2.4e-7 + 6e-8 · (mass-weighted mean |l − M|), so log-probabilities
// match the host's f64 values to ~1e-6 plus the final f32 rounding.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / QMTOT_WARP)
static_assert(SAMPLE_WARPS == QMTOT_WARP, "block reductions read one warp value per lane");

#define ALL_LANES 0xffffffffu

// One row's sampling request; the host twin is `RowParams` in src/backend/cuda/sampling.rs.
struct RowParams {
    double uniform;     // u ∈ [0, 1) from the sequence's seeded host stream
    float temperature;  // 0 = greedy
    float top_p;        // (0, 1]; 1 = off
    float min_p;        // [0, 1]; 0 = off
    int top_k;          // 0 = off (and off when ≥ the row's non-NaN tokens)
    int top_n;          // top log-probabilities wanted (≤ 20), read by logprobs_f32
    int pad;
};
static_assert(sizeof(RowParams) == 32, "RowParams must match src/backend/cuda/sampling.rs");

// Order-preserving key of a non-NaN f32: a < b in `total_cmp` order ⇔ key(a) < key(b)
// (−inf → 0x007fffff, −0 → 0x7fffffff, +0 → 0x80000000, +inf → 0xff800000).
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The f32 whose key is `k` (inverse of order_key).
__device__ __forceinline__ float key_float(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Rank of token `id` for argmax and top-n: larger = earlier in (value descending, id
// ascending), with ±0 equal as the host's float comparisons have them. Every non-NaN token's
// rank is ≥ 0x007fffff·2³² > 0, so 0 means "none".
__device__ __forceinline__ unsigned long long rank_of(float x, int id) {
    return ((unsigned long long)order_key(x == 0.f ? 0.f : x) << 32) | (unsigned)~id;
}

__device__ __forceinline__ int rank_id(unsigned long long r) { return (int)~(unsigned)(r & 0xffffffffu); }

struct SumOp {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// `op` over the block's 1024 values, every thread gets the result. Butterfly shuffles in the
// warps, then the 32 warp values butterflied again: a fixed tree, and a + b == b + a, so all
// threads hold bitwise the same value. `scratch` holds 32 T of shared memory.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
#pragma unroll
    for (int o = QMTOT_WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(ALL_LANES, v, o));
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[lane];
#pragma unroll
    for (int o = QMTOT_WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(ALL_LANES, v, o));
    __syncthreads();  // scratch may be reused right after
    return v;
}

// Shared memory of one row's block.
struct Scratch {
    double f64[QMTOT_WARP];
    int i32[QMTOT_WARP];
    unsigned long long u64[QMTOT_WARP];
    int picked;
};

// Warp `w` owns ids [w·seg, min((w+1)·seg, vocab)), seg a multiple of 32 (coalesced tiles).
__device__ __forceinline__ int segment_len(int vocab) {
    return ((vocab + SAMPLE_WARPS - 1) / SAMPLE_WARPS + QMTOT_WARP - 1) / QMTOT_WARP * QMTOT_WARP;
}

// Argmax rank (see rank_of; 0 when every logit is NaN) and the number of non-NaN logits.
__device__ __forceinline__ void row_max(const float* __restrict__ x, int vocab, Scratch& s,
                                        unsigned long long& best, int& n_valid) {
    unsigned long long b = 0;
    int n = 0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        const float l = x[i];
        if (!isnan(l)) {
            const unsigned long long r = rank_of(l, i);
            if (r > b) b = r;
            ++n;
        }
    }
    best = block_reduce(b, MaxOp(), s.u64);
    n_valid = block_reduce(n, SumOp(), s.i32);
}

// log Σ exp(l − m) + m over the whole row, f32 terms added in f64. NaN logits (and an infinite
// or missing max) make it NaN, as the host's f64 log-sum-exp does.
__device__ __forceinline__ double row_log_sum_exp(const float* __restrict__ x, int vocab, float m, Scratch& s) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) sum += (double)expf(x[i] - m);
    return (double)m + log(block_reduce(sum, SumOp(), s.f64));
}

// The filters of one sampled row, decided step by step (see the file comment).
struct Filters {
    float m;      // max non-NaN logit
    float inv_t;  // 1 / temperature
    float min_p;
    bool k_on, p_on;
    unsigned k_key, p_key;  // keys of the k-th token and of the last top-p token
    int k_cut, p_cut;       // tokens with exactly that key are kept up to this id

    __device__ __forceinline__ float weight(float l) const { return l == m ? 1.f : expf((l - m) * inv_t); }
    // Kept by top-k and min-p (what top-p's mass is taken over).
    __device__ __forceinline__ bool kept_k_min(int i, float l) const {
        if (isnan(l)) return false;
        const unsigned key = order_key(l);
        if (k_on && (key < k_key || (key == k_key && i > k_cut))) return false;
        return weight(l) >= min_p;
    }
    __device__ __forceinline__ bool kept(int i, float l) const {
        if (!kept_k_min(i, l)) return false;
        const unsigned key = order_key(l);
        return !p_on || key > p_key || (key == p_key && i <= p_cut);
    }
};

// The id of the m-th token (1-based, ascending id) for which pred(i, x[i]) holds, 1 ≤ m ≤ their
// count. Exact integer counts: per-warp ballots over the warps' segments, then the warp that
// holds the m-th walks its segment again.
template <class Pred>
__device__ __forceinline__ int nth_id(const float* __restrict__ x, int vocab, Pred pred, int m, Scratch& s) {
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    const int seg = segment_len(vocab);
    const int lo = warp * seg, hi = min(vocab, lo + seg);
    int count = 0;
    for (int base = lo; base < hi; base += QMTOT_WARP) {
        const int i = base + lane;
        count += __popc(__ballot_sync(ALL_LANES, i < hi && pred(i, x[i])));
    }
    if (lane == 0) s.i32[warp] = count;
    if (threadIdx.x == 0) s.picked = vocab - 1;  // unreachable for a valid m
    __syncthreads();
    int before = 0;
    for (int w = 0; w < warp; ++w) before += s.i32[w];
    if (before < m && m <= before + count) {  // warp-uniform
        for (int base = lo; base < hi; base += QMTOT_WARP) {
            const int i = base + lane;
            const bool hit = i < hi && pred(i, x[i]);
            const unsigned ballot = __ballot_sync(ALL_LANES, hit);
            if (hit && before + __popc(ballot & ((1u << lane) - 1u)) + 1 == m) s.picked = i;
            before += __popc(ballot);
            if (before >= m) break;
        }
    }
    __syncthreads();
    const int id = s.picked;
    __syncthreads();
    return id;
}

// Kept mass of the warp's segment [lo, hi) in id order, by warp inclusive scans: token i covers
// [prev_i, cur_i) of the running mass, with prev_{i+1} == cur_i bitwise (the same additions),
// so the intervals tile [0, total) with no gap. When `target` ≥ 0, `*picked` becomes the first
// positive-weight token whose interval holds it (and the walk stops); `*last` is the segment's
// last positive-weight id (−1 if none). The same code computes the per-warp totals and walks,
// so the walk ends at exactly the total the warp was chosen by.
__device__ __forceinline__ double segment_walk(const float* __restrict__ x, const Filters& f, int lo, int hi,
                                               double target, int* picked, int* last) {
    const int lane = threadIdx.x % QMTOT_WARP;
    double running = 0.0;
    for (int base = lo; base < hi; base += QMTOT_WARP) {
        const int i = base + lane;
        float l = 0.f;
        bool k = false;
        if (i < hi) {
            l = x[i];
            k = f.kept(i, l);
        }
        const double w = k ? (double)f.weight(l) : 0.0;
        double incl = w;
#pragma unroll
        for (int o = 1; o < QMTOT_WARP; o <<= 1) {
            const double up = __shfl_up_sync(ALL_LANES, incl, o);
            if (lane >= o) incl += up;
        }
        double excl = __shfl_up_sync(ALL_LANES, incl, 1);
        if (lane == 0) excl = 0.0;
        const unsigned positive = __ballot_sync(ALL_LANES, w > 0.0);
        if (positive) *last = base + QMTOT_WARP - 1 - __clz(positive);
        const unsigned hit = __ballot_sync(ALL_LANES, w > 0.0 && running + excl <= target && target < running + incl);
        running += __shfl_sync(ALL_LANES, incl, QMTOT_WARP - 1);
        if (hit) {
            *picked = base + __ffs(hit) - 1;
            break;
        }
    }
    return running;
}

// The sampled token of one row (every thread returns it).
__device__ __forceinline__ int sample_row(const float* __restrict__ x, int vocab, const RowParams& p,
                                          unsigned long long best, int n_valid, Scratch& s) {
    const int lane = threadIdx.x % QMTOT_WARP, warp = threadIdx.x / QMTOT_WARP;
    if (n_valid == 0) return 0;
    if (p.temperature == 0.f) return rank_id(best);

    Filters f;
    f.m = key_float((unsigned)(best >> 32));
    f.inv_t = 1.f / p.temperature;
    f.min_p = p.min_p;
    f.k_on = p.top_k > 0 && p.top_k < n_valid;
    f.p_on = false;
    f.k_key = f.p_key = 0;
    f.k_cut = f.p_cut = vocab - 1;

    // Top-k: τ = the largest key with #{key ≥ τ} ≥ k (the k-th token's key), bit by bit.
    if (f.k_on) {
        auto count_ge = [&](unsigned t) {
            int c = 0;
            for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
                const float l = x[i];
                c += !isnan(l) && order_key(l) >= t;
            }
            return block_reduce(c, SumOp(), s.i32);
        };
        unsigned t = 0;
        for (int b = 31; b >= 0; --b) {
            const unsigned c = t | (1u << b);
            if (count_ge(c) >= p.top_k) t = c;
        }
        const int above = t == 0xffffffffu ? 0 : count_ge(t + 1);
        // The tie rule: of the tokens with key τ, the (k − above) lowest ids are kept.
        f.k_cut = nth_id(x, vocab, [&](int, float l) { return !isnan(l) && order_key(l) == t; }, p.top_k - above,
                         s);
        f.k_key = t;
    }

    // Top-p over what top-k and min-p kept: τ = the largest key whose mass of keys ≥ τ reaches
    // top_p × total (masses are monotone in τ: the same fixed-order sums of non-negative terms).
    if (p.top_p < 1.f) {
        auto mass_ge = [&](unsigned t) {
            double sum = 0.0;
            for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
                const float l = x[i];
                if (f.kept_k_min(i, l) && order_key(l) >= t) sum += (double)f.weight(l);
            }
            return block_reduce(sum, SumOp(), s.f64);
        };
        const double target = (double)p.top_p * mass_ge(0);
        unsigned t = 0;
        for (int b = 31; b >= 0; --b) {
            const unsigned c = t | (1u << b);
            if (mass_ge(c) >= target) t = c;
        }
        // Tokens with key τ have one logit, so one weight w: the first m of them in id order,
        // m = ⌈(target − mass above τ) / w⌉, complete the prefix.
        const double above = t == 0xffffffffu ? 0.0 : mass_ge(t + 1);
        const double w = (double)f.weight(key_float(t));
        int ties = 0;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float l = x[i];
            ties += f.kept_k_min(i, l) && order_key(l) == t;
        }
        ties = block_reduce(ties, SumOp(), s.i32);
        const double need = ceil((target - above) / w);
        const int m = need < 1.0 ? 1 : (need > (double)ties ? ties : (int)need);
        f.p_cut = nth_id(x, vocab, [&](int i, float l) { return f.kept_k_min(i, l) && order_key(l) == t; }, m, s);
        f.p_key = t;
        f.p_on = true;
    }

    // The draw: per-warp kept masses of the warps' id segments, a sequential prefix over the
    // warps (the same in every thread), then the warp whose interval holds u × mass walks.
    const int seg = segment_len(vocab);
    const int lo = warp * seg, hi = min(vocab, lo + seg);
    int unused = -1, last = -1;
    const double total = segment_walk(x, f, lo, hi, -1.0, &unused, &last);
    if (lane == 0) {
        s.f64[warp] = total;
        s.i32[warp] = last;
    }
    __syncthreads();
    double mass = 0.0, before = 0.0;
    int fallback = -1;
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
        if (w == warp) before = mass;
        mass += s.f64[w];
        if (s.i32[w] >= 0) fallback = s.i32[w];
    }
    // mass ≥ 1 (the most likely token is always kept with weight 1). u × mass can round up to
    // mass when u is within 2⁻⁵³ of 1: then no interval holds it and the last kept token is
    // drawn, as the limit u → 1 would.
    const double target = p.uniform * mass;
    if (threadIdx.x == 0) s.picked = fallback >= 0 ? fallback : 0;
    __syncthreads();
    if (before <= target && target < before + total) {  // warp-uniform; at most one warp
        int picked = -1;
        last = -1;
        segment_walk(x, f, lo, hi, target - before, &picked, &last);
        // Not found only if target − before rounded past the warp's total: its last token.
        if (lane == 0) s.picked = picked >= 0 ? picked : last;
    }
    __syncthreads();
    const int token = s.picked;
    __syncthreads();
    return token;
}

// Samples one token per row and reports its log-probability under the raw logits.
//   logits    [rows, vocab] f32
//   params    [rows] RowParams
//   tokens    [rows] int32 out: the sampled id (0 for a row with no non-NaN logit)
//   logprobs  [rows] f32 out: log-softmax(logits)[token], temperature 1, no filtering
// Grid: (rows), block (1024); any vocab ≥ 1.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_f32(const float* __restrict__ logits,
                                                                        const RowParams* __restrict__ params,
                                                                        int vocab, int* __restrict__ tokens,
                                                                        float* __restrict__ logprobs) {
    __shared__ Scratch s;
    const float* x = logits + (size_t)blockIdx.x * vocab;
    const RowParams p = params[blockIdx.x];
    unsigned long long best;
    int n_valid;
    row_max(x, vocab, s, best, n_valid);
    const float m = best ? key_float((unsigned)(best >> 32)) : QMTOT_NEG_INF;
    const double lse = row_log_sum_exp(x, vocab, m, s);
    const int token = sample_row(x, vocab, p, best, n_valid, s);
    if (threadIdx.x == 0) {
        tokens[blockIdx.x] = token;
        logprobs[blockIdx.x] = (float)((double)x[token] - lse);
    }
}

// Log-probabilities (raw logits, temperature 1) of given candidate ids and of the row's top_n
// most likely tokens (value descending, ties to the lower id, NaN never listed).
//   logits    [rows, vocab] f32
//   params    [rows] RowParams (only top_n ≤ max_top is read)
//   cand_ids  [rows, n_cand] int32, −1 = padding (ids checked < vocab by the launcher)
//   cand_lp   [rows, n_cand] f32 out, NaN at padding
//   top_ids   [rows, max_top] int32 out, most likely first, −1 past top_n or the row's non-NaN
//   top_lp    [rows, max_top] f32 out
// Grid: (rows), block (1024); one pass per listed token (top_n ≤ 20).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) logprobs_f32(
    const float* __restrict__ logits, const RowParams* __restrict__ params, int vocab, const int* __restrict__ cand_ids,
    int n_cand, float* __restrict__ cand_lp, int max_top, int* __restrict__ top_ids, float* __restrict__ top_lp) {
    __shared__ Scratch s;
    const float* x = logits + (size_t)blockIdx.x * vocab;
    const int top_n = min(params[blockIdx.x].top_n, max_top);
    unsigned long long best;
    int n_valid;
    row_max(x, vocab, s, best, n_valid);
    const float m = best ? key_float((unsigned)(best >> 32)) : QMTOT_NEG_INF;
    const double lse = row_log_sum_exp(x, vocab, m, s);
    const size_t row = blockIdx.x;
    for (int j = threadIdx.x; j < n_cand; j += SAMPLE_THREADS) {
        const int id = cand_ids[row * n_cand + j];
        cand_lp[row * n_cand + j] = (id >= 0 && id < vocab) ? (float)((double)x[id] - lse) : __int_as_float(0x7fc00000);
    }
    // The r-th most likely token: the largest rank below the (r−1)-th's (ranks are distinct).
    unsigned long long prev = ~0ull;
    for (int r = 0; r < max_top; ++r) {
        unsigned long long b = 0;
        if (r < top_n && prev != 0) {
            for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
                const float l = x[i];
                if (!isnan(l)) {
                    const unsigned long long k = rank_of(l, i);
                    if (k < prev && k > b) b = k;
                }
            }
            b = block_reduce(b, MaxOp(), s.u64);
        }
        if (threadIdx.x == 0) {
            top_ids[row * max_top + r] = b ? rank_id(b) : -1;
            top_lp[row * max_top + r] = b ? (float)((double)x[rank_id(b)] - lse) : __int_as_float(0x7fc00000);
        }
        prev = b;
    }
}
