//! CPU matmul `out[T, N] = x[T, K] · W[N, K]ᵀ` over INT4, INT8 and dense f32 weights, f32
//! activations and accumulation.
//!
//! # One arithmetic, two schedules (batch invariance)
//!
//! Every output is computed the same way whatever the number of rows `T`:
//!
//! ```text
//!     w      = s·q + m                     (INT4; q·s for INT8; w for dense), in f32
//!     lanes  = Σ_c x[c..c+8] · w[c..c+8]   8-lane f32 accumulation, in input order, per
//!                                          block of TILE_K inputs (FMA on AVX2)
//!     out    = Σ_blocks hsum(lanes)        blocks added in order
//! ```
//!
//! So a row's result does not depend on what else is in the batch, on whether a prompt is
//! prefilled at once or token by token, or on the thread count: the CPU forward is
//! batch-invariant, bit for bit, within one instruction set. (Tree search relies on this:
//! a thought decoded among siblings equals the same thought decoded alone.)
//!
//! The canonical INT4 layout puts element 2i in the low nibble of byte i. To keep nibble
//! unpacking to a mask and a shift, each 32-element chunk of `x` is de-interleaved once per
//! call into `[x0 x2 … x30 | x1 x3 … x31]` (`xd`): a chunk's 16 bytes then yield, as four 8-lane
//! vectors, exactly the weights that meet `xd[0..8]`, `xd[8..16]`, `xd[16..24]`, `xd[24..32]`.
//! "Input order" above is this de-interleaved order for INT4 parts.
//!
//! # Three schedules
//!
//! * **GEMV** (one row, decode): a fused kernel streams eight weight rows at a time,
//!   dequantizing each chunk in registers and FMA-ing it straight into that row's
//!   accumulator; each weight byte is read once and nothing is written back.
//! * **Multi-row GEMV** (2 ..= 16 rows, sibling batches; AVX2, INT4/INT8 parts): one weight
//!   row at a time, each chunk dequantized once in registers and FMA-ed into up to eight
//!   activation rows' accumulators, so a batch of siblings reads the weights once.
//! * **GEMM** (`T ≥ GEMM_MIN_ROWS`, prefill): a task dequantizes a tile of [`TILE_ROWS`]
//!   weight rows × [`TILE_K`] inputs into an f32 buffer in L1 (same formula), then a
//!   register-blocked micro-kernel computes 3 activation rows × 4 weight rows at a time
//!   (12 accumulators, 7 loads per 12 FMAs). The dequantization is amortized over up to
//!   [`T_PER_TASK`] activation rows.
//!
//! Parallel tasks are (weight-row range × activation-row range); every task writes a disjoint
//! block of `out`.
//!
//! With [`MatmulPrecision::Q8`], INT4 and INT8 parts run the 8-bit-activation kernels of
//! [`super::q8`] on the same task list instead (dense parts keep the f32 kernels).
//!
//! # Instruction sets
//!
//! [`Isa::Avx2Fma`] (x86-64 with AVX2 and FMA, detected at run time) uses intrinsics;
//! [`Isa::Portable`] is plain Rust with the same structure, for any target. Tests run both
//! against the dequant oracle.

use half::f16;
use rayon::prelude::*;

use super::q8;
use crate::error::Result;
use crate::quant::{WeightMatrix, INT8_GROUP};

/// Activation rows from which the GEMM path is used (below it, GEMV; from 2 rows on, the
/// multi-row GEMV reads each weight row once for all of them). Measured: at SmolLM2 shapes
/// on Zen 3 the multi-row GEMV beats the dequantized-tile GEMM up to 16 rows.
const GEMM_MIN_ROWS: usize = 17;
/// Weight rows per GEMV task.
const GEMV_ROWS_PER_TASK: usize = 16;
/// Weight rows per dequantized GEMM tile (4 quads of the 3×4 micro-kernel).
const TILE_ROWS: usize = 16;
/// Inputs per dequantized GEMM tile: 16 × 512 f32 = 32 KiB, an L1's worth. A multiple of
/// every group size.
const TILE_K: usize = 512;
/// Activation rows per GEMM task (a task's slice of `x` stays in L2).
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

/// Arithmetic of the CPU matmul over INT4 and INT8 weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 activations and accumulation: the reference.
    F32,
    /// Activations quantized to 8 bits per 32 values, integer dot products
    /// ([`super::q8`]): faster, approximate like llama.cpp's CPU path.
    Q8,
}

impl MatmulPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Q8 => "q8",
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

    fn cols(&self) -> usize {
        match self {
            CpuWeight::Int4(w) => w.cols,
            CpuWeight::Int8(w) => w.cols,
            CpuWeight::Dense(w) => w.cols,
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
            // The CPU computes in f32: f16 weights are widened once (exactly).
            WeightMatrix::F16(m) => CpuWeight::Dense(CpuDense {
                rows: m.rows,
                cols: m.cols,
                data: widen(&m.data),
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
    /// Stored column `j` reads input `input_order[j]` (GPTQ act-order); the activations are
    /// gathered into that order before the matmul.
    pub(crate) input_order: Option<Vec<u32>>,
}

impl CpuLinear {
    pub(crate) fn upload(parts: &[&WeightMatrix]) -> Result<Self> {
        let stacked = crate::backend::stack_parts(parts, |p| Ok(CpuWeight::from_host(p)))?;
        Ok(Self {
            rows: stacked.rows,
            cols: stacked.cols,
            parts: stacked.parts,
            input_order: stacked.input_order,
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

impl OutPtr {
    /// Through a method, so closures capture the whole (Send) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn deinterleave(x: &[f32]) -> Vec<f32> {
    let mut xd = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(32).zip(xd.chunks_exact_mut(32)) {
        for i in 0..16 {
            dst[i] = src[2 * i];
            dst[16 + i] = src[2 * i + 1];
        }
    }
    xd
}

/// `out[T, N] = x[T, K] · Wᵀ`. Shapes are checked by the caller.
pub(crate) fn matmul(isa: Isa, precision: MatmulPrecision, x: &[f32], t: usize, w: &CpuLinear, out: &mut [f32]) {
    let (k, n_total) = (w.cols, w.rows);
    debug_assert_eq!(x.len(), t * k);
    let gathered;
    let x = match &w.input_order {
        None => x,
        Some(order) => {
            gathered = x
                .chunks_exact(k)
                .flat_map(|row| order.iter().map(|&c| row[c as usize]))
                .collect::<Vec<f32>>();
            &gathered[..]
        }
    };
    debug_assert_eq!(out.len(), t * n_total);
    let gemm = t >= GEMM_MIN_ROWS;
    // De-interleaved activations, shared by every INT4 part; Q8-quantized copies for the Q8
    // path (de-interleaved for INT4 parts, natural order for INT8 parts).
    let has_int4 = w.parts.iter().any(|(_, p)| matches!(p, CpuWeight::Int4(_)));
    let has_int8 = w.parts.iter().any(|(_, p)| matches!(p, CpuWeight::Int8(_)));
    let xd = if has_int4 { deinterleave(x) } else { Vec::new() };
    let q8 = precision == MatmulPrecision::Q8;
    let q8_int4 = (q8 && has_int4).then(|| q8::quantize(&xd));
    let q8_int8 = (q8 && has_int8).then(|| q8::quantize(x));
    // Per-group activation sums for the INT4 min term, one set per distinct group size.
    let mut group_sums: Vec<(usize, Vec<f32>)> = Vec::new();
    if let Some(a) = &q8_int4 {
        for (_, p) in &w.parts {
            if let CpuWeight::Int4(q) = p {
                if !group_sums.iter().any(|(g, _)| *g == q.group) {
                    group_sums.push((q.group, a.group_sums(q.group)));
                }
            }
        }
    }
    // Task list: (part, first row in part, rows, first activation row, activation rows).
    let (rows_per_task, t_per_task) = if gemm {
        (TILE_ROWS, T_PER_TASK)
    } else {
        (GEMV_ROWS_PER_TASK, t)
    };
    let mut tasks = Vec::new();
    for (pi, (_, p)) in w.parts.iter().enumerate() {
        for r0 in (0..p.rows()).step_by(rows_per_task) {
            for m0 in (0..t).step_by(t_per_task) {
                tasks.push((pi, r0, rows_per_task.min(p.rows() - r0), m0, t_per_task.min(t - m0)));
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |tile_buf: &mut Vec<f32>, &(pi, r0, nr, m0, mr): &(usize, usize, usize, usize, usize)| {
        let (row_base, part) = &w.parts[pi];
        let tile = Tile {
            out: out_ptr.get(),
            ldo: n_total,
            col0: row_base + r0,
            m0,
            mr,
        };
        let xsrc = if matches!(part, CpuWeight::Int4(_)) { &xd } else { x };
        let q8_acts = match part {
            CpuWeight::Int4(_) => q8_int4.as_ref(),
            CpuWeight::Int8(_) => q8_int8.as_ref(),
            CpuWeight::Dense(_) => None,
        };
        if let Some(a) = q8_acts {
            let gsum = match part {
                CpuWeight::Int4(q) => group_sums
                    .iter()
                    .find(|(g, _)| *g == q.group)
                    .map(|(_, s)| s.as_slice()),
                _ => None,
            };
            q8_task(isa, part, r0, nr, a, gsum, &tile);
        } else if gemm {
            gemm_task(isa, part, r0, nr, xsrc, k, &tile, tile_buf);
        } else {
            gemv_task(isa, part, r0, nr, xsrc, k, &tile);
        }
    };
    tasks.par_iter().for_each_init(
        || {
            if gemm {
                vec![0f32; TILE_ROWS * TILE_K]
            } else {
                Vec::new()
            }
        },
        run,
    );
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

    /// # Safety
    /// `(m, j)` must lie inside this task's tile.
    #[inline(always)]
    unsafe fn add(&self, m: usize, j: usize, v: f32) {
        *self.out.add((self.m0 + m) * self.ldo + self.col0 + j) += v;
    }
}

// ---------------------------------------------------------------------------------------------
// GEMV path

/// One GEMV task: weight rows `r0 .. r0+nr` of `part` against each of the task's activation
/// rows (`xsrc` is `xd` for INT4 parts, `x` otherwise).
fn gemv_task(isa: Isa, part: &CpuWeight, r0: usize, nr: usize, xsrc: &[f32], k: usize, tile: &Tile) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2Fma && tile.mr > 1 && !matches!(part, CpuWeight::Dense(_)) {
        // Several rows: each weight row is read once for up to eight activation rows.
        for j in 0..nr {
            let mut m = 0;
            while m < tile.mr {
                let mut res = [0f32; 8];
                let (n, m0) = (r0 + j, tile.m0 + m);
                // SAFETY: AVX2/FMA detected; row n and activation rows m0.. exist (task bounds).
                let sm = unsafe {
                    match tile.mr - m {
                        8.. => avx2::gemv_rows::<8>(part, n, xsrc, m0, k, &mut res),
                        4..=7 => avx2::gemv_rows::<4>(part, n, xsrc, m0, k, &mut res),
                        2 | 3 => avx2::gemv_rows::<2>(part, n, xsrc, m0, k, &mut res),
                        _ => avx2::gemv_rows::<1>(part, n, xsrc, m0, k, &mut res),
                    }
                    match tile.mr - m {
                        8.. => 8,
                        4..=7 => 4,
                        2 | 3 => 2,
                        _ => 1,
                    }
                };
                for (i, &v) in res.iter().enumerate().take(sm) {
                    // SAFETY: m + i < mr and j < nr: inside this task's tile.
                    unsafe { tile.store(m + i, j, v) };
                }
                m += sm;
            }
        }
        return;
    }
    for m in 0..tile.mr {
        let xrow = &xsrc[(tile.m0 + m) * k..(tile.m0 + m + 1) * k];
        let mut j = 0;
        while j < nr {
            let sn = if nr - j >= 8 {
                8
            } else if nr - j >= 4 {
                4
            } else {
                1
            };
            let mut res = [0f32; 8];
            match (isa, sn) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 8) => unsafe { avx2::gemv::<8>(part, r0 + j, xrow, &mut res) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 4) => unsafe { avx2::gemv::<4>(part, r0 + j, xrow, &mut res) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2Fma, 1) => unsafe { avx2::gemv::<1>(part, r0 + j, xrow, &mut res) },
                _ => portable_gemv(part, r0 + j, sn, xrow, &mut res),
            }
            for (ni, &v) in res.iter().enumerate().take(sn) {
                // SAFETY: m < mr and j + ni < nr: inside this task's tile.
                unsafe { tile.store(m, j + ni, v) };
            }
            j += sn;
        }
    }
}

/// Portable GEMV: for each of `nr` rows, dequantize a block into a stack buffer and take the
/// same 8-lane dot product as the GEMM micro-kernel.
fn portable_gemv(part: &CpuWeight, n: usize, nr: usize, x: &[f32], res: &mut [f32; 8]) {
    let k = x.len();
    let mut wbuf = [0f32; TILE_K];
    for (j, r) in res.iter_mut().enumerate().take(nr) {
        let mut total = 0f32;
        for kb in (0..k).step_by(TILE_K) {
            let kl = TILE_K.min(k - kb);
            dequant_row(Isa::Portable, part, n + j, kb, kl, &mut wbuf[..kl]);
            let block = portable_dot(&x[kb..kb + kl], &wbuf[..kl]);
            total = if kb == 0 { block } else { total + block };
        }
        *r = total;
    }
}

// ---------------------------------------------------------------------------------------------
// Q8 path

/// One Q8 task: weight rows `r0 .. r0+nr` of an INT4 or INT8 part against the task's
/// activation rows, in blocks of 4 activation rows × 2 weight rows (prefill) or 1 × 4 (decode).
/// `gsum` (`[T, K/group]`, INT4 parts only) feeds the min term.
fn q8_task(isa: Isa, part: &CpuWeight, r0: usize, nr: usize, a: &q8::Q8Activations, gsum: Option<&[f32]>, tile: &Tile) {
    let mut m = 0;
    while m < tile.mr {
        let sm = if tile.mr - m >= 4 { 4 } else { 1 };
        let mut j = 0;
        while j < nr {
            let left = nr - j;
            let sn = if sm == 4 {
                left.min(2)
            } else if left >= 4 {
                4
            } else {
                left.min(2)
            };
            let (n, m0) = (r0 + j, tile.m0 + m);
            let mut res = [[0f32; 4]; 4];
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2Fma {
                // SAFETY: AVX2/FMA detected; rows n..n+sn and m0..m0+sm exist.
                unsafe { q8_block_avx2(part, n, a, gsum.unwrap_or(&[]), m0, sm, sn, &mut res) };
            }
            if isa == Isa::Portable {
                let k = part.cols();
                let cpr = k / q8::QK;
                for (i, res_row) in res.iter_mut().enumerate().take(sm) {
                    let row = m0 + i;
                    let (xq, d) = (&a.q[row * k..(row + 1) * k], &a.d[row * cpr..(row + 1) * cpr]);
                    for (jj, r) in res_row.iter_mut().enumerate().take(sn) {
                        *r = match part {
                            CpuWeight::Int4(w) => {
                                let gpr = k / w.group;
                                let gs = gsum.expect("INT4 parts come with group sums");
                                q8::portable_int4_dot(w, n + jj, xq, d, &gs[row * gpr..(row + 1) * gpr])
                            }
                            CpuWeight::Int8(w) => q8::portable_int8_dot(w, n + jj, xq, d),
                            CpuWeight::Dense(_) => unreachable!("dense parts use the f32 path"),
                        };
                    }
                }
            }
            for (i, row) in res.iter().enumerate().take(sm) {
                for (jj, &v) in row.iter().enumerate().take(sn) {
                    // SAFETY: m + i < mr and j + jj < nr: inside this task's tile.
                    unsafe { tile.store(m + i, j + jj, v) };
                }
            }
            j += sn;
        }
        m += sm;
    }
}

/// Dispatches one Q8 block to the AVX2 kernel of its shape.
///
/// # Safety
/// AVX2 and FMA present; weight rows `n..n+sn` and activation rows `m0..m0+sm` exist.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_block_avx2(
    part: &CpuWeight,
    n: usize,
    a: &q8::Q8Activations,
    gsum: &[f32],
    m0: usize,
    sm: usize,
    sn: usize,
    res: &mut [[f32; 4]; 4],
) {
    use q8::avx2::{int4_block, int8_block};
    match (part, sm, sn) {
        (CpuWeight::Int4(w), 4, 2) => int4_block::<4, 2>(w, n, a, gsum, m0, res),
        (CpuWeight::Int4(w), 4, 1) => int4_block::<4, 1>(w, n, a, gsum, m0, res),
        (CpuWeight::Int4(w), 1, 4) => int4_block::<1, 4>(w, n, a, gsum, m0, res),
        (CpuWeight::Int4(w), 1, 2) => int4_block::<1, 2>(w, n, a, gsum, m0, res),
        (CpuWeight::Int4(w), 1, 1) => int4_block::<1, 1>(w, n, a, gsum, m0, res),
        (CpuWeight::Int8(w), 4, 2) => int8_block::<4, 2>(w, n, a, m0, res),
        (CpuWeight::Int8(w), 4, 1) => int8_block::<4, 1>(w, n, a, m0, res),
        (CpuWeight::Int8(w), 1, 4) => int8_block::<1, 4>(w, n, a, m0, res),
        (CpuWeight::Int8(w), 1, 2) => int8_block::<1, 2>(w, n, a, m0, res),
        (CpuWeight::Int8(w), 1, 1) => int8_block::<1, 1>(w, n, a, m0, res),
        _ => unreachable!("Q8 blocks are 4×{{1,2}} or 1×{{1,2,4}} over INT4/INT8 parts"),
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM path

/// One GEMM task: weight rows `r0 .. r0+nr` (≤ TILE_ROWS) of `part` against the task's
/// activation rows. `xsrc` is `xd` for INT4 parts and `x` otherwise (the dequantized tile is in
/// the matching order). `buf` is a `[TILE_ROWS, TILE_K]` scratch tile.
#[allow(clippy::too_many_arguments)]
fn gemm_task(isa: Isa, part: &CpuWeight, r0: usize, nr: usize, xsrc: &[f32], k: usize, tile: &Tile, buf: &mut [f32]) {
    for kb in (0..k).step_by(TILE_K) {
        let kl = TILE_K.min(k - kb);
        dequant_tile(isa, part, r0, nr, kb, kl, buf);
        let mut m = 0;
        while m < tile.mr {
            let sm = (tile.mr - m).min(3);
            let xrow0 = (tile.m0 + m) * k + kb;
            for quad in 0..TILE_ROWS / 4 {
                if quad * 4 >= nr {
                    break;
                }
                let wq = &buf[quad * 4 * TILE_K..];
                let mut res = [[0f32; 4]; 3];
                match (isa, sm) {
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx2Fma, 3) => unsafe { avx2::micro::<3>(xsrc, xrow0, k, wq, kl, &mut res) },
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx2Fma, 2) => unsafe { avx2::micro::<2>(xsrc, xrow0, k, wq, kl, &mut res) },
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx2Fma, 1) => unsafe { avx2::micro::<1>(xsrc, xrow0, k, wq, kl, &mut res) },
                    _ => portable_micro(sm, xsrc, xrow0, k, wq, kl, &mut res),
                }
                for (mi, row) in res.iter().enumerate().take(sm) {
                    for (ni, &v) in row.iter().enumerate() {
                        let j = quad * 4 + ni;
                        if j < nr {
                            // SAFETY: m + mi < mr and j < nr: inside this task's tile.
                            unsafe {
                                if kb == 0 {
                                    tile.store(m + mi, j, v)
                                } else {
                                    tile.add(m + mi, j, v)
                                }
                            }
                        }
                    }
                }
            }
            m += sm;
        }
    }
}

/// Dequantizes rows `r0 .. r0+nr`, inputs `kb .. kb+kl` of `part` into `buf[j · TILE_K + i]`
/// (INT4 in `xd` order, others in natural order); rows `nr..TILE_ROWS` are zeroed.
fn dequant_tile(isa: Isa, part: &CpuWeight, r0: usize, nr: usize, kb: usize, kl: usize, buf: &mut [f32]) {
    for j in 0..TILE_ROWS {
        let dst = &mut buf[j * TILE_K..j * TILE_K + kl];
        if j < nr {
            dequant_row(isa, part, r0 + j, kb, kl, dst);
        } else {
            dst.fill(0.0);
        }
    }
}

/// Row `n`, inputs `kb .. kb+kl`, dequantized into `dst` (INT4: `s·q + m` in `xd` order;
/// INT8: `s·q`, exact; dense: copied).
fn dequant_row(isa: Isa, part: &CpuWeight, n: usize, kb: usize, kl: usize, dst: &mut [f32]) {
    match part {
        CpuWeight::Int4(w) => match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { avx2::dequant_int4_row(w, n, kb, kl, dst) },
            _ => portable_dequant_int4_row(w, n, kb, kl, dst),
        },
        CpuWeight::Int8(w) => {
            let gpr = w.cols / INT8_GROUP;
            let q = &w.q[n * w.cols + kb..n * w.cols + kb + kl];
            for (c, (d, &qv)) in dst.iter_mut().zip(q).enumerate() {
                *d = w.scales[n * gpr + (kb + c) / INT8_GROUP] * qv as f32;
            }
        }
        CpuWeight::Dense(w) => dst.copy_from_slice(&w.data[n * w.cols + kb..n * w.cols + kb + kl]),
    }
}

/// INT4 row `n`, inputs `kb..kb+kl`, as `s·q + m` in `xd` order.
fn portable_dequant_int4_row(w: &CpuInt4, n: usize, kb: usize, kl: usize, dst: &mut [f32]) {
    let gpr = w.cols / w.group;
    for c in (0..kl).step_by(32) {
        let e = kb + c;
        let gi = n * gpr + e / w.group;
        let (s, m) = (w.scales[gi], w.mins[gi]);
        let bytes = &w.packed[(n * w.cols + e) / 2..(n * w.cols + e) / 2 + 16];
        for i in 0..16 {
            dst[c + i] = s * (bytes[i] & 0x0f) as f32 + m;
            dst[c + 16 + i] = s * (bytes[i] >> 4) as f32 + m;
        }
    }
}

/// Portable micro-kernel: `res[i][j] = Σ_c x[row0 + i·ld + c] · wq[j · TILE_K + c]`.
fn portable_micro(mr: usize, x: &[f32], row0: usize, ld: usize, wq: &[f32], kl: usize, res: &mut [[f32; 4]; 3]) {
    for (i, r) in res.iter_mut().enumerate().take(mr) {
        for (j, v) in r.iter_mut().enumerate() {
            *v = portable_dot(&x[row0 + i * ld..row0 + i * ld + kl], &wq[j * TILE_K..j * TILE_K + kl]);
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
#[allow(clippy::needless_range_loop)] // register arrays indexed by const-bounded loops read clearest
mod avx2 {
    //! AVX2 + FMA micro-kernels. Callers guarantee the CPU has both (checked by [`Isa::detect`]).

    use std::arch::x86_64::*;

    use super::{CpuInt4, CpuWeight};
    use crate::backend::cpu::simd::hsum;
    use crate::quant::INT8_GROUP;

    /// Unpacks one 32-element chunk of nibbles (16 bytes at `p`) into four 8-lane f32 vectors
    /// in `xd` order: elements (0,2,…,14), (16,…,30), (1,…,15), (17,…,31).
    #[inline(always)]
    unsafe fn unpack_chunk(p: *const u8) -> [__m256; 4] {
        let mask = _mm_set1_epi8(0x0f);
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
        ]
    }

    /// GEMV block: `res[j] = Σ_blocks hsum(Σ_c x[c..c+8] · w[n+j, c..c+8])` for `j < NR`,
    /// dequantizing in registers (INT4: `fma(q, s, m)`, as the GEMM tile fill does; INT8:
    /// `q·s`, exact), one 8-lane accumulator per row FMA-ed in input order.
    ///
    /// # Safety
    /// AVX2 and FMA present; rows `n..n+NR` exist in `part`; `x.len()` equals its columns.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv<const NR: usize>(part: &CpuWeight, n: usize, x: &[f32], res: &mut [f32; 8]) {
        let k = x.len();
        let xp = x.as_ptr();
        let mut total = [0f32; NR];
        for kb in (0..k).step_by(super::TILE_K) {
            let end = (kb + super::TILE_K).min(k);
            let mut acc = [_mm256_setzero_ps(); NR];
            match part {
                CpuWeight::Int4(w) => {
                    // One base pointer per array and a row stride keep the loop's pointer
                    // arithmetic in a few registers (separate row pointers spill).
                    let gpr = k / w.group;
                    let rows = w.packed.as_ptr().add(n * k / 2);
                    let scales = w.scales.as_ptr().add(n * gpr);
                    let mins = w.mins.as_ptr().add(n * gpr);
                    let row_stride = k / 2;
                    // Group by group (TILE_K is a multiple of every group size): no division.
                    for g in kb / w.group..end / w.group {
                        for e in (g * w.group..(g + 1) * w.group).step_by(32) {
                            let xv = [
                                _mm256_loadu_ps(xp.add(e)),
                                _mm256_loadu_ps(xp.add(e + 8)),
                                _mm256_loadu_ps(xp.add(e + 16)),
                                _mm256_loadu_ps(xp.add(e + 24)),
                            ];
                            for j in 0..NR {
                                let s = _mm256_broadcast_ss(&*scales.add(j * gpr + g));
                                let m = _mm256_broadcast_ss(&*mins.add(j * gpr + g));
                                let q = unpack_chunk(rows.add(j * row_stride + e / 2));
                                for i in 0..4 {
                                    acc[j] = _mm256_fmadd_ps(xv[i], _mm256_fmadd_ps(q[i], s, m), acc[j]);
                                }
                            }
                        }
                    }
                }
                CpuWeight::Int8(w) => {
                    let gpr = k / INT8_GROUP;
                    for e in (kb..end).step_by(32) {
                        for j in 0..NR {
                            let s = _mm256_set1_ps(*w.scales.get_unchecked((n + j) * gpr + e / INT8_GROUP));
                            let b = _mm256_loadu_si256(w.q.as_ptr().add((n + j) * k + e) as *const __m256i);
                            let (lo, hi) = (_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
                            let q = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                            for i in 0..4 {
                                let wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[i])), s);
                                acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(e + 8 * i)), wv, acc[j]);
                            }
                        }
                    }
                }
                CpuWeight::Dense(w) => {
                    for e in (kb..end).step_by(8) {
                        let xv = _mm256_loadu_ps(xp.add(e));
                        for j in 0..NR {
                            let wv = _mm256_loadu_ps(w.data.as_ptr().add((n + j) * k + e));
                            acc[j] = _mm256_fmadd_ps(xv, wv, acc[j]);
                        }
                    }
                }
            }
            for j in 0..NR {
                let block = hsum(acc[j]);
                total[j] = if kb == 0 { block } else { total[j] + block };
            }
        }
        res[..NR].copy_from_slice(&total);
    }

    /// Multi-row GEMV: weight row `n` against the `MR` activation rows `x[m0 .. m0+MR]` (row
    /// stride `k`): `res[i] = Σ_blocks hsum(Σ_c x[m0+i, c..c+8] · w[n, c..c+8])`. Each chunk
    /// of the weight row is dequantized once, in registers, and used for all `MR` rows (sibling
    /// batches: one weight read, `MR` dot products). Per output it performs exactly the
    /// operations of [`gemv`] in the same order, so results are bit-identical to it. INT4 and
    /// INT8 parts only.
    ///
    /// # Safety
    /// AVX2 and FMA present; row `n` exists in `part`, which is INT4 or INT8; `x` holds rows
    /// `m0 .. m0+MR` of `k` columns, `k` the part's columns.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_rows<const MR: usize>(
        part: &CpuWeight,
        n: usize,
        x: &[f32],
        m0: usize,
        k: usize,
        res: &mut [f32; 8],
    ) {
        let xp: [*const f32; MR] = std::array::from_fn(|i| x.as_ptr().add((m0 + i) * k));
        let mut total = [0f32; MR];
        for kb in (0..k).step_by(super::TILE_K) {
            let end = (kb + super::TILE_K).min(k);
            let mut acc = [_mm256_setzero_ps(); MR];
            match part {
                CpuWeight::Int4(w) => {
                    let gpr = k / w.group;
                    let row = w.packed.as_ptr().add(n * k / 2);
                    for g in kb / w.group..end / w.group {
                        let s = _mm256_broadcast_ss(&*w.scales.as_ptr().add(n * gpr + g));
                        let m = _mm256_broadcast_ss(&*w.mins.as_ptr().add(n * gpr + g));
                        for e in (g * w.group..(g + 1) * w.group).step_by(32) {
                            let q = unpack_chunk(row.add(e / 2));
                            let wv: [__m256; 4] = std::array::from_fn(|i| _mm256_fmadd_ps(q[i], s, m));
                            for i in 0..4 {
                                for r in 0..MR {
                                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(e + 8 * i)), wv[i], acc[r]);
                                }
                            }
                        }
                    }
                }
                CpuWeight::Int8(w) => {
                    let gpr = k / INT8_GROUP;
                    for e in (kb..end).step_by(32) {
                        let s = _mm256_set1_ps(*w.scales.get_unchecked(n * gpr + e / INT8_GROUP));
                        let b = _mm256_loadu_si256(w.q.as_ptr().add(n * k + e) as *const __m256i);
                        let (lo, hi) = (_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
                        let q = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                        let wv: [__m256; 4] =
                            std::array::from_fn(|i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[i])), s));
                        for i in 0..4 {
                            for r in 0..MR {
                                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp[r].add(e + 8 * i)), wv[i], acc[r]);
                            }
                        }
                    }
                }
                CpuWeight::Dense(_) => unreachable!("callers pass INT4 or INT8 parts"),
            }
            for r in 0..MR {
                let block = hsum(acc[r]);
                total[r] = if kb == 0 { block } else { total[r] + block };
            }
        }
        res[..MR].copy_from_slice(&total);
    }

    /// INT4 row `n`, inputs `kb..kb+kl`, as `s·q + m` in `xd` order (GEMM tile fill).
    ///
    /// # Safety
    /// AVX2 and FMA present; row `n` exists; `kb`, `kl` multiples of 32 inside the row;
    /// `dst.len() >= kl`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_int4_row(w: &CpuInt4, n: usize, kb: usize, kl: usize, dst: &mut [f32]) {
        let gpr = w.cols / w.group;
        let row = w.packed.as_ptr().add(n * w.cols / 2);
        let d = dst.as_mut_ptr();
        for c in (0..kl).step_by(32) {
            let e = kb + c;
            let gi = n * gpr + e / w.group;
            let s = _mm256_set1_ps(*w.scales.get_unchecked(gi));
            let m = _mm256_set1_ps(*w.mins.get_unchecked(gi));
            let wv = unpack_chunk(row.add(e / 2));
            for (i, v) in wv.iter().enumerate() {
                _mm256_storeu_ps(d.add(c + 8 * i), _mm256_fmadd_ps(*v, s, m));
            }
        }
    }

    /// GEMM micro-kernel: `res[i][j] = Σ_{c<kl} x[row0 + i·ld + c] · wq[j·TILE_K + c]` for
    /// `i < MR ≤ 3`, `j < 4`. 12 accumulators; per 8 inputs, MR + 4 loads and 4·MR FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA present; `kl` a multiple of 8; the rows lie inside `x` and `wq`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro<const MR: usize>(
        x: &[f32],
        row0: usize,
        ld: usize,
        wq: &[f32],
        kl: usize,
        res: &mut [[f32; 4]; 3],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        let xp: [*const f32; MR] = std::array::from_fn(|i| x.as_ptr().add(row0 + i * ld));
        let wp: [*const f32; 4] = std::array::from_fn(|j| wq.as_ptr().add(j * super::TILE_K));
        let mut c = 0;
        while c < kl {
            let wv: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(wp[j].add(c)));
            for i in 0..MR {
                let xv = _mm256_loadu_ps(xp[i].add(c));
                for j in 0..4 {
                    acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
            c += 8;
        }
        for i in 0..MR {
            for j in 0..4 {
                res[i][j] = hsum(acc[i][j]);
            }
        }
    }
}
