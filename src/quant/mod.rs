//! Weight matrices in the forms the backends read, and the dequant oracle tests compare against.
//!
//! # Canonical INT4 (the contract of DESIGN.md)
//!
//! A linear weight `W[out, in]` (row r holds the `in` weights that produce output r) is split
//! into groups of `g` consecutive input elements, `g ∈ {32, 64, 128}`. Each element is
//!
//! ```text
//!     w[r, c] = s[r, c / g] · q[r, c] + m[r, c / g]        q ∈ 0..=15
//! ```
//!
//! with `s` stored as f16 and `m` as f32 per (row, group). Host layout:
//!
//! * `packed: [out, in / 2]` u8 — element `2i` of a row in the low nibble of byte `i`, element
//!   `2i + 1` in the high nibble;
//! * `scales: [out, in / g]` f16, `mins: [out, in / g]` f32.
//!
//! This one form holds GGUF Q4_0 (`m = −8s`), Q4_1 (f16 min), GPTQ/AWQ (`m = −s·z`) and
//! round-to-nearest quantization exactly, so every loader converts into it without loss.
//!
//! # Grouped INT8 (qmtot's addition for GGUF Q8_0)
//!
//! `w[r, c] = s[r, c / 32] · q[r, c]`, `q ∈ −128..=127` stored as i8 `[out, in]`, `s` f16
//! `[out, in / 32]`. It holds Q8_0 exactly at 1.06 bytes per weight instead of f32's 4, which
//! matters for the tied embedding / lm_head of small models: on the CPU the logits matmul is
//! otherwise the single largest memory stream of a decode step.
//!
//! # Dense
//!
//! f32 `[out, in]` (float checkpoints at `--weights f32`, exact comparisons) or f16 `[out, in]`
//! (`--weights f16`, and the embeddings and lm_head of Hugging Face checkpoints).

use half::f16;

use crate::error::{Error, Result};

/// Group sizes the INT4 kernels are built for.
pub const INT4_GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// Group size of [`Int8Matrix`] (that of GGUF Q8_0).
pub const INT8_GROUP: usize = 32;

/// Canonical INT4 matrix; see the module doc for the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `[rows, cols / 2]` u8, element 2i in the low nibble of byte i.
    pub packed: Vec<u8>,
    /// `[rows, cols / group]` f16.
    pub scales: Vec<f16>,
    /// `[rows, cols / group]` f32.
    pub mins: Vec<f32>,
    /// GPTQ act-order: stored column `j` is input `input_order[j]` of the layer (a permutation
    /// of `0..cols`), so that scattered groups become contiguous. The layer computes
    /// `y = W_stored · x[input_order]`; `None` = the identity.
    pub input_order: Option<Vec<u32>>,
}

impl Int4Matrix {
    /// Checks that the buffers match the shape; every constructor of an `Int4Matrix` from
    /// outside data goes through here.
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        packed: Vec<u8>,
        scales: Vec<f16>,
        mins: Vec<f32>,
    ) -> Result<Self> {
        if !INT4_GROUP_SIZES.contains(&group) {
            return Err(Error::InvalidArgument(format!(
                "INT4 group size {group} is not one of {INT4_GROUP_SIZES:?}"
            )));
        }
        if cols % group != 0 {
            return Err(Error::InvalidArgument(format!(
                "INT4 matrix with {cols} columns is not a multiple of the group size {group}"
            )));
        }
        let groups = rows * (cols / group);
        if packed.len() != rows * cols / 2 || scales.len() != groups || mins.len() != groups {
            return Err(Error::InvalidArgument(format!(
                "INT4 buffers do not match [{rows}, {cols}] g{group}: packed {}, scales {}, mins {}",
                packed.len(),
                scales.len(),
                mins.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            group,
            packed,
            scales,
            mins,
            input_order: None,
        })
    }

    /// The matrix with its stored columns taken as inputs `order[j]` (see
    /// [`Int4Matrix::input_order`]); `order` must be a permutation of `0..cols`.
    pub fn with_input_order(mut self, order: Vec<u32>) -> Result<Self> {
        let mut seen = vec![false; self.cols];
        if order.len() != self.cols
            || order
                .iter()
                .any(|&c| (c as usize) >= self.cols || std::mem::replace(&mut seen[c as usize], true))
        {
            return Err(Error::InvalidArgument(format!(
                "input order of {} entries is not a permutation of {} columns",
                order.len(),
                self.cols
            )));
        }
        self.input_order = Some(order);
        Ok(self)
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// Nibble `q[r, c]`.
    pub fn q(&self, r: usize, c: usize) -> u8 {
        let byte = self.packed[r * self.cols / 2 + c / 2];
        if c % 2 == 0 {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// The dequant oracle: row `r` of the layer's `W` as f32, `s·q + m` evaluated in f32, each
    /// stored column put at its input (see [`Int4Matrix::input_order`]).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let gpr = self.groups_per_row();
        for c in 0..self.cols {
            let gi = r * gpr + c / self.group;
            let at = self.input_order.as_ref().map_or(c, |o| o[c] as usize);
            out[at] = self.scales[gi].to_f32() * self.q(r, c) as f32 + self.mins[gi];
        }
    }

    /// The matrix with row `r` taken from row `order[r]` (exact: rows move whole).
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        let (half, gpr) = (self.cols / 2, self.groups_per_row());
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(Error::InvalidArgument(format!(
                "select_rows: {} indices for {} rows",
                order.len(),
                self.rows
            )));
        }
        // Element indices of the chosen rows, `n` per row.
        let rows_of = |n: usize| order.iter().flat_map(move |&r| r * n..(r + 1) * n);
        let packed = rows_of(half).map(|i| self.packed[i]).collect();
        let scales = rows_of(gpr).map(|i| self.scales[i]).collect();
        let mins = rows_of(gpr).map(|i| self.mins[i]).collect();
        let m = Self::new(self.rows, self.cols, self.group, packed, scales, mins)?;
        match &self.input_order {
            Some(o) => m.with_input_order(o.clone()),
            None => Ok(m),
        }
    }

    /// Round-to-nearest asymmetric quantization of a dense row-major `[rows, cols]` matrix:
    /// per group, `s = (max − min) / 15`, `m = min`, `q = round((w − m) / s)`.
    pub fn quantize_rtn(rows: usize, cols: usize, group: usize, w: &[f32]) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::InvalidArgument(format!(
                "quantize: {} values for a [{rows}, {cols}] matrix",
                w.len()
            )));
        }
        if !INT4_GROUP_SIZES.contains(&group) || cols % group != 0 {
            return Err(Error::InvalidArgument(format!(
                "quantize: group {group} does not divide {cols} columns or is unsupported"
            )));
        }
        let gpr = cols / group;
        let mut packed = vec![0u8; rows * cols / 2];
        let mut scales = Vec::with_capacity(rows * gpr);
        let mut mins = Vec::with_capacity(rows * gpr);
        for r in 0..rows {
            for g in 0..gpr {
                let vals = &w[r * cols + g * group..r * cols + (g + 1) * group];
                let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = f16::from_f32((hi - lo) / 15.0);
                let sf = s.to_f32();
                scales.push(s);
                mins.push(lo);
                for (j, &v) in vals.iter().enumerate() {
                    let q = if sf > 0.0 {
                        ((v - lo) / sf).round().clamp(0.0, 15.0) as u8
                    } else {
                        0
                    };
                    let c = g * group + j;
                    packed[r * cols / 2 + c / 2] |= if c % 2 == 0 { q } else { q << 4 };
                }
            }
        }
        Self::new(rows, cols, group, packed, scales, mins)
    }
}

/// Grouped INT8 matrix (GGUF Q8_0 held exactly); see the module doc.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]` i8.
    pub q: Vec<i8>,
    /// `[rows, cols / 32]` f16.
    pub scales: Vec<f16>,
}

impl Int8Matrix {
    pub fn new(rows: usize, cols: usize, q: Vec<i8>, scales: Vec<f16>) -> Result<Self> {
        if cols % INT8_GROUP != 0 || q.len() != rows * cols || scales.len() != rows * cols / INT8_GROUP {
            return Err(Error::InvalidArgument(format!(
                "INT8 buffers do not match [{rows}, {cols}]: q {}, scales {}",
                q.len(),
                scales.len()
            )));
        }
        Ok(Self { rows, cols, q, scales })
    }

    /// The dequant oracle: row `r` as f32, `s·q` in f32.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let gpr = self.cols / INT8_GROUP;
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.scales[r * gpr + c / INT8_GROUP].to_f32() * self.q[r * self.cols + c] as f32;
        }
    }
}

/// Dense f32 matrix `[rows, cols]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl DenseMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::InvalidArgument(format!(
                "dense matrix [{rows}, {cols}] given {} values",
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }
}

/// Half-precision `[out, in]`: float checkpoints kept in f16 (`--weights f16`), and their
/// embeddings and lm_head. Backends may widen it (the CPU backend computes in f32).
#[derive(Clone, Debug, PartialEq)]
pub struct F16Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f16>,
}

impl F16Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f16>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::InvalidArgument(format!(
                "f16 matrix [{rows}, {cols}] given {} values",
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }
}

/// A linear layer's weight `W[out, in]` in one of the host forms above. Backends upload these
/// (repacking as they like); tests compare against [`WeightMatrix::dequant_row`].
#[derive(Clone, Debug, PartialEq)]
pub enum WeightMatrix {
    Int4(Int4Matrix),
    Int8(Int8Matrix),
    Dense(DenseMatrix),
    F16(F16Matrix),
}

impl WeightMatrix {
    pub fn rows(&self) -> usize {
        match self {
            WeightMatrix::Int4(m) => m.rows,
            WeightMatrix::Int8(m) => m.rows,
            WeightMatrix::Dense(m) => m.rows,
            WeightMatrix::F16(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            WeightMatrix::Int4(m) => m.cols,
            WeightMatrix::Int8(m) => m.cols,
            WeightMatrix::Dense(m) => m.cols,
            WeightMatrix::F16(m) => m.cols,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            WeightMatrix::Int4(_) => "int4",
            WeightMatrix::Int8(_) => "int8",
            WeightMatrix::Dense(_) => "f32",
            WeightMatrix::F16(_) => "f16",
        }
    }

    /// Bytes the weight takes in its host form.
    pub fn nbytes(&self) -> usize {
        match self {
            WeightMatrix::Int4(m) => m.packed.len() + m.scales.len() * 2 + m.mins.len() * 4,
            WeightMatrix::Int8(m) => m.q.len() + m.scales.len() * 2,
            WeightMatrix::Dense(m) => m.data.len() * 4,
            WeightMatrix::F16(m) => m.data.len() * 2,
        }
    }

    /// The dequant oracle: row `r` in f32.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        match self {
            WeightMatrix::Int4(m) => m.dequant_row(r, out),
            WeightMatrix::Int8(m) => m.dequant_row(r, out),
            WeightMatrix::Dense(m) => out.copy_from_slice(&m.data[r * m.cols..(r + 1) * m.cols]),
            WeightMatrix::F16(m) => {
                for (o, v) in out.iter_mut().zip(&m.data[r * m.cols..(r + 1) * m.cols]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// The whole matrix dequantized, `[rows, cols]` f32. For tests and reference paths only:
    /// the backends never hold a dequantized copy of INT4 weights.
    pub fn dequant(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_mut(cols.max(1)).enumerate().take(rows) {
            self.dequant_row(r, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtn_roundtrip_error_is_within_half_a_step() {
        let (rows, cols) = (3, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for g in INT4_GROUP_SIZES {
            let q = Int4Matrix::quantize_rtn(rows, cols, g, &w).unwrap();
            let back = WeightMatrix::Int4(q.clone()).dequant();
            for r in 0..rows {
                for c in 0..cols {
                    let s = q.scales[r * (cols / g) + c / g].to_f32();
                    // Half a quantization step, plus the f16 rounding of the scale (≤ 2^-11
                    // relative) accumulated over at most 15 steps.
                    let tol = 0.5 * s + 15.0 * s * 2f32.powi(-11) + 1e-6;
                    let (a, b) = (w[r * cols + c], back[r * cols + c]);
                    assert!((a - b).abs() <= tol, "r{r} c{c}: {a} vs {b} (tol {tol})");
                }
            }
        }
    }

    #[test]
    fn rtn_of_random_matrices_stays_within_the_analytic_bound() {
        // Per group: |w − ŵ| ≤ s/2 (rounding to the nearest level) + 15·s·2^-11 (the f16
        // rounding of s, accumulated over at most 15 levels); a constant group (s = 0) is
        // exact. Random matrices of several scales, a constant row, and each group size.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let (rows, cols) = (9, 384);
        for g in INT4_GROUP_SIZES {
            for scale in [1e-3f32, 0.05, 1.0, 40.0] {
                let mut w: Vec<f32> = (0..rows * cols).map(|_| scale * next()).collect();
                w[..cols].fill(0.25 * scale); // a constant row
                let q = Int4Matrix::quantize_rtn(rows, cols, g, &w).unwrap();
                let back = WeightMatrix::Int4(q.clone()).dequant();
                for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
                    let s = q.scales[(i / cols) * (cols / g) + (i % cols) / g].to_f32();
                    let tol = 0.5 * s + 15.0 * s * 2f32.powi(-11);
                    assert!(
                        (a - b).abs() <= tol,
                        "g{g} scale {scale} element {i}: {a} vs {b} (tol {tol})"
                    );
                    if i < cols {
                        assert_eq!(a, b, "a constant group is exact");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Int4Matrix::new(2, 48, 32, vec![0; 48], vec![f16::ZERO; 3], vec![0.0; 3]).is_err());
        assert!(Int4Matrix::new(2, 64, 16, vec![0; 64], vec![f16::ZERO; 8], vec![0.0; 8]).is_err());
        assert!(Int4Matrix::new(2, 64, 32, vec![0; 63], vec![f16::ZERO; 4], vec![0.0; 4]).is_err());
        assert!(Int8Matrix::new(2, 32, vec![0; 64], vec![f16::ZERO; 1]).is_err());
        assert!(DenseMatrix::new(2, 2, vec![0.0; 3]).is_err());
    }
}
