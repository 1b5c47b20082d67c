//! `qmtot` command line: argument parsing and dispatch only.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use qmtot::backend::cpu::{CpuBackend, MatmulPrecision};
use qmtot::backend::cuda::{self, CudaBackend};
use qmtot::backend::Backend;
use qmtot::bench::tree::TreeMode;
use qmtot::config::ModelConfig;
use qmtot::engine::{
    Engine, EngineConfig, Event, Prompt, Request, SamplingParams, SchedulerConfig, StopConditions,
    DEFAULT_PREFILL_CHUNK,
};
use qmtot::error::{Error, Result};
use qmtot::fetch::resolve_model;
use qmtot::formats::checkpoint::Checkpoint;
use qmtot::formats::safetensors::{FloatWeights, LoadOptions};
use qmtot::kv::DEFAULT_BLOCK_SIZE;
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
    /// Write an INT4 checkpoint of any model qmtot loads: a safetensors folder in the canonical
    /// INT4 layout, or (from a GGUF source) a Q4_1 GGUF file.
    Quantize(QuantizeArgs),
    /// Run a method over a question set (MedQA / MMLU / MedMCQA JSONL), resumably, and report
    /// accuracy.
    Eval(EvalArgs),
    /// Solve one question by tree of thoughts, showing the tree as it grows.
    Tot(cli::tot::TotArgs),
    /// Draw a tree trace (from `tot --trace`) as a self-contained HTML page.
    Draw(cli::tot::DrawArgs),
    /// Export tree-derived reasoning as SFT data (chat-messages JSONL).
    Distill(cli::tot::DistillArgs),
    /// An OpenAI-compatible HTTP server (completions, chat completions, streaming, n > 1
    /// sharing the prompt, Prometheus metrics).
    Serve(ServeArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EvalMethod {
    /// Log-likelihood of each option letter after the question (lm-evaluation-harness style).
    Direct,
    /// Greedy chain of thought, then the letter by log-likelihood.
    Cot,
    /// Self-consistency: --samples sampled chains, each answered, majority vote.
    Sc,
    /// QM-ToT tree search (defaults: the published rollout).
    Tot,
}

#[derive(Args)]
struct EvalArgs {
    /// Question file (JSONL; the format is detected from its first line).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value_t = EvalMethod::Direct)]
    method: EvalMethod,
    /// Results folder: results.jsonl (one line per finished question; a rerun skips those),
    /// report.md and report.json.
    #[arg(long)]
    out: PathBuf,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Only questions of this topic (MMLU `topic`, MedMCQA `subject_name`); repeatable.
    #[arg(long = "subset")]
    subset: Vec<String>,
    /// Skip malformed lines (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Questions in flight at once (their work shares the same engine steps).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[command(flatten)]
    search: SearchArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A GGUF file or a Hugging Face folder (config.json + safetensors: float, GPTQ, AWQ or
    /// qmtot INT4); default: the SmolLM2-135M-Instruct Q4_1 GGUF, fetched if missing.
    #[arg(long)]
    model: Option<PathBuf>,
    /// What float Hugging Face weights become: int4 (round-to-nearest at load), f16, or f32
    /// (exact; CPU comparisons). GGUF, GPTQ and AWQ tensors keep their own types.
    #[arg(long, value_enum, default_value_t = WeightsArg::Int4)]
    weights: WeightsArg,
    /// INT4 group size for --weights int4: 32, 64 or 128.
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Quantize the embedding and lm_head too (they stay f16 otherwise).
    #[arg(long)]
    quantize_lm_head: bool,
}

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// The checkpoint to quantize: a GGUF file or a Hugging Face folder.
    src: PathBuf,
    /// Where to write: a folder (safetensors) or a file (gguf).
    out: PathBuf,
    /// INT4 group size (32, 64, 128). Default: INT4 weights are kept as they are, float ones
    /// quantized at 128 (32 for GGUF).
    #[arg(long)]
    group_size: Option<usize>,
    #[arg(long, value_enum, default_value_t = QuantizeFormat::Safetensors)]
    format: QuantizeFormat,
    /// Quantize the embedding and lm_head too.
    #[arg(long)]
    quantize_lm_head: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum QuantizeFormat {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum WeightsArg {
    Int4,
    F16,
    F32,
}

impl ModelArgs {
    pub(crate) fn load_options(&self) -> LoadOptions {
        LoadOptions {
            weights: match self.weights {
                WeightsArg::Int4 => FloatWeights::Int4 { group: self.group_size },
                WeightsArg::F16 => FloatWeights::F16,
                WeightsArg::F32 => FloatWeights::F32,
            },
            quantize_lm_head: self.quantize_lm_head,
        }
    }

    /// The checkpoint `--model` names (or the default model), opened.
    pub(crate) fn open(&self) -> Result<(PathBuf, Checkpoint)> {
        let path = resolve_model(self.model.as_deref())?;
        let ckpt = Checkpoint::open(&path, self.load_options())?;
        Ok((path, ckpt))
    }
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// CPU threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU matmul arithmetic: f32 (the reference) or q8 (activations quantized to 8 bits per
    /// 32 values with integer dot products, as llama.cpp does: faster, slightly less exact).
    #[arg(long, value_enum, default_value_t = CpuMatmul::F32)]
    cpu_matmul: CpuMatmul,
    /// Where to run: cpu, cuda (device 0), cuda:N, or auto (CUDA when a device is usable,
    /// else CPU; says which it chose). The default stays cpu: CI and most machines that build
    /// qmtot have no GPU, and a run should not change backends with the machine unasked.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda(usize),
    Auto,
}

fn parse_device(s: &str) -> std::result::Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        "auto" => Ok(DeviceArg::Auto),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("{s:?}: expected cpu, cuda, cuda:N or auto")),
    }
}

/// The backend `--device` resolves to.
pub(crate) enum Picked {
    Cpu,
    Cuda(usize),
}

pub(crate) fn pick_device(d: DeviceArg) -> Picked {
    match d {
        DeviceArg::Cpu => Picked::Cpu,
        DeviceArg::Cuda(n) => Picked::Cuda(n),
        DeviceArg::Auto => {
            let n = cuda::device_count();
            if n > 0 {
                eprintln!("device auto: using cuda:0 ({n} CUDA device(s) found)");
                Picked::Cuda(0)
            } else {
                eprintln!("device auto: no usable CUDA device, using the CPU");
                Picked::Cpu
            }
        }
    }
}

/// Loads the model on the backend `--device` picks and runs `$body` with it bound to
/// `$loaded` (a `Loaded<B>`, so `$body` is compiled once per backend).
macro_rules! with_model {
    ($run:expr, $loaded:ident => $body:expr) => {
        match pick_device($run.device) {
            Picked::Cpu => {
                let $loaded = load(cpu_backend(&$run)?, &$run)?;
                $body
            }
            Picked::Cuda(n) => {
                let $loaded = load(CudaBackend::new(n)?, &$run)?;
                $body
            }
        }
    };
}

mod cli;
use cli::search_args::{SearchArgs, TreeMethod};

/// KV cache and scheduler settings.
#[derive(Args)]
pub(crate) struct EngineArgs {
    /// KV cache size in blocks of 16 tokens.
    #[arg(long, default_value_t = 1024)]
    kv_blocks: usize,
    /// Rows (tokens) per forward step: decodes count one each, prompt chunks their length.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    max_batch_tokens: usize,
    /// Sequences per forward step.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// Do not reuse cached prompt prefixes across requests.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Plain paged attention even for sequences that share a prefix.
    #[arg(long)]
    no_cascade: bool,
    /// Run decode steps uncaptured (no CUDA graphs).
    #[arg(long)]
    no_graphs: bool,
    /// Capture decode steps with cascaded sharing groups too (sibling thoughts; not yet
    /// checked on a GPU: off by default).
    #[arg(long)]
    cascade_graphs: bool,
    /// Copy every step's logits to the host and draw there, instead of drawing on the device
    /// (CUDA) when a step's rows are all generating.
    #[arg(long)]
    host_sampling: bool,
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            kv_blocks: self.kv_blocks,
            block_size: DEFAULT_BLOCK_SIZE,
            scheduler: SchedulerConfig {
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
            },
            prefix_cache: !self.no_prefix_cache,
            cascade_min_blocks: (!self.no_cascade).then_some(1),
            graphs: !self.no_graphs,
            cascade_graphs: self.cascade_graphs,
            device_sampling: !self.host_sampling,
        }
    }
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
    /// Number of samples of the prompt. They share the prompt's KV blocks (computed once) and
    /// decode as one batch; sample i uses seed + i. Each is printed with its log-probability.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to bind (loopback by default: expose it deliberately).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "QMTOT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests accepted at once (running or waiting); more are answered 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode throughput on a real model (like llama-bench's pp512 / tg128).
    Decode(BenchDecodeArgs),
    /// Decode step time and KV blocks of K sequences continuing one prefix: a single chain,
    /// K independent copies, K forked siblings, and forked siblings with cascade attention.
    Tree(BenchTreeArgs),
    /// ToT over a question set with sharing and batching, then with every node a fresh
    /// request one question at a time: wall time, tokens computed, thoughts per second.
    Tot(Box<cli::tot::BenchTotArgs>),
    /// INT4 matmul at LLaMA-3.1-8B / LLaMA-2-70B layer shapes for M = 1..64: time, weight GB/s,
    /// share of the measured copy bandwidth, and the dense baseline (cuBLAS f16 on CUDA, the
    /// f32 dense kernel on the CPU).
    Kernels(BenchKernelsArgs),
}

#[derive(Args)]
struct BenchKernelsArgs {
    /// Layer shapes: 8b, 70b or all.
    #[arg(long, default_value = "8b")]
    shapes: String,
    /// Batch rows (tokens) per matmul.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    m: Vec<usize>,
    /// Timed calls per point (median reported), after 3 warm-up calls.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Matmul: also time each compiled pipeline variant of the INT4 g128 kernel beside the
    /// default (CUDA; rows labelled [nN=rRxXC]: R weight slots per warp, activation chunks of XC
    /// inputs). `QMTOT_MATMUL_VARIANTS=LABEL,...` then runs any command through chosen ones.
    #[arg(long)]
    matmul_variants: bool,
    /// Which parts: matmul, attention (decode over long contexts), cascade (shared prefix vs
    /// plain for sibling groups).
    #[arg(long, value_delimiter = ',', default_value = "matmul,attention,cascade")]
    parts: Vec<String>,
    /// Decode attention: contexts (tokens per row).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192,16384,32768")]
    contexts: Vec<usize>,
    /// Decode attention: rows per step.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    attention_batch: Vec<usize>,
    /// Cascade: siblings per group (K).
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    siblings: Vec<usize>,
    /// Cascade: shared prefix lengths (rounded up to whole 16-token blocks).
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,8192,32768")]
    prefixes: Vec<usize>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct BenchTreeArgs {
    /// Sibling sequences (K).
    #[arg(long, default_value_t = 8)]
    siblings: usize,
    /// Shared prefix length in tokens (P).
    #[arg(long, default_value_t = 512)]
    prefix: usize,
    /// Tokens each sibling generates (S).
    #[arg(long, default_value_t = 64)]
    suffix: usize,
    /// Rounds over all setups, interleaved (each setup's median over rounds is reported, so a
    /// noisy machine affects every setup alike).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Copy the siblings' logits to the host and draw there, instead of drawing on the device
    /// (CUDA; the engine's default).
    #[arg(long)]
    host_sampling: bool,
    /// Replay captured graphs for decode steps without sharing groups (CUDA; every setup's
    /// but cascade's).
    #[arg(long)]
    graphs: bool,
    /// With --graphs, capture the cascade setup's steps too (their sharing group in the graph).
    #[arg(long, requires = "graphs")]
    cascade_graphs: bool,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    run: RunArgs,
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
    /// Batched decode instead: sequences decoding together, one row each per step (e.g.
    /// 1,8,16,32,64); prints ms/step and tok/s per batch size.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Batched decode: tokens in each sequence's cache before the timed steps.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Batched decode: capture the decode step once and replay it (CUDA graphs).
    #[arg(long)]
    graphs: bool,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// A benchmark model by shape, with random weights, instead of a checkpoint.
#[derive(Args)]
struct ShapeArgs {
    /// A model shape instead of a checkpoint (llama3-8b, llama2-70b), with --random-weights.
    #[arg(long)]
    shape: Option<String>,
    /// Random INT4 weights (f16 embedding and lm_head) at --shape's sizes: speed only.
    #[arg(long)]
    random_weights: bool,
    /// With --shape: only the first N blocks (a quick run; per-step figures then cover N
    /// blocks, not the whole model).
    #[arg(long)]
    layers: Option<usize>,
}

impl ShapeArgs {
    /// The random-weight model's configuration and weights, or `None` for a checkpoint.
    fn random_model(&self) -> Result<Option<(qmtot::config::ModelConfig, qmtot::bench::random_model::RandomWeights)>> {
        use qmtot::bench::random_model::{RandomWeights, ShapePreset};
        match (&self.shape, self.random_weights) {
            (None, false) => Ok(None),
            (Some(shape), true) => {
                let config = ShapePreset::parse(shape)?.config(self.layers);
                eprintln!(
                    "{shape}, random INT4 weights: {} blocks, d {}, {} heads / {} KV heads, vocab {}",
                    config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.vocab_size
                );
                Ok(Some((config.clone(), RandomWeights::new(config))))
            }
            (Some(_), false) => Err(Error::InvalidArgument(
                "--shape needs --random-weights (no checkpoint is read)".into(),
            )),
            (None, true) => Err(Error::InvalidArgument("--random-weights needs --shape".into())),
        }
    }
}

/// Runs `$body` with `$model` bound to the benchmark's model: random weights at `$shape`'s
/// shape, or the checkpoint of `$run`, on the backend `--device` picks.
macro_rules! with_bench_model {
    ($shape:expr, $run:expr, $model:ident => $body:expr) => {
        match $shape.random_model()? {
            None => with_model!($run, loaded => {
                let $model = loaded.model;
                $body
            }),
            Some((config, weights)) => match pick_device($run.device) {
                Picked::Cpu => {
                    let $model = Llama::load(cpu_backend(&$run)?, config, &weights, |_, _| {})?;
                    $body
                }
                Picked::Cuda(n) => {
                    let $model = Llama::load(CudaBackend::new(n)?, config, &weights, |_, _| {})?;
                    $body
                }
            },
        }
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Info(a) => cmd_info(a),
        Command::Quantize(a) => cmd_quantize(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Tot(a) => cli::tot::cmd_tot(a),
        Command::Serve(a) => cmd_serve(a),
        Command::Draw(a) => cli::tot::cmd_draw(a),
        Command::Distill(a) => cli::tot::cmd_distill(a),
        Command::Bench(BenchCommand::Tot(a)) => cli::tot::cmd_bench_tot(*a),
        Command::Bench(BenchCommand::Decode(a)) => cmd_bench_decode(a),
        Command::Bench(BenchCommand::Tree(a)) => cmd_bench_tree(a),
        Command::Bench(BenchCommand::Kernels(a)) => cmd_bench_kernels(a),
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
pub(crate) struct Loaded<B: Backend> {
    model: Llama<B>,
    tokenizer: Tokenizer,
}

pub(crate) fn cpu_backend(run: &RunArgs) -> Result<CpuBackend> {
    let threads = run.threads.unwrap_or_else(CpuBackend::default_threads);
    let precision = match run.cpu_matmul {
        CpuMatmul::F32 => MatmulPrecision::F32,
        CpuMatmul::Q8 => MatmulPrecision::Q8,
    };
    Ok(CpuBackend::new(threads)?.with_precision(precision))
}

pub(crate) fn load<B: Backend>(backend: B, run: &RunArgs) -> Result<Loaded<B>> {
    let (path, ckpt) = run.model.open()?;
    let config = ckpt.config()?;
    let tokenizer = ckpt.tokenizer()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(file_name(&path));
    let model = Llama::load(backend, config, &ckpt, |done, total| {
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
        top_logprobs: 0,
    };
    sampling.validate()?;
    if a.prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if a.n > 1 && a.temperature == 0.0 {
        eprintln!(
            "note: --temperature 0 is greedy, so all {} samples will be the same; try --temperature 0.8",
            a.n
        );
    }
    with_model!(a.run, loaded => generate_on(&a, sampling, loaded))
}

fn generate_on<B: Backend>(a: &GenerateArgs, sampling: SamplingParams, loaded: Loaded<B>) -> Result<()> {
    let Loaded { model, tokenizer } = loaded;
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
    let stop = StopConditions {
        max_new_tokens: a.max_tokens,
        stop_tokens: tokenizer.eos_ids().to_vec(),
        stop_strings: a.stop.clone(),
    };
    let mut engine = Engine::new(&model, Some(&tokenizer), a.engine.config())?;
    let started = std::time::Instant::now();
    let ids = engine.submit(Request {
        prompt: Prompt::Tokens(prompt.clone()),
        n: a.n,
        sampling,
        stop,
    })?;
    let mut stdout = std::io::stdout().lock();
    let mut results = Vec::new();
    let (mut peak_used, mut peak_shared) = (0, 0);
    while !engine.is_idle() {
        for event in engine.step()? {
            match event {
                // One sample streams as it goes; several are printed whole at the end.
                Event::Token { text, .. } if a.n == 1 => {
                    stdout
                        .write_all(text.as_bytes())
                        .and_then(|_| stdout.flush())
                        .map_err(|e| Error::io("<stdout>", e))?;
                }
                Event::Finished { seq, generation } => results.push((seq, generation)),
                Event::Failed { error, .. } => return Err(error),
                _ => {}
            }
        }
        let pool = engine.stats().pool;
        peak_used = peak_used.max(pool.used);
        peak_shared = peak_shared.max(pool.shared);
    }
    let elapsed = started.elapsed();
    results.sort_by_key(|(seq, _)| ids.iter().position(|i| i == seq));
    let out = |s: String| writeln!(std::io::stdout(), "{s}").map_err(|e| Error::io("<stdout>", e));
    if a.n == 1 {
        drop(stdout);
        out(String::new())?;
    } else {
        drop(stdout);
        for (i, (_, g)) in results.iter().enumerate() {
            out(format!(
                "--- sample {} of {} | log-probability {:.3} | {} tokens | {} ---",
                i + 1,
                a.n,
                g.logprob(),
                g.tokens.len(),
                g.finish
            ))?;
            out(g.text.clone())?;
        }
    }
    let generated: usize = results.iter().map(|(_, g)| g.tokens.len()).sum();
    let st = engine.stats();
    if let [(_, g)] = results.as_slice() {
        let s = &g.stats;
        eprintln!(
            "[{}] prompt tokens: {} | prefill: {:.1} tok/s | decode: {:.1} tok/s | time to first token: {:.1} ms | generated: {} tokens ({}) | log-probability {:.3}",
            model.backend_name(),
            s.prompt_tokens,
            s.prefill_tok_per_s(),
            s.decode_tok_per_s(),
            s.time_to_first_token.as_secs_f64() * 1e3,
            s.generated_tokens,
            g.finish,
            g.logprob(),
        );
    } else {
        eprintln!(
            "[{}] {} samples | prompt tokens: {} (computed once) | generated: {generated} tokens in {:.2} s ({:.1} tok/s) | forward steps: {}",
            model.backend_name(),
            a.n,
            prompt.len(),
            elapsed.as_secs_f64(),
            generated as f64 / elapsed.as_secs_f64().max(1e-9),
            st.steps,
        );
    }
    eprintln!(
        "KV blocks of {} tokens: peak used {peak_used}, peak shared {peak_shared} (of {}) | copy-on-write copies: {} | tokens computed: {}",
        DEFAULT_BLOCK_SIZE, st.pool.total, st.block_copies, st.computed_tokens,
    );
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    if a.max_queue == 0 {
        return Err(Error::InvalidArgument("--max-queue must be at least 1".into()));
    }
    let addr = format!("{}:{}", a.host, a.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|e| Error::io(&addr, e))?;
    with_model!(a.run, loaded => serve_on(&a, listener, loaded))
}

fn serve_on<B: Backend>(a: &ServeArgs, listener: std::net::TcpListener, loaded: Loaded<B>) -> Result<()> {
    let Loaded { model, tokenizer } = loaded;
    let model_name = resolve_model(a.run.model.model.as_deref())
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "qmtot".into());
    eprintln!(
        "serving {model_name} on http://{} [{}]{}",
        listener.local_addr().map_err(|e| Error::io("<listener>", e))?,
        model.backend_name(),
        if a.api_key.is_some() { " (API key required)" } else { "" }
    );
    qmtot::server::serve(
        &model,
        &tokenizer,
        listener,
        qmtot::server::ServerConfig {
            api_key: a.api_key.clone(),
            max_queue: a.max_queue,
            model_name,
            engine: a.engine.config(),
        },
    )
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    use qmtot::formats::quantize::{quantize, OutFormat, QuantizeOptions};
    // Float sources are read exactly; quantize() does the rounding once.
    let exact = LoadOptions {
        weights: FloatWeights::F32,
        quantize_lm_head: false,
    };
    let src = Checkpoint::open(&a.src, exact)?;
    let opts = QuantizeOptions {
        group: a.group_size,
        format: match a.format {
            QuantizeFormat::Safetensors => OutFormat::Safetensors,
            QuantizeFormat::Gguf => OutFormat::Gguf,
        },
        quantize_lm_head: a.quantize_lm_head,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("quantizing [{bar:30}] {pos}/{len} tensors")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let s = quantize(&src, &a.out, opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {}: {} INT4 tensors ({} quantized here, the rest kept), {} others, {:.1} MB of tensor data",
        a.out.display(),
        s.int4_tensors,
        s.requantized,
        s.other_tensors,
        s.bytes as f64 / 1e6
    );
    Ok(())
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    let (path, ckpt) = a.open()?;
    let c = ckpt.config()?;
    println!("file:            {}", path.display());
    let g = match &ckpt {
        Checkpoint::Gguf(g) => g,
        Checkpoint::Hf(h) => {
            print_config(&c);
            println!(
                "format:          Hugging Face folder, {} safetensors shard(s), {:?}",
                h.shard_count(),
                h.quantization
            );
            let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
            for (_, dtype, shape) in h.tensor_list() {
                let e = by_type.entry(format!("{dtype:?}")).or_default();
                e.0 += 1;
                e.1 += shape.iter().product::<usize>() as u64;
            }
            for (ty, (n, elems)) in &by_type {
                println!("  {ty:<6} {n:>4} tensors {elems:>12} elements");
            }
            return Ok(());
        }
    };
    println!("gguf version:    {}", g.version);
    if let Some(name) = g.get("general.name").and_then(|v| v.as_str()) {
        println!("name:            {name}");
    }
    print_config(&c);
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

fn print_config(c: &ModelConfig) {
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
    println!("rope scaling:    {:?}", c.rope_scaling);
    println!("tied output:     {}", c.tied_output);
}

fn cmd_bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use qmtot::bench::kernels::{LLAMA2_70B, LLAMA3_8B};
    let shapes: Vec<_> = match a.shapes.as_str() {
        "8b" => LLAMA3_8B.to_vec(),
        "70b" => LLAMA2_70B.to_vec(),
        "all" => LLAMA3_8B.iter().chain(&LLAMA2_70B).copied().collect(),
        other => return Err(Error::InvalidArgument(format!("--shapes {other:?}: 8b, 70b or all"))),
    };
    let lists = [&a.m, &a.contexts, &a.attention_batch, &a.siblings, &a.prefixes];
    if lists.iter().any(|l| l.is_empty() || l.contains(&0)) || a.reps == 0 {
        return Err(Error::InvalidArgument(
            "--m, --contexts, --attention-batch, --siblings and --prefixes need positive sizes, --reps at least 1"
                .into(),
        ));
    }
    if let Some(p) = a
        .parts
        .iter()
        .find(|p| !["matmul", "attention", "cascade"].contains(&p.as_str()))
    {
        return Err(Error::InvalidArgument(format!(
            "--parts {p:?}: matmul, attention or cascade"
        )));
    }
    match pick_device(a.run.device) {
        Picked::Cpu => {
            let b = cpu_backend(&a.run)?;
            println!("device: {} ({})", b.name(), cpu_model());
            bench_kernels_on(&b, &shapes, &a)
        }
        Picked::Cuda(n) => {
            let b = CudaBackend::new(n)?;
            println!("device: {}", b.name());
            bench_kernels_on(&b, &shapes, &a)
        }
    }
}

fn bench_kernels_on<B: qmtot::bench::kernels::KernelBenchDevice>(
    b: &B,
    shapes: &[qmtot::bench::kernels::Shape],
    a: &BenchKernelsArgs,
) -> Result<()> {
    let part = |p: &str| a.parts.iter().any(|x| x == p);
    if part("matmul") {
        bench_matmul_on(b, shapes, a)?;
    }
    let layout = qmtot::bench::attention::LLAMA3_8B_ATTENTION;
    if part("attention") {
        println!();
        println!("Decode attention, LLaMA-3.1-8B heads (32 × 128, 8 KV heads), one layer:");
        println!("| rows | context | µs | K/V GB/s |");
        println!("|---:|---:|---:|---:|");
        for &batch in &a.attention_batch {
            for &context in &a.contexts {
                let r = qmtot::bench::attention::decode(b, layout, batch, context, a.reps)?;
                println!(
                    "| {} | {} | {:.1} | {:.0} |",
                    r.batch,
                    r.context,
                    r.seconds * 1e6,
                    r.kv_gbps
                );
                let _ = std::io::stdout().flush();
            }
        }
    }
    if part("cascade") {
        println!();
        println!("Sibling decode rows over a shared prefix, one layer: plain paged attention vs cascade:");
        println!("| siblings | prefix | plain µs | cascade µs | speed-up |");
        println!("|---:|---:|---:|---:|---:|");
        for &k in &a.siblings {
            for &prefix in &a.prefixes {
                let r = qmtot::bench::attention::cascade(b, layout, k, prefix, a.reps)?;
                println!(
                    "| {} | {} | {:.1} | {:.1} | {:.2}× |",
                    r.siblings,
                    r.prefix,
                    r.plain_seconds * 1e6,
                    r.cascade_seconds * 1e6,
                    r.plain_seconds / r.cascade_seconds
                );
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}

fn bench_matmul_on<B: qmtot::bench::kernels::KernelBenchDevice>(
    b: &B,
    shapes: &[qmtot::bench::kernels::Shape],
    a: &BenchKernelsArgs,
) -> Result<()> {
    println!("| shape | N×K | M | qmtot µs | weight GB/s | % of copy | baseline | baseline µs | speed-up |");
    println!("|---|---|---:|---:|---:|---:|---|---:|---:|");
    let report = qmtot::bench::kernels::run(b, shapes, &a.m, a.reps, a.matmul_variants, |r| {
        let variant = r.variant.as_ref().map_or(String::new(), |v| format!(" [{v}]"));
        println!(
            "| {}{} | {}×{} | {} | {:.1} | {:.0} | {:.0}% | {} | {:.1} | {:.2}× |",
            r.shape.name,
            variant,
            r.shape.n,
            r.shape.k,
            r.m,
            r.seconds * 1e6,
            r.weight_gbps,
            100.0 * r.fraction_of_copy,
            r.baseline,
            r.baseline_seconds * 1e6,
            r.baseline_seconds / r.seconds
        );
        let _ = std::io::stdout().flush();
    })?;
    println!("measured copy bandwidth: {:.0} GB/s (read + write)", report.copy_gbps);
    println!(
        "µs per call: {} back-to-back calls over rotating weight copies (beyond L2), median of {} rounds; weights INT4 g128 unless the shape says f16",
        a.reps,
        qmtot::bench::kernels::BENCH_ROUNDS
    );
    Ok(())
}

fn cmd_bench_decode(a: BenchDecodeArgs) -> Result<()> {
    if a.shape.random_weights && a.batch.is_empty() {
        return Err(Error::InvalidArgument(
            "--random-weights measures batched decode: give --batch".into(),
        ));
    }
    with_bench_model!(a.shape, a.run, model => bench_decode_on(&a, model))
}

fn bench_decode_on<B: Backend>(a: &BenchDecodeArgs, model: Llama<B>) -> Result<()> {
    if !a.batch.is_empty() {
        println!("backend: {}", model.backend_name());
        println!("| batch | context | ms/step | tok/s | graph |");
        println!("|---:|---:|---:|---:|---|");
        for &batch in &a.batch {
            let r = qmtot::bench::decode::run_batched(&model, batch, a.context, a.decode_tokens, a.reps, a.graphs)?;
            let graph = if r.graphs { "yes" } else { "no" };
            println!(
                "| {} | {} | {:.2} | {:.1} | {graph} |",
                r.batch, r.context, r.ms_per_step, r.tok_per_s
            );
            let _ = std::io::stdout().flush();
        }
        return Ok(());
    }
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
pub(crate) fn cpu_model() -> String {
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

fn cmd_bench_tree(a: BenchTreeArgs) -> Result<()> {
    with_bench_model!(a.shape, a.run, model => bench_tree_on(&a, model))
}

fn bench_tree_on<B: Backend>(a: &BenchTreeArgs, model: Llama<B>) -> Result<()> {
    println!("backend:  {}", model.backend_name());
    println!("cpu:      {}", cpu_model());
    let on_device = !a.host_sampling && model.backend().draws_on_device();
    println!("draws:    {}", if on_device { "on the device" } else { "on the host" });
    let graphs = match (a.graphs, a.cascade_graphs) {
        (false, _) => "none",
        (true, false) => "decode steps without a sharing group",
        (true, true) => "decode steps, with sharing groups too",
    };
    println!("graphs:   {graphs}");
    println!(
        "K = {} siblings, prefix P = {} tokens, suffix S = {} tokens, block = {} tokens",
        a.siblings, a.prefix, a.suffix, DEFAULT_BLOCK_SIZE
    );
    println!(
        "{:<12} {:>5} {:>14} {:>12} {:>14} {:>12} {:>12} {:>11} {:>9} {:>11}",
        "setup",
        "seqs",
        "median ms/step",
        "mean ms/step",
        "vs single",
        "KV blocks",
        "shared",
        "forward ms",
        "draw ms",
        "prefill ms"
    );
    let options = qmtot::bench::tree::TreeBenchOptions {
        siblings: a.siblings,
        prefix: a.prefix,
        suffix: a.suffix,
        device_sampling: !a.host_sampling,
        graphs: a.graphs,
        cascade_graphs: a.cascade_graphs,
    };
    let mut rounds: Vec<Vec<qmtot::bench::tree::TreeBenchResult>> = Vec::new();
    for _ in 0..a.reps.max(1) {
        let round = TreeMode::ALL
            .iter()
            .map(|&mode| qmtot::bench::tree::run(&model, mode, options))
            .collect::<Result<Vec<_>>>()?;
        rounds.push(round);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let mut single_ms = None;
    for (i, mode) in TreeMode::ALL.iter().enumerate() {
        let step = median(rounds.iter().map(|r| r[i].median_step_ms).collect());
        let mean = median(rounds.iter().map(|r| r[i].mean_step_ms).collect());
        let forward = median(rounds.iter().map(|r| r[i].forward_ms).collect());
        let draw = median(rounds.iter().map(|r| r[i].draw_ms).collect());
        let prefill = median(rounds.iter().map(|r| r[i].prefill_ms).collect());
        let r = &rounds[0][i];
        let base = *single_ms.get_or_insert(step);
        println!(
            "{:<12} {:>5} {:>14.2} {:>12.2} {:>13.2}x {:>12} {:>12} {:>11.2} {:>9.2} {:>11.1}",
            mode.name(),
            r.sequences,
            step,
            mean,
            step / base,
            r.blocks_used,
            r.blocks_shared,
            forward,
            draw,
            prefill
        );
    }
    println!(
        "(step times: median over {} interleaved rounds of each round's median step; forward (with the \
         logits' copy to the host) and host draws: mean per step, median over rounds; prefill: wall \
         time of the setup's prompt prefill (K prompts for independent), not in the steps, median over rounds)",
        rounds.len()
    );
    let bound = a.prefix.div_ceil(DEFAULT_BLOCK_SIZE)
        + a.siblings * (a.suffix + DEFAULT_BLOCK_SIZE).div_ceil(DEFAULT_BLOCK_SIZE);
    println!(
        "bound for shared setups (prefix blocks + per-sibling suffix blocks incl. a copied partial block): {bound}"
    );
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    use qmtot::eval::datasets;
    let opts = datasets::LoadOptions {
        skip_bad: a.skip_bad,
        topics: (!a.subset.is_empty()).then(|| a.subset.clone()),
        ..Default::default()
    };
    let questions = cli::load_questions(&a.data, &opts, a.limit, false)?;
    with_model!(a.run, loaded => eval_on(&a, &questions, loaded))
}

fn eval_on<B: Backend>(a: &EvalArgs, questions: &[qmtot::eval::datasets::Question], loaded: Loaded<B>) -> Result<()> {
    use qmtot::eval::harness;
    let Loaded { model, tokenizer } = loaded;
    let tree_method = match a.method {
        EvalMethod::Direct => None,
        EvalMethod::Cot => Some(TreeMethod::Cot),
        EvalMethod::Sc => Some(TreeMethod::Sc),
        EvalMethod::Tot => Some(TreeMethod::Tot),
    };
    let method = tree_method.map_or("direct", TreeMethod::name);
    let engine_config = match a.search.no_sharing {
        true => a.engine.config().unshared(),
        false => a.engine.config(),
    };
    let mut engine = Engine::new(&model, Some(&tokenizer), engine_config)?;
    let bar = cli::tot::progress_bar(questions.len(), method);
    let progress = |p: harness::Progress| cli::tot::show_progress(&bar, p);
    let (records, run) = match tree_method {
        None => (
            harness::run_direct(&mut engine, &tokenizer, questions, &a.out, a.concurrency, progress)?,
            None,
        ),
        Some(m) => {
            let prompts = a.search.rendered(&tokenizer)?;
            let config = a.search.runner_config(m)?;
            let (records, run) = harness::run_search(
                &mut engine,
                &tokenizer,
                &prompts,
                config,
                method,
                questions,
                &a.out,
                a.concurrency,
                progress,
            )?;
            (records, Some(run))
        }
    };
    bar.finish_and_clear();
    let report = harness::report(method, &a.data, &records, run.as_ref());
    harness::write_report(&a.out, &report)?;
    println!(
        "{method} on {}: {} | results in {}",
        a.data.display(),
        report.accuracy_line(),
        a.out.display()
    );
    Ok(())
}
