//! CPU elementwise and row ops. Rows are independent, so each op splits rows across threads
//! when there are enough of them to pay for it.

use rayon::prelude::*;

use super::matmul::CpuLinear;
use crate::backend::QkvLayout;

/// Rows per parallel task for row-wise ops (one decode row runs inline).
const ROWS_PER_TASK: usize = 8;

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w`, `[T, d]`.
pub(crate) fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    };
    x.par_chunks(d * ROWS_PER_TASK)
        .zip(out.par_chunks_mut(d * ROWS_PER_TASK))
        .for_each(|(xs, os)| xs.chunks(d).zip(os.chunks_mut(d)).for_each(norm_row));
}

/// Rotates Q and K heads in place. `cos`/`sin` are `[max_pos, head_dim/2]`.
pub(crate) fn rope(qkv: &mut [f32], layout: QkvLayout, cos: &[f32], sin: &[f32], half_split: bool, positions: &[u32]) {
    let hd = layout.head_dim;
    let half = hd / 2;
    let width = layout.width();
    let rotated_heads = layout.n_heads + layout.n_kv_heads; // Q heads then K heads
    qkv.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let c = &cos[pos as usize * half..(pos as usize + 1) * half];
            let s = &sin[pos as usize * half..(pos as usize + 1) * half];
            for head in row[..rotated_heads * hd].chunks_exact_mut(hd) {
                for i in 0..half {
                    // Pair (a, b) rotated by angle pos·θ_i.
                    let (ia, ib) = if half_split { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c[i] - b * s[i];
                    head[ib] = a * s[i] + b * c[i];
                }
            }
        });
}

/// `out = silu(gate) ⊙ up`, `gate_up[T, 2f] = [gate | up]` → `out[T, f]`.
pub(crate) fn silu_mul(gate_up: &[f32], out: &mut [f32], f: usize) {
    gate_up
        .par_chunks(2 * f * ROWS_PER_TASK)
        .zip(out.par_chunks_mut(f * ROWS_PER_TASK))
        .for_each(|(gu, o)| {
            for (gur, or) in gu.chunks(2 * f).zip(o.chunks_mut(f)) {
                let (g, u) = gur.split_at(f);
                for ((ov, &gv), &uv) in or.iter_mut().zip(g).zip(u) {
                    *ov = gv / (1.0 + (-gv).exp()) * uv;
                }
            }
        });
}

/// `x += y`.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(a, b)| {
        for (av, &bv) in a.iter_mut().zip(b) {
            *av += bv;
        }
    });
}

/// `out[r] = table[tokens[r]]`, dequantized.
pub(crate) fn embed(table: &CpuLinear, tokens: &[u32], out: &mut [f32]) {
    let d = table.cols;
    out.par_chunks_mut(d).zip(tokens.par_iter()).for_each(|(o, &t)| {
        let (part, row) = table.locate(t as usize);
        part.dequant_row(row, o);
    });
}
