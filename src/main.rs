//! `qmtot` command line: argument parsing and dispatch only.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use qmtot::backend::cpu::{CpuBackend, MatmulPrecision};
use qmtot::config::ModelConfig;
use qmtot::engine::{generate, FinishReason, GenerateRequest, SamplingParams, StopConditions, DEFAULT_PREFILL_CHUNK};
use qmtot::error::{Error, Result};
use qmtot::fetch::resolve_model;
use qmtot::formats::gguf::GgufFile;
use qmtot::model::Llama;
use qmtot::tokenizer::{ChatMessage, Tokenizer};

#[derive(Parser)]
#[command(
    name = "qmtot",
    version,
    about = "INT4 LLaMA inference built for tree-of-thought generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout (stats on stderr).
    Generate(GenerateArgs),
    /// Print a model's configuration and tensor summary.
    Info(ModelArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF model file (default: the SmolLM2-135M-Instruct Q4_1 model, fetched if missing).
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// CPU threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU matmul arithmetic: f32 (the reference) or q8 (activations quantized to 8 bits per
    /// 32 values with integer dot products, as llama.cpp does: faster, slightly less exact).
    #[arg(long, value_enum, default_value_t = CpuMatmul::F32)]
    cpu_matmul: CpuMatmul,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CpuMatmul {
    F32,
    Q8,
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than min-p × the most likely (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string appears (repeatable); the output ends before it.
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode throughput on a real model (like llama-bench's pp512 / tg128).
    Decode(BenchDecodeArgs),
}

#[derive(Args)]
struct BenchDecodeArgs {
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one at a time for the decode measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Info(a) => cmd_info(a),
        Command::Bench(BenchCommand::Decode(a)) => cmd_bench_decode(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A loaded model with its tokenizer.
struct Loaded {
    model: Llama<CpuBackend>,
    tokenizer: Tokenizer,
}

fn load(run: &RunArgs) -> Result<Loaded> {
    let threads = run.threads.unwrap_or_else(CpuBackend::default_threads);
    let precision = match run.cpu_matmul {
        CpuMatmul::F32 => MatmulPrecision::F32,
        CpuMatmul::Q8 => MatmulPrecision::Q8,
    };
    let backend = CpuBackend::new(threads)?.with_precision(precision);
    let path = resolve_model(run.model.model.as_deref())?;
    let gguf = GgufFile::open(&path)?;
    let config = ModelConfig::from_gguf(&gguf)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(file_name(&path));
    let model = Llama::load(backend, config, &gguf, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    Ok(Loaded { model, tokenizer })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
    };
    sampling.validate()?;
    if a.prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let Loaded { model, tokenizer } = load(&a.run)?;
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        let text = tokenizer.apply_chat_template(&messages, true)?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&a.prompt, true)?
    };
    let req = GenerateRequest {
        prompt,
        sampling,
        stop: StopConditions {
            max_new_tokens: a.max_tokens,
            stop_tokens: tokenizer.eos_ids().to_vec(),
            stop_strings: a.stop,
        },
        prefill_chunk: DEFAULT_PREFILL_CHUNK,
    };
    let mut stdout = std::io::stdout().lock();
    let gen = generate(&model, &tokenizer, &req, |piece| {
        stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
            .map_err(|e| Error::io("<stdout>", e))
    })?;
    writeln!(stdout).map_err(|e| Error::io("<stdout>", e))?;
    let s = &gen.stats;
    let finish = match &gen.finish {
        FinishReason::Length => "length".to_string(),
        FinishReason::StopToken(t) => format!("stop token {t}"),
        FinishReason::StopString(s) => format!("stop string {s:?}"),
    };
    eprintln!(
        "[{}] prompt tokens: {} | prefill: {:.1} tok/s | decode: {:.1} tok/s | time to first token: {:.1} ms | generated: {} tokens ({finish})",
        model.backend_name(),
        s.prompt_tokens,
        s.prefill_tok_per_s(),
        s.decode_tok_per_s(),
        s.time_to_first_token.as_secs_f64() * 1e3,
        s.generated_tokens,
    );
    Ok(())
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    let path = resolve_model(a.model.as_deref())?;
    let g = GgufFile::open(&path)?;
    let c = ModelConfig::from_gguf(&g)?;
    println!("file:            {}", path.display());
    println!("gguf version:    {}", g.version);
    if let Some(name) = g.get("general.name").and_then(|v| v.as_str()) {
        println!("name:            {name}");
    }
    println!("architecture:    {}", c.architecture);
    println!("layers:          {}", c.n_layers);
    println!("d_model:         {}", c.d_model);
    println!("d_ff:            {}", c.d_ff);
    println!(
        "heads:           {} (kv heads {}, head dim {}, GQA group {})",
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.gqa_group()
    );
    println!("vocab:           {}", c.vocab_size);
    println!("context:         {}", c.context_length);
    println!("rope:            theta {} ({:?})", c.rope_theta, c.rope_style);
    println!("rms eps:         {:e}", c.rms_eps);
    println!("tied output:     {}", c.tied_output);
    if let Ok(pre) = g.get_str("tokenizer.ggml.pre") {
        println!(
            "tokenizer:       {} / {pre}",
            g.get_str("tokenizer.ggml.model").unwrap_or("?")
        );
    }
    let mut by_type: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.elements();
        e.2 += t.nbytes;
    }
    println!("tensors:         {}", g.tensors.len());
    for (ty, (n, elems, bytes)) in &by_type {
        println!("  {ty:<6} {n:>4} tensors {elems:>12} elements {bytes:>12} bytes");
    }
    let total: u64 = g.tensors.iter().map(|t| t.nbytes).sum();
    let params: u64 = g.tensors.iter().map(|t| t.elements()).sum();
    println!("total:           {params} parameters, {total} bytes of tensor data");
    Ok(())
}

fn cmd_bench_decode(a: BenchDecodeArgs) -> Result<()> {
    let Loaded { model, .. } = load(&a.run)?;
    let r = qmtot::bench::decode::run(&model, a.prompt_tokens, a.decode_tokens, a.reps)?;
    println!("backend:  {}", model.backend_name());
    println!("cpu:      {}", cpu_model());
    println!(
        "prefill:  {:.1} tok/s ({} tokens, median of {})",
        r.prefill_tok_per_s, r.prompt_tokens, a.reps
    );
    println!(
        "decode:   {:.1} tok/s, {:.2} ms/token ({} tokens, median of {})",
        r.decode_tok_per_s, r.decode_ms_per_token, r.decode_tokens, a.reps
    );
    Ok(())
}

/// The CPU's model name from /proc/cpuinfo where there is one.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
