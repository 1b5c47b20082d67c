//! Each backend op against a straightforward f64 reference, at odd shapes (rows, columns and
//! batch sizes that are not multiples of any tile), on every backend.

mod common;

use qmtot::backend::cpu::CpuTensor;
use qmtot::backend::{Backend, KvShape, QkvLayout, StepInput};
use qmtot::formats::gguf::{quantize_q8_0, GgmlType, GgufFile, GgufWriter};
use qmtot::quant::{DenseMatrix, Int4Matrix, WeightMatrix};

use common::{assert_close, cpu_backends, rand_values};

fn tensor(rows: usize, cols: usize, data: Vec<f32>) -> CpuTensor {
    CpuTensor { rows, cols, data }
}

/// `x · Wᵀ` in f64 over the dequant oracle's weights.
fn reference_matmul(x: &[f32], t: usize, parts: &[&WeightMatrix]) -> Vec<f32> {
    let k = parts[0].cols();
    let w: Vec<f32> = parts.iter().flat_map(|p| p.dequant()).collect();
    let n = w.len() / k;
    let mut out = vec![0f32; t * n];
    for m in 0..t {
        for j in 0..n {
            let s: f64 = (0..k).map(|c| x[m * k + c] as f64 * w[j * k + c] as f64).sum();
            out[m * n + j] = s as f32;
        }
    }
    out
}

fn int8_matrix(rows: usize, cols: usize, seed: u64) -> WeightMatrix {
    let mut w = GgufWriter::new();
    w.tensor(
        "w",
        &[rows, cols],
        GgmlType::Q8_0,
        quantize_q8_0(&rand_values(rows * cols, seed, 1.0)),
    )
    .unwrap();
    GgufFile::from_bytes(w.to_bytes()).unwrap().weight_matrix("w").unwrap()
}

#[test]
fn matmul_matches_the_dequant_oracle_at_odd_shapes() {
    for (name, b) in cpu_backends() {
        // (rows N, inputs K, group): N off every multiple of 4 and 16; K below, at and above the
        // 512-input block; every group size.
        for &(n, k, g) in &[
            (1, 32, 32),
            (7, 96, 32),
            (21, 544, 32),
            (37, 1088, 64),
            (18, 640, 128),
            (3, 128, 128),
        ] {
            let w = WeightMatrix::Int4(Int4Matrix::quantize_rtn(n, k, g, &rand_values(n * k, 3, 0.5)).unwrap());
            let lin = b.upload_linear(&[&w]).unwrap();
            for &t in &[1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 64, 65, 130] {
                let x = rand_values(t * k, 100 + t as u64, 1.0);
                let mut out = b.alloc_activations(t, n).unwrap();
                out.data.fill(f32::NAN); // every element must be written
                b.run(|| b.matmul(&tensor(t, k, x.clone()), &lin, &mut out)).unwrap();
                // f32 accumulation over K products of magnitude ≤ ~1: relative error of a few
                // ulps times sqrt(K) against the f64 sum; 2e-5·sqrt(K) absolute covers it with
                // margin (K ≤ 1088 → ≤ 6.6e-4), while a wrong nibble, scale or min is off by
                // ≥ 1e-2.
                let tol = 2e-5 * (k as f32).sqrt();
                assert_close(
                    &format!("{name}: int4 N={n} K={k} g={g} T={t}"),
                    &out.data,
                    &reference_matmul(&x, t, &[&w]),
                    tol,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn matmul_over_stacked_parts_of_mixed_formats() {
    let k = 160;
    let a = WeightMatrix::Int4(Int4Matrix::quantize_rtn(9, k, 32, &rand_values(9 * k, 1, 1.0)).unwrap());
    let c = int8_matrix(6, k, 2);
    let d = WeightMatrix::Dense(DenseMatrix::new(5, k, rand_values(5 * k, 3, 1.0)).unwrap());
    let e = WeightMatrix::Int4(Int4Matrix::quantize_rtn(17, k, 32, &rand_values(17 * k, 4, 1.0)).unwrap());
    let parts = [&a, &c, &d, &e];
    for (name, b) in cpu_backends() {
        let lin = b.upload_linear(&parts).unwrap();
        for t in [1, 3, 4, 9] {
            let x = rand_values(t * k, 7 + t as u64, 1.0);
            let mut out = b.alloc_activations(t, 37).unwrap();
            b.run(|| b.matmul(&tensor(t, k, x.clone()), &lin, &mut out)).unwrap();
            assert_close(
                &format!("{name}: stacked T={t}"),
                &out.data,
                &reference_matmul(&x, t, &parts),
                2e-4,
                1e-5,
            );
        }
    }
}

/// A permutation of `0..n` from a seed.
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let r = rand_values(n, seed, 1.0);
    p.sort_by(|&a, &b| r[a as usize].total_cmp(&r[b as usize]));
    p
}

#[test]
fn act_order_matmul_gathers_the_inputs_like_the_oracle() {
    // GPTQ act-order: stored column j reads input order[j]; the oracle (dequant) puts each
    // stored column back at its input, so W·x must match whatever the order.
    let k = 256;
    let order = permutation(k, 9);
    let int4 = |rows, seed| Int4Matrix::quantize_rtn(rows, k, 64, &rand_values(rows * k, seed, 1.0)).unwrap();
    let a = WeightMatrix::Int4(int4(7, 1).with_input_order(order.clone()).unwrap());
    let b = WeightMatrix::Int4(int4(12, 2).with_input_order(order.clone()).unwrap());
    let parts = [&a, &b];
    for (name, be) in cpu_backends() {
        let lin = be.upload_linear(&parts).unwrap();
        for t in [1, 5, 9] {
            let x = rand_values(t * k, 30 + t as u64, 1.0);
            let mut out = be.alloc_activations(t, 19).unwrap();
            be.run(|| be.matmul(&tensor(t, k, x.clone()), &lin, &mut out)).unwrap();
            assert_close(
                &format!("{name}: act-order T={t}"),
                &out.data,
                &reference_matmul(&x, t, &parts),
                2e-4,
                1e-5,
            );
        }
        // The order matters: the same stored matrix without it is a different function.
        let plain = WeightMatrix::Int4(int4(7, 1));
        let x = rand_values(k, 3, 1.0);
        let (mut o1, mut o2) = (be.alloc_activations(1, 7).unwrap(), be.alloc_activations(1, 7).unwrap());
        let (l1, l2) = (be.upload_linear(&[&a]).unwrap(), be.upload_linear(&[&plain]).unwrap());
        be.run(|| be.matmul(&tensor(1, k, x.clone()), &l1, &mut o1)).unwrap();
        be.run(|| be.matmul(&tensor(1, k, x.clone()), &l2, &mut o2)).unwrap();
        assert!(common::max_abs_diff(&o1.data, &o2.data) > 1e-2);
        // Parts that read one input in different orders cannot be fused.
        let other = WeightMatrix::Int4(int4(7, 3).with_input_order(permutation(k, 10)).unwrap());
        assert!(be.upload_linear(&[&a, &other]).is_err());
        assert!(be.upload_linear(&[&a, &plain]).is_err());
    }
    assert!(int4(3, 4).with_input_order(vec![0; k]).is_err(), "not a permutation");
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let (_, b) = cpu_backends().remove(0);
    let w = WeightMatrix::Dense(DenseMatrix::new(4, 8, vec![0.0; 32]).unwrap());
    let lin = b.upload_linear(&[&w]).unwrap();
    let mut out = b.alloc_activations(2, 4).unwrap();
    assert!(b.matmul(&tensor(2, 7, vec![0.0; 14]), &lin, &mut out).is_err());
    let mut wrong_out = b.alloc_activations(2, 5).unwrap();
    assert!(b.matmul(&tensor(2, 8, vec![0.0; 16]), &lin, &mut wrong_out).is_err());
    let other = WeightMatrix::Dense(DenseMatrix::new(4, 9, vec![0.0; 36]).unwrap());
    assert!(
        b.upload_linear(&[&w, &other]).is_err(),
        "parts must share their input width"
    );
}

/// Naive causal GQA attention in f64 over explicit K/V per position.
fn reference_attention(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
) -> Vec<f32> {
    let group = n_heads / n_kv;
    let mut out = vec![0f32; n_heads * hd];
    for h in 0..n_heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| (0..hd).map(|i| qh[i] as f64 * k[kvh * hd + i] as f64).sum::<f64>() / (hd as f64).sqrt())
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for i in 0..hd {
            let v: f64 = scores
                .iter()
                .zip(values)
                .map(|(s, v)| (s - max).exp() / z * v[kvh * hd + i] as f64)
                .sum();
            out[h * hd + i] = v as f32;
        }
    }
    out
}

#[test]
fn paged_attention_matches_naive_attention_over_scattered_blocks() {
    let layout = QkvLayout {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 40,
    };
    let bs = 16;
    for (name, b) in cpu_backends() {
        // Two sequences, 700 and 37 positions (700 spans several 256-position chunks), with
        // their blocks interleaved and reversed in a pool; unused slots stay NaN.
        let lens = [700usize, 37];
        let shape = KvShape {
            n_layers: 2,
            n_blocks: 64,
            block_size: bs,
            n_kv_heads: 2,
            head_dim: 40,
        };
        let mut kv = b.alloc_kv(shape).unwrap();
        let mut free: Vec<u32> = (0..64).rev().collect();
        let tables: Vec<Vec<u32>> = lens
            .iter()
            .map(|&l| (0..l.div_ceil(bs)).map(|_| free.pop().unwrap()).rev().collect())
            .collect();
        let w = layout.width();
        // Write every position through kv_write (layer 1), one step per sequence.
        let mut kvs: Vec<Vec<(Vec<f32>, Vec<f32>)>> = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let rows = rand_values(len * w, 50 + s as u64, 1.0);
            let slots = (0..len)
                .map(|p| tables[s][p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            let step = StepInput::one_sequence(vec![0; len], 0, slots, tables[s].clone(), vec![]);
            let st = b.upload_step(&step).unwrap();
            b.kv_write(&mut kv, 1, &tensor(len, w, rows.clone()), layout, &st)
                .unwrap();
            kvs.push(
                (0..len)
                    .map(|p| {
                        let r = &rows[p * w..(p + 1) * w];
                        (
                            r[layout.k_offset()..layout.v_offset()].to_vec(),
                            r[layout.v_offset()..].to_vec(),
                        )
                    })
                    .collect(),
            );
        }
        // Query rows at several positions of both sequences in one step.
        let queries: Vec<(usize, usize)> = vec![(0, 0), (0, 255), (0, 256), (0, 699), (1, 36), (1, 3), (0, 511)];
        let qrows = rand_values(queries.len() * w, 99, 1.0);
        let step = StepInput {
            tokens: vec![0; queries.len()],
            positions: queries.iter().map(|&(_, p)| p as u32).collect(),
            slots: queries
                .iter()
                .map(|&(s, p)| tables[s][p / bs] * bs as u32 + (p % bs) as u32)
                .collect(),
            row_seq: queries.iter().map(|&(s, _)| s as u32).collect(),
            block_tables: tables.clone(),
            logit_rows: vec![],
            groups: vec![],
        };
        let st = b.upload_step(&step).unwrap();
        let mut out = b.alloc_activations(queries.len(), 6 * 40).unwrap();
        b.run(|| b.attention(&tensor(queries.len(), w, qrows.clone()), &kv, 1, layout, &st, &mut out))
            .unwrap();
        for (r, &(s, p)) in queries.iter().enumerate() {
            let keys: Vec<Vec<f32>> = kvs[s][..=p].iter().map(|(k, _)| k.clone()).collect();
            let values: Vec<Vec<f32>> = kvs[s][..=p].iter().map(|(_, v)| v.clone()).collect();
            let want = reference_attention(&qrows[r * w..r * w + 240], &keys, &values, 6, 2, 40);
            // Softmax-weighted averages of values in [-1, 1]: f32 error ~1e-6; 2e-5 leaves
            // margin and still catches any wrong position, head mapping or merge weight.
            assert_close(
                &format!("{name}: seq {s} pos {p}"),
                &out.data[r * 240..(r + 1) * 240],
                &want,
                2e-5,
                1e-5,
            );
        }
        // Layer 0 was never written: reading it must not silently produce numbers.
        let mut out0 = b.alloc_activations(queries.len(), 240).unwrap();
        b.run(|| b.attention(&tensor(queries.len(), w, qrows.clone()), &kv, 0, layout, &st, &mut out0))
            .unwrap();
        assert!(
            out0.data.iter().all(|v| v.is_nan()),
            "{name}: unwritten (NaN-poisoned) slots were not read"
        );
    }
}

/// One sequence of a cascade test: `len` cached positions (its own after its group's prefix),
/// and query rows at `rows` (positions) in the attention step.
struct SeqSpec {
    group: Option<usize>,
    len: usize,
    rows: Vec<usize>,
}

/// A step with sharing groups: `prefix_blocks[g]` shared blocks for group `g`.
struct CascadeCase {
    name: &'static str,
    layout: QkvLayout,
    block_size: usize,
    prefix_blocks: Vec<usize>,
    seqs: Vec<SeqSpec>,
}

fn seq(group: Option<usize>, len: usize, rows: impl IntoIterator<Item = usize>) -> SeqSpec {
    SeqSpec {
        group,
        len,
        rows: rows.into_iter().collect(),
    }
}

/// Builds the pool of `case`, writes its K/V through `kv_write` (a shared prefix once, through
/// its group's first member; each sequence's own positions through its own table; every other
/// slot stays NaN) and runs attention with and without the groups on every backend: the
/// cascade must match plain paged attention and both the f64 reference.
fn check_cascade_case(case: &CascadeCase) {
    let (layout, bs) = (case.layout, case.block_size);
    let (w, qw) = (layout.width(), layout.n_heads * layout.head_dim);
    let n_groups = case.prefix_blocks.len();
    let prefix = |s: &SeqSpec| s.group.map_or(0, |g| case.prefix_blocks[g] * bs);
    let own_blocks = |s: &SeqSpec| s.len.div_ceil(bs) - prefix(s) / bs;
    // Physical blocks scattered over the pool by a stride coprime to its size, with 3 never
    // used (NaN) among them.
    let used = case.prefix_blocks.iter().sum::<usize>() + case.seqs.iter().map(own_blocks).sum::<usize>();
    let n_blocks = used + 3;
    let stride = (7..).find(|k| gcd(*k, n_blocks) == 1).unwrap();
    let mut free = (0..n_blocks).map(|i| (i * stride % n_blocks) as u32);
    let group_blocks: Vec<Vec<u32>> = case
        .prefix_blocks
        .iter()
        .map(|&n| free.by_ref().take(n).collect())
        .collect();
    let tables: Vec<Vec<u32>> = case
        .seqs
        .iter()
        .map(|s| {
            let shared = s.group.map_or(vec![], |g| group_blocks[g].clone());
            shared.into_iter().chain(free.by_ref().take(own_blocks(s))).collect()
        })
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
    // Cached rows (only their K and V columns matter) per sequence: a member's prefix rows
    // are its group's.
    let group_rows: Vec<Vec<f32>> = (0..n_groups)
        .map(|g| rand_values(case.prefix_blocks[g] * bs * w, 300 + g as u64, 1.0))
        .collect();
    let cached: Vec<Vec<f32>> = case
        .seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let shared = s.group.map_or(&[][..], |g| &group_rows[g][..]);
            let own = rand_values((s.len - prefix(s)) * w, 400 + i as u64, 1.0);
            [shared, &own[..]].concat()
        })
        .collect();
    // Writes: each group's prefix once, then each sequence's own positions.
    let mut writes: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for g in 0..n_groups {
        if let Some(first) = case.seqs.iter().position(|s| s.group == Some(g)) {
            writes.push((first, 0..case.prefix_blocks[g] * bs));
        }
    }
    writes.extend(case.seqs.iter().enumerate().map(|(i, s)| (i, prefix(s)..s.len)));

    // The attention step: the sequences' rows interleaved round-robin, so a group's rows are
    // not contiguous; group members listed last to first.
    let mut rows: Vec<(usize, usize)> = Vec::new();
    for k in 0..case.seqs.iter().map(|s| s.rows.len()).max().unwrap_or(0) {
        rows.extend(
            case.seqs
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.rows.get(k).map(|&p| (i, p))),
        );
    }
    let t = rows.len();
    let shape = KvShape {
        n_layers: 1,
        n_blocks,
        block_size: bs,
        n_kv_heads: layout.n_kv_heads,
        head_dim: layout.head_dim,
    };
    let step = StepInput {
        tokens: vec![0; t],
        positions: rows.iter().map(|&(_, p)| p as u32).collect(),
        slots: rows.iter().map(|&(s, p)| slot(s, p)).collect(),
        row_seq: rows.iter().map(|&(s, _)| s as u32).collect(),
        block_tables: tables.clone(),
        logit_rows: vec![],
        groups: (0..n_groups)
            .map(|g| qmtot::backend::SharedPrefix {
                seqs: (0..case.seqs.len() as u32)
                    .rev()
                    .filter(|&i| case.seqs[i as usize].group == Some(g))
                    .collect(),
                blocks: case.prefix_blocks[g] as u32,
            })
            .collect(),
    };
    // The test's own inputs obey the SharedPrefix invariants.
    step.validate(1, 1 << 20, &shape).unwrap();
    let plain = StepInput {
        groups: vec![],
        ..step.clone()
    };
    // Queries scaled so softmaxes are peaked (scores of a few units), not nearly uniform.
    let q = tensor(t, w, rand_values(t * w, 500, 4.0));
    let want: Vec<f32> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, &(s, p))| {
            let at = |i: usize, from: usize, to: usize| cached[s][i * w + from..i * w + to].to_vec();
            let keys: Vec<Vec<f32>> = (0..=p).map(|i| at(i, layout.k_offset(), layout.v_offset())).collect();
            let values: Vec<Vec<f32>> = (0..=p).map(|i| at(i, layout.v_offset(), w)).collect();
            let (nh, nkv, hd) = (layout.n_heads, layout.n_kv_heads, layout.head_dim);
            reference_attention(&q.data[r * w..r * w + qw], &keys, &values, nh, nkv, hd)
        })
        .collect();

    for (name, b) in cpu_backends() {
        let what = format!("{name}: {}", case.name);
        let mut kv = b.alloc_kv(shape).unwrap();
        for (s, range) in &writes {
            let n = range.len();
            let slots = range.clone().map(|p| slot(*s, p)).collect();
            let write = StepInput::one_sequence(vec![0; n], range.start as u32, slots, tables[*s].clone(), vec![]);
            let rows = cached[*s][range.start * w..range.end * w].to_vec();
            b.kv_write(&mut kv, 0, &tensor(n, w, rows), layout, &b.upload_step(&write).unwrap())
                .unwrap();
        }
        let run = |step: &StepInput| {
            let mut out = b.alloc_activations(t, qw).unwrap();
            let st = b.upload_step(step).unwrap();
            b.run(|| b.attention(&q, &kv, 0, layout, &st, &mut out)).unwrap();
            out.data
        };
        let (cascade, reference) = (run(&step), run(&plain));
        // Unused slots are NaN: reading one shows here (and fails assert_close below too).
        assert!(cascade.iter().all(|v| v.is_finite()), "{what}: non-finite output");
        // The same f32 sums in a different chunking and order: outputs are convex
        // combinations of values in [-1, 1], so they differ by a few ulp of 1 (measured
        // ≤ 3e-7; atol 1e-6) — relative error alone would not do for elements near 0 — or of
        // the element (rtol 1e-5); a position read twice, missed or read through the wrong
        // table is off by ≥ 1e-3.
        assert_close(&format!("{what}: cascade vs plain"), &cascade, &reference, 1e-6, 1e-5);
        // Against the f64 reference both carry the f32 rounding of scores and sums: measured
        // ≤ 3e-7; 2e-6 leaves margin and is still far below a misread position.
        assert_close(&format!("{what}: cascade vs f64"), &cascade, &want, 2e-6, 1e-5);
        assert_close(&format!("{what}: plain vs f64"), &reference, &want, 2e-6, 1e-5);
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[test]
fn cascade_attention_equals_plain_attention() {
    let gqa3 = QkvLayout {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 40,
    };
    // Group size 1 (one query head per KV head) and a head_dim off every multiple of 8.
    let mha = QkvLayout {
        n_heads: 4,
        n_kv_heads: 4,
        head_dim: 20,
    };
    let cases = [
        // Two siblings, one decode row each; one suffix partly fills its block.
        CascadeCase {
            name: "1 group of 2",
            layout: gqa3,
            block_size: 16,
            prefix_blocks: vec![2],
            seqs: vec![seq(Some(0), 37, [36]), seq(Some(0), 48, [47])],
        },
        // Eight siblings over a 640-token prefix (several prefix chunks), suffixes of 1..=15.
        CascadeCase {
            name: "1 group of 8",
            layout: gqa3,
            block_size: 16,
            prefix_blocks: vec![40],
            seqs: (0..8).map(|i| seq(Some(0), 641 + 2 * i, [640 + 2 * i])).collect(),
        },
        // Odd block size: two groups (one with a member that has no row this step, one with
        // a single block), a group sharing no blocks, and ungrouped sequences, one long enough
        // for several own-position chunks and with several rows.
        CascadeCase {
            name: "two groups and ungrouped, block 5",
            layout: mha,
            block_size: 5,
            prefix_blocks: vec![3, 1, 0],
            seqs: vec![
                seq(Some(0), 18, [17]),
                seq(None, 300, [299, 256, 0, 131]),
                seq(Some(1), 5 + 7, [11, 8]),
                seq(Some(0), 16, [15]),
                seq(Some(0), 21, []),
                seq(None, 9, [8]),
                seq(Some(1), 5, []),
                seq(Some(1), 6, [5]),
                seq(Some(2), 3, [2]),
                seq(Some(0), 20, [15]),
            ],
        },
        // A group whose members have several rows each (prefill chunks right after a
        // 320-token prefix): 102 queries, so the prefix takes several query tiles.
        CascadeCase {
            name: "group with prefill chunks",
            layout: gqa3,
            block_size: 16,
            prefix_blocks: vec![20],
            seqs: vec![
                seq(Some(0), 350, 320..350),
                seq(Some(0), 323, 320..323),
                seq(Some(0), 325, [324]),
                seq(None, 40, 30..40),
            ],
        },
        // Wide prefix tiles (≥ 8 queries, scored against the queries transposed) whose query
        // count is off a multiple of 8 and whose prefix chunk is off a multiple of 4 keys:
        // 9 rows at group size 1 and head_dim 20, and 3 rows at group size 3, block 5.
        CascadeCase {
            name: "wide tiles of 9 queries, block 5",
            layout: mha,
            block_size: 5,
            prefix_blocks: vec![7, 41],
            seqs: (0..9)
                .map(|i| seq(Some(0), 36 + i, [35 + i]))
                .chain((0..3).map(|i| seq(Some(1), 206 + 3 * i, [205 + 3 * i])))
                .collect(),
        },
        CascadeCase {
            name: "wide tile of 3 rows × 3 query heads, block 5",
            layout: gqa3,
            block_size: 5,
            prefix_blocks: vec![41],
            seqs: (0..3).map(|i| seq(Some(0), 206 + 3 * i, [205 + 3 * i])).collect(),
        },
        // Group size 1 with a long shared prefix (many prefix chunks of the 4-query group).
        CascadeCase {
            name: "group size 1, group of 4",
            layout: mha,
            block_size: 16,
            prefix_blocks: vec![33],
            seqs: (0..4).map(|i| seq(Some(0), 530 + 5 * i, [529 + 5 * i])).collect(),
        },
    ];
    for case in &cases {
        check_cascade_case(case);
    }
}

#[test]
fn cascade_attention_rejects_inconsistent_groups() {
    let layout = QkvLayout {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
    };
    let shape = KvShape {
        n_layers: 1,
        n_blocks: 8,
        block_size: 4,
        n_kv_heads: 1,
        head_dim: 8,
    };
    let share = |seqs: Vec<u32>, blocks| qmtot::backend::SharedPrefix { seqs, blocks };
    let good = StepInput {
        tokens: vec![0, 0],
        positions: vec![9, 8],
        slots: vec![5 * 4 + 1, 6 * 4],
        row_seq: vec![0, 1],
        block_tables: vec![vec![0, 1, 5], vec![0, 1, 6]],
        logit_rows: vec![],
        groups: vec![share(vec![0, 1], 2)],
    };
    let bad = [
        ("tables differ", vec![share(vec![0, 1], 3)]),
        ("sequence out of range", vec![share(vec![0, 2], 2)]),
        ("sequence in two groups", vec![share(vec![0, 1], 2), share(vec![1], 1)]),
    ];
    let inside = StepInput {
        positions: vec![9, 7],
        slots: vec![5 * 4 + 1, 4 + 3],
        ..good.clone()
    };
    for (name, b) in cpu_backends() {
        let kv = b.alloc_kv(shape).unwrap();
        let q = tensor(2, layout.width(), vec![0.0; 2 * layout.width()]);
        let mut out = b.alloc_activations(2, 16).unwrap();
        // The well-formed step runs (reading NaN: nothing was written).
        b.attention(&q, &kv, 0, layout, &b.upload_step(&good).unwrap(), &mut out)
            .unwrap();
        for (what, groups) in &bad {
            let step = StepInput {
                groups: groups.clone(),
                ..good.clone()
            };
            let st = b.upload_step(&step).unwrap();
            assert!(
                b.attention(&q, &kv, 0, layout, &st, &mut out).is_err(),
                "{name}: {what}"
            );
        }
        let st = b.upload_step(&inside).unwrap();
        assert!(
            b.attention(&q, &kv, 0, layout, &st, &mut out).is_err(),
            "{name}: a row inside the shared prefix"
        );
    }
}

#[test]
fn rope_rotates_adjacent_pairs_or_half_split() {
    let layout = QkvLayout {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
    };
    let (half, max_pos, theta) = (4, 50, 10000f64);
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 * theta.powf(-(2.0 * i as f64) / 8.0);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    for (name, b) in cpu_backends() {
        let (cv, sv) = (b.upload_vector(&cos).unwrap(), b.upload_vector(&sin).unwrap());
        for half_split in [false, true] {
            let x = rand_values(2 * layout.width(), 5, 1.0);
            let positions = [3u32, 47];
            let step = StepInput {
                tokens: vec![0, 0],
                positions: positions.to_vec(),
                slots: vec![0, 1],
                row_seq: vec![0, 0],
                block_tables: vec![vec![0]],
                logit_rows: vec![],
                groups: vec![],
            };
            let st = b.upload_step(&step).unwrap();
            let mut t = tensor(2, layout.width(), x.clone());
            b.run(|| b.rope(&mut t, layout, &cv, &sv, half_split, &st)).unwrap();
            for (r, &p) in positions.iter().enumerate() {
                let row = &x[r * layout.width()..(r + 1) * layout.width()];
                let got = &t.data[r * layout.width()..(r + 1) * layout.width()];
                for head in 0..4 {
                    let base = head * 8;
                    for i in 0..4 {
                        let (ia, ib) = if half_split { (i, i + 4) } else { (2 * i, 2 * i + 1) };
                        let a = p as f64 * theta.powf(-(2.0 * i as f64) / 8.0);
                        let (xa, xb) = (row[base + ia] as f64, row[base + ib] as f64);
                        let want_a = xa * a.cos() - xb * a.sin();
                        let want_b = xa * a.sin() + xb * a.cos();
                        if head < 3 {
                            assert!(
                                (got[base + ia] as f64 - want_a).abs() < 1e-5,
                                "{name} hs={half_split} head {head} pair {i}"
                            );
                            assert!(
                                (got[base + ib] as f64 - want_b).abs() < 1e-5,
                                "{name} hs={half_split} head {head} pair {i}"
                            );
                        } else {
                            // V heads are not rotated.
                            assert_eq!((got[base + ia], got[base + ib]), (row[base + ia], row[base + ib]));
                        }
                    }
                }
            }
        }
        // A position past the table is an error, not an out-of-bounds read.
        let step = StepInput {
            tokens: vec![0],
            positions: vec![max_pos as u32],
            slots: vec![0],
            row_seq: vec![0],
            block_tables: vec![vec![0]],
            logit_rows: vec![],
            groups: vec![],
        };
        let st = b.upload_step(&step).unwrap();
        let mut t = tensor(1, layout.width(), vec![0.0; layout.width()]);
        assert!(b.rope(&mut t, layout, &cv, &sv, false, &st).is_err());
    }
}

#[test]
fn norm_activation_add_gather_and_block_copy() {
    for (name, b) in cpu_backends() {
        let (t, d) = (11, 24);
        let x = rand_values(t * d, 1, 2.0);
        let w = rand_values(d, 2, 1.0);
        let mut out = b.alloc_activations(t, d).unwrap();
        let wv = b.upload_vector(&w).unwrap();
        b.run(|| b.rmsnorm(&tensor(t, d, x.clone()), &wv, 1e-5, &mut out))
            .unwrap();
        let mut want = vec![0f32; t * d];
        for r in 0..t {
            let row = &x[r * d..(r + 1) * d];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            for c in 0..d {
                want[r * d + c] = (row[c] as f64 / (ms + 1e-5).sqrt() * w[c] as f64) as f32;
            }
        }
        assert_close(&format!("{name}: rmsnorm"), &out.data, &want, 1e-5, 1e-5);

        let gu = rand_values(t * 2 * d, 3, 4.0);
        let mut act = b.alloc_activations(t, d).unwrap();
        b.run(|| b.silu_mul(&tensor(t, 2 * d, gu.clone()), &mut act)).unwrap();
        let want: Vec<f32> = (0..t * d)
            .map(|i| {
                let (r, c) = (i / d, i % d);
                let g = gu[r * 2 * d + c] as f64;
                let u = gu[r * 2 * d + d + c] as f64;
                (g / (1.0 + (-g).exp()) * u) as f32
            })
            .collect();
        assert_close(&format!("{name}: silu_mul"), &act.data, &want, 1e-5, 1e-5);

        let mut a = tensor(t, d, x.clone());
        b.run(|| b.add_assign(&mut a, &tensor(t, d, gu[..t * d].to_vec())))
            .unwrap();
        let want: Vec<f32> = x.iter().zip(&gu).map(|(p, q)| p + q).collect();
        assert_eq!(a.data, want, "{name}: add");

        let step = StepInput {
            tokens: vec![0; t],
            positions: vec![0; t],
            slots: vec![0; t],
            row_seq: vec![0; t],
            block_tables: vec![vec![0]],
            logit_rows: vec![10, 0, 4],
            groups: vec![],
        };
        let st = b.upload_step(&step).unwrap();
        let mut g = b.alloc_activations(3, d).unwrap();
        b.gather_logit_rows(&tensor(t, d, x.clone()), &st, &mut g).unwrap();
        assert_eq!(&g.data[..d], &x[10 * d..11 * d]);
        assert_eq!(&g.data[d..2 * d], &x[..d]);

        // Copy-on-write block copy: every layer's K and V of block 1 land in block 3.
        let layout = QkvLayout {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
        };
        let shape = KvShape {
            n_layers: 2,
            n_blocks: 4,
            block_size: 2,
            n_kv_heads: 1,
            head_dim: 8,
        };
        let mut kv = b.alloc_kv(shape).unwrap();
        let rows = rand_values(2 * layout.width(), 9, 1.0);
        let step = StepInput {
            tokens: vec![0, 0],
            positions: vec![0, 1],
            slots: vec![2, 3],
            row_seq: vec![0, 0],
            block_tables: vec![vec![1]],
            logit_rows: vec![],
            groups: vec![],
        };
        let st = b.upload_step(&step).unwrap();
        for layer in 0..2 {
            b.kv_write(&mut kv, layer, &tensor(2, layout.width(), rows.clone()), layout, &st)
                .unwrap();
        }
        b.copy_blocks(&mut kv, &[(1, 3)]).unwrap();
        let copied = StepInput {
            block_tables: vec![vec![3]],
            slots: vec![6, 7],
            ..step.clone()
        };
        let (st1, st3) = (b.upload_step(&step).unwrap(), b.upload_step(&copied).unwrap());
        for layer in 0..2 {
            let q = tensor(2, layout.width(), rand_values(2 * layout.width(), 10, 1.0));
            let mut o1 = b.alloc_activations(2, 16).unwrap();
            let mut o3 = b.alloc_activations(2, 16).unwrap();
            b.attention(&q, &kv, layer, layout, &st1, &mut o1).unwrap();
            b.attention(&q, &kv, layer, layout, &st3, &mut o3).unwrap();
            assert_eq!(o1.data, o3.data, "{name}: layer {layer} block copy");
            assert!(o3.data.iter().all(|v| v.is_finite()));
        }
        assert!(
            b.copy_blocks(&mut kv, &[(1, 4)]).is_err(),
            "{name}: copy outside the pool"
        );
    }
}

// ---- the Q8 (8-bit activation) matmul ------------------------------------------------------

fn q8_backends() -> Vec<(String, qmtot::backend::cpu::CpuBackend)> {
    cpu_backends()
        .into_iter()
        .map(|(_, b)| {
            let b = b.with_precision(qmtot::backend::cpu::MatmulPrecision::Q8);
            (b.name(), b)
        })
        .collect()
}

/// The worst-case error of 8-bit activation rounding for one output: the Q8 path computes the
/// exact dot product of the weights with the rounded activations, each off by at most half its
/// chunk's step `d = max|x|/127`, so `|Δ| ≤ Σ_c |w_c| · d(c)/2`.
fn q8_bound(x: &[f32], w: &[f32]) -> f32 {
    let mut bound = 0f32;
    for (xc, wc) in x.chunks(32).zip(w.chunks(32)) {
        let d = xc.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        bound += wc.iter().map(|v| v.abs()).sum::<f32>() * d / 2.0;
    }
    bound
}

#[test]
fn q8_matmul_stays_within_the_activation_rounding_bound() {
    let k = 544;
    let int4 = WeightMatrix::Int4(Int4Matrix::quantize_rtn(21, k, 32, &rand_values(21 * k, 3, 0.5)).unwrap());
    let int4_g128 = WeightMatrix::Int4(Int4Matrix::quantize_rtn(6, 640, 128, &rand_values(6 * 640, 4, 0.5)).unwrap());
    let int8 = int8_matrix(13, k, 5);
    for (name, b) in q8_backends() {
        for (wname, w) in [("int4", &int4), ("int4 g128", &int4_g128), ("int8", &int8)] {
            let (n, kk) = (w.rows(), w.cols());
            let dense = w.dequant();
            let lin = b.upload_linear(&[w]).unwrap();
            for t in [1, 3, 4, 9] {
                let x = rand_values(t * kk, 40 + t as u64, 1.0);
                let mut out = b.alloc_activations(t, n).unwrap();
                out.data.fill(f32::NAN);
                b.run(|| b.matmul(&tensor(t, kk, x.clone()), &lin, &mut out)).unwrap();
                let want = reference_matmul(&x, t, &[w]);
                for m in 0..t {
                    for j in 0..n {
                        let bound = q8_bound(&x[m * kk..(m + 1) * kk], &dense[j * kk..(j + 1) * kk]);
                        // The rounding bound plus f32 accumulation slack (as in the f32 test).
                        let tol = bound + 2e-5 * (kk as f32).sqrt();
                        let (g, r) = (out.data[m * n + j], want[m * n + j]);
                        assert!(
                            (g - r).abs() <= tol,
                            "{name} {wname} T={t} [{m},{j}]: {g} vs {r}, bound {tol}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn f32_matmul_rows_are_bit_identical_whatever_the_batch_size() {
    // Every schedule (GEMV for one row, multi-row GEMV for siblings, dequantized-tile GEMM for
    // prompts) must do the same float operations in the same order per output, so a sibling
    // decoded in a batch of 8 equals the same sibling decoded alone, bit for bit.
    let k = 1088; // three 512-input blocks, the last partial
    let w = WeightMatrix::Int4(Int4Matrix::quantize_rtn(21, k, 64, &rand_values(21 * k, 11, 0.5)).unwrap());
    let w8 = int8_matrix(13, k, 12);
    let x = rand_values(40 * k, 13, 1.0);
    for (name, b) in cpu_backends() {
        let lin = b.upload_linear(&[&w, &w8]).unwrap();
        let mut alone = Vec::new();
        for m in 0..40 {
            let mut one = b.alloc_activations(1, 34).unwrap();
            b.run(|| b.matmul(&tensor(1, k, x[m * k..(m + 1) * k].to_vec()), &lin, &mut one))
                .unwrap();
            alone.extend(one.data);
        }
        for t in (2..=20).chain([33, 40]) {
            let mut batched = b.alloc_activations(t, 34).unwrap();
            b.run(|| b.matmul(&tensor(t, k, x[..t * k].to_vec()), &lin, &mut batched))
                .unwrap();
            assert_eq!(batched.data, alone[..t * 34], "{name}: T={t} vs one row at a time");
        }
    }
}

#[test]
fn q8_matmul_is_batch_invariant_and_identical_on_every_isa() {
    let k = 576;
    let w = WeightMatrix::Int4(Int4Matrix::quantize_rtn(40, k, 32, &rand_values(40 * k, 8, 0.5)).unwrap());
    let w8 = int8_matrix(24, k, 9);
    let x = rand_values(70 * k, 10, 1.0);
    let mut results: Vec<(String, Vec<f32>)> = Vec::new();
    for (name, b) in q8_backends() {
        let lin = b.upload_linear(&[&w, &w8]).unwrap();
        let mut batched = b.alloc_activations(70, 64).unwrap();
        b.run(|| b.matmul(&tensor(70, k, x.clone()), &lin, &mut batched))
            .unwrap();
        for (m, rows) in [(0usize, 1usize), (5, 1), (67, 3), (10, 4), (20, 9)] {
            let mut part = b.alloc_activations(rows, 64).unwrap();
            b.run(|| b.matmul(&tensor(rows, k, x[m * k..(m + rows) * k].to_vec()), &lin, &mut part))
                .unwrap();
            assert_eq!(
                part.data,
                batched.data[m * 64..(m + rows) * 64],
                "{name}: rows {m}..{} alone vs batched",
                m + rows
            );
        }
        results.push((name, batched.data));
    }
    // Exact integer dot products and the same float steps in the same order on every ISA.
    for (name, r) in &results[1..] {
        assert_eq!(r, &results[0].1, "{name} vs {}", results[0].0);
    }
}
