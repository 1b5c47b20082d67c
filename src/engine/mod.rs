//! Generation. For now: one sequence at a time over a paged KV cache, with chunked prefill,
//! sampling, stop conditions and streamed text. The continuous-batching engine (many
//! sequences, fork, copy-on-write, prefix cache) grows from here and keeps this API for the
//! single-sequence case.

pub mod sampler;
pub mod stop;

use std::time::{Duration, Instant};

pub use sampler::{Sampled, Sampler, SamplingParams};
pub use stop::{FinishReason, StopConditions, StopMatcher};

use crate::backend::{Backend, StepInput};
use crate::error::{Error, Result};
use crate::kv::{BlockPool, BlockTable, DEFAULT_BLOCK_SIZE};
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;

/// Prompt tokens per prefill forward (bounds activation memory for long prompts).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Time to run the prompt through the model (up to the first logits).
    pub prefill: Duration,
    /// Time of the decode steps after the first token.
    pub decode: Duration,
    /// From the call to the first sampled token.
    pub time_to_first_token: Duration,
}

impl GenerationStats {
    pub fn prefill_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode steps per second (each step after the first token produces one token).
    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids, including a final stop token if one ended generation.
    pub tokens: Vec<u32>,
    /// log p of each generated id under the model.
    pub logprobs: Vec<f32>,
    /// Generated text, cut before a stop string; stop tokens are not rendered.
    pub text: String,
    pub finish: FinishReason,
    pub stats: GenerationStats,
}

/// Checks a prompt against the model before any work is done.
pub fn check_prompt(prompt_len: usize, max_new: usize, context: usize) -> Result<()> {
    if prompt_len == 0 {
        return Err(Error::EmptyPrompt);
    }
    if prompt_len + max_new > context {
        return Err(Error::PromptTooLong {
            tokens: prompt_len,
            max_new,
            context,
        });
    }
    Ok(())
}

/// One sequence's KV state: its own cache, block pool and table.
pub struct SequenceKv<B: Backend> {
    pub cache: KvCache<B>,
    pub pool: BlockPool,
    pub table: BlockTable,
}

impl<B: Backend> SequenceKv<B> {
    /// Room for `tokens` positions.
    pub fn new(model: &Llama<B>, tokens: usize) -> Result<Self> {
        let bs = DEFAULT_BLOCK_SIZE;
        let n_blocks = tokens.div_ceil(bs).max(1);
        Ok(Self {
            cache: model.new_kv_cache(n_blocks, bs)?,
            pool: BlockPool::new(n_blocks, bs)?,
            table: BlockTable::new(bs),
        })
    }

    /// Appends `tokens` at the end of the sequence and runs them through the model; returns
    /// logits for every new position (`all_logits`) or only the last, `[R, vocab]`.
    pub fn extend(&mut self, model: &Llama<B>, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let start = self.table.len();
        let appended = self.table.append(&self.pool, tokens.len())?;
        model.copy_blocks(&mut self.cache, &appended.copies)?;
        let n = tokens.len() as u32;
        let step = StepInput {
            tokens: tokens.to_vec(),
            positions: (start as u32..start as u32 + n).collect(),
            slots: appended.slots,
            row_seq: vec![0; tokens.len()],
            block_tables: vec![self.table.block_ids()],
            logit_rows: if all_logits { (0..n).collect() } else { vec![n - 1] },
            groups: Vec::new(),
        };
        model.forward(&mut self.cache, &step)
    }
}

/// Generates a continuation of `req.prompt`, calling `on_text` with each piece of text as it
/// becomes final.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let t0 = Instant::now();
    let max_new = req.stop.max_new_tokens;
    check_prompt(req.prompt.len(), max_new, model.config.context_length)?;
    if req.prefill_chunk == 0 {
        return Err(Error::InvalidArgument("prefill chunk must be at least 1".into()));
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    let mut stats = GenerationStats {
        prompt_tokens: req.prompt.len(),
        ..Default::default()
    };
    let mut out = Generation {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        finish: FinishReason::Length,
        stats: stats.clone(),
    };
    if max_new == 0 {
        out.stats.time_to_first_token = t0.elapsed();
        return Ok(out);
    }

    let mut seq = SequenceKv::new(model, req.prompt.len() + max_new)?;
    let mut logits = Vec::new();
    for chunk in req.prompt.chunks(req.prefill_chunk) {
        logits = seq.extend(model, chunk, false)?;
    }
    stats.prefill = t0.elapsed();

    let mut stream = tokenizer.stream();
    let mut matcher = StopMatcher::new(&req.stop.stop_strings);
    let decode_start = Instant::now();
    loop {
        let Sampled { token, logprob } = sampler.sample(&logits);
        if out.tokens.is_empty() {
            stats.time_to_first_token = t0.elapsed();
        }
        out.tokens.push(token);
        out.logprobs.push(logprob);
        if req.stop.stop_tokens.contains(&token) {
            out.finish = FinishReason::StopToken(token);
            break;
        }
        if let Some(piece) = stream.step(tokenizer, token)? {
            let (emit, hit) = matcher.push(&piece);
            if !emit.is_empty() {
                out.text.push_str(&emit);
                on_text(&emit)?;
            }
            if let Some(s) = hit {
                out.finish = FinishReason::StopString(s);
                break;
            }
        }
        if out.tokens.len() == max_new {
            out.finish = FinishReason::Length;
            break;
        }
        logits = seq.extend(model, &[token], false)?;
    }
    if !matches!(out.finish, FinishReason::StopString(_)) {
        let rest = matcher.finish();
        if !rest.is_empty() {
            out.text.push_str(&rest);
            on_text(&rest)?;
        }
    }
    stats.decode = decode_start.elapsed();
    stats.generated_tokens = out.tokens.len();
    out.stats = stats;
    Ok(out)
}
