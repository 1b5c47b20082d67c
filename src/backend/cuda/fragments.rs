//! Host repacking of weights into the tensor-core fragment layout that
//! `kernels/int4_matmul.cu` reads (its header is the specification; this is its host half).
//!
//! The weights `W[rows, cols]` are cut into 16 × 16 tiles, row block `rb` (16 output rows) by
//! k-tile `kt` (16 inputs). Lane `l = 4g + t` of a warp holds the `mma.m16n8k16` A fragment of a
//! tile: the eight elements `(row, input) = (g + 8h, 2t + 8c + p)` for row-half `h`, input-half
//! `c` and pair member `p` (each 0 or 1).
//!
//! - INT4: one u32 per lane and tile, element `(h, c, p)` in nibble `h + 2c + 4p`; four
//!   consecutive k-tiles make one `uint4` per lane: `qweight [rows/16, cols/64, 32, 4]` u32.
//!   Scales and mins follow the row blocks as f32 quads `(s[g], s[g+8], m[g], m[g+8])`:
//!   `scale_min [rows/16, cols/group, 8, 4]`.
//! - f16: one `uint4` (8 halves) per lane and tile, element `(h, c, p)` at half
//!   `2(h + 2c) + p`: `w [rows/16, cols/16, 32, 8]` f16.
//!
//! Rows are padded with zeros to a multiple of 16 and inputs to a multiple of 64 (padded scales
//! and mins are 0, so padded weights are exactly 0).

use half::f16;
use rayon::prelude::*;

use crate::quant::{F16Matrix, Int4Matrix};

/// Output rows per row block.
pub const BLOCK_ROWS: usize = 16;
/// Inputs are padded to a multiple of this (one INT4 `uint4` per lane covers 64 inputs).
pub const INPUT_ALIGN: usize = 64;
/// f32 values of `scale_min` per row block and group: 8 quads.
pub const SCALE_MIN_PER_GROUP: usize = 8 * 4;

/// `cols` rounded up to [`INPUT_ALIGN`]: the `kp` the kernels take.
pub fn padded_inputs(cols: usize) -> usize {
    cols.div_ceil(INPUT_ALIGN) * INPUT_ALIGN
}

/// Where element `(row, input)` lives: `(row block, k-tile, lane, h + 2c, p)`.
pub fn fragment_position(row: usize, input: usize) -> (usize, usize, usize, usize, usize) {
    let (rb, i) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
    let (kt, kk) = (input / 16, input % 16);
    let (g, h) = (i % 8, i / 8);
    let (c, j) = (kk / 8, kk % 8);
    let (t, p) = (j / 2, j % 2);
    (rb, kt, 4 * g + t, h + 2 * c, p)
}

/// Walks the element pairs `(p = 0, p = 1)` of row block `rb` that lie inside a
/// `rows × cols` matrix: `f(kt, lane, h + 2c, row, first input)` for every k-tile of
/// `padded_inputs(cols)`, lane `4g + t` and half pair `(h, c)`, where `row = 16·rb + g + 8h`
/// and the pair is inputs `16·kt + 2t + 8c` and the next. Padding positions are skipped (the
/// repacked buffers start zeroed).
fn for_each_pair(rb: usize, rows: usize, cols: usize, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
    for kt in 0..padded_inputs(cols) / 16 {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for hc in 0..4 {
                let (h, c) = (hc % 2, hc / 2);
                let (row, input) = (rb * BLOCK_ROWS + g + 8 * h, kt * 16 + 2 * t + 8 * c);
                if row < rows && input < cols {
                    f(kt, lane, hc, row, input);
                }
            }
        }
    }
}

/// An INT4 matrix in the fragment layout.
pub struct Int4Fragments {
    /// `[rows/16, kp/64, 32, 4]` u32 (rows and kp padded).
    pub qweight: Vec<u32>,
    /// `[rows/16, kp/group, 8, 4]` f32: for row block `rb`, group `gi` and `g` in 0..8 the
    /// quad `(s[g], s[g+8], m[g], m[g+8])` of its rows `16·rb + g` and `16·rb + g + 8`
    /// (w = s·q + m; the f16 scales are exact in f32): one 16-byte load gives a lane of the
    /// kernel all it needs at a group's end.
    pub scale_min: Vec<f32>,
    /// Inputs padded to [`INPUT_ALIGN`].
    pub kp: usize,
}

/// Repacks canonical INT4 (`packed [rows, cols/2]`, element 2i in the low nibble of byte i;
/// `scales`, `mins [rows, cols/group]`) into the fragment layout. `cols` is even and a multiple
/// of `group` (the canonical form's invariants), so the pair `(p = 0, p = 1)` of a fragment
/// element is one canonical byte.
pub fn int4_fragments(m: &Int4Matrix) -> Int4Fragments {
    let (rows, cols, group) = (m.rows, m.cols, m.group);
    let kp = padded_inputs(cols);
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let (chunks, groups, kgroups) = (kp / 64, kp / group, cols / group);
    let words_per_block = chunks * 32 * 4;
    let mut qweight = vec![0u32; blocks * words_per_block];
    qweight
        .par_chunks_mut(words_per_block)
        .enumerate()
        .for_each(|(rb, out)| {
            for_each_pair(rb, rows, cols, |kt, lane, hc, row, input| {
                // Inputs `input` (low nibble) and `input + 1` (high nibble): p = 0 and 1.
                let byte = m.packed[(row * cols + input) / 2] as u32;
                out[((kt / 4) * 32 + lane) * 4 + kt % 4] |= (byte & 0xf) << (4 * hc) | (byte >> 4) << (4 * (hc + 4));
            })
        });
    // Quad (s[g], s[g+8], m[g], m[g+8]) of row block rb, group gi, g = row % 8 at
    // ((rb·groups + gi)·8 + g)·4; element h or 2 + h for row-half h = (row % 16) / 8.
    let mut scale_min = vec![0f32; blocks * groups * SCALE_MIN_PER_GROUP];
    for row in 0..rows {
        let (rb, i) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
        let (g, h) = (i % 8, i / 8);
        for gi in 0..kgroups {
            let at = ((rb * groups + gi) * 8 + g) * 4;
            scale_min[at + h] = m.scales[row * kgroups + gi].to_f32();
            scale_min[at + 2 + h] = m.mins[row * kgroups + gi];
        }
    }
    Int4Fragments { qweight, scale_min, kp }
}

/// Repacks a row-major f16 matrix into the fragment layout: `[rows/16, kp/16, 32, 8]` f16.
pub fn f16_fragments(m: &F16Matrix) -> (Vec<f16>, usize) {
    let (rows, cols) = (m.rows, m.cols);
    let kp = padded_inputs(cols);
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let per_block = (kp / 16) * 32 * 8;
    let mut out = vec![f16::ZERO; blocks * per_block];
    out.par_chunks_mut(per_block).enumerate().for_each(|(rb, out)| {
        for_each_pair(rb, rows, cols, |kt, lane, hc, row, input| {
            // cols is a multiple of 32, so input + 1 < cols too.
            let at = (kt * 32 + lane) * 8 + 2 * hc;
            out[at] = m.data[row * cols + input];
            out[at + 1] = m.data[row * cols + input + 1];
        })
    });
    (out, kp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int4(rows: usize, cols: usize, group: usize) -> Int4Matrix {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Int4Matrix::quantize_rtn(rows, cols, group, &values).unwrap()
    }

    /// Every element read back through [`fragment_position`] (the index the embedding kernels
    /// and the spec use) is the canonical one, and padding is zero.
    #[test]
    fn int4_fragments_hold_every_element_where_the_kernels_read_it() {
        for &(rows, cols, group) in &[(37, 1088, 64), (16, 64, 32), (5, 32, 32), (40, 256, 128)] {
            let m = int4(rows, cols, group);
            let f = int4_fragments(&m);
            assert_eq!(f.kp, padded_inputs(cols));
            let blocks = rows.div_ceil(16);
            assert_eq!(f.qweight.len(), blocks * f.kp / 64 * 128);
            let nibble = |row: usize, input: usize| {
                let (rb, kt, lane, hc, p) = fragment_position(row, input);
                let word = f.qweight[((rb * (f.kp / 64) + kt / 4) * 32 + lane) * 4 + kt % 4];
                (word >> (4 * (hc + 4 * p))) & 0xf
            };
            for row in 0..blocks * 16 {
                for input in 0..f.kp {
                    let want = if row < rows && input < cols {
                        let byte = m.packed[(row * cols + input) / 2];
                        (if input % 2 == 0 { byte & 0xf } else { byte >> 4 }) as u32
                    } else {
                        0
                    };
                    assert_eq!(nibble(row, input), want, "({row}, {input}) of {rows}×{cols}");
                }
            }
            let groups = f.kp / group;
            assert_eq!(f.scale_min.len(), blocks * groups * SCALE_MIN_PER_GROUP);
            for row in 0..blocks * 16 {
                for gi in 0..groups {
                    let (i, rb) = (row % 16, row / 16);
                    let at = ((rb * groups + gi) * 8 + i % 8) * 4 + i / 8;
                    let (s, mn) = if row < rows && gi < cols / group {
                        (
                            m.scales[row * (cols / group) + gi].to_f32(),
                            m.mins[row * (cols / group) + gi],
                        )
                    } else {
                        (0.0, 0.0)
                    };
                    assert_eq!((f.scale_min[at], f.scale_min[at + 2]), (s, mn), "row {row} group {gi}");
                }
            }
        }
    }

    #[test]
    fn f16_fragments_hold_every_element_where_the_kernels_read_it() {
        let (rows, cols) = (21, 96);
        let data: Vec<f16> = (0..rows * cols).map(|i| f16::from_f32(i as f32)).collect();
        let m = F16Matrix::new(rows, cols, data).unwrap();
        let (f, kp) = f16_fragments(&m);
        assert_eq!(kp, 128);
        for row in 0..32 {
            for input in 0..kp {
                let (rb, kt, lane, hc, p) = fragment_position(row, input);
                let got = f[((rb * (kp / 16) + kt) * 32 + lane) * 8 + 2 * hc + p];
                let want = if row < rows && input < cols {
                    f16::from_f32((row * cols + input) as f32)
                } else {
                    f16::ZERO
                };
                assert_eq!(got, want, "({row}, {input})");
            }
        }
    }
}
