//! Runs [`Search`]es on the engine, many questions at once: every engine step carries the
//! active nodes of every question in flight (continuous batching across questions).
//!
//! How a search's actions map onto engine sequences (with `sharing`, the default):
//! * every node holds a sequence: the root's prompt, then its path's steps;
//! * `Propose { k }` = one request `Continue { from: node, step prefix }` with `n = k`: the
//!   prefix is computed once and the `k` samples fork from it, decoding as one batch; each
//!   sample's sequence becomes a child node's sequence (a trailing stop token is cut off and
//!   the step's line ended, so the child continues with the next step);
//! * an evaluator = a fork of the node plus the evaluator's question, then `score` of its fixed
//!   answers: only the question's tokens are computed, the path is shared;
//! * `Release` = release the node's sequence (its full blocks stay in the prefix cache).
//!
//! Without `sharing` (the benchmark's baseline) every request is a fresh sequence of the full
//! token list, which recomputes its whole prefix, as a ToT driver on a server without prefix
//! reuse would.
//!
//! Sampling seeds come from the question id and the node's sibling path, so a node samples
//! the same thoughts however the engine interleaves the work.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::prompts::{Evaluator, Rendered};
use super::search::{Action, Job, JobKind, Outcome, Search, SearchConfig, StepKind, Thought};
use super::tree::{NodeId, StepValue, Tree};
use crate::backend::Backend;
use crate::engine::{Engine, Event, FinishReason, Generation, Prompt, Request, SamplingParams, SeqId, StopConditions};
use crate::error::{Error, Result};
use crate::eval::datasets::Question;
use crate::hash::fnv1a;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, PartialEq)]
pub struct RunnerConfig {
    pub search: SearchConfig,
    /// Sampling of thoughts; `seed` is the base of every node's seed.
    pub sampling: SamplingParams,
    /// Most tokens per reasoning step (`StepKind::Line`).
    pub step_tokens: usize,
    /// Most tokens per chain (`StepKind::Chain`).
    pub chain_tokens: usize,
    /// Share KV blocks between a node, its children and its evaluators (fork); off = every
    /// request recomputes its prefix.
    pub sharing: bool,
}

impl RunnerConfig {
    pub fn new(search: SearchConfig) -> Self {
        Self {
            search,
            sampling: SamplingParams {
                temperature: 0.7,
                ..Default::default()
            },
            step_tokens: 64,
            chain_tokens: 256,
            sharing: true,
        }
    }
}

/// Token counts of one question (or of a whole run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Sampled tokens (thoughts).
    pub generated: usize,
    /// Prompt tokens that had to be computed (question, step prefixes, evaluator questions,
    /// answer candidates).
    pub prefilled: usize,
    /// Prompt tokens shared with a sequence already computed instead (the node's path under
    /// its children and evaluators). A run without sharing has none.
    pub reused: usize,
}

impl std::ops::AddAssign for TokenCounts {
    fn add_assign(&mut self, o: Self) {
        self.generated += o.generated;
        self.prefilled += o.prefilled;
        self.reused += o.reused;
    }
}

/// One question's finished search.
#[derive(Clone, Debug)]
pub struct Solved {
    /// Position in the question list.
    pub index: usize,
    pub tree: Tree,
    pub tokens: TokenCounts,
    /// From its first job to its decision (questions overlap, so these add up to more than
    /// the wall time).
    pub seconds: f64,
}

/// What a whole run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunStats {
    pub questions: usize,
    pub thoughts: usize,
    pub tokens: TokenCounts,
    pub wall_seconds: f64,
    pub engine_steps: usize,
    /// Rows the model computed.
    pub computed_tokens: usize,
    /// Tokens taken from the radix prefix cache.
    pub cached_tokens: usize,
    pub peak_kv_blocks: usize,
    pub kv_blocks: usize,
}

impl RunStats {
    pub fn thoughts_per_second(&self) -> f64 {
        self.thoughts as f64 / self.wall_seconds.max(1e-9)
    }

    pub fn generated_per_second(&self) -> f64 {
        self.tokens.generated as f64 / self.wall_seconds.max(1e-9)
    }

    /// Share of prompt tokens the prefix cache supplied.
    pub fn cache_hit_rate(&self) -> f64 {
        self.cached_tokens as f64 / (self.cached_tokens + self.computed_tokens).max(1) as f64
    }
}

/// The KV blocks of one expansion, recorded for checks (see [`Runner::record_forks`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkRecord {
    /// The expanded node's blocks (`None` for a node holding no sequence, like the root).
    pub parent: Option<Vec<u32>>,
    /// Each new child's blocks.
    pub children: Vec<Vec<u32>>,
}

/// One question in flight.
struct Active {
    index: usize,
    search: Search,
    started: Instant,
    /// Sequences held per node (with sharing).
    seqs: HashMap<NodeId, SeqId>,
    /// Every node's full token list.
    tokens: HashMap<NodeId, Vec<u32>>,
    counts: TokenCounts,
    seed: u64,
    letters: Vec<char>,
}

/// What an engine sequence is working on.
#[derive(Clone, Copy)]
struct InFlight {
    slot: usize,
    job: Job,
    /// Sample index within a `Propose`.
    part: usize,
}

/// A `Propose` collecting its `k` samples.
struct Proposal {
    prefix: String,
    samples: Vec<Option<(SeqId, Generation)>>,
}

/// Drives searches on an engine it is handed at each call (so the engine can serve other
/// work between calls, as the server's does).
pub struct Runner<'a> {
    tokenizer: &'a Tokenizer,
    prompts: &'a Rendered,
    config: RunnerConfig,
    active: Vec<Option<Active>>,
    inflight: HashMap<SeqId, InFlight>,
    proposals: HashMap<(usize, NodeId), Proposal>,
    forks: Option<Vec<ForkRecord>>,
}

impl<'a> Runner<'a> {
    pub fn new(tokenizer: &'a Tokenizer, prompts: &'a Rendered, config: RunnerConfig) -> Result<Self> {
        config.search.validate()?;
        config.sampling.validate()?;
        if config.step_tokens == 0 || config.chain_tokens == 0 {
            return Err(Error::InvalidArgument(
                "step and chain token limits must be positive".into(),
            ));
        }
        Ok(Self {
            tokenizer,
            prompts,
            config,
            active: Vec::new(),
            inflight: HashMap::new(),
            proposals: HashMap::new(),
            forks: None,
        })
    }

    /// Records the KV blocks of every expansion from now on (tests check that children share
    /// their parent's blocks).
    pub fn record_forks(&mut self) {
        self.forks.get_or_insert_with(Vec::new);
    }

    pub fn forks(&self) -> &[ForkRecord] {
        self.forks.as_deref().unwrap_or_default()
    }

    /// Solves `questions`, `concurrency` at a time, stepping `engine` until all are decided.
    /// `on_solved` gets each finished question (in finishing order); `observe` sees a
    /// question's tree after every change.
    pub fn solve_all<B: Backend>(
        &mut self,
        engine: &mut Engine<'_, B>,
        questions: &[Question],
        concurrency: usize,
        mut on_solved: impl FnMut(Solved) -> Result<()>,
        mut observe: impl FnMut(usize, &Tree),
    ) -> Result<RunStats> {
        let started = Instant::now();
        let before = engine.stats();
        let mut stats = RunStats {
            kv_blocks: before.pool.total,
            ..Default::default()
        };
        let mut next = 0;
        loop {
            // Keep `concurrency` questions in flight.
            while self.in_flight() < concurrency.max(1) && next < questions.len() {
                self.start(next, &questions[next])?;
                next += 1;
            }
            self.dispatch(engine)?;
            // Finished searches leave; their slots take new questions.
            let finished = self.take_finished(engine)?;
            if !finished.is_empty() {
                for solved in finished {
                    stats.questions += 1;
                    stats.thoughts += solved.tree.thought_count();
                    stats.tokens += solved.tokens;
                    on_solved(solved)?;
                }
                continue;
            }
            if self.in_flight() == 0 {
                break;
            }
            for event in engine.step_with_progress()? {
                self.handle(engine, event, &mut observe)?;
            }
            stats.peak_kv_blocks = stats.peak_kv_blocks.max(engine.stats().pool.used);
        }
        let after = engine.stats();
        stats.wall_seconds = started.elapsed().as_secs_f64();
        stats.engine_steps = after.steps - before.steps;
        stats.computed_tokens = after.computed_tokens - before.computed_tokens;
        stats.cached_tokens = after.cached_tokens - before.cached_tokens;
        Ok(stats)
    }

    /// Questions being solved.
    pub fn in_flight(&self) -> usize {
        self.active.iter().flatten().count()
    }

    /// Whether `seq` is one of this runner's sequences with a task running (its events belong
    /// to [`Runner::handle`]).
    pub fn owns(&self, seq: SeqId) -> bool {
        self.inflight.contains_key(&seq)
    }

    /// Carries out every search's pending actions (call before stepping the engine).
    pub fn dispatch<B: Backend>(&mut self, engine: &mut Engine<'_, B>) -> Result<()> {
        for slot in 0..self.active.len() {
            self.dispatch_slot(engine, slot)?;
        }
        Ok(())
    }

    /// The decided questions, their sequences released.
    pub fn take_finished<B: Backend>(&mut self, engine: &mut Engine<'_, B>) -> Result<Vec<Solved>> {
        let mut done = Vec::new();
        for slot in 0..self.active.len() {
            if self.active[slot].as_ref().is_some_and(|a| a.search.is_done()) {
                let a = self.active[slot].take().expect("checked");
                for (_, seq) in a.seqs {
                    engine.release(seq)?;
                }
                done.push(Solved {
                    index: a.index,
                    tree: a.search.into_tree(),
                    tokens: a.counts,
                    seconds: a.started.elapsed().as_secs_f64(),
                });
            }
        }
        Ok(done)
    }

    /// Stops every search and frees all their sequences (say, the client went away).
    pub fn abort<B: Backend>(&mut self, engine: &mut Engine<'_, B>) {
        for (seq, _) in self.inflight.drain() {
            let _ = engine.cancel(seq);
        }
        for (_, p) in self.proposals.drain() {
            for (seq, _) in p.samples.into_iter().flatten() {
                let _ = engine.release(seq);
            }
        }
        for a in self.active.drain(..).flatten() {
            for (_, seq) in a.seqs {
                let _ = engine.release(seq);
            }
        }
    }

    /// Starts solving `q`; `index` names it in [`Solved`].
    pub fn start(&mut self, index: usize, q: &Question) -> Result<()> {
        let tree = Tree::new(&q.id, &q.stem, q.options.clone(), q.answer);
        let search = Search::new(self.config.search, tree)?;
        let root_text = self.prompts.root(q, self.config.search.step);
        let root = self.tokenizer.encode(&root_text, self.prompts.add_special())?;
        let active = Active {
            index,
            search,
            started: Instant::now(),
            seqs: HashMap::new(),
            tokens: HashMap::from([(Tree::ROOT, root)]),
            counts: TokenCounts::default(),
            seed: self.config.sampling.seed ^ fnv1a(q.id.as_bytes()),
            letters: q.options.iter().map(|o| o.0).collect(),
        };
        match self.active.iter().position(Option::is_none) {
            Some(slot) => self.active[slot] = Some(active),
            None => self.active.push(Some(active)),
        }
        Ok(())
    }

    /// Carries out a search's pending actions.
    fn dispatch_slot<B: Backend>(&mut self, engine: &mut Engine<'_, B>, slot: usize) -> Result<()> {
        let Some(a) = self.active[slot].as_mut() else {
            return Ok(());
        };
        let actions = a.search.poll();
        for action in actions {
            match action {
                Action::Release(node) => {
                    let a = self.active[slot].as_mut().expect("active");
                    if let Some(seq) = a.seqs.remove(&node) {
                        engine.release(seq)?;
                    }
                }
                Action::Run(job) => match job.kind {
                    JobKind::Propose { k } => self.propose(engine, slot, job, k)?,
                    JobKind::Value => self.evaluate(engine, slot, job, Evaluator::Value)?,
                    JobKind::Sufficiency => self.evaluate(engine, slot, job, Evaluator::Sufficiency)?,
                    JobKind::Answer => self.evaluate(engine, slot, job, Evaluator::Answer)?,
                    JobKind::Judge => self.evaluate(engine, slot, job, Evaluator::Judge)?,
                },
            }
        }
        Ok(())
    }

    /// A request continuing `node` by `extra` tokens: a fork of its sequence with sharing,
    /// else (or when the node holds none) a fresh sequence of all its tokens.
    fn continuation(&self, a: &Active, node: NodeId, extra: Vec<u32>) -> (Prompt, TokenCounts) {
        let context = a.tokens[&node].len();
        match a.seqs.get(&node) {
            Some(&from) if self.config.sharing => (
                Prompt::Continue {
                    from,
                    tokens: extra.clone(),
                },
                TokenCounts {
                    prefilled: extra.len(),
                    reused: context,
                    generated: 0,
                },
            ),
            _ => {
                let mut all = a.tokens[&node].clone();
                all.extend_from_slice(&extra);
                let n = all.len();
                (
                    Prompt::Tokens(all),
                    TokenCounts {
                        prefilled: n,
                        ..Default::default()
                    },
                )
            }
        }
    }

    fn propose<B: Backend>(&mut self, engine: &mut Engine<'_, B>, slot: usize, job: Job, k: usize) -> Result<()> {
        let a = self.active[slot].as_ref().expect("active");
        let tree = a.search.tree();
        let (prefix, stop) = match self.config.search.step {
            StepKind::Line => (
                self.prompts.step_prefix(tree.node(job.node).depth + 1),
                StopConditions {
                    max_new_tokens: self.config.step_tokens,
                    stop_tokens: self.tokenizer.eos_ids().to_vec(),
                    stop_strings: vec!["\n".into()],
                },
            ),
            StepKind::Chain => (
                String::new(),
                StopConditions {
                    max_new_tokens: self.config.chain_tokens,
                    stop_tokens: self.tokenizer.eos_ids().to_vec(),
                    stop_strings: Vec::new(),
                },
            ),
        };
        let prefix_ids = self.tokenizer.encode(&prefix, false)?;
        let sampling = SamplingParams {
            seed: a.seed ^ fnv1a(&key_bytes(&tree.path_key(job.node))),
            ..self.config.sampling.clone()
        };
        let (prompt, mut counts) = self.continuation(a, job.node, prefix_ids);
        let ids = if self.config.sharing {
            // One request: the prompt is computed once, the k samples fork from it.
            engine.submit(Request {
                prompt,
                n: k,
                sampling,
                stop,
            })?
        } else {
            // k independent requests, each recomputing the prompt.
            let mut ids = Vec::with_capacity(k);
            for i in 0..k {
                ids.extend(engine.submit(Request {
                    prompt: prompt.clone(),
                    n: 1,
                    sampling: SamplingParams {
                        seed: sampling.seed.wrapping_add(i as u64),
                        ..sampling.clone()
                    },
                    stop: stop.clone(),
                })?);
            }
            counts.prefilled *= k;
            ids
        };
        for (part, &seq) in ids.iter().enumerate() {
            self.inflight.insert(seq, InFlight { slot, job, part });
        }
        self.proposals.insert(
            (slot, job.node),
            Proposal {
                prefix,
                samples: vec![None; k],
            },
        );
        let a = self.active[slot].as_mut().expect("active");
        if self.config.sharing {
            // The k samples share one computed prompt: k - 1 further copies of it are reused.
            let per_sample = counts.prefilled + counts.reused;
            counts.reused += (k - 1) * per_sample;
        }
        a.counts += counts;
        Ok(())
    }

    fn evaluate<B: Backend>(&mut self, engine: &mut Engine<'_, B>, slot: usize, job: Job, e: Evaluator) -> Result<()> {
        let a = self.active[slot].as_ref().expect("active");
        let letters = a.letters.clone();
        let suffix = self.tokenizer.encode(&self.prompts.evaluator_suffix(e), false)?;
        let candidates = self
            .prompts
            .candidates(e, &letters)
            .iter()
            .map(|c| self.tokenizer.encode(c, false))
            .collect::<Result<Vec<_>>>()?;
        if candidates.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "an answer candidate of the {e:?} evaluator is empty after tokenization"
            )));
        }
        let (prompt, mut counts) = self.continuation(a, job.node, suffix);
        counts.prefilled += candidates.iter().map(Vec::len).sum::<usize>();
        let seq = match prompt {
            Prompt::Continue { from, tokens } => {
                let s = engine.fork(from, 1)?[0];
                engine.append(s, &tokens)?;
                s
            }
            Prompt::Tokens(t) => engine.add(t)?,
        };
        engine.score(seq, candidates)?;
        self.inflight.insert(seq, InFlight { slot, job, part: 0 });
        self.active[slot].as_mut().expect("active").counts += counts;
        Ok(())
    }

    /// Takes an engine event of one of its sequences (others are ignored).
    pub fn handle<B: Backend>(
        &mut self,
        engine: &mut Engine<'_, B>,
        event: Event,
        observe: &mut impl FnMut(usize, &Tree),
    ) -> Result<()> {
        match event {
            Event::Finished { seq, generation } => {
                let Some(f) = self.inflight.remove(&seq) else {
                    return Ok(());
                };
                let p = self
                    .proposals
                    .get_mut(&(f.slot, f.job.node))
                    .expect("a proposal per propose job");
                p.samples[f.part] = Some((seq, generation));
                if p.samples.iter().all(Option::is_some) {
                    let p = self.proposals.remove(&(f.slot, f.job.node)).expect("present");
                    self.proposed(engine, f.slot, f.job, p, observe)?;
                }
            }
            Event::Scored { seq, scores } => {
                let Some(f) = self.inflight.remove(&seq) else {
                    return Ok(());
                };
                engine.release(seq)?;
                let p = softmax(&scores.iter().map(|s| s.total()).collect::<Vec<_>>());
                let outcome = match f.job.kind {
                    JobKind::Value => {
                        let w = self.prompts.prompts.value.weights;
                        Outcome::Value(StepValue {
                            sure: p[0],
                            likely: p[1],
                            impossible: p[2],
                            value: w[0] * p[0] + w[1] * p[1] + w[2] * p[2],
                        })
                    }
                    JobKind::Sufficiency => Outcome::Sufficiency(p[0]),
                    JobKind::Judge => Outcome::Judge(p[0]),
                    JobKind::Answer => Outcome::Answer(p),
                    JobKind::Propose { .. } => unreachable!("proposals finish with Event::Finished"),
                };
                let a = self.active[f.slot].as_mut().expect("active");
                a.search.complete(f.job, outcome)?;
                observe(a.index, a.search.tree());
            }
            Event::Failed { error, .. } => return Err(error),
            Event::Ready { .. } | Event::Token { .. } => {}
        }
        Ok(())
    }

    /// All `k` samples of a `Propose` are in: settle their sequences into child nodes.
    fn proposed<B: Backend>(
        &mut self,
        engine: &mut Engine<'_, B>,
        slot: usize,
        job: Job,
        p: Proposal,
        observe: &mut impl FnMut(usize, &Tree),
    ) -> Result<()> {
        let mut thoughts = Vec::new();
        let mut children = Vec::new(); // (seq, tokens)
        let mut generated = 0;
        for (seq, g) in p.samples.into_iter().map(|s| s.expect("all samples in")) {
            let tokens = self.settle(engine, seq, &g)?;
            generated += g.tokens.len();
            thoughts.push(Thought {
                text: format!("{}{}", p.prefix, g.text),
                tokens: g.tokens.len(),
                logprob: g.logprob(),
            });
            children.push((seq, tokens));
        }
        if let Some(forks) = self.forks.as_mut() {
            let parent = self.active[slot].as_ref().expect("active").seqs.get(&job.node);
            forks.push(ForkRecord {
                parent: parent.map(|&s| engine.block_ids(s)).transpose()?,
                children: children
                    .iter()
                    .map(|(s, _)| engine.block_ids(*s))
                    .collect::<Result<_>>()?,
            });
        }
        let a = self.active[slot].as_mut().expect("active");
        a.counts.generated += generated;
        let created = a.search.complete(job, Outcome::Proposed(thoughts))?;
        for (node, (seq, tokens)) in created.into_iter().zip(children) {
            a.tokens.insert(node, tokens);
            if self.config.sharing {
                a.seqs.insert(node, seq);
            } else {
                engine.release(seq)?;
            }
        }
        observe(a.index, a.search.tree());
        Ok(())
    }

    /// Makes a finished sample's sequence a clean node: a sampled stop token is cut off, the
    /// stop string's line is ended, and the step ends with a newline. Returns its tokens.
    fn settle<B: Backend>(&mut self, engine: &mut Engine<'_, B>, seq: SeqId, g: &Generation) -> Result<Vec<u32>> {
        let len = engine.tokens(seq)?.len();
        let ending = match &g.finish {
            FinishReason::StopString(_) => {
                // The last token completed the "\n"; keep the text before it, end the line.
                let kept = self.tokenizer.decode(&g.tokens[..g.tokens.len() - 1])?;
                let rest = g.text.strip_prefix(kept.as_str()).unwrap_or("");
                engine.truncate(seq, len - 1)?;
                format!("{rest}\n")
            }
            FinishReason::StopToken(_) => {
                engine.truncate(seq, len - 1)?;
                "\n".to_string()
            }
            FinishReason::Length | FinishReason::Cancelled => "\n".to_string(),
        };
        let ids = self.tokenizer.encode(&ending, false)?;
        engine.append(seq, &ids)?;
        Ok(engine.tokens(seq)?.to_vec())
    }
}

/// Probabilities from log-probabilities, renormalized over the candidates.
pub fn softmax(logp: &[f32]) -> Vec<f32> {
    let m = logp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logp.iter().map(|&x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|&x| x / s).collect()
}

fn key_bytes(key: &[usize]) -> Vec<u8> {
    key.iter().flat_map(|&i| (i as u64).to_le_bytes()).collect()
}
