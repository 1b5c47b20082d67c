//! GGUF quantized block layouts, their dequant formulas as the GGUF spec states them, lossless
//! conversion into qmtot's canonical forms, and round-to-nearest quantizers (used to write
//! test models).
//!
//! Blocks of 32 elements:
//!
//! ```text
//! Q4_0  [d: f16][qs: 16 × u8]          x[j] = d·(lo(qs[j]) − 8),  x[j+16] = d·(hi(qs[j]) − 8)
//! Q4_1  [d: f16][m: f16][qs: 16 × u8]  x[j] = d·lo(qs[j]) + m,    x[j+16] = d·hi(qs[j]) + m
//! Q8_0  [d: f16][qs: 32 × i8]          x[j] = d·qs[j]
//! ```
//!
//! for j in 0..16: the low nibbles hold elements 0–15 and the high nibbles 16–31. The
//! canonical INT4 form instead puts element 2i in the low nibble of byte i, so converting
//! re-pairs nibbles (values and scales are carried over bit for bit).

use half::f16;

use crate::error::Result;
use crate::quant::{Int4Matrix, Int8Matrix};

const QK: usize = 32;

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// GGUF's own Q4_0 formula for one 18-byte block.
pub fn dequant_block_q4_0(block: &[u8], out: &mut [f32; QK]) {
    let d = f16_at(block, 0).to_f32();
    for j in 0..16 {
        let b = block[2 + j];
        out[j] = d * ((b & 0x0f) as f32 - 8.0);
        out[j + 16] = d * ((b >> 4) as f32 - 8.0);
    }
}

/// GGUF's own Q4_1 formula for one 20-byte block.
pub fn dequant_block_q4_1(block: &[u8], out: &mut [f32; QK]) {
    let d = f16_at(block, 0).to_f32();
    let m = f16_at(block, 2).to_f32();
    for j in 0..16 {
        let b = block[4 + j];
        out[j] = d * (b & 0x0f) as f32 + m;
        out[j + 16] = d * (b >> 4) as f32 + m;
    }
}

/// GGUF's own Q8_0 formula for one 34-byte block.
pub fn dequant_block_q8_0(block: &[u8], out: &mut [f32; QK]) {
    let d = f16_at(block, 0).to_f32();
    for j in 0..QK {
        out[j] = d * (block[2 + j] as i8) as f32;
    }
}

/// Re-pair one block's GGUF nibbles (elements j and j+16 share a byte) into canonical order
/// (elements 2i and 2i+1 share byte i), appending 16 bytes to `packed`.
fn repack_nibbles(qs: &[u8], packed: &mut Vec<u8>) {
    let q = |e: usize| -> u8 {
        if e < 16 {
            qs[e] & 0x0f
        } else {
            qs[e - 16] >> 4
        }
    };
    for i in 0..16 {
        packed.push(q(2 * i) | (q(2 * i + 1) << 4));
    }
}

/// Q4_0 or Q4_1 data of a `[rows, cols]` matrix into canonical INT4 with group 32.
/// Q4_0: `s = d`, `m = −8d` (exact in f32: a power-of-two multiple of an f16).
/// Q4_1: `s = d`, `m = m` (f16 widened to f32, exact).
pub(crate) fn q4_to_int4(data: &[u8], rows: usize, cols: usize, has_min: bool) -> Result<Int4Matrix> {
    let block_bytes = if has_min { 20 } else { 18 };
    let nblocks = rows * cols / QK;
    debug_assert_eq!(data.len(), nblocks * block_bytes);
    let mut packed = Vec::with_capacity(rows * cols / 2);
    let mut scales = Vec::with_capacity(nblocks);
    let mut mins = Vec::with_capacity(nblocks);
    for block in data.chunks_exact(block_bytes) {
        let d = f16_at(block, 0);
        scales.push(d);
        if has_min {
            mins.push(f16_at(block, 2).to_f32());
            repack_nibbles(&block[4..20], &mut packed);
        } else {
            mins.push(-8.0 * d.to_f32());
            repack_nibbles(&block[2..18], &mut packed);
        }
    }
    Int4Matrix::new(rows, cols, QK, packed, scales, mins)
}

/// Q8_0 data of a `[rows, cols]` matrix into grouped INT8 (exact).
pub(crate) fn q8_0_to_int8(data: &[u8], rows: usize, cols: usize) -> Result<Int8Matrix> {
    let nblocks = rows * cols / QK;
    debug_assert_eq!(data.len(), nblocks * 34);
    let mut q = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(nblocks);
    for block in data.chunks_exact(34) {
        scales.push(f16_at(block, 0));
        q.extend(block[2..34].iter().map(|&b| b as i8));
    }
    Int8Matrix::new(rows, cols, q, scales)
}

/// Round-to-nearest Q4_0 (symmetric, 4 bits): `d = v / −8` where `v` is the value of largest
/// magnitude, `q = clamp(round(x/d) + 8, 0, 15)`. `x.len()` must be a multiple of 32.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0, "Q4_0 needs whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for blk in x.chunks_exact(QK) {
        let v = blk
            .iter()
            .copied()
            .fold(0f32, |a, b| if b.abs() > a.abs() { b } else { a });
        let d = f16::from_f32(v / -8.0);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend_from_slice(&d.to_le_bytes());
        let q = |e: usize| ((blk[e] * id).round() + 8.0).clamp(0.0, 15.0) as u8;
        for j in 0..16 {
            out.push(q(j) | (q(j + 16) << 4));
        }
    }
    out
}

/// Round-to-nearest Q4_1 (asymmetric): `d = (max − min)/15`, `m = min`,
/// `q = clamp(round((x − m)/d), 0, 15)`.
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0, "Q4_1 needs whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / QK * 20);
    for blk in x.chunks_exact(QK) {
        let lo = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = f16::from_f32((hi - lo) / 15.0);
        let m = f16::from_f32(lo);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        let q = |e: usize| ((blk[e] - m.to_f32()) * id).round().clamp(0.0, 15.0) as u8;
        for j in 0..16 {
            out.push(q(j) | (q(j + 16) << 4));
        }
    }
    out
}

/// Round-to-nearest Q8_0: `d = max|x| / 127`, `q = round(x/d)`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % QK, 0, "Q8_0 needs whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, b| a.max(b.abs()));
        let d = f16::from_f32(amax / 127.0);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(blk.iter().map(|&v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    out
}
