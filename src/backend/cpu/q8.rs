//! The CPU's 8-bit-activation matmul ([`MatmulPrecision::Q8`](super::MatmulPrecision)): a
//! faster path beside the f32 reference, never replacing it in tests.
//!
//! Activations are quantized per 32-element chunk, as llama.cpp's Q8 does:
//! `d = max|x| / 127`, `xq = round(x / d) ∈ −127..=127`, plus the chunk's sum `d · Σ xq`. A
//! weight row's chunk then meets `xq` in an exact integer dot product (`maddubs` + `madd` on
//! AVX2: 8 lanes of 4 products each), scaled once:
//!
//! ```text
//!     INT4:  Σ_c w·x ≈ Σ_chunks s_w[g]·d_x · Σ q_w·xq   +   Σ_groups m_w[g] · Σ_{c∈g} d_x·Σ xq
//!     INT8:  Σ_c w·x ≈ Σ_chunks s_w[c]·d_x · Σ q_w·xq
//! ```
//!
//! Float work per output: 8-lane FMA accumulation of `float(lanes) · (s_w·d_x)` in chunk
//! order, a fixed horizontal-sum tree, plus (INT4) the min term, a sequential fused
//! multiply-add over groups of `m_w[g]` and the group's quantized activation sum.
//! The integer part is exact, and every float step is the same whatever the batch shape and
//! whichever instruction set runs it (the portable kernel uses `mul_add` and the same sum
//! tree), so this path is batch-invariant and gives identical bits on every ISA. Its only
//! approximation is the 8-bit rounding of activations (≤ d/2 per element).
//!
//! INT4 weights meet activations in the de-interleaved order of [`super::matmul`] (low
//! nibbles = even elements first), so a chunk's 16 bytes become one 32-byte vector with a mask
//! and a shift. Dense weights have no integer form and use the f32 kernels.

use super::matmul::{CpuInt4, CpuInt8};
use super::simd::hsum8;
use crate::quant::INT8_GROUP;

/// Chunk of activations sharing one quantization scale.
pub(crate) const QK: usize = 32;

/// Activations quantized for the Q8 kernels, `T` rows of `K`.
pub(crate) struct Q8Activations {
    /// `[T, K]` i8, in the order the weights meet them (de-interleaved for INT4).
    pub q: Vec<i8>,
    /// `[T, K/32]` scale per chunk.
    pub d: Vec<f32>,
    /// `[T, K/32]` each chunk's sum as quantized, `d · Σ xq`.
    pub sum: Vec<f32>,
}

impl Q8Activations {
    /// Per-group sums `[T, K/group]`, each the sequential f32 sum of its chunks' sums (the INT4
    /// min term's right-hand side).
    pub fn group_sums(&self, group: usize) -> Vec<f32> {
        let per = group / QK;
        self.sum
            .chunks_exact(per)
            .map(|c| c.iter().skip(1).fold(c[0], |a, &v| a + v))
            .collect()
    }
}

/// Quantizes `x` (`[T, K]`, K a multiple of 32) per 32-element chunk.
pub(crate) fn quantize(x: &[f32]) -> Q8Activations {
    let chunks = x.len() / QK;
    let mut q = vec![0i8; x.len()];
    let mut d = Vec::with_capacity(chunks);
    let mut sum = Vec::with_capacity(chunks);
    for (src, dst) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
        let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        d.push(scale);
        // The min term uses the quantized activations too, so the whole dot product is that of
        // the rounded activations: its error is Σ w·δ (δ the rounding), not the larger
        // Σ (w − m)·δ that mixing exact and rounded activations would give.
        sum.push(scale * dst.iter().map(|&v| v as i32).sum::<i32>() as f32);
    }
    Q8Activations { q, d, sum }
}

/// Portable INT4 × Q8 for weight row `n` against one activation row (`xq`, `d`, group sums
/// `gsum`): exactly the AVX2 kernel's arithmetic.
pub(crate) fn portable_int4_dot(w: &CpuInt4, n: usize, xq: &[i8], d: &[f32], gsum: &[f32]) -> f32 {
    let k = w.cols;
    let gpr = k / w.group;
    let row = &w.packed[n * k / 2..(n + 1) * k / 2];
    let mut lanes = [0f32; 8];
    let mut min_acc = 0f32;
    for e in (0..k).step_by(QK) {
        let c = e / QK;
        let bytes = &row[e / 2..e / 2 + 16];
        // Byte b of the 32-byte weight vector: low nibbles (b < 16), then high nibbles.
        let qw = |b: usize| -> i32 {
            if b < 16 {
                (bytes[b] & 0x0f) as i32
            } else {
                (bytes[b - 16] >> 4) as i32
            }
        };
        let t = w.scales[n * gpr + e / w.group] * d[c];
        for (l, lane) in lanes.iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4).map(|b| qw(b) * xq[e + b] as i32).sum();
            *lane = (p as f32).mul_add(t, *lane);
        }
        if (e + QK) % w.group == 0 {
            let g = e / w.group;
            min_acc = w.mins[n * gpr + g].mul_add(gsum[g], min_acc);
        }
    }
    hsum8(&lanes) + min_acc
}

/// Portable INT8 × Q8 for weight row `n`.
pub(crate) fn portable_int8_dot(w: &CpuInt8, n: usize, xq: &[i8], d: &[f32]) -> f32 {
    let k = w.cols;
    let gpr = k / INT8_GROUP;
    let row = &w.q[n * k..(n + 1) * k];
    let mut lanes = [0f32; 8];
    for (c, &dc) in d.iter().enumerate().take(gpr) {
        let t = w.scales[n * gpr + c] * dc;
        for (l, lane) in lanes.iter_mut().enumerate() {
            let p: i32 = (c * QK + 4 * l..c * QK + 4 * l + 4)
                .map(|b| row[b] as i32 * xq[b] as i32)
                .sum();
            *lane = (p as f32).mul_add(t, *lane);
        }
    }
    hsum8(&lanes)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register arrays indexed by const-bounded loops read clearest
pub(crate) mod avx2 {
    //! AVX2 Q8 kernels: `MR` activation rows × `NR` weight rows per call, each weight chunk
    //! unpacked once and each activation chunk loaded once.

    use std::arch::x86_64::*;

    use super::{Q8Activations, QK};
    use crate::backend::cpu::matmul::{CpuInt4, CpuInt8};
    use crate::backend::cpu::simd::hsum;
    use crate::quant::INT8_GROUP;

    /// `res[i][j] = row (m0+i) · weight row (n+j)` for INT4 weights, without the min term.
    ///
    /// Per chunk: each weight row's 16 bytes become one 32-byte vector (mask and shift), each
    /// activation row's 32 bytes are loaded once, and every (row, row) pair costs `maddubs`,
    /// `madd`, a conversion and an FMA with `s_w · d_x` (a lane-wise product of two broadcasts,
    /// the same rounding as the scalar product).
    ///
    /// # Safety
    /// AVX2 and FMA present; rows exist; `a` holds rows `m0..m0+MR` of `w.cols`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn int4_block<const MR: usize, const NR: usize>(
        w: &CpuInt4,
        n: usize,
        a: &Q8Activations,
        gsum: &[f32],
        m0: usize,
        res: &mut [[f32; 4]; 4],
    ) {
        let k = w.cols;
        let (gpr, cpr) = (k / w.group, k / QK);
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut min_acc = [[0f32; NR]; MR];
        let rows = w.packed.as_ptr().add(n * k / 2);
        let scales = w.scales.as_ptr().add(n * gpr);
        let mins = w.mins.as_ptr().add(n * gpr);
        let xq = a.q.as_ptr().add(m0 * k);
        let dx = a.d.as_ptr().add(m0 * cpr);
        let gs = gsum.as_ptr().add(m0 * gpr);
        for e in (0..k).step_by(QK) {
            let (c, g) = (e / QK, e / w.group);
            let mut q = [_mm256_setzero_si256(); NR];
            for j in 0..NR {
                let b = _mm_loadu_si128(rows.add(j * k / 2 + e / 2) as *const __m128i);
                q[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), mask);
            }
            for i in 0..MR {
                let x = _mm256_loadu_si256(xq.add(i * k + e) as *const __m256i);
                let d = _mm256_broadcast_ss(&*dx.add(i * cpr + c));
                for j in 0..NR {
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], x), ones);
                    let sd = _mm256_mul_ps(_mm256_broadcast_ss(&*scales.add(j * gpr + g)), d);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sd, acc[i][j]);
                }
            }
            // After a group's last chunk: the min term, one fused multiply-add per output.
            if (e + QK) % w.group == 0 {
                for i in 0..MR {
                    let x = *gs.add(i * gpr + g);
                    for j in 0..NR {
                        min_acc[i][j] = (*mins.add(j * gpr + g)).mul_add(x, min_acc[i][j]);
                    }
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                res[i][j] = hsum(acc[i][j]) + min_acc[i][j];
            }
        }
    }

    /// `res[i][j] = row (m0+i) · weight row (n+j)` for grouped INT8 weights (signed × signed
    /// through `maddubs(|w|, sign(x, w))`).
    ///
    /// # Safety
    /// AVX2 and FMA present; rows exist; `a` holds rows `m0..m0+MR` of `w.cols`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn int8_block<const MR: usize, const NR: usize>(
        w: &CpuInt8,
        n: usize,
        a: &Q8Activations,
        m0: usize,
        res: &mut [[f32; 4]; 4],
    ) {
        let k = w.cols;
        let cpr = k / INT8_GROUP;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        for c in 0..cpr {
            let qw: [__m256i; NR] =
                std::array::from_fn(|j| _mm256_loadu_si256(w.q.as_ptr().add((n + j) * k + c * QK) as *const __m256i));
            for i in 0..MR {
                let xq = _mm256_loadu_si256(a.q.as_ptr().add((m0 + i) * k + c * QK) as *const __m256i);
                let d = _mm256_broadcast_ss(a.d.get_unchecked((m0 + i) * cpr + c));
                for j in 0..NR {
                    let p = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_sign_epi8(qw[j], qw[j]), _mm256_sign_epi8(xq, qw[j])),
                        ones,
                    );
                    let sd = _mm256_mul_ps(_mm256_broadcast_ss(w.scales.get_unchecked((n + j) * cpr + c)), d);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sd, acc[i][j]);
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                res[i][j] = hsum(acc[i][j]);
            }
        }
    }
}
