//! The engine: many sequences over one paged KV cache, advanced together one batched step at
//! a time.
//!
//! A *sequence* is a token list with K/V in the cache and, at most, one task: prefill it,
//! generate a continuation, or score candidate continuations. Sequences are cheap to fork:
//! a fork shares every block of its parent (see [`crate::kv`] for the ownership and
//! copy-on-write rules), so the frontier of a tree of thoughts, or the `n` samples of one
//! prompt, cost the prompt once. Each [`Engine::step`] runs one forward over the rows the
//! [`scheduler`] picked from every sequence with pending tokens (continuous batching) and
//! returns what happened as [`Event`]s.
//!
//! Ownership in one line each:
//! * the engine owns the sequences; callers hold [`SeqId`]s and must [`Engine::release`] them;
//! * a sequence owns its block table, the table owns block handles, handles own refcounts;
//! * released sequences leave their full blocks in the radix prefix cache, which evicts them
//!   least recently used when the pool runs low.
//!
//! [`generate`] is the one-prompt, one-answer convenience on top, with streamed text.

mod graph_policy;
pub mod sampler;
pub mod scheduler;
mod sequence;
mod single;
mod step;
pub mod stop;
pub mod vocab;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use sampler::{Sampled, Sampler, SamplingParams};
pub use scheduler::SchedulerConfig;
pub use sequence::SeqId;
pub use single::SequenceKv;
pub use stop::{FinishReason, StopConditions, StopMatcher};

use rayon::prelude::*;

use crate::backend::{Backend, RowDraw};
use crate::error::{Error, Result};
use crate::kv::{BlockPool, PoolStats, RadixCache, DEFAULT_BLOCK_SIZE};
use crate::model::llama::{DecodeGraph, StepOutput};
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;
use sequence::{detach_kept_rows, Candidate, Generating, LogitsRow, Scoring, Sequence, Task};
use step::LogitUse;

/// Prompt tokens per prefill forward (bounds activation memory for long prompts).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// How the engine is sized and behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    pub scheduler: SchedulerConfig,
    /// Reuse computed prefixes across sequences through the radix cache.
    pub prefix_cache: bool,
    /// Cascade attention for sequences sharing at least this many leading blocks; `None` off.
    pub cascade_min_blocks: Option<usize>,
    /// Replay captured graphs for decode steps (CUDA graphs; no effect on a backend without).
    pub graphs: bool,
    /// With `graphs`, capture decode steps with sharing groups too (cascade in the graph, one
    /// graph per group layout, captured once a layout has repeated for
    /// [`graph_policy::GROUP_GRAPH_MIN_STEPS`] steps). Off by default until a GPU run has checked it; off,
    /// such steps run uncaptured.
    pub cascade_graphs: bool,
    /// Draw tokens on the device when every logit row of a step is a generating sequence's
    /// next token, so only the tokens come back ([`crate::backend::Backend::draw_rows`]; no
    /// effect on a backend without). On by default (checked against host draws on an H100,
    /// 2026-11-26, run 10).
    pub device_sampling: bool,
}

impl EngineConfig {
    /// The same engine without sharing between requests: no prefix cache, no cascade (the
    /// baseline that recomputes every prompt).
    pub fn unshared(self) -> Self {
        Self {
            prefix_cache: false,
            cascade_min_blocks: None,
            ..self
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_blocks: 1024,
            block_size: DEFAULT_BLOCK_SIZE,
            scheduler: SchedulerConfig::default(),
            prefix_cache: true,
            cascade_min_blocks: Some(1),
            graphs: true,
            cascade_graphs: false,
            device_sampling: true,
        }
    }
}

/// What a step produced, in order.
#[derive(Debug)]
pub enum Event {
    /// A [`Engine::prefill`] finished: the sequence's next-token logits are known, so its
    /// forks can sample at once.
    Ready { seq: SeqId },
    /// A generated token, with the text it made final (possibly empty: held back as a partial
    /// character or a possible stop string).
    Token {
        seq: SeqId,
        token: u32,
        logprob: f32,
        text: String,
        /// The most likely tokens at this step with their log-probabilities, most likely
        /// first, when the sampling parameters ask (`top_logprobs`); empty otherwise.
        top: Vec<(u32, f32)>,
    },
    /// Generation ended; the sequence is idle again and still holds its tokens.
    Finished { seq: SeqId, generation: Generation },
    /// Scores of [`Engine::score`], one per candidate, in the order given.
    Scored { seq: SeqId, scores: Vec<CandidateScore> },
    /// A task could not run (it can never fit the KV pool); the sequence is idle again.
    Failed { seq: SeqId, error: Error },
}

/// Log-probabilities of one candidate continuation, token by token.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateScore {
    pub logprobs: Vec<f32>,
    /// Per token, the `top` most likely tokens at its position (see
    /// [`Engine::score_with_alternatives`]); empty per token when none were asked.
    pub top: Vec<Vec<(u32, f32)>>,
}

impl CandidateScore {
    /// log p(candidate | sequence).
    pub fn total(&self) -> f32 {
        self.logprobs.iter().sum()
    }
}

/// A generation request for [`Engine::submit`].
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    /// Samples, sharing the prompt's blocks (like OpenAI's `n`). Sample `i` uses seed
    /// `sampling.seed + i`.
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    /// A new sequence of these tokens.
    Tokens(Vec<u32>),
    /// A fork of an idle sequence, extended by `tokens` (the original stays as it is).
    Continue { from: SeqId, tokens: Vec<u32> },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the start of the task to the first sampled token (prompt processing).
    pub prefill: Duration,
    /// From the first sampled token to the last.
    pub decode: Duration,
    /// From the start of the task to the first sampled token.
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

impl Generation {
    /// Sum of the generated tokens' log-probabilities.
    pub fn logprob(&self) -> f32 {
        self.logprobs.iter().sum()
    }
}

/// Counters since the engine started, and the pool now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub steps: usize,
    /// Steps that replayed a captured graph.
    pub graph_steps: usize,
    /// Rows run through the model (prompt, decode and candidate tokens).
    pub computed_tokens: usize,
    /// Tokens whose K/V came from the prefix cache instead.
    pub cached_tokens: usize,
    /// Copy-on-write block copies.
    pub block_copies: usize,
    pub preemptions: usize,
    /// Wall time in the steps' forwards (block copies, the forward or its graph replay, and
    /// the logits' copy to the host, which waits for the device).
    pub forward_time: Duration,
    /// Wall time drawing tokens from logits on the host.
    pub draw_time: Duration,
    /// Steps whose tokens were drawn on the device ([`EngineConfig::device_sampling`]).
    pub device_draw_steps: usize,
    /// Sequences held (including engine-internal ones).
    pub sequences: usize,
    pub pool: PoolStats,
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

pub struct Engine<'m, B: Backend> {
    model: &'m Llama<B>,
    /// Needed for text output and stop strings.
    tokenizer: Option<&'m Tokenizer>,
    config: EngineConfig,
    kv: KvCache<B>,
    pool: BlockPool,
    radix: Option<RadixCache>,
    seqs: HashMap<SeqId, Sequence>,
    next_id: u64,
    /// Task start counter (scheduling priority).
    next_order: u64,
    stats: EngineStats,
    /// Captured decode steps by [`GraphKey`]; `graphs_unavailable` once the backend has said
    /// it captures none.
    graphs: HashMap<GraphKey, DecodeGraph<B>>,
    graphs_unavailable: bool,
    /// Which graphs with sharing groups to capture and keep; steps run, as their clock;
    /// `group_graphs_failed` once such a capture failed (those steps then run uncaptured,
    /// the others keep their graphs).
    group_graphs: graph_policy::GroupGraphPolicy<GraphKey>,
    group_graphs_failed: bool,
    steps_run: u64,
}

/// What a captured decode step is reused for: the row count, the context bucket, and the
/// sharing groups as (member rows, shared blocks), sorted (empty without groups).
type GraphKey = (usize, usize, Vec<(usize, u32)>);

/// Most rows of a decode step that gets a graph (a graph per row count and context bucket).
pub const MAX_GRAPH_ROWS: usize = 64;
/// Smallest context bucket of a decode graph: buckets are powers of two from here, so a
/// graph's attention grid covers at most twice the longest row's keys.
const MIN_GRAPH_CONTEXT: usize = 512;

impl<'m, B: Backend> Engine<'m, B> {
    pub fn new(model: &'m Llama<B>, tokenizer: Option<&'m Tokenizer>, config: EngineConfig) -> Result<Self> {
        if config.scheduler.max_batch_tokens == 0 || config.scheduler.max_seqs == 0 {
            return Err(Error::InvalidArgument(format!(
                "scheduler limits must be positive: {:?}",
                config.scheduler
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            kv: model.new_kv_cache(config.kv_blocks, config.block_size)?,
            pool: BlockPool::new(config.kv_blocks, config.block_size)?,
            radix: config.prefix_cache.then(|| RadixCache::new(config.block_size)),
            config,
            seqs: HashMap::new(),
            next_id: 0,
            next_order: 0,
            stats: EngineStats::default(),
            graphs: HashMap::new(),
            graphs_unavailable: false,
            group_graphs: Default::default(),
            group_graphs_failed: false,
            steps_run: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            sequences: self.seqs.len(),
            pool: self.pool.stats(),
            ..self.stats.clone()
        }
    }

    /// Block ids each live sequence holds, and those the prefix cache holds (for checks).
    pub fn block_holders(&self) -> (Vec<Vec<u32>>, Vec<u32>) {
        let tables = self.seqs.values().map(|s| s.table.block_ids()).collect();
        let cached = self.radix.as_ref().map(RadixCache::block_ids).unwrap_or_default();
        (tables, cached)
    }

    /// The physical KV blocks of a sequence, in position order (for checks of sharing).
    pub fn block_ids(&self, id: SeqId) -> Result<Vec<u32>> {
        Ok(self.visible(id)?.table.block_ids())
    }

    /// The pool (for stats and invariant checks).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Whether any task is still running.
    pub fn is_idle(&self) -> bool {
        self.seqs.values().all(|s| matches!(s.task, Task::Idle))
    }

    /// The tokens of a sequence.
    pub fn tokens(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.visible(id)?.tokens)
    }

    /// The next-token logits `[vocab]` of a sequence, when all its tokens are computed (after
    /// [`Event::Ready`], for instance; a fork shares its parent's).
    pub fn next_logits(&self, id: SeqId) -> Result<Option<&[f32]>> {
        Ok(self.visible(id)?.next_logits.as_deref())
    }

    // ---- creating and shaping sequences ------------------------------------------------------

    /// A new idle sequence of `tokens` (nothing is computed until a task needs it; then the
    /// longest cached prefix is reused).
    pub fn add(&mut self, tokens: Vec<u32>) -> Result<SeqId> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_tokens(&tokens)?;
        self.check_fits(tokens.len(), 0)?;
        Ok(self.insert(Sequence::new(tokens, self.config.block_size)))
    }

    /// Appends tokens to an idle sequence (they are computed by its next task).
    pub fn append(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        self.check_tokens(tokens)?;
        let len = self.idle(id)?.tokens.len() + tokens.len();
        self.check_fits(len, 0)?;
        let seq = self.seqs.get_mut(&id).expect("checked above");
        seq.tokens.extend_from_slice(tokens);
        if !tokens.is_empty() {
            seq.next_logits = None;
        }
        Ok(())
    }

    /// Cuts idle sequence `id` back to its first `len` tokens (say, to drop a sampled stop
    /// token before continuing). Blocks past `len` go back to the pool unless shared.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let bs = self.config.block_size;
        let have = self.idle(id)?.tokens.len();
        if len == 0 || len > have {
            return Err(Error::InvalidArgument(format!(
                "truncate {id} to {len} tokens: it has {have} (and must keep at least one)"
            )));
        }
        let seq = self.seqs.get_mut(&id).expect("checked above");
        if len < have {
            seq.tokens.truncate(len);
            seq.next_logits = None;
            if seq.computed >= len {
                // The last kept token is recomputed so that its next-token logits are known
                // again (they were consumed, or belong to a longer sequence).
                seq.computed = len - 1;
                seq.table.truncate(len - 1);
                seq.cached_blocks = seq.cached_blocks.min((len - 1) / bs);
            }
        }
        Ok(())
    }

    /// `n` new sequences sharing every block of idle sequence `id` (no K/V is copied).
    pub fn fork(&mut self, id: SeqId, n: usize) -> Result<Vec<SeqId>> {
        let parent = self.idle(id)?;
        let children: Vec<Sequence> = (0..n).map(|_| parent.fork()).collect();
        Ok(children.into_iter().map(|c| self.insert(c)).collect())
    }

    /// Drops a sequence and any task it runs. Its full computed blocks stay in the prefix
    /// cache; everything else returns to the pool once no other sequence shares it.
    pub fn release(&mut self, id: SeqId) -> Result<()> {
        self.visible(id)?;
        self.remove(id);
        Ok(())
    }

    /// Stops a sequence's task and releases it; returns what it had generated, if it was
    /// generating (finish reason `Cancelled`).
    pub fn cancel(&mut self, id: SeqId) -> Result<Option<Generation>> {
        self.visible(id)?;
        let out = match self
            .seqs
            .get_mut(&id)
            .map(|s| std::mem::replace(&mut s.task, Task::Idle))
        {
            Some(Task::Generate(g)) => Some(finish_generation(*g, FinishReason::Cancelled)),
            _ => None,
        };
        self.remove(id);
        Ok(out)
    }

    // ---- tasks ---------------------------------------------------------------------------------

    /// Computes the pending tokens of idle sequence `id`; [`Event::Ready`] follows.
    pub fn prefill(&mut self, id: SeqId) -> Result<()> {
        self.idle(id)?;
        self.start(id, Task::Prefill);
        Ok(())
    }

    /// Samples a continuation of idle sequence `id`; [`Event::Token`]s then
    /// [`Event::Finished`] follow.
    pub fn generate(&mut self, id: SeqId, sampling: SamplingParams, stop: StopConditions) -> Result<()> {
        let g = self.new_generation(self.idle(id)?.tokens.len(), sampling, stop)?;
        self.start(id, Task::Generate(Box::new(g)));
        Ok(())
    }

    /// Log-probabilities of each candidate token sequence right after idle sequence `id`;
    /// [`Event::Scored`] follows. Candidates longer than one token are scored by forks, which
    /// share the sequence's blocks.
    pub fn score(&mut self, id: SeqId, candidates: Vec<Vec<u32>>) -> Result<()> {
        self.score_with_alternatives(id, candidates, 0)
    }

    /// [`Engine::score`], also reporting at each candidate token the `top` most likely tokens
    /// there (for OpenAI-style prompt log-probabilities, `echo` with `logprobs`).
    pub fn score_with_alternatives(&mut self, id: SeqId, candidates: Vec<Vec<u32>>, top: usize) -> Result<()> {
        if top > sampler::MAX_TOP_LOGPROBS {
            return Err(Error::InvalidArgument(format!(
                "score: at most {} alternatives per token",
                sampler::MAX_TOP_LOGPROBS
            )));
        }
        let len = self.idle(id)?.tokens.len();
        if candidates.is_empty() || candidates.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument(
                "score: candidates must be non-empty token lists".into(),
            ));
        }
        for c in &candidates {
            self.check_tokens(c)?;
            self.check_fits(len + c.len() - 1, 0)?;
        }
        let n = candidates.len();
        self.start(
            id,
            Task::Score(Scoring {
                candidates,
                results: vec![None; n],
                started: false,
                alternatives: top,
            }),
        );
        Ok(())
    }

    /// Creates the request's sequence(s) and starts generating; returns one id per sample.
    /// With `n > 1` the prompt is computed once and the samples fork from it.
    pub fn submit(&mut self, req: Request) -> Result<Vec<SeqId>> {
        if req.n == 0 {
            return Err(Error::InvalidArgument("n must be at least 1".into()));
        }
        let prompt_len = match &req.prompt {
            Prompt::Tokens(t) => t.len(),
            Prompt::Continue { from, tokens } => self.idle(*from)?.tokens.len() + tokens.len(),
        };
        // Check everything before creating anything.
        check_prompt(prompt_len, req.stop.max_new_tokens, self.model.config.context_length)?;
        self.new_generation(prompt_len, req.sampling.clone(), req.stop.clone())?;
        self.check_fits(prompt_len, req.stop.max_new_tokens)?;
        let base = match req.prompt {
            Prompt::Tokens(tokens) => self.add(tokens)?,
            Prompt::Continue { from, tokens } => {
                let child = self.fork(from, 1)?[0];
                self.append(child, &tokens)?;
                child
            }
        };
        if req.n == 1 {
            self.generate(base, req.sampling, req.stop)?;
            return Ok(vec![base]);
        }
        let base_tokens = self.seqs[&base].tokens.clone();
        let mut children = Vec::with_capacity(req.n);
        for i in 0..req.n {
            let id = self.insert(Sequence::new(base_tokens.clone(), self.config.block_size));
            let sampling = SamplingParams {
                seed: req.sampling.seed.wrapping_add(i as u64),
                ..req.sampling.clone()
            };
            self.generate(id, sampling, req.stop.clone())?;
            self.seqs.get_mut(&id).expect("just added").waiting_for = Some(base);
            children.push(id);
        }
        self.seqs.get_mut(&base).expect("just added").hidden = true;
        self.start(
            base,
            Task::FanOut {
                children: children.clone(),
            },
        );
        Ok(children)
    }

    // ---- running -------------------------------------------------------------------------------

    /// The step's forward: a captured graph for a decode step (one row per sequence, every
    /// row returning logits, at most [`MAX_GRAPH_ROWS`]; with sharing groups only under
    /// [`EngineConfig::cascade_graphs`], once their layout has repeated) when the config allows
    /// and the backend has graphs; else, or when the step does not fit its graph, the plain
    /// forward.
    /// With `draws` (one per logit row), the tokens are drawn on the device where the backend
    /// can ([`Llama::forward_drawing`]).
    fn run_forward(&mut self, input: &crate::backend::StepInput, draws: Option<&[RowDraw]>) -> Result<StepOutput> {
        let plain = |engine: &mut Self| match draws {
            Some(d) => engine.model.forward_drawing(&mut engine.kv, input, d),
            None => engine.model.forward(&mut engine.kv, input).map(StepOutput::Logits),
        };
        self.steps_run += 1;
        let rows = input.rows();
        let decode = rows <= MAX_GRAPH_ROWS
            && rows == input.block_tables.len()
            && input.logit_rows.len() == rows
            && (input.groups.is_empty() || (self.config.cascade_graphs && !self.group_graphs_failed));
        if !self.config.graphs || self.graphs_unavailable || !decode {
            return plain(self);
        }
        let longest = input.positions.iter().max().map_or(1, |&p| p as usize + 1);
        let bucket = longest
            .next_power_of_two()
            .max(MIN_GRAPH_CONTEXT)
            .min(self.model.config.context_length);
        let mut layout: Vec<(usize, u32)> = input.groups.iter().map(|g| (g.seqs.len(), g.blocks)).collect();
        layout.sort_unstable();
        let grouped = !layout.is_empty();
        let key: GraphKey = (rows, bucket, layout);
        if !self.graphs.contains_key(&key) {
            if grouped {
                if !self.group_graphs.ready(&key) {
                    return plain(self);
                }
                for old in self.group_graphs.make_room() {
                    self.graphs.remove(&old);
                }
            }
            match self.model.capture_decode(&mut self.kv, input, bucket) {
                Ok(Some(g)) => {
                    self.graphs.insert(key.clone(), g);
                }
                Ok(None) => self.graphs_unavailable = true,
                // A capture that fails leaves nothing recorded and nothing run: the engine goes
                // on uncaptured rather than fail the step.
                Err(e) if grouped => {
                    eprintln!(
                        "qmtot: decode graph capture with sharing groups failed, running those steps uncaptured from now on: {e}"
                    );
                    self.group_graphs_failed = true;
                }
                Err(e) => {
                    eprintln!("qmtot: decode graph capture failed, running uncaptured from now on: {e}");
                    self.graphs_unavailable = true;
                }
            }
        }
        if grouped && self.graphs.contains_key(&key) {
            self.group_graphs.used(&key, self.steps_run);
        }
        if let Some(g) = self.graphs.get_mut(&key) {
            let replayed = match draws {
                Some(d) => self.model.replay_decode_drawing(g, &mut self.kv, input, d)?,
                None => self
                    .model
                    .replay_decode(g, &mut self.kv, input)?
                    .map(StepOutput::Logits),
            };
            if let Some(out) = replayed {
                self.stats.graph_steps += 1;
                return Ok(out);
            }
        }
        plain(self)
    }

    /// Device draws for a step whose logit rows `uses` all give a generating sequence its next
    /// token (and only when the config asks and the backend draws on the device): each
    /// sequence's parameters and the next uniform of its stream, in row order, with the
    /// samplers as they were before (to rewind them if the step fails, so a recomputed step
    /// draws what it would have). `None` leaves every stream untouched (the host draws as
    /// usual).
    #[allow(clippy::type_complexity)]
    fn device_draws(
        &mut self,
        plan: &[scheduler::Planned],
        uses: &[LogitUse],
    ) -> Option<(Vec<(SamplingParams, f64)>, Vec<(SeqId, Sampler)>)> {
        if !self.config.device_sampling || !self.model.backend().draws_on_device() || uses.is_empty() {
            return None;
        }
        let seq_of = |u: &LogitUse| match u {
            LogitUse::Next { entry } => Some(plan[*entry].seq),
            LogitUse::Candidate { .. } => None,
        };
        let all_generating = uses.iter().all(|u| {
            seq_of(u)
                .and_then(|id| self.seqs.get(&id))
                .is_some_and(|s| matches!(&s.task, Task::Generate(g) if g.drawn.is_none() && s.next_logits.is_none()))
        });
        if !all_generating {
            return None;
        }
        let mut before = Vec::with_capacity(uses.len());
        let draws = uses
            .iter()
            .map(|u| {
                let id = seq_of(u).expect("checked");
                let Some(Task::Generate(g)) = self.seqs.get_mut(&id).map(|s| &mut s.task) else {
                    unreachable!("checked")
                };
                before.push((id, g.sampler.clone()));
                (g.sampler.params().clone(), g.sampler.next_uniform())
            })
            .collect();
        Some((draws, before))
    }

    /// Runs one batched forward over the scheduled rows and returns the events it caused.
    /// Returns no events and does nothing when no task has work.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.advance(&mut events);
        let plan = self.schedule(&mut events);
        if plan.is_empty() {
            return Ok(events);
        }
        let copies: Vec<(u32, u32)> = plan.iter().flat_map(|p| p.appended.copies.iter().copied()).collect();
        let (input, uses) = step::build(
            &plan,
            &self.seqs,
            self.config.block_size,
            self.config.cascade_min_blocks,
        );
        let (draw_params, samplers_before) = self.device_draws(&plan, &uses).unzip();
        let draws: Option<Vec<RowDraw>> = draw_params.as_ref().map(|d| {
            d.iter()
                .map(|(params, uniform)| RowDraw {
                    params,
                    uniform: *uniform,
                })
                .collect()
        });
        let forward_start = Instant::now();
        let result = self
            .model
            .copy_blocks(&mut self.kv, &copies)
            .and_then(|()| self.run_forward(&input, draws.as_deref()));
        self.stats.forward_time += forward_start.elapsed();
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                // The planned rows' slots were reserved but not written: recompute them later,
                // with the streams the device draws took from rewound.
                for (id, sampler) in samplers_before.into_iter().flatten() {
                    if let Some(Task::Generate(g)) = self.seqs.get_mut(&id).map(|s| &mut s.task) {
                        g.sampler = sampler;
                    }
                }
                for p in &plan {
                    self.preempt(p.seq);
                }
                return Err(e);
            }
        };
        self.stats.steps += 1;
        self.stats.computed_tokens += input.rows();
        self.stats.block_copies += copies.len();
        for p in &plan {
            self.seqs.get_mut(&p.seq).expect("planned sequences exist").computed += p.rows;
        }
        let logits = match output {
            StepOutput::Logits(logits) => logits,
            StepOutput::Drawn(drawn) => {
                self.stats.device_draw_steps += 1;
                // Every row was a generating sequence's next token (`device_draws`).
                for (sampled, use_) in drawn.into_iter().zip(&uses) {
                    let LogitUse::Next { entry } = use_ else {
                        unreachable!("device draws only for next-token rows")
                    };
                    let seq = self.seqs.get_mut(&plan[*entry].seq).expect("planned");
                    if let Task::Generate(g) = &mut seq.task {
                        g.drawn = Some(sampled);
                    }
                }
                Vec::new()
            }
        };
        let vocab = self.model.config.vocab_size;
        // The rows stay in the step's buffer: a 128k-vocabulary row is 512 KB, and copying 16
        // of them took 0.43 ms on the development CPU (best of 30; more with fresh pages),
        // host time in every sibling step.
        let logits = Arc::new(logits);
        for (i, (row, use_)) in logits.chunks_exact(vocab).zip(uses).enumerate() {
            match use_ {
                LogitUse::Next { entry } => {
                    let seq = self.seqs.get_mut(&plan[entry].seq).expect("planned");
                    seq.next_logits = Some(LogitsRow::new(&logits, i, vocab));
                }
                LogitUse::Candidate { entry, position } => {
                    let seq = self.seqs.get_mut(&plan[entry].seq).expect("planned");
                    if let Task::Candidate(c) = &mut seq.task {
                        let j = position - c.base + 1;
                        c.logprobs[j] = sampler::candidate_logprobs(row, &[c.tokens[j]])?[0];
                        c.top[j] = sampler::top_logprobs(row, c.alternatives);
                    }
                }
            }
        }
        let planned: Vec<SeqId> = plan.iter().map(|p| p.seq).collect();
        drop(plan); // copies applied: release the copy sources
        for id in planned {
            self.offer_to_cache(id);
        }
        self.advance(&mut events);
        Ok(events)
    }

    /// [`Engine::step`] for callers waiting on tasks: a step that neither ran a forward nor
    /// produced an event while tasks remain is an error (an internal stall), never a hang.
    pub fn step_with_progress(&mut self) -> Result<Vec<Event>> {
        let before = self.stats.steps;
        let events = self.step()?;
        if events.is_empty() && self.stats.steps == before && !self.is_idle() {
            return Err(Error::InvalidArgument(
                "the engine made no progress (internal error)".into(),
            ));
        }
        Ok(events)
    }

    /// Steps until no task is left; returns every event.
    pub fn run_until_idle(&mut self) -> Result<Vec<Event>> {
        let mut all = Vec::new();
        while !self.is_idle() {
            all.extend(self.step_with_progress()?);
        }
        Ok(all)
    }

    // ---- internals -------------------------------------------------------------------------------

    fn insert(&mut self, seq: Sequence) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, seq);
        id
    }

    fn start(&mut self, id: SeqId, task: Task) {
        let seq = self.seqs.get_mut(&id).expect("checked by the caller");
        seq.task = task;
        seq.order = self.next_order;
        self.next_order += 1;
    }

    fn visible(&self, id: SeqId) -> Result<&Sequence> {
        match self.seqs.get(&id) {
            Some(s) if !s.hidden => Ok(s),
            _ => Err(Error::InvalidArgument(format!("unknown sequence {id}"))),
        }
    }

    /// A visible sequence with no task.
    fn idle(&self, id: SeqId) -> Result<&Sequence> {
        let s = self.visible(id)?;
        if !matches!(s.task, Task::Idle) || s.waiting_for.is_some() {
            return Err(Error::InvalidArgument(format!("{id} is busy with a task")));
        }
        Ok(s)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// A sequence of `len` tokens that may grow by `max_new` must fit the context and, alone,
    /// the pool.
    fn check_fits(&self, len: usize, max_new: usize) -> Result<()> {
        let context = self.model.config.context_length;
        if len + max_new > context {
            return Err(Error::PromptTooLong {
                tokens: len,
                max_new,
                context,
            });
        }
        let needed_blocks = (len + max_new).div_ceil(self.config.block_size);
        if needed_blocks > self.config.kv_blocks {
            return Err(Error::KvCapacity {
                tokens: len + max_new,
                needed_blocks,
                total_blocks: self.config.kv_blocks,
            });
        }
        Ok(())
    }

    fn new_generation(
        &self,
        prompt_tokens: usize,
        sampling: SamplingParams,
        stop: StopConditions,
    ) -> Result<Generating> {
        if !stop.stop_strings.is_empty() && self.tokenizer.is_none() {
            return Err(Error::InvalidArgument("stop strings need a tokenizer".into()));
        }
        Ok(Generating {
            sampler: Sampler::new(sampling)?,
            matcher: StopMatcher::new(&stop.stop_strings),
            stop,
            text_stream: Default::default(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            prompt_tokens,
            started: Instant::now(),
            first_token: None,
            drawn: None,
        })
    }

    /// Inserts `id`'s newly completed full blocks into the prefix cache.
    pub(crate) fn offer_to_cache(&mut self, id: SeqId) {
        let (Some(radix), Some(seq)) = (self.radix.as_mut(), self.seqs.get_mut(&id)) else {
            return;
        };
        let full = seq.computed / self.config.block_size;
        if full > seq.cached_blocks {
            radix.insert(
                &seq.tokens[..full * self.config.block_size],
                &seq.table.blocks()[..full],
            );
            seq.cached_blocks = full;
        }
    }

    /// Removes the candidate forks scoring for `parent`.
    fn remove_candidates(&mut self, parent: SeqId) {
        let children: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| matches!(&s.task, Task::Candidate(c) if c.parent == parent))
            .map(|(&c, _)| c)
            .collect();
        for c in children {
            self.remove(c);
        }
    }

    /// Removes a sequence with everything that depends on it (its candidates; a fan-out
    /// parent left without children).
    fn remove(&mut self, id: SeqId) {
        self.offer_to_cache(id);
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        match seq.task {
            Task::Score(_) => {
                self.remove_candidates(id);
            }
            Task::FanOut { children } => {
                for c in children {
                    if let Some(child) = self.seqs.get_mut(&c) {
                        child.waiting_for = None;
                    }
                }
            }
            _ => {}
        }
        if let Some(parent) = seq.waiting_for {
            let orphaned = match self.seqs.get_mut(&parent).map(|p| &mut p.task) {
                Some(Task::FanOut { children }) => {
                    children.retain(|&c| c != id);
                    children.is_empty()
                }
                _ => false,
            };
            if orphaned {
                self.remove(parent);
            }
        }
    }

    /// Ends `id`'s task with `error` (and the tasks that depend on it).
    fn fail(&mut self, id: SeqId, error: Error, events: &mut Vec<Event>) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        match std::mem::replace(&mut seq.task, Task::Idle) {
            Task::Candidate(c) => {
                self.remove(id);
                self.fail(c.parent, error, events);
            }
            Task::FanOut { children } => {
                self.remove(id);
                for c in children {
                    self.fail(
                        c,
                        Error::InvalidArgument(format!("the shared prompt failed: {error}")),
                        events,
                    );
                }
            }
            Task::Score(_) => {
                self.remove_candidates(id);
                events.push(Event::Failed { seq: id, error });
            }
            _ => {
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.waiting_for = None;
                }
                events.push(Event::Failed { seq: id, error });
            }
        }
    }

    /// Moves every task whose sequence is fully computed one step on: sample, score, hand a
    /// prompt to its forks, or report readiness.
    fn advance(&mut self, events: &mut Vec<Event>) {
        self.draw_in_parallel(|_| true);
        let mut ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.advance_one(id, events);
        }
        // Rows still held now outlive the step (a prefilled sequence waiting for its caller,
        // a prompt being scored, fan-out children not yet drawn): each gets a buffer of its
        // own, so the step's buffer goes once its drawn rows are done with it.
        detach_kept_rows(self.seqs.values_mut().filter_map(|s| s.next_logits.as_mut()));
    }

    /// Draws the next token of every generating sequence that `pick` selects and that has its
    /// logits, in parallel (into `Generating.drawn`, which `advance_one` consumes). A draw reads
    /// only the sequence's own logits and advances only its own sampler, so the tokens are
    /// those of drawing one by one. A 128k-vocabulary row costs about 0.2 ms of host time at
    /// temperature 1 (`cargo bench --bench cpu -- sampler`; it was 1.3–1.6 ms before the row
    /// passes were vectorized), so 16 siblings drawn one by one would still be a GPU step's worth.
    fn draw_in_parallel(&mut self, pick: impl Fn(SeqId) -> bool + Sync) {
        let start = Instant::now();
        self.seqs.par_iter_mut().for_each(|(&id, seq)| {
            if let (Task::Generate(g), Some(logits)) = (&mut seq.task, &seq.next_logits) {
                if g.drawn.is_none() && pick(id) {
                    g.drawn = Some(g.sampler.sample(logits));
                }
            }
        });
        self.stats.draw_time += start.elapsed();
    }

    fn advance_one(&mut self, id: SeqId, events: &mut Vec<Event>) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let complete = seq.computed == seq.tokens.len();
        match &mut seq.task {
            Task::Prefill if seq.next_logits.is_some() => {
                seq.task = Task::Idle;
                events.push(Event::Ready { seq: id });
            }
            Task::Generate(g) if seq.next_logits.is_some() || g.drawn.is_some() || g.stop.max_new_tokens == 0 => {
                // Drawn already (in parallel on the host, or on the device), else drawn now.
                let logits = seq.next_logits.take();
                let sampled = match (g.drawn.take(), logits) {
                    (Some(sampled), _) => sampled,
                    (None, Some(logits)) => g.sampler.sample(&logits),
                    (None, None) => {
                        let Task::Generate(g) = std::mem::replace(&mut seq.task, Task::Idle) else {
                            unreachable!()
                        };
                        let generation = finish_generation(*g, FinishReason::Length);
                        events.push(Event::Finished { seq: id, generation });
                        return;
                    }
                };
                let Sampled { token, logprob, top } = sampled;
                seq.tokens.push(token);
                let (text, finish) = record_token(g, self.tokenizer, token, logprob);
                events.push(Event::Token {
                    seq: id,
                    token,
                    logprob,
                    text,
                    top,
                });
                if let Some(finish) = finish {
                    let Task::Generate(g) = std::mem::replace(&mut seq.task, Task::Idle) else {
                        unreachable!()
                    };
                    let generation = finish_generation(*g, finish);
                    events.push(Event::Finished { seq: id, generation });
                }
            }
            Task::Score(s) if !s.started && seq.next_logits.is_some() => {
                s.started = true;
                let logits = seq.next_logits.clone().expect("checked");
                let base = seq.tokens.len();
                let mut spawn = Vec::new();
                for (index, c) in s.candidates.iter().enumerate() {
                    // Ids were checked against the vocabulary when the task started.
                    let first = sampler::candidate_logprobs(&logits, &c[..1]).map_or(f32::NAN, |v| v[0]);
                    let first_top = sampler::top_logprobs(&logits, s.alternatives);
                    if c.len() == 1 {
                        s.results[index] = Some(CandidateScore {
                            logprobs: vec![first],
                            top: vec![first_top],
                        });
                    } else {
                        let mut logprobs = vec![f32::NAN; c.len()];
                        logprobs[0] = first;
                        let mut top = vec![Vec::new(); c.len()];
                        top[0] = first_top;
                        spawn.push(Candidate {
                            parent: id,
                            index,
                            base,
                            tokens: c.clone(),
                            logprobs,
                            alternatives: s.alternatives,
                            top,
                        });
                    }
                }
                for c in spawn {
                    let mut child = self.seqs[&id].fork();
                    child.tokens.extend_from_slice(&c.tokens[..c.tokens.len() - 1]);
                    child.next_logits = None;
                    child.hidden = true;
                    let cid = self.insert(child);
                    self.start(cid, Task::Candidate(c));
                }
                self.finish_scoring_if_done(id, events);
            }
            Task::Candidate(_) if complete => {
                let Some(Sequence {
                    task: Task::Candidate(c),
                    ..
                }) = self.seqs.remove(&id)
                else {
                    unreachable!()
                };
                if let Some(Task::Score(s)) = self.seqs.get_mut(&c.parent).map(|p| &mut p.task) {
                    s.results[c.index] = Some(CandidateScore {
                        logprobs: c.logprobs,
                        top: c.top,
                    });
                }
                self.finish_scoring_if_done(c.parent, events);
            }
            Task::FanOut { .. } if seq.next_logits.is_some() => {
                let Some(parent) = self.seqs.remove(&id) else {
                    unreachable!()
                };
                let Task::FanOut { children } = &parent.task else {
                    unreachable!()
                };
                for c in children {
                    if let Some(child) = self.seqs.get_mut(c) {
                        let order = child.order;
                        let task = std::mem::replace(&mut child.task, Task::Idle);
                        *child = Sequence {
                            task,
                            order,
                            ..parent.fork()
                        };
                    }
                }
                // The children sample from the shared logits right away (drawn together).
                self.draw_in_parallel(|id| children.contains(&id));
                for &c in children {
                    self.advance_one(c, events);
                }
            }
            _ => {}
        }
    }

    fn finish_scoring_if_done(&mut self, id: SeqId, events: &mut Vec<Event>) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let Task::Score(s) = &seq.task else {
            return;
        };
        if !s.started || s.results.iter().any(Option::is_none) {
            return;
        }
        let Task::Score(s) = std::mem::replace(&mut seq.task, Task::Idle) else {
            unreachable!()
        };
        let scores = s.results.into_iter().map(|r| r.expect("all present")).collect();
        events.push(Event::Scored { seq: id, scores });
    }
}

/// Adds a sampled token to a generation: text, stop checks. Returns the text made final and
/// the finish reason if generation ends here.
fn record_token(
    g: &mut Generating,
    tokenizer: Option<&Tokenizer>,
    token: u32,
    logprob: f32,
) -> (String, Option<FinishReason>) {
    g.first_token.get_or_insert_with(Instant::now);
    g.tokens.push(token);
    g.logprobs.push(logprob);
    let mut text = String::new();
    let mut finish = None;
    if g.stop.stop_tokens.contains(&token) {
        finish = Some(FinishReason::StopToken(token));
    } else if let Some(tok) = tokenizer {
        // A token the tokenizer cannot decode contributes no text rather than failing the run.
        if let Ok(Some(piece)) = g.text_stream.step(tok, token) {
            let (emit, hit) = g.matcher.push(&piece);
            text = emit;
            if let Some(s) = hit {
                finish = Some(FinishReason::StopString(s));
            }
        }
    }
    if finish.is_none() && g.tokens.len() >= g.stop.max_new_tokens {
        finish = Some(FinishReason::Length);
    }
    if finish.is_some() && !matches!(finish, Some(FinishReason::StopString(_))) {
        text.push_str(&g.matcher.finish());
    }
    g.text.push_str(&text);
    (text, finish)
}

fn finish_generation(g: Generating, finish: FinishReason) -> Generation {
    let now = Instant::now();
    let first = g.first_token.unwrap_or(now);
    let prefill = first - g.started;
    Generation {
        stats: GenerationStats {
            prompt_tokens: g.prompt_tokens,
            generated_tokens: g.tokens.len(),
            prefill,
            decode: now - first,
            time_to_first_token: prefill,
        },
        tokens: g.tokens,
        logprobs: g.logprobs,
        text: g.text,
        finish,
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

/// Generates a continuation of `req.prompt`, calling `on_text` with each piece of text as it
/// becomes final. A one-sequence engine sized for exactly this request.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let max_new = req.stop.max_new_tokens;
    check_prompt(req.prompt.len(), max_new, model.config.context_length)?;
    if req.prefill_chunk == 0 {
        return Err(Error::InvalidArgument("prefill chunk must be at least 1".into()));
    }
    let config = EngineConfig {
        kv_blocks: (req.prompt.len() + max_new).div_ceil(DEFAULT_BLOCK_SIZE).max(1),
        scheduler: SchedulerConfig {
            max_batch_tokens: req.prefill_chunk,
            max_seqs: 1,
        },
        prefix_cache: false,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, Some(tokenizer), config)?;
    engine.submit(Request {
        prompt: Prompt::Tokens(req.prompt.clone()),
        n: 1,
        sampling: req.sampling.clone(),
        stop: req.stop.clone(),
    })?;
    while !engine.is_idle() {
        for event in engine.step_with_progress()? {
            match event {
                Event::Token { text, .. } if !text.is_empty() => on_text(&text)?,
                Event::Finished { generation, .. } => return Ok(generation),
                Event::Failed { error, .. } => return Err(error),
                _ => {}
            }
        }
    }
    Err(Error::InvalidArgument(
        "generation ended without a result (internal error)".into(),
    ))
}
