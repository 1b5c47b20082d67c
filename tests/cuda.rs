//! The CUDA backend against the CPU oracle. Without a GPU these tests print a notice and pass,
//! except with `REQUIRE_GPU=1` (the GPU bundle's run.sh), where a missing GPU fails them. The
//! one test that needs no GPU checks that a machine without a driver gets a typed error.
//!
//! Tolerances: CUDA keeps activations and K/V in f16 (DESIGN "Precision"), so each kernel is
//! compared with the CPU backend fed the same f16-rounded inputs; what remains is the f16
//! rounding of the kernel's output (relative 2⁻¹¹ ≈ 4.9e-4) and f32 summation order, covered by
//! atol + rtol = 2e-3 + 4e-3·|ref|. A wrong nibble, scale, slot or softmax is off by ≥ 1e-1.

mod common;

use qmtot::backend::cpu::{CpuBackend, CpuTensor};
use qmtot::backend::cuda::{self, CudaBackend};
use qmtot::backend::{Backend, QkvLayout, StepInput};
use qmtot::engine::sampler::{argmax, log_softmax};
use qmtot::model::Llama;
use qmtot::quant::{Int4Matrix, WeightMatrix};

use common::{assert_close, gpu, load_smollm2, rand_values};

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

fn host(g: &CudaBackend, t: &<CudaBackend as Backend>::Activations) -> Vec<f32> {
    let mut out = Vec::new();
    g.to_host(t, &mut out).unwrap();
    out
}

#[test]
fn without_a_driver_the_cuda_backend_is_a_typed_error() {
    if cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    assert_eq!(cuda::device_count(), 0);
    match CudaBackend::new(0) {
        Err(qmtot::Error::Backend { backend: "cuda", .. }) => {}
        Err(other) => panic!("expected a CUDA backend error, got {other}"),
        Ok(_) => panic!("a CUDA backend without a driver"),
    }
}

/// `x [t, k]` (random from `seed`, f16-representable, as the CUDA backend stores activations)
/// through both backends' uploads of the same weights `[n, k]`: equal within the f16 rounding
/// of the output and f32 summation order over K (2e-3·sqrt(K/512) + 4e-3·|ref|).
fn compare_matmul(
    g: &CudaBackend,
    c: &CpuBackend,
    (wg, wc): (&<CudaBackend as Backend>::Linear, &<CpuBackend as Backend>::Linear),
    (t, k, n): (usize, usize, usize),
    seed: u64,
    what: &str,
) {
    let x = f16_round(&rand_values(t * k, seed, 1.0));
    let mut og = g.alloc_activations(t, n).unwrap();
    g.matmul(&g.upload_activations(t, k, &x).unwrap(), wg, &mut og).unwrap();
    let mut oc = c.alloc_activations(t, n).unwrap();
    let xc = CpuTensor {
        rows: t,
        cols: k,
        data: x,
    };
    c.run(|| c.matmul(&xc, wc, &mut oc)).unwrap();
    let tol = 2e-3 * (k as f32 / 512.0).sqrt();
    assert_close(what, &host(g, &og), &oc.data, tol, 4e-3);
}

#[test]
fn int4_and_dense_matmul_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    // N off every multiple of the 64 rows a block takes; K below, at and above the 1024-input
    // activation chunk and over many pipeline stages (4352 = 17 INT4 stages, a ring of 4
    // wrapping several times); every group size; T across the 8/16/32/64-row tiles and over
    // several blocks of 64 rows.
    for &(n, k, group) in &[
        (37, 1088, 64),
        (960, 576, 32),
        (21, 2048, 128),
        (5, 32, 32),
        (70, 4352, 128),
    ] {
        let w = WeightMatrix::Int4(Int4Matrix::quantize_rtn(n, k, group, &rand_values(n * k, 3, 0.5)).unwrap());
        // Dense weights f16-representable: the CUDA backend keeps dense parts as f16 (a real
        // model's f16 lm_head is exact), and rounding them here would be an input change, not
        // a kernel error (at K = 576 it alone reaches 3e-3).
        let dense =
            WeightMatrix::Dense(qmtot::quant::DenseMatrix::new(n, k, f16_round(&rand_values(n * k, 4, 0.5))).unwrap());
        // GPTQ act-order: the activations are gathered into a reversed-and-rotated order.
        let WeightMatrix::Int4(plain) = &w else { unreachable!() };
        let order: Vec<u32> = (0..k as u32).map(|j| (k as u32 - 1 - j + 7) % k as u32).collect();
        let ordered = WeightMatrix::Int4(plain.clone().with_input_order(order).unwrap());
        for (what, weights) in [("int4", &w), ("dense", &dense), ("int4 act-order", &ordered)] {
            let (wg, wc) = (
                g.upload_linear(&[weights]).unwrap(),
                c.upload_linear(&[weights]).unwrap(),
            );
            for t in [1, 2, 3, 5, 8, 13, 16, 21, 40, 64, 65, 130] {
                let what = format!("{what} N={n} K={k} g={group} T={t}");
                compare_matmul(&g, &c, (&wg, &wc), (t, k, n), 100 + t as u64, &what);
            }
        }
    }
}

/// Every pipeline variant of the INT4 g128 kernel (deeper weight rings, smaller activation
/// chunks, `QMTOT_MATMUL_VARIANTS`) equals the CPU backend, as the default does: K below, at and
/// above each chunk size (640 ends in a short stage), many ring wraps (4352), N off the 64-row
/// block, and T over the rows its batch width serves.
#[test]
fn int4_matmul_pipeline_variants_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for &(n, k) in &[(70, 4352), (21, 2048), (130, 640)] {
        let w = WeightMatrix::Int4(Int4Matrix::quantize_rtn(n, k, 128, &rand_values(n * k, 5, 0.5)).unwrap());
        let (wg, wc) = (g.upload_linear(&[&w]).unwrap(), c.upload_linear(&[&w]).unwrap());
        for v in cuda::matmul_variant::MATMUL_VARIANTS {
            g.use_matmul_variants(&[v]).unwrap();
            assert_eq!(g.matmul_variants_in_use(), vec![v]);
            let rows: &[usize] = if v.nt == 1 { &[1, 3, 8] } else { &[9, 16] };
            for &t in rows {
                let what = format!("variant {} N={n} K={k} T={t}", v.label());
                compare_matmul(&g, &c, (&wg, &wc), (t, k, n), 200 + t as u64, &what);
            }
        }
        g.use_matmul_variants(&[]).unwrap();
        assert!(g.matmul_variants_in_use().is_empty());
    }
}

/// Q|K|V-like INT4 parts (32, 16 and 5 rows: the CUDA upload fuses them into one launch) and
/// a part of another group size after them (its own launch) equal the CPU backend.
#[test]
fn fused_int4_parts_match_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let k = 1536;
    let part = |n: usize, group: usize, seed: u64| {
        WeightMatrix::Int4(Int4Matrix::quantize_rtn(n, k, group, &rand_values(n * k, seed, 0.5)).unwrap())
    };
    let (q, kk, v, o) = (part(32, 64, 1), part(16, 64, 2), part(5, 64, 3), part(19, 128, 4));
    let parts = [&q, &kk, &v, &o];
    let (wg, wc) = (g.upload_linear(&parts).unwrap(), c.upload_linear(&parts).unwrap());
    for t in [1, 7, 16, 33] {
        compare_matmul(
            &g,
            &c,
            (&wg, &wc),
            (t, k, 72),
            50 + t as u64,
            &format!("fused parts T={t}"),
        );
    }
}

/// RMSNorm (alone and fused with the residual add) and SiLU·mul at widths that take the
/// 16-byte vector paths (4096, 14336), one too wide for the norm's registers (20480), and odd
/// widths that take the scalar paths.
#[test]
fn row_kernels_match_the_cpu_backend_at_vector_and_odd_widths() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let rows = 3;
    for d in [4096, 20480, 100, 36] {
        let x = f16_round(&rand_values(rows * d, 11 + d as u64, 2.0));
        let w = rand_values(d, 12, 1.0);
        let mut og = g.alloc_activations(rows, d).unwrap();
        g.rmsnorm(
            &g.upload_activations(rows, d, &x).unwrap(),
            &g.upload_vector(&w).unwrap(),
            1e-5,
            &mut og,
        )
        .unwrap();
        let mut oc = c.alloc_activations(rows, d).unwrap();
        let xc = CpuTensor { rows, cols: d, data: x };
        c.run(|| c.rmsnorm(&xc, &w, 1e-5, &mut oc)).unwrap();
        // One f16 rounding of the output and f32 sums of d squares.
        assert_close(&format!("rmsnorm d={d}"), &host(&g, &og), &oc.data, 2e-3, 4e-3);

        // The fused residual add: x += y (rounded to f16 in place on the GPU), then the norm.
        let y = f16_round(&rand_values(rows * d, 14 + d as u64, 2.0));
        let mut xg = g.upload_activations(rows, d, &xc.data).unwrap();
        g.add_rmsnorm(
            &mut xg,
            &g.upload_activations(rows, d, &y).unwrap(),
            &g.upload_vector(&w).unwrap(),
            1e-5,
            &mut og,
        )
        .unwrap();
        let mut xc = xc;
        let yc = CpuTensor { rows, cols: d, data: y };
        c.run(|| c.add_rmsnorm(&mut xc, &yc, &w, 1e-5, &mut oc)).unwrap();
        // x: one f16 rounding of the sum (≤ 2⁻¹¹ relative); out: that rounding carried through
        // (≤ 2⁻¹¹ relative per element) within the plain norm's bounds.
        assert_close(&format!("add_rmsnorm x d={d}"), &host(&g, &xg), &xc.data, 1e-3, 1e-3);
        assert_close(&format!("add_rmsnorm d={d}"), &host(&g, &og), &oc.data, 2e-3, 4e-3);
    }
    for f in [14336, 100, 36] {
        let gu = f16_round(&rand_values(rows * 2 * f, 13 + f as u64, 4.0));
        let mut og = g.alloc_activations(rows, f).unwrap();
        g.silu_mul(&g.upload_activations(rows, 2 * f, &gu).unwrap(), &mut og)
            .unwrap();
        let mut oc = c.alloc_activations(rows, f).unwrap();
        let gc = CpuTensor {
            rows,
            cols: 2 * f,
            data: gu,
        };
        c.run(|| c.silu_mul(&gc, &mut oc)).unwrap();
        assert_close(&format!("silu_mul f={f}"), &host(&g, &og), &oc.data, 2e-3, 4e-3);
    }
}

/// The fused RoPE + K/V write leaves exactly what RoPE then the K/V write leave (the same
/// rotation, rounded once), and its rotation matches the CPU backend's.
#[test]
fn fused_rope_and_kv_write_equal_the_two_ops() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for (n_heads, n_kv, hd) in [(8, 2, 128), (9, 3, 64)] {
        let layout = QkvLayout {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let shape = qmtot::backend::KvShape {
            n_layers: 2,
            n_blocks: 4,
            block_size: 16,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let (max_pos, half) = (64, hd / 2);
        let angles: Vec<f64> = (0..max_pos * half)
            .map(|e| (e / half) as f64 * 10000f64.powf(-2.0 * (e % half) as f64 / hd as f64))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        let (cg, sg) = (g.upload_vector(&cos).unwrap(), g.upload_vector(&sin).unwrap());
        let step = StepInput {
            tokens: vec![0; 3],
            positions: vec![0, 17, 63],
            slots: vec![5, 33, 62],
            row_seq: vec![0, 1, 2],
            block_tables: vec![vec![0], vec![2], vec![3]],
            logit_rows: vec![],
            groups: vec![],
        };
        let st = g.upload_step(&step).unwrap();
        let x = f16_round(&rand_values(3 * layout.width(), 21 + hd as u64, 1.0));
        for half_split in [false, true] {
            let what = format!("h={n_heads} kv={n_kv} hd={hd} half_split={half_split}");
            let (mut fused, mut apart) = (
                g.upload_activations(3, layout.width(), &x).unwrap(),
                g.upload_activations(3, layout.width(), &x).unwrap(),
            );
            let (mut kv_fused, mut kv_apart) = (g.alloc_kv(shape).unwrap(), g.alloc_kv(shape).unwrap());
            g.rope_kv_write(&mut fused, layout, &cg, &sg, half_split, &mut kv_fused, 1, &st)
                .unwrap();
            g.rope(&mut apart, layout, &cg, &sg, half_split, &st).unwrap();
            g.kv_write(&mut kv_apart, 1, &apart, layout, &st).unwrap();
            let same_bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same_bits(&host(&g, &fused), &host(&g, &apart)), "{what}: qkv");
            let (sf, sa) = (g.kv_to_host(&kv_fused).unwrap(), g.kv_to_host(&kv_apart).unwrap());
            assert!(
                same_bits(&sf, &sa),
                "{what}: the K/V store (unwritten slots poisoned alike)"
            );
            assert_eq!(
                sf.iter().filter(|v| !v.is_nan()).count(),
                2 * 3 * n_kv * hd,
                "{what}: slots written"
            );

            let mut xc = CpuTensor {
                rows: 3,
                cols: layout.width(),
                data: x.clone(),
            };
            let sc = c.upload_step(&step).unwrap();
            c.run(|| c.rope(&mut xc, layout, &cos, &sin, half_split, &sc)).unwrap();
            // One f16 rounding of each rotated value (2⁻¹¹ relative).
            assert_close(&what, &host(&g, &fused), &xc.data, 1e-3, 1e-3);
        }
    }
}

#[test]
fn add_bias_matches_the_cpu_backend() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let (rows, n) = (5, 300);
    let x = f16_round(&rand_values(rows * n, 8, 1.0));
    let bias = rand_values(n, 9, 0.5);
    let mut xg = g.upload_activations(rows, n, &x).unwrap();
    g.add_bias(&mut xg, &g.upload_vector(&bias).unwrap()).unwrap();
    let mut xc = CpuTensor { rows, cols: n, data: x };
    c.run(|| c.add_bias(&mut xc, &bias)).unwrap();
    // One f16 rounding of the sum: 1e-3 relative.
    assert_close("add_bias", &host(&g, &xg), &xc.data, 1e-3, 1e-3);
    let short = g.upload_vector(&bias[..10]).unwrap();
    assert!(g.add_bias(&mut xg, &short).is_err());
}

/// A step for the attention tests: `seqs[s] = (length, rows)` — sequence `s` has K/V at
/// positions `0..length` and the step's rows at positions `rows` (all < length) — over block
/// tables scattered through a pool of `n_blocks`, where `groups` `(members, blocks)` share
/// their lead's first blocks. Returns the step and a "fill" step whose rows write every
/// position's K/V once (a shared block through its lead only).
fn attention_steps(seqs: &[(usize, Vec<u32>)], groups: &[(Vec<u32>, u32)], n_blocks: u32) -> (StepInput, StepInput) {
    use qmtot::backend::SharedPrefix;
    let bs = 16usize;
    // Scatter: block i of the pool order is physical block (i·97 + 5) mod n_blocks.
    let mut next = 0u32;
    let mut take = || {
        let b = (next * 97 + 5) % n_blocks;
        next += 1;
        b
    };
    let mut tables: Vec<Vec<u32>> = seqs
        .iter()
        .map(|(len, _)| (0..len.div_ceil(bs)).map(|_| take()).collect())
        .collect();
    // shared[s] = leading blocks of s that belong to its group's lead.
    let mut shared = vec![0usize; seqs.len()];
    let mut step = StepInput::default();
    for (members, blocks) in groups {
        let nb = *blocks as usize;
        let lead = tables[members[0] as usize][..nb].to_vec();
        for &m in &members[1..] {
            tables[m as usize][..nb].copy_from_slice(&lead);
            shared[m as usize] = nb * bs;
        }
        step.groups.push(SharedPrefix {
            seqs: members.clone(),
            blocks: *blocks,
        });
    }
    let mut fill = StepInput::default();
    let push = |st: &mut StepInput, s: usize, p: u32, table: &[u32]| {
        st.tokens.push(0);
        st.positions.push(p);
        st.slots.push(table[p as usize / bs] * bs as u32 + p % bs as u32);
        st.row_seq.push(s as u32);
    };
    for (s, (len, rows)) in seqs.iter().enumerate() {
        for p in shared[s]..*len {
            push(&mut fill, s, p as u32, &tables[s]);
        }
        for &p in rows {
            push(&mut step, s, p, &tables[s]);
        }
    }
    fill.block_tables = tables.clone();
    step.block_tables = tables;
    (step, fill)
}

#[test]
fn attention_matches_the_cpu_backend_for_decode_prefill_and_cascade() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    // Both attention tile kernels: `attention_tile` (f32 softmax weights) and the tensor-core
    // `attention_tile_mma` (the default), whose weights P are rounded to f16 for
    // P·V. That moves an output by at most 2⁻¹¹·max|v − o| ≤ 1e-3 here (|v| ≤ 1), so against
    // plain attention its cascade is held to 2e-3 + 2e-3·|ref| rather than an f16 ulp or two;
    // against the CPU the same 2e-3 + 4e-3·|ref| as the rest.
    for mma in [false, true] {
        g.use_mma_attention_tiles(mma);
        attention_scenarios(&g, &c, mma);
    }
    g.use_mma_attention_tiles(true); // the default
}

fn attention_scenarios(g: &CudaBackend, c: &CpuBackend, mma: bool) {
    // Scenarios, each checked with its sharing groups (cascade) and without (plain):
    //   * scattered prefill rows of two short sequences (the tile kernel, causal);
    //   * decode rows over 3000 and 1200 keys (flash-decoding split over many chunks), a
    //     70-row prefill after a 100-token cached prefix (several tiles, odd ends), five
    //     siblings one to three tokens past a shared 1152-token prefix plus a member still
    //     prefilling 25 rows (cascade over the prefix, then split rows and a tile).
    let short = vec![(40usize, (0..40).collect::<Vec<u32>>()), (23, (0..23).collect())];
    let mut long = vec![(3000usize, vec![2999]), (1200, vec![1199]), (170, (100..170).collect())];
    let mut members = Vec::new();
    for i in 0..5u32 {
        members.push(long.len() as u32);
        long.push((1153 + i as usize % 3, vec![1152 + i % 3]));
    }
    members.push(long.len() as u32);
    long.push((1177, (1152..1177).collect()));
    // 72 blocks = 1152 tokens × 29 more rows, 30 rows: over the cascade crossover
    // (attention_plan) at GQA 3, 4 and 8; plain at GQA 1 (a tile holds 64 rows there).
    let scenarios = [(short, vec![]), (long, vec![(members, 72u32)])];
    for (n_heads, n_kv, hd) in [(9, 3, 64), (8, 2, 128), (8, 1, 128), (4, 4, 64)] {
        let layout = QkvLayout {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        // 1024 blocks: every sequence's table is distinct from the others' (713 blocks are
        // taken; 97 is coprime with 1024), so no two rows of the fill step share a slot.
        let shape = qmtot::backend::KvShape {
            n_layers: 1,
            n_blocks: 1024,
            block_size: 16,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        for (si, (seqs, groups)) in scenarios.iter().enumerate() {
            let (step, fill) = attention_steps(seqs, groups, shape.n_blocks as u32);
            // K/V of every position (unfilled slots stay NaN-poisoned on both backends).
            let (mut kg, mut kc) = (g.alloc_kv(shape).unwrap(), c.alloc_kv(shape).unwrap());
            let kv_vals = f16_round(&rand_values(fill.rows() * layout.width(), 11 + si as u64, 1.0));
            let fg = g.upload_activations(fill.rows(), layout.width(), &kv_vals).unwrap();
            let fc = CpuTensor {
                rows: fill.rows(),
                cols: layout.width(),
                data: kv_vals,
            };
            g.kv_write(&mut kg, 0, &fg, layout, &g.upload_step(&fill).unwrap())
                .unwrap();
            c.kv_write(&mut kc, 0, &fc, layout, &c.upload_step(&fill).unwrap())
                .unwrap();
            // Queries of the step's rows: scale 3 makes the softmax peaked, so a wrong mask or
            // merge shows.
            let rows = step.rows();
            let q = f16_round(&rand_values(rows * layout.width(), 7 + si as u64, 3.0));
            let qg = g.upload_activations(rows, layout.width(), &q).unwrap();
            let qc = CpuTensor {
                rows,
                cols: layout.width(),
                data: q,
            };
            let tiles = if mma { "mma" } else { "simt" };
            let what = format!("attention scenario {si} h={n_heads} kv={n_kv} hd={hd} ({tiles} tiles)");
            let mut plain = step.clone();
            plain.groups.clear();
            let mut outs = Vec::new();
            for st in [&step, &plain] {
                let mut og = g.alloc_activations(rows, n_heads * hd).unwrap();
                g.attention(&qg, &kg, 0, layout, &g.upload_step(st).unwrap(), &mut og)
                    .unwrap();
                let got = host(g, &og);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{what}: a NaN-poisoned slot was read"
                );
                outs.push(got);
            }
            let mut oc = c.alloc_activations(rows, n_heads * hd).unwrap();
            let sc = c.upload_step(&step).unwrap();
            c.run(|| c.attention(&qc, &kc, 0, layout, &sc, &mut oc)).unwrap();
            // Against the CPU: f16 output rounding plus summation order (module doc).
            assert_close(&what, &outs[0], &oc.data, 2e-3, 4e-3);
            // Cascade against plain on the same device: the same sums in another order, each
            // rounded once to f16 — within an f16 ulp or two (2⁻¹⁰ relative); with mma tiles
            // also the f16 weights (see the caller).
            let tol = if mma { 2e-3 } else { 1e-3 };
            assert_close(&format!("{what}: cascade vs plain"), &outs[0], &outs[1], tol, tol);
        }
    }
}

/// Next-token logits at every position of `prompt` (one prefill step).
fn prefill_logits<B: Backend>(model: &Llama<B>, prompt: &[u32]) -> Vec<f32> {
    qmtot::engine::SequenceKv::new(model, prompt.len())
        .unwrap()
        .extend(model, prompt, true)
        .unwrap()
}

#[test]
fn the_forward_on_cuda_tracks_the_cpu_logits_and_greedy_text() {
    let Some(g) = gpu() else { return };
    let ((gm, tok), (cm, _)) = (load_smollm2(g), load_smollm2(cpu()));
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let lc = prefill_logits(&cm, &prompt);
    let vocab = gm.config.vocab_size;
    // Mean KL(cpu ‖ cuda) per position ≤ 1e-3: f16 activations through 30 layers. The prefill
    // goes through the attention tile kernel: both of them.
    for mma in [false, true] {
        gm.backend().use_mma_attention_tiles(mma);
        let lg = prefill_logits(&gm, &prompt);
        let mut kl_sum = 0f64;
        for (rg, rc) in lg.chunks_exact(vocab).zip(lc.chunks_exact(vocab)) {
            let (pg, pc) = (log_softmax(rg), log_softmax(rc));
            kl_sum += pc
                .iter()
                .zip(&pg)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>();
        }
        let mean_kl = kl_sum / prompt.len() as f64;
        let tiles = if mma { "mma" } else { "simt" };
        eprintln!(
            "mean KL(cpu ‖ cuda) = {mean_kl:.2e} over {} positions ({tiles} tiles)",
            prompt.len()
        );
        assert!(mean_kl <= 1e-3, "mean KL {mean_kl} ({tiles} tiles)");
    }
    gm.backend().use_mma_attention_tiles(true); // the default
                                                // Greedy continuation identical for 8 tokens.
    let (mut a, mut b) = (prompt.clone(), prompt.clone());
    for _ in 0..8 {
        let ng = argmax(&prefill_logits(&gm, &a)[(a.len() - 1) * vocab..]);
        let nc = argmax(&prefill_logits(&cm, &b)[(b.len() - 1) * vocab..]);
        a.push(ng);
        b.push(nc);
    }
    assert_eq!(a, b, "greedy continuation on CUDA vs CPU");
}

#[test]
fn forked_siblings_on_cuda_equal_unshared_runs() {
    use qmtot::engine::{Engine, EngineConfig, Event};
    let Some(g) = gpu() else { return };
    let (model, _) = load_smollm2(g);
    let mut engine = Engine::new(&model, None, EngineConfig::default()).unwrap();
    let root = engine.add((1..=37).collect()).unwrap();
    engine.prefill(root).unwrap();
    engine.run_until_idle().unwrap();
    let kids = engine.fork(root, 3).unwrap();
    for (i, &k) in kids.iter().enumerate() {
        engine.append(k, &[100 + i as u32, 7]).unwrap();
        engine.prefill(k).unwrap();
    }
    let ready = engine
        .run_until_idle()
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e, Event::Ready { .. }))
        .count();
    assert_eq!(ready, 3);
    for &k in &kids {
        let tokens = engine.tokens(k).unwrap().to_vec();
        let got = engine.next_logits(k).unwrap().unwrap().to_vec();
        let alone = prefill_logits(&model, &tokens);
        let want = &alone[(tokens.len() - 1) * model.config.vocab_size..];
        // Same device and precision on both sides; only the batch composition differs.
        assert_close(&format!("child {k}"), &got, want, 2e-2, 1e-2);
    }
}

/// `steps` decode steps, `step(tokens, i)`, run uncaptured on `plain_kv` and replayed through
/// `graph` on `graph_kv`: the logits must be identical (the callers make both run the same
/// kernels on the same data in the same order). Each step's greedy tokens feed the next, and
/// are left in `next`.
fn replay_equals_uncaptured(
    model: &Llama<CudaBackend>,
    plain_kv: &mut qmtot::model::llama::KvCache<CudaBackend>,
    graph_kv: &mut qmtot::model::llama::KvCache<CudaBackend>,
    graph: &mut qmtot::model::llama::DecodeGraph<CudaBackend>,
    next: &mut [u32],
    steps: usize,
    step: &dyn Fn(&[u32], usize) -> StepInput,
) {
    let vocab = model.config.vocab_size;
    for i in 0..steps {
        let input = step(next, i);
        let want = model.forward(plain_kv, &input).unwrap();
        let got = model
            .replay_decode(graph, graph_kv, &input)
            .unwrap()
            .expect("the step fits the graph");
        assert_close(&format!("graph step {i}"), &got, &want, 1e-6, 0.0);
        for (s, row) in want.chunks_exact(vocab).enumerate() {
            next[s] = argmax(row);
        }
    }
}

#[test]
fn a_captured_decode_graph_replays_the_uncaptured_decode() {
    use qmtot::backend::StepInput;
    let Some(g) = gpu() else { return };
    let (model, _) = load_smollm2(g);
    let (bs, batch, context, steps, max_context) = (16usize, 3usize, 21usize, 6usize, 64usize);
    let per_seq = max_context / bs;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| (0..per_seq as u32).map(|i| (s * per_seq) as u32 + i).collect())
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
    // Two caches holding the same three prompts: one decodes uncaptured, one through a graph.
    let mut caches = [
        model.new_kv_cache(batch * per_seq, bs).unwrap(),
        model.new_kv_cache(batch * per_seq, bs).unwrap(),
    ];
    let mut next = vec![0u32; batch];
    for cache in caches.iter_mut() {
        for (s, tok) in next.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..context as u32)
                .map(|i| 1 + (i * 37 + s as u32 * 101) % 4000)
                .collect();
            let slots = (0..context).map(|p| slot(s, p)).collect();
            let step = StepInput::one_sequence(prompt, 0, slots, tables[s].clone(), vec![context as u32 - 1]);
            *tok = argmax(&model.forward(cache, &step).unwrap());
        }
    }
    let decode = |tokens: &[u32], p: usize| {
        let slots = (0..tokens.len()).map(|s| slot(s, p)).collect();
        StepInput::decode(tokens.to_vec(), p as u32, slots, tables[..tokens.len()].to_vec())
    };
    let [plain_kv, graph_kv] = &mut caches;
    let mut graph = model
        .capture_decode(graph_kv, &decode(&next, context), max_context)
        .unwrap()
        .expect("the CUDA backend captures graphs");
    // The same kernels on the same data with the same attention chunking (one chunk below 64
    // keys either way) and deterministic reductions: identical up to nothing.
    replay_equals_uncaptured(&model, plain_kv, graph_kv, &mut graph, &mut next, steps, &|t, i| {
        decode(t, context + i)
    });
    // Steps that do not fit fall back to the uncaptured forward: another batch size, another
    // number of logit rows.
    let p = context + steps;
    assert!(model
        .replay_decode(&mut graph, graph_kv, &decode(&next[..2], p))
        .unwrap()
        .is_none());
    let mut fewer = decode(&next, p);
    fewer.logit_rows.pop();
    assert!(model.replay_decode(&mut graph, graph_kv, &fewer).unwrap().is_none());
}

/// A decode step of forked siblings with a cascaded shared prefix, captured with its sharing
/// group (`attention_plan::graph_plan`: the prefix's tile tasks in the graph), replays the
/// uncaptured step; another group layout does not fit the graph.
#[test]
fn a_captured_cascade_decode_graph_replays_the_uncaptured_decode() {
    use qmtot::backend::SharedPrefix;
    let Some(g) = gpu() else { return };
    let (model, _) = load_smollm2(g);
    // 8 siblings after a 1024-token prefix (64 shared blocks, 7168 key reads saved: cascade
    // under either tile kernel's crossover), 4 blocks of their own each.
    let (bs, siblings, prefix, own, steps, max_context) = (16usize, 8usize, 1024usize, 4usize, 6usize, 2048usize);
    let shared = prefix / bs;
    let tables: Vec<Vec<u32>> = (0..siblings)
        .map(|s| {
            let mut t: Vec<u32> = (0..shared as u32).collect();
            t.extend((0..own).map(|i| (shared + s * own + i) as u32));
            t
        })
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
    let n_blocks = shared + siblings * own;
    let mut caches = [
        model.new_kv_cache(n_blocks, bs).unwrap(),
        model.new_kv_cache(n_blocks, bs).unwrap(),
    ];
    let prompt: Vec<u32> = (0..prefix as u32).map(|i| 1 + (i * 37) % 4000).collect();
    let mut first = 0;
    for cache in caches.iter_mut() {
        let slots = (0..prefix).map(|p| slot(0, p)).collect();
        let step = StepInput::one_sequence(
            prompt.clone(),
            0,
            slots,
            tables[0][..shared].to_vec(),
            vec![prefix as u32 - 1],
        );
        first = argmax(&model.forward(cache, &step).unwrap());
    }
    // Each sibling starts from another token, so their rows differ.
    let mut next: Vec<u32> = (0..siblings as u32).map(|s| (first + 13 * s) % 4000 + 1).collect();
    let group = |blocks: usize| SharedPrefix {
        seqs: (0..siblings as u32).collect(),
        blocks: blocks as u32,
    };
    let decode = |tokens: &[u32], p: usize, blocks: Option<usize>| {
        let slots = (0..tokens.len()).map(|s| slot(s, p)).collect();
        let mut step = StepInput::decode(tokens.to_vec(), p as u32, slots, tables.clone());
        step.groups = blocks.map(group).into_iter().collect();
        step
    };
    let [plain_kv, graph_kv] = &mut caches;
    let mut graph = model
        .capture_decode(graph_kv, &decode(&next, prefix, Some(shared)), max_context)
        .unwrap()
        .expect("the CUDA backend captures graphs");
    // The same prefix tasks, and the own keys (at most 6) one split chunk either way: the same
    // kernels on the same data in the same order, identical up to nothing.
    replay_equals_uncaptured(&model, plain_kv, graph_kv, &mut graph, &mut next, steps, &|t, i| {
        decode(t, prefix + i, Some(shared))
    });
    // Another group layout launches attention differently: no group, a shorter prefix.
    let p = prefix + steps;
    for blocks in [None, Some(shared / 2)] {
        assert!(
            model
                .replay_decode(&mut graph, graph_kv, &decode(&next, p, blocks))
                .unwrap()
                .is_none(),
            "{blocks:?}"
        );
    }
}

/// Greedy generations of the engine on `model`: three independent prompts (decode steps of
/// three rows, which graphs capture when `graphs` is on) and three forked siblings of one
/// prompt (their prompt is shorter than a block: no sharing group), tokens drawn on the
/// device when `device_sampling` is on and the backend can. Returns the generated ids in
/// request order, the steps that replayed a graph and the steps drawn on the device.
fn engine_greedy<B: Backend>(
    model: &Llama<B>,
    tok: &qmtot::tokenizer::Tokenizer,
    graphs: bool,
    device_sampling: bool,
) -> (Vec<Vec<u32>>, usize, usize) {
    use qmtot::engine::{Engine, EngineConfig, Event, SamplingParams, StopConditions};
    let config = EngineConfig {
        graphs,
        device_sampling,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, None, config).unwrap();
    let stop = StopConditions {
        max_new_tokens: 10,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for p in ["The capital of France is", "Water boils at", "The largest planet is"] {
        let s = engine.add(tok.encode(p, true).unwrap()).unwrap();
        engine.generate(s, SamplingParams::default(), stop.clone()).unwrap();
        ids.push(s);
    }
    let root = engine
        .add(tok.encode("A healthy breakfast includes", true).unwrap())
        .unwrap();
    engine.prefill(root).unwrap();
    let mut events = engine.run_until_idle().unwrap();
    for (k, word) in engine
        .fork(root, 3)
        .unwrap()
        .into_iter()
        .zip([" eggs", " fruit", " oats"])
    {
        engine.append(k, &tok.encode(word, false).unwrap()).unwrap();
        engine.generate(k, SamplingParams::default(), stop.clone()).unwrap();
        ids.push(k);
    }
    let mut out = vec![Vec::new(); ids.len()];
    events.extend(engine.run_until_idle().unwrap());
    for e in events {
        match e {
            Event::Finished { seq, generation } => {
                let i = ids.iter().position(|&s| s == seq).unwrap();
                out[i] = generation.tokens;
            }
            Event::Failed { seq, error } => panic!("{seq} failed: {error}"),
            _ => {}
        }
    }
    let stats = engine.stats();
    (out, stats.graph_steps, stats.device_draw_steps)
}

#[test]
fn the_engine_on_cuda_generates_the_cpu_greedy_text_with_and_without_graphs() {
    // The CPU oracle first (it runs everywhere; it has no graphs and draws on the host even
    // when asked to draw on the device).
    let (cm, tok) = load_smollm2(cpu());
    let (on_cpu, cpu_replays, _) = engine_greedy(&cm, &tok, true, false);
    assert_eq!(cpu_replays, 0);
    assert!(on_cpu.iter().all(|t| t.len() == 10), "{on_cpu:?}");
    let (asked, _, cpu_device_draws) = engine_greedy(&cm, &tok, true, true);
    assert_eq!((&asked, cpu_device_draws), (&on_cpu, 0));
    let Some(g) = gpu() else { return };
    let (gm, _) = load_smollm2(g);
    let (with_graphs, replayed, _) = engine_greedy(&gm, &tok, true, false);
    let (without, none, _) = engine_greedy(&gm, &tok, false, false);
    assert!(replayed > 0, "no decode step replayed a graph");
    assert_eq!(none, 0);
    assert_eq!(with_graphs, without, "graphs change the greedy text");
    // Greedy text on CUDA (f16) equals the CPU oracle's (f32): the forward test's bound on
    // the logits leaves these prompts' top tokens clear of ties.
    assert_eq!(with_graphs, on_cpu, "CUDA vs CPU greedy text");
    // Drawn on the device (the argmax kernel is the host argmax), with and without graphs.
    for graphs in [true, false] {
        let (drawn, _, device_steps) = engine_greedy(&gm, &tok, graphs, true);
        assert!(device_steps > 0, "graphs={graphs}: no step drew on the device");
        assert_eq!(drawn, on_cpu, "graphs={graphs}: device draws vs CPU greedy text");
    }
}

/// Forked siblings of a prompt longer than two blocks decode with a sharing group. With
/// `cascade_graphs` the engine captures those steps once their layout repeats and replays
/// them, and the greedy text is the uncaptured text (the group is below the cascade crossover,
/// so attention is plain either way, in one 64-key chunk per row either way).
#[test]
fn the_engine_captures_sibling_steps_with_their_sharing_group() {
    use qmtot::engine::{Engine, EngineConfig, Event, SamplingParams, StopConditions};
    let Some(g) = gpu() else { return };
    let (gm, tok) = load_smollm2(g);
    let prompt = tok
        .encode(
            "Question: a patient presents with fever, cough and shortness of breath for three \
             days. Which investigation should come first? Let us think step by step.",
            true,
        )
        .unwrap();
    assert!(prompt.len() > 32, "{} tokens", prompt.len());
    let run = |cascade_graphs: bool| {
        let config = EngineConfig {
            graphs: true,
            cascade_graphs,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(&gm, None, config).unwrap();
        let root = engine.add(prompt.clone()).unwrap();
        engine.prefill(root).unwrap();
        engine.run_until_idle().unwrap();
        let kids = engine.fork(root, 4).unwrap();
        for (&k, word) in kids.iter().zip([" First", " The", " A", " We"]) {
            engine.append(k, &tok.encode(word, false).unwrap()).unwrap();
            let stop = StopConditions {
                max_new_tokens: 12,
                ..Default::default()
            };
            engine.generate(k, SamplingParams::default(), stop).unwrap();
        }
        let mut out = vec![Vec::new(); kids.len()];
        for e in engine.run_until_idle().unwrap() {
            match e {
                Event::Finished { seq, generation } => {
                    out[kids.iter().position(|&s| s == seq).unwrap()] = generation.tokens;
                }
                Event::Failed { seq, error } => panic!("{seq} failed: {error}"),
                _ => {}
            }
        }
        (out, engine.stats().graph_steps)
    };
    let (plain, plain_replays) = run(false);
    let (grouped, grouped_replays) = run(true);
    assert_eq!(plain_replays, 0, "sibling steps with a sharing group replayed a graph");
    assert!(grouped_replays > 0, "no sibling step replayed a graph with its group");
    assert!(plain.iter().all(|t| t.len() == 12), "{plain:?}");
    assert_eq!(grouped, plain, "graphs with a sharing group change the greedy text");
}

/// Seeded sampling with top-k / top-p drawn on the device repeats itself, token for token.
#[test]
fn device_draws_in_the_engine_repeat_for_a_seed() {
    use qmtot::engine::{Engine, EngineConfig, Event, SamplingParams, StopConditions};
    let Some(g) = gpu() else { return };
    let (gm, tok) = load_smollm2(g);
    let run = || {
        let config = EngineConfig {
            device_sampling: true,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(&gm, None, config).unwrap();
        let root = engine.add(tok.encode("Once upon a time", true).unwrap()).unwrap();
        engine.prefill(root).unwrap();
        engine.run_until_idle().unwrap();
        let kids = engine.fork(root, 4).unwrap();
        for (i, &k) in kids.iter().enumerate() {
            let sampling = SamplingParams {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.9,
                seed: 7 + i as u64,
                ..SamplingParams::default()
            };
            let stop = StopConditions {
                max_new_tokens: 12,
                ..Default::default()
            };
            engine.generate(k, sampling, stop).unwrap();
        }
        let mut out = vec![Vec::new(); kids.len()];
        for e in engine.run_until_idle().unwrap() {
            if let Event::Finished { seq, generation } = e {
                out[kids.iter().position(|&k| k == seq).unwrap()] = generation.tokens;
            }
        }
        (out, engine.stats().device_draw_steps)
    };
    let (first, steps) = run();
    assert!(steps > 0, "no step drew on the device");
    assert!(first.iter().all(|t| t.len() == 12), "{first:?}");
    assert_eq!(run().0, first, "the same seeds drew other tokens");
}
