//! CPU matmul `out[T, N] = x[T, K] · W[N, K]ᵀ` over INT4, INT8 and dense f32 weights, f32
//! activations and accumulation.
//!
//! # INT4 kernel
//!
//! Reads the canonical groups directly (packed nibbles, never a dequantized copy). Per group
//! `g` of row `n`, with `q` the nibbles and `x` one activation row:
//!
//! ```text
//!     Σ_c w[n,c]·x[c] = Σ_g ( s[n,g] · Σ_{c∈g} q[n,c]·x[c]  +  m[n,g] · Σ_{c∈g} x[c] )
//! ```
//!
//! so the inner loop is an integer-valued dot product scaled once per group, and the min term
//! uses per-group sums of `x` computed once per call. The canonical layout puts element 2i in
//! the low nibble of byte i; to keep nibble unpacking to a mask and a shift, each 32-element
//! chunk of `x` is de-interleaved once per call into `[x0 x2 … x30 | x1 x3 … x31]` (`xd`), so
//! low nibbles meet the first half and high nibbles the second.
//!
//! Tiling: the parallel loop runs over tiles of [`ROWS_PER_TASK`] weight rows × [`T_PER_TASK`]
//! activation rows; inside a tile a micro-kernel computes `MR × NR` outputs at once, unpacking
//! each weight chunk once for `MR` activation rows and reusing each activation chunk for `NR`
//! weight rows. Decode (`T = 1`) runs `1 × 4`, prefill `4 × 2`.
//!
//! # Instruction sets
//!
//! [`Isa::Avx2Fma`] (x86-64 with AVX2 and FMA, detected at run time) uses intrinsics;
//! [`Isa::Portable`] is plain Rust with the same arithmetic structure, for any target. Tests run
//! both against the dequant oracle.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::{Int4Matrix, WeightMatrix, INT8_GROUP};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;
/// Activation rows per parallel task (keeps a task's slice of `x` in L2 during prefill).
const T_PER_TASK: usize = 64;

/// Which kernel family runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2Fma,
}

impl Isa {
    /// The best kernels this machine runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
        }
    }
}

/// INT4 weights as the CPU kernels read them: canonical nibbles and mins, scales widened to
/// f32 once at upload (exact).
pub(crate) struct CpuInt4 {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `[rows, cols/2]` canonical nibbles.
    pub packed: Vec<u8>,
    /// `[rows, cols/group]`.
    pub scales: Vec<f32>,
    /// `[rows, cols/group]`.
    pub mins: Vec<f32>,
}

/// Grouped INT8 weights: `[rows, cols]` i8 and `[rows, cols/32]` f32 scales.
pub(crate) struct CpuInt8 {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Dense f32 `[rows, cols]`.
pub(crate) struct CpuDense {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

pub(crate) enum CpuWeight {
    Int4(CpuInt4),
    Int8(CpuInt8),
    Dense(CpuDense),
}

impl CpuWeight {
    fn rows(&self) -> usize {
        match self {
            CpuWeight::Int4(w) => w.rows,
            CpuWeight::Int8(w) => w.rows,
            CpuWeight::Dense(w) => w.rows,
        }
    }

    fn from_host(w: &WeightMatrix) -> Self {
        let widen = |s: &[f16]| s.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        match w {
            WeightMatrix::Int4(m) => CpuWeight::Int4(CpuInt4 {
                rows: m.rows,
                cols: m.cols,
                group: m.group,
                packed: m.packed.clone(),
                scales: widen(&m.scales),
                mins: m.mins.clone(),
            }),
            WeightMatrix::Int8(m) => CpuWeight::Int8(CpuInt8 {
                rows: m.rows,
                cols: m.cols,
                q: m.q.clone(),
                scales: widen(&m.scales),
            }),
            WeightMatrix::Dense(m) => CpuWeight::Dense(CpuDense {
                rows: m.rows,
                cols: m.cols,
                data: m.data.clone(),
            }),
        }
    }

    /// Row `r` dequantized into `out` (`[cols]`): the embedding lookup.
    pub(crate) fn dequant_row(&self, r: usize, out: &mut [f32]) {
        match self {
            CpuWeight::Int4(w) => {
                let gpr = w.cols / w.group;
                let row = &w.packed[r * w.cols / 2..(r + 1) * w.cols / 2];
                for (i, &b) in row.iter().enumerate() {
                    let g = r * gpr + 2 * i / w.group;
                    out[2 * i] = w.scales[g] * (b & 0x0f) as f32 + w.mins[g];
                    out[2 * i + 1] = w.scales[g] * (b >> 4) as f32 + w.mins[g];
                }
            }
            CpuWeight::Int8(w) => {
                let gpr = w.cols / INT8_GROUP;
                for (c, o) in out.iter_mut().enumerate() {
                    *o = w.scales[r * gpr + c / INT8_GROUP] * w.q[r * w.cols + c] as f32;
                }
            }
            CpuWeight::Dense(w) => out.copy_from_slice(&w.data[r * w.cols..(r + 1) * w.cols]),
        }
    }
}

/// A linear layer on the CPU: one or more stacked parts (see [`crate::backend::Backend::upload_linear`]).
pub struct CpuLinear {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// `(first output row, weight)`, in row order.
    pub(crate) parts: Vec<(usize, CpuWeight)>,
}

impl CpuLinear {
    pub(crate) fn upload(parts: &[&WeightMatrix]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidArgument("upload_linear: no parts".into()));
        };
        let cols = first.cols();
        let mut row = 0;
        let mut out = Vec::with_capacity(parts.len());
        for p in parts {
            if p.cols() != cols {
                return Err(Error::InvalidArgument(format!(
                    "upload_linear: parts have {} and {} columns",
                    cols,
                    p.cols()
                )));
            }
            out.push((row, CpuWeight::from_host(p)));
            row += p.rows();
        }
        Ok(Self {
            rows: row,
            cols,
            parts: out,
        })
    }

    /// The part holding output row `r`, and the row within it.
    pub(crate) fn locate(&self, r: usize) -> (&CpuWeight, usize) {
        let i = self.parts.partition_point(|(start, _)| *start <= r) - 1;
        (&self.parts[i].1, r - self.parts[i].0)
    }
}

/// Raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (row, column) elements of the output, and the
// buffer outlives the parallel loop (it is borrowed mutably for the whole call).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activations prepared once per call for the INT4 kernels: de-interleaved chunks and group sums.
struct Int4Activations {
    /// `[T, K]`, each 32-chunk as `[even elements | odd elements]`.
    xd: Vec<f32>,
    /// `[T, K/group]`.
    xsum: Vec<f32>,
    group: usize,
}

fn prepare_int4(x: &[f32], t: usize, k: usize, group: usize) -> Int4Activations {
    let mut xd = vec![0f32; t * k];
    for (src, dst) in x.chunks_exact(32).zip(xd.chunks_exact_mut(32)) {
        for i in 0..16 {
            dst[i] = src[2 * i];
            dst[16 + i] = src[2 * i + 1];
        }
    }
    let xsum = x.chunks_exact(group).map(|g| g.iter().sum()).collect();
    Int4Activations { xd, xsum, group }
}

/// `out[T, N] = x[T, K] · Wᵀ`. Shapes are checked by the caller.
pub(crate) fn matmul(isa: Isa, x: &[f32], t: usize, w: &CpuLinear, out: &mut [f32]) {
    let (k, n_total) = (w.cols, w.rows);
    debug_assert_eq!(x.len(), t * k);
    debug_assert_eq!(out.len(), t * n_total);
    // One preparation per distinct INT4 group size among the parts.
    let mut preps: Vec<Int4Activations> = Vec::new();
    for (_, p) in &w.parts {
        if let CpuWeight::Int4(q) = p {
            if !preps.iter().any(|a| a.group == q.group) {
                preps.push(prepare_int4(x, t, k, q.group));
            }
        }
    }
    // Task list: (part, first row in part, rows, first activation row, activation rows).
    let mut tasks = Vec::new();
    for (pi, (_, p)) in w.parts.iter().enumerate() {
        for r0 in (0..p.rows()).step_by(ROWS_PER_TASK) {
            for m0 in (0..t).step_by(T_PER_TASK) {
                tasks.push((pi, r0, ROWS_PER_TASK.min(p.rows() - r0), m0, T_PER_TASK.min(t - m0)));
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    tasks.par_iter().for_each(|&(pi, r0, nr, m0, mr)| {
        let out_ptr = out_ptr;
        let (row_base, part) = &w.parts[pi];
        let tile = Tile {
            out: out_ptr.0,
            ldo: n_total,
            col0: row_base + r0,
            m0,
            mr,
        };
        match part {
            CpuWeight::Int4(q) => {
                let prep = preps.iter().find(|a| a.group == q.group).expect("prepared above");
                int4_tile(isa, q, r0, nr, prep, k, &tile);
            }
            CpuWeight::Int8(q) => int8_tile(isa, q, r0, nr, x, k, &tile),
            CpuWeight::Dense(d) => dense_tile(isa, d, r0, nr, x, k, &tile),
        }
    });
}

/// Where a task writes: `out[(m0 + i) · ldo + col0 + j]` for `i < mr`, `j <` its rows.
struct Tile {
    out: *mut f32,
    ldo: usize,
    col0: usize,
    m0: usize,
    mr: usize,
}

impl Tile {
    /// # Safety
    /// `(m, j)` must lie inside this task's tile.
    #[inline(always)]
    unsafe fn store(&self, m: usize, j: usize, v: f32) {
        *self.out.add((self.m0 + m) * self.ldo + self.col0 + j) = v;
    }
}

// ---------------------------------------------------------------------------------------------
// INT4

fn int4_tile(isa: Isa, w: &CpuInt4, r0: usize, nr: usize, a: &Int4Activations, k: usize, tile: &Tile) {
    let gpr = k / w.group;
    // Strips of weight rows: 4 wide for decode (one activation row), 2 wide otherwise (so
    // four activation rows × two weight rows fit the 16 vector registers); 1 for leftovers.
    let strip = if tile.mr == 1 { 4 } else { 2 };
    let mut j = 0;
    while j < nr {
        let sn = if nr - j >= strip { strip } else if nr - j >= 2 { 2 } else { 1 };
        let n = r0 + j;
        let mut m = 0;
        while m < tile.mr {
            let sm = if sn == 2 && tile.mr - m >= 4 { 4 } else { 1 };
            let xm = tile.m0 + m;
            let xd = &a.xd[xm * k..(xm + sm) * k];
            let mut res = [[0f32; 4]; 4];
            match (isa, sm, sn) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 4, 2) => unsafe { avx2::int4_block::<4, 2>(w, n, xd, k, &mut res) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 1, 4) => unsafe { avx2::int4_block::<1, 4>(w, n, xd, k, &mut res) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 1, 2) => unsafe { avx2::int4_block::<1, 2>(w, n, xd, k, &mut res) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 1, 1) => unsafe { avx2::int4_block::<1, 1>(w, n, xd, k, &mut res) },
                _ => portable_int4_block(w, n, sm, sn, xd, k, &mut res),
            }
            for (mi, row) in res.iter().enumerate().take(sm) {
                let sums = &a.xsum[(xm + mi) * gpr..(xm + mi + 1) * gpr];
                for (ni, &v) in row.iter().enumerate().take(sn) {
                    // Min term: Σ_g m[n, g] · Σ_{c∈g} x[c].
                    let mins = &w.mins[(n + ni) * gpr..(n + ni + 1) * gpr];
                    let min_term: f32 = mins.iter().zip(sums).map(|(a, b)| a * b).sum();
                    // SAFETY: m + mi < mr and j + ni < nr: inside this task's tile.
                    unsafe { tile.store(m + mi, j + ni, v + min_term) };
                }
            }
            m += sm;
        }
        j += sn;
    }
}

/// Portable micro-kernel: `res[m][j] = Σ_g s[n+j, g] · Σ_{c∈g} q[n+j, c] · x[m, c]` (no min term).
fn portable_int4_block(w: &CpuInt4, n: usize, mr: usize, nr: usize, xd: &[f32], k: usize, res: &mut [[f32; 4]; 4]) {
    let gpr = k / w.group;
    for j in 0..nr {
        let row = &w.packed[(n + j) * k / 2..(n + j + 1) * k / 2];
        for m in 0..mr {
            let x = &xd[m * k..(m + 1) * k];
            let mut acc = 0f32;
            for g in 0..gpr {
                let mut lanes = [0f32; 16];
                for c in (g * w.group..(g + 1) * w.group).step_by(32) {
                    let bytes = &row[c / 2..c / 2 + 16];
                    let (xe, xo) = x[c..c + 32].split_at(16);
                    for i in 0..16 {
                        lanes[i] += (bytes[i] & 0x0f) as f32 * xe[i] + (bytes[i] >> 4) as f32 * xo[i];
                    }
                }
                acc += w.scales[(n + j) * gpr + g] * lanes.iter().sum::<f32>();
            }
            res[m][j] = acc;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// INT8 and dense: one output per (activation row, weight row); rows are long enough that
// the inner loop vectorizes on its own and the loads dominate.

fn int8_tile(isa: Isa, w: &CpuInt8, r0: usize, nr: usize, x: &[f32], k: usize, tile: &Tile) {
    for j in 0..nr {
        let n = r0 + j;
        for m in 0..tile.mr {
            let xr = &x[(tile.m0 + m) * k..(tile.m0 + m + 1) * k];
            let v = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { avx2::int8_dot(w, n, xr) },
                _ => portable_int8_dot(w, n, xr),
            };
            // SAFETY: inside this task's tile.
            unsafe { tile.store(m, j, v) };
        }
    }
}

fn portable_int8_dot(w: &CpuInt8, n: usize, x: &[f32]) -> f32 {
    let k = w.cols;
    let gpr = k / INT8_GROUP;
    let q = &w.q[n * k..(n + 1) * k];
    let mut acc = 0f32;
    for g in 0..gpr {
        let mut lanes = [0f32; 8];
        for c in (g * INT8_GROUP..(g + 1) * INT8_GROUP).step_by(8) {
            for i in 0..8 {
                lanes[i] += q[c + i] as f32 * x[c + i];
            }
        }
        acc += w.scales[n * gpr + g] * lanes.iter().sum::<f32>();
    }
    acc
}

fn dense_tile(isa: Isa, w: &CpuDense, r0: usize, nr: usize, x: &[f32], k: usize, tile: &Tile) {
    for j in 0..nr {
        let wr = &w.data[(r0 + j) * k..(r0 + j + 1) * k];
        for m in 0..tile.mr {
            let xr = &x[(tile.m0 + m) * k..(tile.m0 + m + 1) * k];
            let v = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { avx2::dense_dot(wr, xr) },
                _ => portable_dot(wr, xr),
            };
            // SAFETY: inside this task's tile.
            unsafe { tile.store(m, j, v) };
        }
    }
}

/// f32 dot product in 8 independent lanes (vectorizes on any target).
pub(crate) fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA micro-kernels. Callers guarantee the CPU has both (checked by [`Isa::detect`]).

    use std::arch::x86_64::*;

    use super::{CpuInt4, CpuInt8};
    use crate::quant::INT8_GROUP;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `res[m][j] = Σ_g s[n+j, g] · Σ_{c∈g} q[n+j, c] · x[m, c]` for `m < MR`, `j < NR`.
    ///
    /// Per 32-element chunk and weight row: one 16-byte load of nibbles, mask/shift into low
    /// and high halves, widen to 4 × 8 f32 lanes (`w0` = elements 0,2,…,14, `w1` = 16,…,30,
    /// `w2` = 1,…,15, `w3` = 17,…,31) matching the de-interleaved `xd` chunk
    /// `[x0 x2 … x30 | x1 x3 … x31]`, then 4 FMAs per activation row into a per-group partial
    /// `t`, folded into `acc` with the group's scale.
    ///
    /// # Safety
    /// AVX2 and FMA present; rows `n..n+NR` exist in `w`; `xd` holds `MR` rows of `k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn int4_block<const MR: usize, const NR: usize>(
        w: &CpuInt4,
        n: usize,
        xd: &[f32],
        k: usize,
        res: &mut [[f32; 4]; 4],
    ) {
        let gpr = k / w.group;
        let chunks = w.group / 32;
        let mask = _mm_set1_epi8(0x0f);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let packed = w.packed.as_ptr();
        let x = xd.as_ptr();
        for g in 0..gpr {
            let mut t = [[_mm256_setzero_ps(); NR]; MR];
            for c in 0..chunks {
                let e = g * w.group + c * 32;
                for j in 0..NR {
                    let bytes = _mm_loadu_si128(packed.add((n + j) * k / 2 + e / 2) as *const __m128i);
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                    let w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                    let w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                    let w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                    let w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                    for m in 0..MR {
                        let xp = x.add(m * k + e);
                        let mut v = t[m][j];
                        v = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), v);
                        v = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), v);
                        v = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), v);
                        v = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), v);
                        t[m][j] = v;
                    }
                }
            }
            for j in 0..NR {
                let s = _mm256_set1_ps(*w.scales.get_unchecked((n + j) * gpr + g));
                for m in 0..MR {
                    acc[m][j] = _mm256_fmadd_ps(t[m][j], s, acc[m][j]);
                }
            }
        }
        for m in 0..MR {
            for j in 0..NR {
                res[m][j] = hsum(acc[m][j]);
            }
        }
    }

    /// `Σ_g s[n, g] · Σ_{c∈g} q[n, c] · x[c]` for grouped INT8 row `n`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `x.len() == w.cols`; row `n` exists.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn int8_dot(w: &CpuInt8, n: usize, x: &[f32]) -> f32 {
        let k = w.cols;
        let gpr = k / INT8_GROUP;
        let q = w.q.as_ptr().add(n * k);
        let xp = x.as_ptr();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        for g in 0..gpr {
            let e = g * INT8_GROUP;
            let b = _mm256_loadu_si256(q.add(e) as *const __m256i);
            let b_lo = _mm256_castsi256_si128(b);
            let b_hi = _mm256_extracti128_si256(b, 1);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b_lo));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b_lo, 8)));
            let w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b_hi));
            let w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b_hi, 8)));
            let t0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(e + 8)), _mm256_mul_ps(w0, _mm256_loadu_ps(xp.add(e))));
            let t1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(e + 24)), _mm256_mul_ps(w2, _mm256_loadu_ps(xp.add(e + 16))));
            let s = _mm256_set1_ps(*w.scales.get_unchecked(n * gpr + g));
            acc0 = _mm256_fmadd_ps(t0, s, acc0);
            acc1 = _mm256_fmadd_ps(t1, s, acc1);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// f32 dot product.
    ///
    /// # Safety
    /// AVX2 and FMA present; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dense_dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

}

/// Builds the CPU form of an INT4 matrix (used by benches that time the kernel alone).
pub fn int4_for_bench(m: &Int4Matrix) -> CpuLinear {
    CpuLinear::upload(&[&WeightMatrix::Int4(m.clone())]).expect("valid INT4 matrix")
}
