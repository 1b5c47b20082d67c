//! CPU paged attention: causal, grouped-query, reading K/V only through block tables, with
//! shared prefixes read once per group (cascade).
//!
//! For row `r` (position `p`, sequence `s`) and KV head `h`, the `G = n_heads / n_kv_heads`
//! query heads `h·G .. (h+1)·G` attend over positions `0..=p`:
//!
//! ```text
//!     score[i] = q · k[i] / sqrt(head_dim)      k[i] = K[layer, table_s[i / bs], i % bs, h]
//!     out      = Σ_i softmax(score)[i] · v[i]
//! ```
//!
//! Work is split into tasks of (queries, KV head, chunk of positions), so one decode row over a
//! long context still spreads over every thread (split-K, as flash-decoding does on GPUs).
//! A task reads each K/V position of its chunk once for all its queries and leaves a partial
//! result `(max score m, Σ exp(score − m), Σ exp(score − m)·v)` per query; a merge pass
//! rescales the partials of a (row, head) to a common max and normalizes (log-sum-exp).
//! Within a chunk the softmax is exact two-pass in f32.
//!
//! The queries of a task are either
//!
//! * **one row's own positions**: the `G` query heads of row `r` over positions
//!   `P..=p` in chunks of [`CHUNK`], where `P` is the row's shared prefix length (0 for a
//!   sequence in no group): plain paged attention;
//! * **a shared prefix** ([`crate::backend::SharedPrefix`]): the members of a group have the
//!   same physical blocks for positions `0..P`, `P = blocks·block_size`, and every one of their
//!   rows attends over all of them, so all `rows·G` (row, query head) pairs of the group are
//!   queries of one set of tasks (tiles of at most [`QUERY_TILE`] queries × chunks of prefix
//!   positions). Each prefix position is then read once per group instead of once per row,
//!   and the wide query tile lets the score and value products run as small matrix products
//!   (see [`attend`]).
//!
//! Both kinds leave the same partials, and the merge treats a row's prefix partials and
//! own-position partials alike, so a grouped row's result equals plain attention up to f32
//! rounding of a different chunking. The chunking follows from the step's shapes alone, never
//! from the thread count, so a result does not change with `--threads`.

use rayon::prelude::*;

use super::matmul::Isa;
use super::{CpuKv, CpuStep};
use crate::backend::QkvLayout;

/// Positions per task over a row's own positions; also per prefix task of a group with more
/// than one query tile (which has parallelism across its tiles already).
const CHUNK: usize = 256;
/// Most queries ((row, query head) pairs) per prefix task: bounds its score buffer to
/// `QUERY_TILE × CHUNK` f32 (64 KiB) and its outputs to `QUERY_TILE × head_dim`.
const QUERY_TILE: usize = 64;
/// (query, position) scores a prefix task of a single query tile aims at. A group of one
/// decode row per sibling has few queries (8 siblings × 3 query heads = 24), so its prefix is
/// cut into chunks of about `PREFIX_TASK_SCORES / queries` positions (a 2048-token prefix into
/// 13 chunks per KV head) to spread over the threads, while a chunk stays long enough that
/// its fixed costs (partials, merge, tails) stay small. On a 2-core EPYC, 2048 cost up to 10%
/// against 4096 and 8192 gained up to 5%, but would leave a 512-token prefix of 8 siblings
/// only 6 tasks, too few for a larger machine.
const PREFIX_TASK_SCORES: usize = 4096;
/// Shortest prefix chunk.
const MIN_PREFIX_CHUNK: usize = 32;
/// Queries from which a prefix task scores keys against its queries transposed
/// (`key_scores`) rather than query by query (`dots`): the transposed form pads the queries
/// to a multiple of 8 and needs no horizontal sums.
const WIDE_TILE: usize = 8;
/// Queries per micro-kernel call: `dots` and `weighted_sums` keep 4 queries' accumulators in
/// registers while each K/V load serves all 4.
const QUADS: usize = 4;
/// Keys per `dots` call: with 4 queries, 8 independent accumulator chains instead of 4, which
/// keeps more FMAs in flight than their latency would otherwise allow.
const KEY_PAIR: usize = 2;

/// Vector primitives the attention body is written with.
trait Lanes {
    /// `out[c][j] = q[j] · k[c]`, dot products over `n` elements for `R ≤ 4` queries and
    /// `C ≤ 2` keys: every load of a key serves all `R` queries, of a query all `C` keys.
    unsafe fn dots<const R: usize, const C: usize>(q: [*const f32; R], k: [*const f32; C], n: usize) -> [[f32; R]; C];
    /// `s[c·ns + q] = Σ_d k[c][d] · qt[d·ns + q]` for `c < C ≤ 4` keys and `q < ns` (a
    /// multiple of 8) queries stored transposed, `d < hd`: every load of 8 queries serves all
    /// `C` keys, and no sum needs a horizontal reduction.
    unsafe fn key_scores<const C: usize>(k: [*const f32; C], qt: *const f32, ns: usize, hd: usize, s: *mut f32);
    /// `o[j][d] = Σ_i p[j][i·ps] · v[offs[i] + d]` for `d < n`, `j < R ≤ 4` (overwrites
    /// `o[j]`): every load of a value row serves all `R` outputs, and the sums stay in
    /// registers across the positions `i`.
    unsafe fn weighted_sums<const R: usize>(
        o: [*mut f32; R],
        p: [*const f32; R],
        ps: usize,
        v: *const f32,
        offs: &[usize],
        n: usize,
    );
    /// Softmax numerators down the columns of `s[n, ns]` (`ns` a multiple of 8):
    /// `m[q] = max_i s[i][q]`, `s[i][q] = exp(s[i][q] − m[q])`, `l[q] = Σ_i s[i][q]`. NaN
    /// scores stay NaN (and so make `l` NaN).
    unsafe fn exp_columns(s: *mut f32, n: usize, ns: usize, m: *mut f32, l: *mut f32);
    /// `s[i] = exp(s[i] − m)` in place over `n` elements; returns their sum. NaN stays NaN.
    unsafe fn exp_sub_sum(s: *mut f32, n: usize, m: f32) -> f32;
}

struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(q: [*const f32; R], k: [*const f32; C], n: usize) -> [[f32; R]; C] {
        std::array::from_fn(|c| {
            let k = std::slice::from_raw_parts(k[c], n);
            std::array::from_fn(|j| super::matmul::portable_dot(std::slice::from_raw_parts(q[j], n), k))
        })
    }

    #[inline(always)]
    unsafe fn key_scores<const C: usize>(k: [*const f32; C], qt: *const f32, ns: usize, hd: usize, s: *mut f32) {
        for (c, key) in k.iter().enumerate() {
            let out = std::slice::from_raw_parts_mut(s.add(c * ns), ns);
            out.fill(0.0);
            for d in 0..hd {
                let (w, row) = (*key.add(d), std::slice::from_raw_parts(qt.add(d * ns), ns));
                for (o, &x) in out.iter_mut().zip(row) {
                    *o += w * x;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn weighted_sums<const R: usize>(
        o: [*mut f32; R],
        p: [*const f32; R],
        ps: usize,
        v: *const f32,
        offs: &[usize],
        n: usize,
    ) {
        for j in 0..R {
            let o = std::slice::from_raw_parts_mut(o[j], n);
            o.fill(0.0);
            for (i, &off) in offs.iter().enumerate() {
                let (w, x) = (*p[j].add(i * ps), std::slice::from_raw_parts(v.add(off), n));
                for (ov, &xv) in o.iter_mut().zip(x) {
                    *ov += w * xv;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn exp_sub_sum(s: *mut f32, n: usize, m: f32) -> f32 {
        let s = std::slice::from_raw_parts_mut(s, n);
        let mut l = 0f32;
        for v in s.iter_mut() {
            *v = (*v - m).exp();
            l += *v;
        }
        l
    }

    #[inline(always)]
    unsafe fn exp_columns(s: *mut f32, n: usize, ns: usize, m: *mut f32, l: *mut f32) {
        let s = std::slice::from_raw_parts_mut(s, n * ns);
        let (m, l) = (
            std::slice::from_raw_parts_mut(m, ns),
            std::slice::from_raw_parts_mut(l, ns),
        );
        m.fill(f32::NEG_INFINITY);
        for row in s.chunks_exact(ns) {
            for (mq, &x) in m.iter_mut().zip(row) {
                *mq = mq.max(x);
            }
        }
        l.fill(0.0);
        for row in s.chunks_exact_mut(ns) {
            for ((x, &mq), lq) in row.iter_mut().zip(m.iter()).zip(l.iter_mut()) {
                *x = (*x - mq).exp();
                *lq += *x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register arrays indexed by const-bounded loops read clearest
impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn dots<const R: usize, const C: usize>(q: [*const f32; R], k: [*const f32; C], n: usize) -> [[f32; R]; C] {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let mut i = 0;
        while i + 8 <= n {
            let kv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(k[c].add(i)));
            for j in 0..R {
                let qv = _mm256_loadu_ps(q[j].add(i));
                for c in 0..C {
                    acc[c][j] = _mm256_fmadd_ps(qv, kv[c], acc[c][j]);
                }
            }
            i += 8;
        }
        std::array::from_fn(|c| {
            // Reduce up to four accumulators at once: after three rounds of pairwise adds
            // lane j of each 128-bit half holds half of query j's sum.
            let z = _mm256_setzero_ps();
            let a = |j: usize| if j < R { acc[c][j] } else { z };
            let t = _mm256_hadd_ps(_mm256_hadd_ps(a(0), a(1)), _mm256_hadd_ps(a(2), a(3)));
            let mut sums = [0f32; 4];
            _mm_storeu_ps(
                sums.as_mut_ptr(),
                _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)),
            );
            std::array::from_fn(|j| {
                let mut s = sums[j];
                for e in i..n {
                    s += *q[j].add(e) * *k[c].add(e);
                }
                s
            })
        })
    }

    #[inline(always)]
    unsafe fn key_scores<const C: usize>(k: [*const f32; C], qt: *const f32, ns: usize, hd: usize, s: *mut f32) {
        use std::arch::x86_64::*;
        // Queries in strips of 16 (2·C ≤ 8 accumulators, two query loads and C broadcasts per
        // element), then one strip of 8.
        let mut q0 = 0;
        while q0 + 16 <= ns {
            let mut acc = [[_mm256_setzero_ps(); 2]; C];
            for d in 0..hd {
                let x = qt.add(d * ns + q0);
                let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                for c in 0..C {
                    let w = _mm256_broadcast_ss(&*k[c].add(d));
                    acc[c][0] = _mm256_fmadd_ps(w, x0, acc[c][0]);
                    acc[c][1] = _mm256_fmadd_ps(w, x1, acc[c][1]);
                }
            }
            for c in 0..C {
                _mm256_storeu_ps(s.add(c * ns + q0), acc[c][0]);
                _mm256_storeu_ps(s.add(c * ns + q0 + 8), acc[c][1]);
            }
            q0 += 16;
        }
        if q0 < ns {
            let mut acc = [_mm256_setzero_ps(); C];
            for d in 0..hd {
                let x = _mm256_loadu_ps(qt.add(d * ns + q0));
                for c in 0..C {
                    acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*k[c].add(d)), x, acc[c]);
                }
            }
            for c in 0..C {
                _mm256_storeu_ps(s.add(c * ns + q0), acc[c]);
            }
        }
    }

    #[inline(always)]
    unsafe fn weighted_sums<const R: usize>(
        o: [*mut f32; R],
        p: [*const f32; R],
        ps: usize,
        v: *const f32,
        offs: &[usize],
        n: usize,
    ) {
        use std::arch::x86_64::*;
        // Columns in strips of 16 (two vectors per output: 2·R ≤ 8 accumulators, two value
        // loads and R broadcasts per position), then one strip of 8, then single columns.
        let mut d = 0;
        while d + 16 <= n {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (i, &off) in offs.iter().enumerate() {
                let x = v.add(off + d);
                let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                for j in 0..R {
                    let w = _mm256_broadcast_ss(&*p[j].add(i * ps));
                    acc[j][0] = _mm256_fmadd_ps(w, x0, acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps(w, x1, acc[j][1]);
                }
            }
            for j in 0..R {
                _mm256_storeu_ps(o[j].add(d), acc[j][0]);
                _mm256_storeu_ps(o[j].add(d + 8), acc[j][1]);
            }
            d += 16;
        }
        if d + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); R];
            for (i, &off) in offs.iter().enumerate() {
                let x = _mm256_loadu_ps(v.add(off + d));
                for j in 0..R {
                    acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p[j].add(i * ps)), x, acc[j]);
                }
            }
            for j in 0..R {
                _mm256_storeu_ps(o[j].add(d), acc[j]);
            }
            d += 8;
        }
        while d < n {
            for j in 0..R {
                let mut s = 0f32;
                for (i, &off) in offs.iter().enumerate() {
                    s += *p[j].add(i * ps) * *v.add(off + d);
                }
                *o[j].add(d) = s;
            }
            d += 1;
        }
    }

    /// Vectorized `exp` (Cephes-style: `x = n·ln2 + r`, a degree-6 polynomial in `r`, `2^n`
    /// through the exponent bits), within 2 ulp of libm over the softmax's range `x ≤ 0`.
    #[inline(always)]
    unsafe fn exp_sub_sum(s: *mut f32, n: usize, m: f32) -> f32 {
        use std::arch::x86_64::*;
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s.add(i)), mv));
            _mm256_storeu_ps(s.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        let mut total = super::simd::hsum(sum);
        while i < n {
            let e = (*s.add(i) - m).exp();
            *s.add(i) = e;
            total += e;
            i += 1;
        }
        total
    }

    #[inline(always)]
    unsafe fn exp_columns(s: *mut f32, n: usize, ns: usize, m: *mut f32, l: *mut f32) {
        use std::arch::x86_64::*;
        for q0 in (0..ns).step_by(8) {
            // max_ps returns its second operand when either is NaN: NaN scores are skipped
            // here (as f32::max does) and come out of the exp as NaN.
            let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
            for i in 0..n {
                mv = _mm256_max_ps(_mm256_loadu_ps(s.add(i * ns + q0)), mv);
            }
            let mut lv = _mm256_setzero_ps();
            for i in 0..n {
                let x = s.add(i * ns + q0);
                let e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x), mv));
                _mm256_storeu_ps(x, e);
                lv = _mm256_add_ps(lv, e);
            }
            _mm256_storeu_ps(m.add(q0), mv);
            _mm256_storeu_ps(l.add(q0), lv);
        }
    }
}

/// `exp(x)` for 8 lanes; NaN in, NaN out; underflows smoothly to 0 below about −87.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // max/min return their second operand when either is NaN, so NaN passes the clamp.
    let x = _mm256_min_ps(_mm256_set1_ps(88.376_26), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-87.336_55), x);
    // n = round(x / ln 2), r = x − n·ln 2 (ln 2 split in two for an exact product).
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.0e-1] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n from the exponent field.
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_mul_ps(p, pow2n)
}

/// Shapes shared by every task of one call.
struct Geometry<'a> {
    qkv: &'a [f32],
    k_layer: &'a [f32],
    v_layer: &'a [f32],
    width: usize,
    hd: usize,
    group: usize,
    n_kv_heads: usize,
    block_size: usize,
    scale: f32,
}

/// One task: queries `q.0..q.1` of the rows `order[rows.0..rows.1]`, numbered row-major as
/// (row, query head) pairs (`G` per row, all in KV head `h`'s group), over positions
/// `start..end` read through the block table of sequence `seq`. A wide prefix tile has its
/// queries transposed at `qt` in the call's query-tile buffer (see [`attend`]).
#[derive(Clone, Copy)]
struct Task {
    rows: (usize, usize),
    q: (usize, usize),
    h: usize,
    seq: usize,
    start: usize,
    end: usize,
    qt: Option<usize>,
}

impl Task {
    fn queries(&self) -> usize {
        self.q.1 - self.q.0
    }
}

/// Where the partials of one (row, KV head) lie in the partial buffer: `count` of them, the
/// one of chunk `c` and query head `qh` at `base + c·stride + qh·partial_len`.
#[derive(Clone, Copy, Default)]
struct Run {
    base: usize,
    stride: usize,
    count: usize,
}

/// The tasks of one call and where their partials go.
struct Plan {
    /// Every row once: the rows of group 0, of group 1, …, then the ungrouped rows.
    order: Vec<usize>,
    /// Prefix tasks first (the larger ones), then own-position tasks. Task `t` writes its
    /// `queries() × partial_len` partials right after those of task `t − 1`.
    tasks: Vec<Task>,
    /// `[T · n_kv_heads]`: per (row, KV head), its own-position run and its prefix run (count
    /// 0 outside a group).
    runs: Vec<[Run; 2]>,
    /// f32 in the partial buffer.
    partial_elems: usize,
    /// f32 in the query-tile buffer.
    qt_elems: usize,
}

/// Partial result layout per query: `[m, l, o[0..hd]]`.
fn partial_len(hd: usize) -> usize {
    hd + 2
}

/// Lays out the tasks of a step whose sharing groups satisfy the
/// [`crate::backend::SharedPrefix`] invariants (checked by the caller: reading the prefix once
/// through one member's table must be right for every member's row).
fn plan(step: &CpuStep, layout: QkvLayout, block_size: usize) -> Result<Plan, String> {
    let (t_rows, n_kv) = (step.rows(), layout.n_kv_heads);
    let group = layout.n_heads / n_kv;
    let pl = partial_len(layout.head_dim);
    let n_seqs = step.block_tables.len();
    const NONE: usize = usize::MAX;

    // group_of[s]: the group sequence s belongs to. The groups were checked by
    // `StepInput::validate_groups` (members in range, in one group each, sharing the prefix).
    let mut group_of = vec![NONE; n_seqs];
    for (gi, g) in step.groups.iter().enumerate() {
        for &s in &g.seqs {
            group_of[s as usize] = gi;
        }
    }
    let prefix_of_row = |r: usize| match group_of[step.row_seq[r] as usize] {
        NONE => 0,
        gi => step.groups[gi].blocks as usize * block_size,
    };

    // Rows in group order (a counting sort by group; ungrouped rows last).
    let n_groups = step.groups.len();
    let group_of_row = |r: usize| match group_of[step.row_seq[r] as usize] {
        NONE => n_groups,
        gi => gi,
    };
    let mut starts = vec![0usize; n_groups + 3];
    for r in 0..t_rows {
        starts[group_of_row(r) + 2] += 1;
    }
    for i in 2..starts.len() {
        starts[i] += starts[i - 1];
    }
    // Now starts[gi + 1] is where group gi's rows begin; filling advances it to their end,
    // so afterwards starts[gi]..starts[gi + 1] are group gi's rows.
    let mut order = vec![0usize; t_rows];
    for r in 0..t_rows {
        let gi = group_of_row(r);
        if (step.positions[r] as usize) < prefix_of_row(r) {
            return Err(format!("row {r} lies inside the shared prefix of group {gi}"));
        }
        order[starts[gi + 1]] = r;
        starts[gi + 1] += 1;
    }

    let mut tasks = Vec::new();
    let mut runs = vec![[Run::default(); 2]; t_rows * n_kv];
    let mut elems = 0usize;
    let mut qt_elems = 0usize;

    // Shared prefixes: every (row, query head) of the group, tiled, × chunks of the prefix.
    for (gi, g) in step.groups.iter().enumerate() {
        let rows = (starts[gi], starts[gi + 1]);
        let prefix = g.blocks as usize * block_size;
        if rows.0 == rows.1 || prefix == 0 {
            continue;
        }
        let nq = (rows.1 - rows.0) * group;
        let tiles = nq.div_ceil(QUERY_TILE);
        let tile = nq.div_ceil(tiles);
        let target = if tiles == 1 {
            (PREFIX_TASK_SCORES / nq).clamp(MIN_PREFIX_CHUNK, CHUNK)
        } else {
            CHUNK
        };
        // Even chunks rather than `target`-long ones and a short remainder.
        let n_chunks = prefix.div_ceil(target);
        let chunk = prefix.div_ceil(n_chunks);
        // Any member's table reads the prefix; take the first row's (checked by the caller to
        // cover its position, hence the prefix).
        let seq = step.row_seq[order[rows.0]] as usize;
        // Transposed query tiles, one per (KV head, tile), shared by the tile's chunks.
        let qt_tile = layout.head_dim * tile.next_multiple_of(8);
        for h in 0..n_kv {
            for (j, &r) in order[rows.0..rows.1].iter().enumerate() {
                runs[r * n_kv + h][1] = Run {
                    base: elems + j * group * pl,
                    stride: nq * pl,
                    count: n_chunks,
                };
            }
            for start in (0..prefix).step_by(chunk) {
                for (ti, q0) in (0..nq).step_by(tile).enumerate() {
                    let q = (q0, (q0 + tile).min(nq));
                    let task = Task {
                        rows,
                        q,
                        h,
                        seq,
                        start,
                        end: (start + chunk).min(prefix),
                        qt: (q.1 - q.0 >= WIDE_TILE).then_some(qt_elems + ti * qt_tile),
                    };
                    elems += task.queries() * pl;
                    tasks.push(task);
                }
            }
            qt_elems += nq.div_ceil(tile) * qt_tile;
        }
    }

    // Each row's own positions (all of them for an ungrouped row).
    for (i, &r) in order.iter().enumerate() {
        let (from, n_ctx) = (prefix_of_row(r), step.positions[r] as usize + 1);
        for h in 0..n_kv {
            runs[r * n_kv + h][0] = Run {
                base: elems,
                stride: group * pl,
                count: (n_ctx - from).div_ceil(CHUNK),
            };
            for start in (from..n_ctx).step_by(CHUNK) {
                let task = Task {
                    rows: (i, i + 1),
                    q: (0, group),
                    h,
                    seq: step.row_seq[r] as usize,
                    start,
                    end: (start + CHUNK).min(n_ctx),
                    qt: None,
                };
                elems += task.queries() * pl;
                tasks.push(task);
            }
        }
    }
    Ok(Plan {
        order,
        tasks,
        runs,
        partial_elems: elems,
        qt_elems,
    })
}

thread_local! {
    /// The task loop's buffers, one set per thread, kept across tasks and calls (a task runs
    /// no rayon work inside, so the borrow never nests).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread buffers of the task loop.
#[derive(Default)]
struct Scratch {
    /// `[queries]` offsets of the task's query vectors in `qkv`.
    q: Vec<usize>,
    /// `[positions]` offsets of the task's positions (slot, head `h`) in a layer's K or V.
    offs: Vec<usize>,
    /// Scores, then softmax weights: `[queries, positions]` (narrow tasks) or
    /// `[positions, queries padded to 8]` (wide prefix tiles).
    scores: Vec<f32>,
    /// `[queries padded to 8]` column maxima and sums of a wide tile.
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    /// The score buffer, at least `n` long.
    fn scores(&mut self, n: usize) -> *mut f32 {
        if self.scores.len() < n {
            self.scores.resize(n, 0.0);
        }
        self.scores.as_mut_ptr()
    }
}

/// Calls `f(i, offset)` for positions `start..end` of a sequence with block table `table`,
/// `offset` being the position's (slot, head `h`) offset in a layer's K or V: walks block by
/// block, so no position costs a division.
#[inline(always)]
fn for_each_slot(g: &Geometry, table: &[u32], h: usize, start: usize, end: usize, mut f: impl FnMut(usize, usize)) {
    let bs = g.block_size;
    let mut i = start;
    while i < end {
        let (block, first) = (i / bs, i % bs);
        let n = (bs - first).min(end - i);
        let slot0 = table[block] as usize * bs + first;
        for o in 0..n {
            f(i + o - start, ((slot0 + o) * g.n_kv_heads + h) * g.hd);
        }
        i += n;
    }
}

/// Calls `f::<…, R>(…)` for the query quads starting at `j = 0, 4, …` of `0..nq`: `R = 4`,
/// then one call with the 1–3 left over (`R` is the last generic argument).
macro_rules! for_each_quad {
    ($nq:expr, |$j:ident| $call:ident::<$($gen:tt),*; R>($($arg:expr),*)) => {{
        let nq = $nq;
        let mut $j = 0;
        while $j + QUADS <= nq {
            $call::<$($gen),*, 4>($($arg),*);
            $j += QUADS;
        }
        match nq - $j {
            1 => $call::<$($gen),*, 1>($($arg),*),
            2 => $call::<$($gen),*, 2>($($arg),*),
            3 => $call::<$($gen),*, 3>($($arg),*),
            _ => {}
        }
    }};
}

/// `scores[(j + a)·n + i + c] = q_{j+a} · k_c / sqrt(hd)` for `a < R`, `c < C`.
#[inline(always)]
unsafe fn score_quad<L: Lanes, const C: usize, const R: usize>(
    g: &Geometry,
    q: &[usize],
    j: usize,
    k: [*const f32; C],
    scores: *mut f32,
    n: usize,
    i: usize,
) {
    let qp = std::array::from_fn(|a| g.qkv.as_ptr().add(q[j + a]));
    for (c, s) in L::dots::<R, C>(qp, k, g.hd).iter().enumerate() {
        for (a, &v) in s.iter().enumerate() {
            *scores.add((j + a) * n + i + c) = v * g.scale;
        }
    }
}

/// `o_{j+a} = Σ_i w_{j+a}[i] · v_i` into the partials' `o` fields, for `a < R`; weight `i` of
/// query `q` at `scores[q·qs + i·ps]`.
#[inline(always)]
unsafe fn value_quad<L: Lanes, const R: usize>(
    g: &Geometry,
    j: usize,
    scores: *const f32,
    (qs, ps): (usize, usize),
    offs: &[usize],
    partial: *mut f32,
) {
    let pl = partial_len(g.hd);
    let o = std::array::from_fn(|a| partial.add((j + a) * pl + 2));
    let p = std::array::from_fn(|a| scores.add((j + a) * qs));
    L::weighted_sums::<R>(o, p, ps, g.v_layer.as_ptr(), offs, g.hd);
}

/// One task: its queries over positions `t.start..t.end` of `table`, leaving their partials in
/// `partial` (`[queries, partial_len]`). `rows` are the task's rows (`order[t.rows]`), `qt` the
/// task's transposed query tile (`[head_dim, queries padded to 8]`, pre-scaled by
/// 1/sqrt(head_dim)) when it has one.
///
/// A narrow task (one row's `G` query heads, or a small group) scores query by query: `dots`
/// of up to 4 queries against 2 keys, reduced horizontally. A wide prefix tile scores key by
/// key against the transposed queries (`key_scores`): 4 keys × 16 queries of accumulators,
/// plain vertical FMAs, the scores laid out `[positions, queries]` so the softmax runs down
/// columns 8 queries at a time. Both then form the weighted values a quad of queries at a
/// time, each value row loaded once per quad.
#[inline(always)]
unsafe fn attend<L: Lanes>(
    g: &Geometry,
    table: &[u32],
    t: &Task,
    rows: &[usize],
    qt: Option<&[f32]>,
    s: &mut Scratch,
    partial: &mut [f32],
) {
    let (n, nq, pl) = (t.end - t.start, t.queries(), partial_len(g.hd));
    s.offs.clear();
    for_each_slot(g, table, t.h, t.start, t.end, |_, off| s.offs.push(off));
    let key = |offs: &[usize], i: usize| g.k_layer.as_ptr().add(offs[i]);
    let strides;
    let scores;
    if let Some(qt) = qt {
        let ns = nq.next_multiple_of(8);
        scores = s.scores(n * ns);
        strides = (1, ns);
        let (offs, qt) = (&s.offs, qt.as_ptr());
        let mut i = 0;
        while i + 4 <= n {
            let k = [key(offs, i), key(offs, i + 1), key(offs, i + 2), key(offs, i + 3)];
            L::key_scores::<4>(k, qt, ns, g.hd, scores.add(i * ns));
            i += 4;
        }
        let tail = scores.add(i * ns);
        match n - i {
            1 => L::key_scores::<1>([key(offs, i)], qt, ns, g.hd, tail),
            2 => L::key_scores::<2>([key(offs, i), key(offs, i + 1)], qt, ns, g.hd, tail),
            3 => L::key_scores::<3>([key(offs, i), key(offs, i + 1), key(offs, i + 2)], qt, ns, g.hd, tail),
            _ => {}
        }
        s.m.resize(ns, 0.0);
        s.l.resize(ns, 0.0);
        L::exp_columns(scores, n, ns, s.m.as_mut_ptr(), s.l.as_mut_ptr());
        for j in 0..nq {
            partial[j * pl] = s.m[j];
            partial[j * pl + 1] = s.l[j];
        }
    } else {
        scores = s.scores(nq * n);
        strides = (n, 1);
        s.q.clear();
        s.q.extend((t.q.0..t.q.1).map(|q| rows[q / g.group] * g.width + (t.h * g.group + q % g.group) * g.hd));
        let (q, offs) = (&s.q, &s.offs);
        // A pair of positions at a time: each key is loaded from the cache once and stays in
        // L1 while every quad of queries dots with it.
        let mut i = 0;
        while i + KEY_PAIR <= n {
            let k = [key(offs, i), key(offs, i + 1)];
            for_each_quad!(nq, |j| score_quad::<L, 2; R>(g, q, j, k, scores, n, i));
            i += KEY_PAIR;
        }
        if i < n {
            let k = [key(offs, i)];
            for_each_quad!(nq, |j| score_quad::<L, 1; R>(g, q, j, k, scores, n, i));
        }
        // Softmax numerators per query (two-pass within the chunk).
        for j in 0..nq {
            let row = std::slice::from_raw_parts_mut(scores.add(j * n), n);
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            partial[j * pl] = m;
            partial[j * pl + 1] = L::exp_sub_sum(row.as_mut_ptr(), n, m);
        }
    }
    let (offs, partial) = (&s.offs, partial.as_mut_ptr());
    for_each_quad!(nq, |j| value_quad::<L; R>(g, j, scores, strides, offs, partial));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    g: &Geometry,
    table: &[u32],
    t: &Task,
    rows: &[usize],
    qt: Option<&[f32]>,
    s: &mut Scratch,
    partial: &mut [f32],
) {
    attend::<Avx2>(g, table, t, rows, qt, s, partial)
}

/// `out[T, n_heads·head_dim]`; `qkv[T, layout.width()]`. The caller has checked the shapes and
/// that every row's block table covers its position inside the pool; the sharing groups are
/// checked here (an error names the broken invariant).
pub(crate) fn attention(
    isa: Isa,
    qkv: &[f32],
    kv: &CpuKv,
    layer: usize,
    layout: QkvLayout,
    step: &CpuStep,
    out: &mut [f32],
) -> Result<(), String> {
    let hd = layout.head_dim;
    let g = Geometry {
        qkv,
        k_layer: kv.layer_k(layer),
        v_layer: kv.layer_v(layer),
        width: layout.width(),
        hd,
        group: layout.n_heads / layout.n_kv_heads,
        n_kv_heads: layout.n_kv_heads,
        block_size: kv.shape.block_size,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let plan = plan(step, layout, g.block_size)?;
    let pl = partial_len(hd);

    // Transposed, pre-scaled query tiles of the wide prefix tasks (`[hd, queries padded to
    // 8]`, padding 0): each is written once, from the tasks of its first chunk.
    let mut qt = vec![0f32; plan.qt_elems];
    for t in plan.tasks.iter().filter(|t| t.start == 0) {
        let Some(at) = t.qt else { continue };
        let (rows, ns) = (&plan.order[t.rows.0..t.rows.1], t.queries().next_multiple_of(8));
        for (a, q) in (t.q.0..t.q.1).enumerate() {
            let src = rows[q / g.group] * g.width + (t.h * g.group + q % g.group) * hd;
            for (d, &x) in qkv[src..src + hd].iter().enumerate() {
                qt[at + d * ns + a] = x * g.scale;
            }
        }
    }

    // Hand each task its own stretch of the partial buffer.
    let mut partials = vec![0f32; plan.partial_elems];
    let mut work = Vec::with_capacity(plan.tasks.len());
    let mut rest = partials.as_mut_slice();
    for t in &plan.tasks {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(t.queries() * pl);
        work.push((t, mine));
        rest = tail;
    }
    // One rayon job per task: prefix tasks are few and large next to own-position tasks, and
    // rayon's default splitting hands them out in runs that leave threads idle at the end.
    work.into_par_iter().with_max_len(1).for_each(|(t, partial)| {
        let rows = &plan.order[t.rows.0..t.rows.1];
        let qt = t.qt.map(|at| &qt[at..at + hd * t.queries().next_multiple_of(8)]);
        let table = &step.block_tables[t.seq];
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: shapes and block tables were checked by the caller, the groups by
            // `plan`; AVX2/FMA only when detected.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2Fma => attend_avx2(&g, table, t, rows, qt, s, partial),
                    _ => attend::<Portable>(&g, table, t, rows, qt, s, partial),
                }
            }
        })
    });

    // Merge the partials of each (row, KV head), prefix and own positions alike: rescale to
    // the largest max, then normalize.
    let partials = &partials[..];
    out.par_chunks_mut(g.group * hd).enumerate().for_each(|(pair, o)| {
        for qh in 0..g.group {
            let parts = plan.runs[pair].iter().flat_map(|run| {
                (0..run.count).map(move |c| {
                    let at = run.base + c * run.stride + qh * pl;
                    &partials[at..at + pl]
                })
            });
            let m = parts.clone().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
            let dst = &mut o[qh * hd..(qh + 1) * hd];
            dst.fill(0.0);
            let mut l = 0f32;
            for p in parts {
                let w = (p[0] - m).exp();
                l += p[1] * w;
                for (d, &v) in dst.iter_mut().zip(&p[2..]) {
                    *d += w * v;
                }
            }
            let inv = 1.0 / l;
            dst.iter_mut().for_each(|d| *d *= inv);
        }
    });
    Ok(())
}
