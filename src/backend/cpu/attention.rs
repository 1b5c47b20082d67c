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
//! One parallel task per (row, KV head): the K/V of that head are read once for all `G` query
//! heads. Scores are exact two-pass softmax in f32 (max first), the oracle's precision.

use rayon::prelude::*;

use super::matmul::portable_dot;
use super::{CpuKv, CpuStep};
use crate::backend::QkvLayout;

/// `out[T, n_heads·head_dim]`; `qkv[T, layout.width()]`.
pub(crate) fn attention(qkv: &[f32], kv: &CpuKv, layer: usize, layout: QkvLayout, step: &CpuStep, out: &mut [f32]) {
    let hd = layout.head_dim;
    let group = layout.n_heads / layout.n_kv_heads;
    let width = layout.width();
    let bs = kv.shape.block_size;
    let scale = 1.0 / (hd as f32).sqrt();
    let k_layer = kv.layer_k(layer);
    let v_layer = kv.layer_v(layer);
    // Offset of (slot, kv head) in a layer: [block][slot][head][dim] flattened.
    let at = |slot: usize, h: usize| (slot * layout.n_kv_heads + h) * hd;

    // Each task owns the `group` query heads of one KV head in one row: a contiguous
    // `group·hd` span of that row of `out`.
    out.par_chunks_mut(group * hd).enumerate().for_each(|(task, o)| {
        let (r, h) = (task / layout.n_kv_heads, task % layout.n_kv_heads);
        let pos = step.positions[r] as usize;
        let table = &step.block_tables[step.row_seq[r] as usize];
        let n_ctx = pos + 1;
        let mut scores = vec![0f32; group * n_ctx];
        for i in 0..n_ctx {
            let slot = table[i / bs] as usize * bs + i % bs;
            let k = &k_layer[at(slot, h)..at(slot, h) + hd];
            for g in 0..group {
                let qh = h * group + g;
                let q = &qkv[r * width + qh * hd..r * width + (qh + 1) * hd];
                scores[g * n_ctx + i] = portable_dot(q, k) * scale;
            }
        }
        for g in 0..group {
            let s = &mut scores[g * n_ctx..(g + 1) * n_ctx];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in s.iter_mut() {
                *v *= inv;
            }
        }
        o.fill(0.0);
        for i in 0..n_ctx {
            let slot = table[i / bs] as usize * bs + i % bs;
            let v = &v_layer[at(slot, h)..at(slot, h) + hd];
            for g in 0..group {
                let p = scores[g * n_ctx + i];
                for (acc, &vv) in o[g * hd..(g + 1) * hd].iter_mut().zip(v) {
                    *acc += p * vv;
                }
            }
        }
    });
}
