//! Shared test helpers: tolerance checks that name the worst element, the real default model,
//! tiny random GGUF models written on the fly, and the backend list every backend-generic test
//! body runs on.

#![allow(dead_code)]

pub mod chi2;

use std::path::{Path, PathBuf};

use qmtot::backend::cpu::{CpuBackend, Isa};
use qmtot::backend::Backend;
use qmtot::formats::gguf::{quantize_q4_0, quantize_q4_1, quantize_q8_0, GgmlType, GgufWriter, MetaType, MetaValue};

/// Asserts `|got − want| ≤ atol + rtol·|want|` element-wise; on failure names the worst
/// element (index, both values, error, allowed error).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst: Option<(usize, f32)> = None;
    let mut max_abs = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = if err.is_nan() {
            f32::INFINITY
        } else {
            err - (atol + rtol * w.abs())
        };
        max_abs = max_abs.max(if err.is_nan() { f32::INFINITY } else { err });
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {} want {} (|err| {} > allowed {}); max |err| over all {} elements: {max_abs}",
            got[i],
            want[i],
            (got[i] - want[i]).abs(),
            atol + rtol * want[i].abs(),
            got.len()
        );
    }
}

/// Maximum absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The default model (fetched by `scripts/fetch-model` or, if missing, by qmtot itself).
pub fn model_path() -> PathBuf {
    qmtot::fetch::resolve_model(None).unwrap_or_else(|e| panic!("the default model is needed: {e}"))
}

pub fn data_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Every backend present, as `(name, backend)`: the CPU backend with each kernel family this
/// machine runs, on 1 and 2 threads (so splitting work across threads is exercised).
/// (The CUDA backend joins this list with its issue.)
pub fn cpu_backends() -> Vec<(String, CpuBackend)> {
    let mut out = Vec::new();
    let mut isas = vec![Isa::Portable];
    if Isa::detect() == Isa::Avx2Fma {
        isas.push(Isa::Avx2Fma);
    } else {
        eprintln!("note: this CPU lacks AVX2/FMA; only the portable kernels are tested");
    }
    for isa in isas {
        for threads in [1, 2] {
            let b = CpuBackend::with_isa(threads, isa).expect("cpu backend");
            out.push((b.name(), b));
        }
    }
    out
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn rand_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = qmtot::engine::sampler::Rng::new(seed);
    (0..n).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect()
}

/// Hyper-parameters of a tiny LLaMA written as GGUF by [`write_tiny_model`].
#[derive(Clone, Copy, Debug)]
pub struct TinySpec {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
    /// Type of the linear weights (norms are F32).
    pub matrix_type: GgmlType,
    pub tied: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layers: 2,
            d_model: 64,
            d_ff: 96,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 96,
            context: 256,
            matrix_type: GgmlType::Q4_1,
            tied: false,
        }
    }
}

fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => bytemuck::cast_slice(v).to_vec(),
        GgmlType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        GgmlType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        GgmlType::Q4_0 => quantize_q4_0(v),
        GgmlType::Q4_1 => quantize_q4_1(v),
        GgmlType::Q8_0 => quantize_q8_0(v),
    }
}

/// A GGUF writer holding a tiny random LLaMA (`llama.*` metadata and every tensor), so tests
/// can add or remove things before writing. Tokenizer metadata: a byte-level vocabulary of
/// `vocab` made-up tokens (enough for the config; the tiny model is driven by ids).
pub fn tiny_model_writer(spec: TinySpec, seed: u64) -> GgufWriter {
    let mut w = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.to_string());
    let u = |v: usize| MetaValue::U32(v as u32);
    w.meta("general.architecture", s("llama"));
    w.meta("llama.block_count", u(spec.n_layers));
    w.meta("llama.context_length", u(spec.context));
    w.meta("llama.embedding_length", u(spec.d_model));
    w.meta("llama.feed_forward_length", u(spec.d_ff));
    w.meta("llama.attention.head_count", u(spec.n_heads));
    w.meta("llama.attention.head_count_kv", u(spec.n_kv_heads));
    w.meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5));
    w.meta("llama.vocab_size", u(spec.vocab));
    w.meta("tokenizer.ggml.model", s("gpt2"));
    w.meta("tokenizer.ggml.pre", s("smollm"));
    let tokens = (0..spec.vocab).map(|i| MetaValue::String(format!("t{i}"))).collect();
    w.meta("tokenizer.ggml.tokens", MetaValue::Array(MetaType::String, tokens));

    let (d, f) = (spec.d_model, spec.d_ff);
    let hd = d / spec.n_heads;
    let kvd = spec.n_kv_heads * hd;
    let mut seed = seed;
    let mut next = || {
        seed += 1;
        seed
    };
    let mut matrix = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        // Scale like a real init: outputs keep unit-ish variance.
        let v = rand_values(rows * cols, next(), 1.0 / (cols as f32).sqrt() * 1.7);
        w.tensor(name, &[rows, cols], ty, encode(ty, &v)).expect("tensor");
    };
    let norm = |w: &mut GgufWriter, name: &str, n: usize, seed: u64| {
        let v: Vec<f32> = rand_values(n, seed, 0.2).iter().map(|x| 1.0 + x).collect();
        w.tensor_f32(name, &[n], &v).expect("norm");
    };
    matrix(&mut w, "token_embd.weight", spec.vocab, d, GgmlType::Q8_0);
    for l in 0..spec.n_layers {
        let t = spec.matrix_type;
        norm(&mut w, &format!("blk.{l}.attn_norm.weight"), d, 1000 + l as u64);
        matrix(&mut w, &format!("blk.{l}.attn_q.weight"), d, d, t);
        matrix(&mut w, &format!("blk.{l}.attn_k.weight"), kvd, d, t);
        matrix(&mut w, &format!("blk.{l}.attn_v.weight"), kvd, d, t);
        matrix(&mut w, &format!("blk.{l}.attn_output.weight"), d, d, t);
        norm(&mut w, &format!("blk.{l}.ffn_norm.weight"), d, 2000 + l as u64);
        matrix(&mut w, &format!("blk.{l}.ffn_gate.weight"), f, d, t);
        matrix(&mut w, &format!("blk.{l}.ffn_up.weight"), f, d, t);
        matrix(&mut w, &format!("blk.{l}.ffn_down.weight"), d, f, t);
    }
    norm(&mut w, "output_norm.weight", d, 3000);
    if !spec.tied {
        matrix(&mut w, "output.weight", spec.vocab, d, GgmlType::Q8_0);
    }
    w
}

/// Writes a tiny model to a temporary file; keep the returned handle alive while using it.
pub fn write_tiny_model(spec: TinySpec, seed: u64) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".gguf").tempfile().expect("temp file");
    tiny_model_writer(spec, seed)
        .write_to(file.path())
        .expect("write tiny model");
    file
}

/// The default model (SmolLM2-135M-Instruct) on `backend`, with its tokenizer.
pub fn load_smollm2<B: Backend>(backend: B) -> (qmtot::model::Llama<B>, qmtot::tokenizer::Tokenizer) {
    let g = qmtot::formats::gguf::GgufFile::open(model_path()).expect("the default model parses");
    let config = qmtot::config::ModelConfig::from_gguf(&g).expect("default config");
    let tok = qmtot::tokenizer::Tokenizer::from_gguf(&g).expect("default tokenizer");
    (
        qmtot::model::Llama::load(backend, config, &g, |_, _| {}).expect("the default model loads"),
        tok,
    )
}

/// A tiny random model on one CPU thread, with its tokenizer; keep the file handle alive.
pub fn load_tiny_model(
    spec: TinySpec,
    seed: u64,
) -> (
    tempfile::NamedTempFile,
    qmtot::model::Llama<CpuBackend>,
    qmtot::tokenizer::Tokenizer,
) {
    let file = write_tiny_model(spec, seed);
    let g = qmtot::formats::gguf::GgufFile::open(file.path()).expect("tiny model parses");
    let config = qmtot::config::ModelConfig::from_gguf(&g).expect("tiny config");
    let model = qmtot::model::Llama::load(CpuBackend::new(1).expect("one thread"), config, &g, |_, _| {})
        .expect("tiny model loads");
    let tok = qmtot::tokenizer::Tokenizer::from_gguf(&g).expect("tiny tokenizer");
    (file, model, tok)
}

/// The CUDA device, or `None` (with a notice) when there is none and none is required; with
/// `REQUIRE_GPU=1` (the GPU bundle's run.sh) a missing GPU fails the test instead.
pub fn gpu() -> Option<qmtot::backend::cuda::CudaBackend> {
    match qmtot::backend::cuda::CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var("REQUIRE_GPU").as_deref() != Ok("1"),
                "REQUIRE_GPU=1 but no usable GPU: {e}"
            );
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}
