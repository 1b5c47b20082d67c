//! CPU criterion benchmarks: the INT4 matmul at SmolLM2-135M and LLaMA-3.1-8B shapes for
//! M = 1, 8, 32 activation rows, and (when the default model is present) one decode step and
//! a 512-token prefill of SmolLM2-135M. Throughput is reported in weights per second for the
//! matmuls (M·N·K / time would double-count nothing: each weight is read once per call).
//!
//! `cargo bench --bench cpu` (set `QMTOT_BENCH_FILTER`-style filters with criterion's own
//! positional argument, e.g. `cargo bench --bench cpu -- int4/smollm2`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use qmtot::backend::cpu::{CpuBackend, MatmulPrecision};
use qmtot::backend::Backend;
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
        for m in [1usize, 8, 32] {
            let x = qmtot::backend::cpu::CpuTensor {
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

criterion_group!(benches, int4_matmul, smollm2);
criterion_main!(benches);
