//! CPU paged attention: causal, grouped-query, reading K/V only through block tables.
//!
//! For row `r` (position `p`, sequence `s`) and KV head `h`, the `G = n_heads / n_kv_heads`
//! query heads `h·G .. (h+1)·G` attend over positions `0..=p`:
//!
//! ```text
//!     score[i] = q · k[i] / sqrt(head_dim)      k[i] = K[layer, table_s[i / bs], i % bs, h]
//!     out      = Σ_i softmax(score)[i] · v[i]
//! ```
//!
//! Work is split into tasks of (row, KV head, chunk of [`CHUNK`] positions), so one decode row
//! over a long context still spreads over every thread (split-K, as flash-decoding does on
//! GPUs). Each task reads its K/V once for all `G` query heads and leaves a partial result
//! `(max score m, Σ exp(score − m), Σ exp(score − m)·v)` per query head; a merge pass
//! rescales the chunks of a (row, head) to a common max and normalizes. Within a chunk the
//! softmax is exact two-pass in f32.

use rayon::prelude::*;

use super::matmul::Isa;
use super::{CpuKv, CpuStep};
use crate::backend::QkvLayout;

/// Positions per task.
const CHUNK: usize = 256;

/// Vector primitives the attention body is written with.
trait Lanes {
    /// `Σ a[i]·b[i]` over `n` elements.
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32;
    /// `y[i] += s·x[i]` over `n` elements.
    unsafe fn axpy(y: *mut f32, s: f32, x: *const f32, n: usize);
    /// `s[i] = exp(s[i] − m)` in place over `n` elements; returns their sum. NaN stays NaN.
    unsafe fn exp_sub_sum(s: *mut f32, n: usize, m: f32) -> f32;
}

struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        let (a, b) = (std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n));
        super::matmul::portable_dot(a, b)
    }

    #[inline(always)]
    unsafe fn axpy(y: *mut f32, s: f32, x: *const f32, n: usize) {
        let (y, x) = (std::slice::from_raw_parts_mut(y, n), std::slice::from_raw_parts(x, n));
        for (yv, &xv) in y.iter_mut().zip(x) {
            *yv += s * xv;
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
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), _mm256_loadu_ps(b.add(i + 8)), acc1);
            i += 16;
        }
        let mut total = super::simd::hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            total += *a.add(i) * *b.add(i);
            i += 1;
        }
        total
    }

    #[inline(always)]
    unsafe fn axpy(y: *mut f32, s: f32, x: *const f32, n: usize) {
        use std::arch::x86_64::*;
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                y.add(i),
                _mm256_fmadd_ps(sv, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i))),
            );
            i += 8;
        }
        while i < n {
            *y.add(i) += s * *x.add(i);
            i += 1;
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

/// One task: rows `r`, KV head `h`, positions `start..end`.
#[derive(Clone, Copy)]
struct Task {
    r: usize,
    h: usize,
    start: usize,
    end: usize,
}

/// Partial result layout per query head: `[m, l, o[0..hd]]`.
fn partial_len(hd: usize) -> usize {
    hd + 2
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

#[inline(always)]
unsafe fn attend_chunk<L: Lanes>(g: &Geometry, table: &[u32], t: Task, scores: &mut [f32], partial: &mut [f32]) {
    let (hd, group) = (g.hd, g.group);
    let n = t.end - t.start;
    let q0 = t.r * g.width + t.h * group * hd;
    for_each_slot(g, table, t.h, t.start, t.end, |i, off| {
        let k = g.k_layer.as_ptr().add(off);
        for qh in 0..group {
            scores[qh * n + i] = L::dot(g.qkv.as_ptr().add(q0 + qh * hd), k, hd) * g.scale;
        }
    });
    let pl = partial_len(hd);
    for qh in 0..group {
        let s = &mut scores[qh * n..(qh + 1) * n];
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let l = L::exp_sub_sum(s.as_mut_ptr(), n, m);
        let p = &mut partial[qh * pl..(qh + 1) * pl];
        p[0] = m;
        p[1] = l;
        p[2..].fill(0.0);
    }
    for_each_slot(g, table, t.h, t.start, t.end, |i, off| {
        let v = g.v_layer.as_ptr().add(off);
        for qh in 0..group {
            let o = partial.as_mut_ptr().add(qh * pl + 2);
            L::axpy(o, scores[qh * n + i], v, hd);
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_chunk_avx2(g: &Geometry, table: &[u32], t: Task, scores: &mut [f32], partial: &mut [f32]) {
    attend_chunk::<Avx2>(g, table, t, scores, partial)
}

/// `out[T, n_heads·head_dim]`; `qkv[T, layout.width()]`.
pub(crate) fn attention(
    isa: Isa,
    qkv: &[f32],
    kv: &CpuKv,
    layer: usize,
    layout: QkvLayout,
    step: &CpuStep,
    out: &mut [f32],
) {
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
    // Tasks grouped by (row, head): `first[j]` is the first task of pair j.
    let mut tasks = Vec::new();
    let mut first = Vec::new();
    for r in 0..step.rows() {
        let n_ctx = step.positions[r] as usize + 1;
        for h in 0..layout.n_kv_heads {
            first.push(tasks.len());
            for start in (0..n_ctx).step_by(CHUNK) {
                tasks.push(Task {
                    r,
                    h,
                    start,
                    end: (start + CHUNK).min(n_ctx),
                });
            }
        }
    }
    first.push(tasks.len());

    let pl = partial_len(hd);
    let per_task = g.group * pl;
    let mut partials = vec![0f32; tasks.len() * per_task];
    partials.par_chunks_mut(per_task).zip(tasks.par_iter()).for_each_init(
        || vec![0f32; g.group * CHUNK],
        |scores, (partial, &t)| {
            let table = &step.block_tables[step.row_seq[t.r] as usize];
            // SAFETY: shapes and block tables were checked by the caller; AVX2/FMA only
            // when detected.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2Fma => attend_chunk_avx2(&g, table, t, scores, partial),
                    _ => attend_chunk::<Portable>(&g, table, t, scores, partial),
                }
            }
        },
    );

    // Merge the chunks of each (row, KV head): rescale to the largest max, then normalize.
    out.par_chunks_mut(g.group * hd).enumerate().for_each(|(pair, o)| {
        let chunks = &partials[first[pair] * per_task..first[pair + 1] * per_task];
        for qh in 0..g.group {
            let part = |c: usize| &chunks[c * per_task + qh * pl..c * per_task + (qh + 1) * pl];
            let n_chunks = first[pair + 1] - first[pair];
            let m = (0..n_chunks).map(|c| part(c)[0]).fold(f32::NEG_INFINITY, f32::max);
            let dst = &mut o[qh * hd..(qh + 1) * hd];
            dst.fill(0.0);
            let mut l = 0f32;
            for c in 0..n_chunks {
                let p = part(c);
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
}
