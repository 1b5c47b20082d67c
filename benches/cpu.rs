//! CPU criterion benchmarks: the INT4 matmul at SmolLM2-135M and LLaMA-3.1-8B shapes for
//! M = 1, 8, 32 activation rows; one layer of paged attention for sibling sequences sharing a
//! prefix, plain against cascade; drawing one token from a LLaMA-3 vocabulary row (128256
//! logits) with each sampling setting; and (when the default model is present) one decode step
//! and a 512-token prefill of SmolLM2-135M. Throughput is reported in weights per second for the
//! matmuls (M·N·K / time would double-count nothing: each weight is read once per call).
//!
//! `cargo bench --bench cpu` (set `QMTOT_BENCH_FILTER`-style filters with criterion's own
//! positional argument, e.g. `cargo bench --bench cpu -- int4/smollm2`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use qmtot::backend::cpu::{CpuBackend, CpuTensor, MatmulPrecision};
use qmtot::backend::{Backend, KvShape, QkvLayout, SharedPrefix, StepInput};
use qmtot::bench::decode;
use qmtot::config::ModelConfig;
use qmtot::fetch::default_model_path;
use qmtot::formats::gguf::GgufFile;
use qmtot::model::Llama;
use qmtot::quant::{Int4Matrix, WeightMatrix};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Threads: `QMTOT_BENCH_THREADS`, else every core.
fn threads() -> usize {
    std::env::var("QMTOT_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(CpuBackend::default_threads)
}

/// Matmul arithmetic: `QMTOT_BENCH_PRECISION=q8`, else f32.
fn precision() -> MatmulPrecision {
    match std::env::var("QMTOT_BENCH_PRECISION").as_deref() {
        Ok("q8") => MatmulPrecision::Q8,
        _ => MatmulPrecision::F32,
    }
}

fn int4_matmul(c: &mut Criterion) {
    let backend = CpuBackend::new(threads()).expect("backend").with_precision(precision());
    // (label, out N, in K)
    let shapes = [
        ("l1/64x512", 64, 512),
        ("l2/256x1024", 256, 1024),
        ("smollm2/qkv", 960, 576),
        ("smollm2/gate_up", 3072, 576),
        ("smollm2/down", 576, 1536),
        ("llama8b/4096x4096", 4096, 4096),
        ("llama8b/14336x4096", 14336, 4096),
        ("llama8b/4096x14336", 4096, 14336),
    ];
    let mut group = c.benchmark_group("int4");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(10);
    for (label, n, k) in shapes {
        // Real quantized weights (RTN, group 32 as in GGUF Q4_0/Q4_1).
        let w = Int4Matrix::quantize_rtn(n, k, 32, &values(n * k, 1)).expect("quantize");
        let w = backend.upload_linear(&[&WeightMatrix::Int4(w)]).expect("upload");
        for m in [1usize, 8, 16, 32] {
            let x = CpuTensor {
                rows: m,
                cols: k,
                data: values(m * k, 2),
            };
            let mut out = backend.alloc_activations(m, n).expect("alloc");
            group.throughput(Throughput::Elements((n * k) as u64));
            group.bench_with_input(BenchmarkId::new(label, format!("M={m}")), &m, |b, _| {
                b.iter(|| {
                    backend
                        .run(|| backend.matmul(black_box(&x), &w, &mut out))
                        .expect("matmul")
                })
            });
        }
    }
    group.finish();
}

/// One layer of attention for `K` siblings decoding one token each after a shared prefix of
/// `P` tokens and 32 tokens of their own, at SmolLM2-135M's shapes (9 query heads over 3 KV
/// heads of 64, blocks of 16): "plain" reads the prefix once per sibling, "cascade" once for
/// the group ([`SharedPrefix`]). Throughput counts the (sibling, position) pairs attended.
fn attention(c: &mut Criterion) {
    let backend = CpuBackend::new(threads()).expect("backend");
    let layout = QkvLayout {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (bs, suffix) = (16usize, 32usize);
    let mut group = c.benchmark_group("attention");
    group.sample_size(20);
    for p in [512usize, 2048] {
        for k in [4usize, 8, 16] {
            // Blocks 0..P/16 hold the prefix; sibling s owns the next `suffix/16` blocks.
            let shared = p / bs;
            let own = suffix / bs;
            let shape = KvShape {
                n_layers: 1,
                n_blocks: shared + k * own,
                block_size: bs,
                n_kv_heads: layout.n_kv_heads,
                head_dim: layout.head_dim,
            };
            let mut kv = backend.alloc_kv(shape).expect("kv");
            // Fill every slot of the pool with random K/V in one write.
            let n_slots = shape.n_slots();
            let fill = StepInput {
                tokens: vec![0; n_slots],
                positions: vec![0; n_slots],
                slots: (0..n_slots as u32).collect(),
                row_seq: vec![0; n_slots],
                block_tables: vec![vec![0]],
                ..Default::default()
            };
            let rows = CpuTensor {
                rows: n_slots,
                cols: layout.width(),
                data: values(n_slots * layout.width(), 3),
            };
            backend
                .kv_write(&mut kv, 0, &rows, layout, &backend.upload_step(&fill).expect("step"))
                .expect("fill");
            // The decode row of sibling s sits at position P + suffix − 1.
            let pos = p + suffix - 1;
            let tables: Vec<Vec<u32>> = (0..k)
                .map(|s| {
                    (0..shared)
                        .chain((0..own).map(|b| shared + s * own + b))
                        .map(|b| b as u32)
                        .collect()
                })
                .collect();
            let plain = StepInput {
                tokens: vec![0; k],
                positions: vec![pos as u32; k],
                slots: tables
                    .iter()
                    .map(|t| t[pos / bs] * bs as u32 + (pos % bs) as u32)
                    .collect(),
                row_seq: (0..k as u32).collect(),
                block_tables: tables,
                logit_rows: vec![],
                groups: vec![],
            };
            let cascade = StepInput {
                groups: vec![SharedPrefix {
                    seqs: (0..k as u32).collect(),
                    blocks: shared as u32,
                }],
                ..plain.clone()
            };
            let q = CpuTensor {
                rows: k,
                cols: layout.width(),
                data: values(k * layout.width(), 4),
            };
            let mut out = backend
                .alloc_activations(k, layout.n_heads * layout.head_dim)
                .expect("alloc");
            group.throughput(Throughput::Elements((k * (pos + 1)) as u64));
            for (name, step) in [("plain", &plain), ("cascade", &cascade)] {
                let step = backend.upload_step(step).expect("step");
                group.bench_function(BenchmarkId::new(name, format!("K={k}/P={p}")), |b| {
                    b.iter(|| {
                        backend
                            .run(|| backend.attention(black_box(&q), &kv, 0, layout, &step, &mut out))
                            .expect("attention")
                    })
                });
            }
        }
    }
    group.finish();
}

fn smollm2(c: &mut Criterion) {
    let path = default_model_path();
    let Ok(gguf) = GgufFile::open(&path) else {
        eprintln!(
            "skipping the SmolLM2 benches: {} is missing (run scripts/fetch-model)",
            path.display()
        );
        return;
    };
    let config = ModelConfig::from_gguf(&gguf).expect("config");
    let backend = CpuBackend::new(threads()).expect("backend").with_precision(precision());
    let model = Llama::load(backend, config, &gguf, |_, _| {}).expect("model");
    let mut group = c.benchmark_group("smollm2");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    // One decode step after a 16-token prompt.
    group.bench_function("decode_step", |b| {
        b.iter(|| decode::run(&model, 16, 1, 1).expect("decode"))
    });
    group.bench_function("prefill_512", |b| {
        b.iter(|| decode::run(&model, 512, 0, 1).expect("prefill"))
    });
    group.finish();
}

/// One token drawn from a 128256-logit row (LLaMA 3's vocabulary), log-probability included,
/// as the engine draws every host-sampled token: a flat row (random logits, the worst case of
/// top-p) and a peaked one (a few tokens far above the rest, as a trained model's).
fn sampler(c: &mut Criterion) {
    use qmtot::engine::{Sampler, SamplingParams};
    let flat: Vec<f32> = values(128_256, 7).iter().map(|v| 4.0 * v).collect();
    let peaked: Vec<f32> = flat
        .iter()
        .enumerate()
        .map(|(i, &l)| if i % 5000 == 7 { l + 14.0 } else { l })
        .collect();
    let mut group = c.benchmark_group("sampler");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    let settings = [
        ("greedy", 0.0, 0, 1.0, 0.0),
        ("t1", 1.0, 0, 1.0, 0.0),
        ("t0.7", 0.7, 0, 1.0, 0.0),
        ("top_k40", 1.0, 40, 1.0, 0.0),
        ("top_p0.9", 1.0, 0, 0.9, 0.0),
        ("min_p0.05", 1.0, 0, 1.0, 0.05),
    ];
    for (row_name, row) in [("flat", &flat), ("peaked", &peaked)] {
        for (name, temperature, top_k, top_p, min_p) in settings {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed: 1,
                top_logprobs: 0,
            })
            .expect("valid parameters");
            group.bench_function(BenchmarkId::new(row_name, name), |b| {
                b.iter(|| black_box(s.sample(row)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, int4_matmul, attention, sampler, smollm2);
criterion_main!(benches);
