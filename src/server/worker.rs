//! The engine thread: owns the model and the [`Engine`], takes requests from the HTTP side over
//! a channel, advances every request in flight with one batched step at a time (continuous
//! batching across connections), and sends each request its tokens as they come.
//!
//! A request with `n > 1` is one `submit`: the prompt is computed once and the samples fork.
//! When a request's receiver is gone (the client disconnected), its sequences are cancelled at
//! the next token and their blocks freed.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::tot_jobs::{TotJob, TotRuns, TotUpdate};
use crate::backend::Backend;
use crate::engine::{Engine, Event, FinishReason, Prompt, Request, SamplingParams, SeqId, StopConditions};
use crate::error::Error;
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::tot::{Prompts, Rendered};

/// What to complete.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Tokenized with the model's special tokens (a BOS where the model wants one).
    Text(String),
    /// Used as given.
    Tokens(Vec<u32>),
    /// Rendered through the model's chat template, with the assistant turn opened.
    Chat(Vec<ChatMessage>),
}

/// One prompt of a request (a request with several prompts sends one job each, on the same
/// reply channel). Its choices are numbered `index × n + j` in the request.
pub struct Job {
    pub prompt: PromptInput,
    /// Which prompt of its request this is.
    pub index: usize,
    pub n: usize,
    /// `sampling.top_logprobs` alternatives are reported per token, of the prompt too when it
    /// is scored.
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Also score the prompt: [`Update::PromptLogprobs`] comes before the request ends.
    pub prompt_logprobs: bool,
    /// Send the prompt's text with `Started` (for `echo`).
    pub echo: bool,
    pub reply: UnboundedSender<Update>,
}

/// What a request hears back, in order: `Started` (or `Failed`), then tokens and finishes.
#[derive(Debug)]
pub enum Update {
    Started {
        index: usize,
        prompt_tokens: usize,
        /// The prompt as text, when the job asked for `echo`.
        text: Option<String>,
    },
    Token {
        choice: usize,
        text: String,
        token_text: String,
        logprob: f32,
        /// The most likely tokens' texts and log-probabilities here, when asked.
        top: Vec<(String, f32)>,
    },
    /// `text` is the whole choice (it may end with text held back from the last tokens).
    Finished {
        choice: usize,
        reason: FinishReason,
        tokens: usize,
        text: String,
    },
    /// Each prompt token's text and log-probability, and the most likely tokens at its
    /// position when asked (`None` for the first token, which has no context).
    PromptLogprobs {
        index: usize,
        tokens: Vec<String>,
        logprobs: Vec<Option<f32>>,
        top: Vec<Option<Vec<(String, f32)>>>,
    },
    Failed(Error),
}

/// `owner` entry of a request's prompt-scoring sequence.
const SCORING: usize = usize::MAX;

struct Live {
    reply: UnboundedSender<Update>,
    /// The job's prompt index and the request-wide number of its first choice.
    index: usize,
    first_choice: usize,
    seqs: Vec<SeqId>,
    /// Choices (and the prompt scoring) not finished yet.
    open: usize,
    /// The prompt's token texts while it is being scored.
    prompt: Vec<String>,
}

/// Work for the engine thread.
pub enum Work {
    Generate(Job),
    Tot(TotJob),
}

/// Runs until every sender of `rx` is gone.
pub fn run<B: Backend>(engine: &mut Engine<'_, B>, tokenizer: &Tokenizer, rx: Receiver<Work>, metrics: Arc<Metrics>) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut owner: HashMap<SeqId, (u64, usize)> = HashMap::new();
    let mut next_id = 0u64;
    let rendered = Rendered::new(Prompts::builtin(), tokenizer);
    let mut tots = TotRuns::default();
    loop {
        // Wait when there is nothing to do; otherwise take what arrived and step.
        let nothing = engine.is_idle() && tots.is_empty();
        let first = if nothing {
            match rx.recv() {
                Ok(work) => Some(work),
                Err(_) => return,
            }
        } else {
            None
        };
        let mut works: Vec<Work> = first.into_iter().collect();
        loop {
            match rx.try_recv() {
                Ok(work) => works.push(work),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if nothing && works.is_empty() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let mut jobs = Vec::new();
        for work in works {
            match work {
                Work::Generate(job) => jobs.push(job),
                Work::Tot(t) => match &rendered {
                    Ok(prompts) => tots.start(t, tokenizer, prompts),
                    Err(e) => {
                        let _ = t
                            .reply
                            .send(TotUpdate::Failed(Error::InvalidArgument(format!("prompts: {e}"))));
                    }
                },
            }
        }
        for job in jobs {
            next_id += 1;
            match start(engine, tokenizer, &job) {
                Ok(Started { prompt, seqs, scoring }) => {
                    metrics.prompt_tokens(prompt.len());
                    for (choice, &s) in seqs.iter().enumerate() {
                        owner.insert(s, (next_id, choice));
                    }
                    let mut all = seqs.clone();
                    if let Some(s) = scoring {
                        owner.insert(s, (next_id, SCORING));
                        all.push(s);
                    }
                    // The prompt's token texts, for its log-probabilities.
                    let texts: Vec<String> = if job.prompt_logprobs {
                        prompt.iter().map(|&t| token_text(tokenizer, t)).collect()
                    } else {
                        Vec::new()
                    };
                    let text = match (&job.prompt, job.echo) {
                        (PromptInput::Text(t), true) => Some(t.clone()),
                        (_, true) => Some(tokenizer.decode(&prompt).unwrap_or_default()),
                        (_, false) => None,
                    };
                    let mut sent = job.reply.send(Update::Started {
                        index: job.index,
                        prompt_tokens: prompt.len(),
                        text,
                    });
                    if job.prompt_logprobs && scoring.is_none() {
                        // A one-token prompt: nothing to score, its one token has no context.
                        sent = sent.and_then(|()| {
                            job.reply.send(Update::PromptLogprobs {
                                index: job.index,
                                logprobs: vec![None; texts.len()],
                                top: vec![None; texts.len()],
                                tokens: texts.clone(),
                            })
                        });
                    }
                    if sent.is_err() {
                        cancel(engine, &all, &mut owner);
                        continue;
                    }
                    // Kept until the scoring sequence reports.
                    let prompt = if scoring.is_some() { texts } else { Vec::new() };
                    let open = all.len();
                    live.insert(
                        next_id,
                        Live {
                            reply: job.reply,
                            index: job.index,
                            first_choice: job.index * job.n,
                            seqs: all,
                            open,
                            prompt,
                        },
                    );
                }
                Err(e) => {
                    let _ = job.reply.send(Update::Failed(e));
                }
            }
        }
        tots.advance(engine);
        // Before stepping, so that a request that has started is never reported as idle.
        metrics.engine(&engine.stats(), live.len());
        if engine.is_idle() {
            tots.fail_all(engine, "the tree search stalled (internal error)");
            continue;
        }
        let events = match engine.step() {
            Ok(events) => events,
            Err(e) => {
                // A failed forward fails every request in flight (the engine stays usable).
                for (_, l) in live.drain() {
                    cancel(engine, &l.seqs, &mut owner);
                    let _ = l
                        .reply
                        .send(Update::Failed(Error::InvalidArgument(format!("the step failed: {e}"))));
                }
                tots.fail_all(engine, &format!("the step failed: {e}"));
                continue;
            }
        };
        for event in events {
            let seq = match &event {
                Event::Token { seq, .. }
                | Event::Finished { seq, .. }
                | Event::Failed { seq, .. }
                | Event::Scored { seq, .. } => *seq,
                _ => continue,
            };
            if tots.owns(seq) {
                tots.handle(engine, seq, event);
                continue;
            }
            let Some(&(id, choice)) = owner.get(&seq) else { continue };
            let Some(l) = live.get_mut(&id) else { continue };
            let sent = match event {
                Event::Token {
                    token,
                    logprob,
                    text,
                    top,
                    ..
                } => {
                    metrics.generated(1);
                    l.reply.send(Update::Token {
                        choice: l.first_choice + choice,
                        text,
                        token_text: token_text(tokenizer, token),
                        logprob,
                        top: named(tokenizer, &top),
                    })
                }
                Event::Finished { generation, .. } => {
                    owner.remove(&seq);
                    let _ = engine.release(seq);
                    l.open -= 1;
                    l.reply.send(Update::Finished {
                        choice: l.first_choice + choice,
                        reason: generation.finish,
                        tokens: generation.tokens.len(),
                        text: generation.text,
                    })
                }
                Event::Scored { scores, .. } if choice == SCORING => {
                    owner.remove(&seq);
                    let _ = engine.release(seq);
                    l.open -= 1;
                    let score = &scores[0];
                    let logprobs = std::iter::once(None)
                        .chain(score.logprobs.iter().map(|&l| Some(l)))
                        .collect();
                    let top = std::iter::once(None)
                        .chain(score.top.iter().map(|t| Some(named(tokenizer, t))))
                        .collect();
                    l.reply.send(Update::PromptLogprobs {
                        index: l.index,
                        tokens: std::mem::take(&mut l.prompt),
                        logprobs,
                        top,
                    })
                }
                Event::Failed { error, .. } => l.reply.send(Update::Failed(error)),
                _ => Ok(()),
            };
            let done = l.open == 0;
            if sent.is_err() || done {
                let l = live.remove(&id).expect("present");
                if sent.is_err() {
                    // The client went away: stop its samples and free their blocks.
                    metrics.disconnected();
                    cancel(engine, &l.seqs, &mut owner);
                }
            }
        }
        metrics.engine(&engine.stats(), live.len());
    }
}

/// A job in the engine.
struct Started {
    prompt: Vec<u32>,
    /// One per sample.
    seqs: Vec<SeqId>,
    /// The sequence scoring the prompt, when asked (a one-token prompt has nothing to score).
    scoring: Option<SeqId>,
}

/// Tokenizes and submits a job.
fn start<B: Backend>(engine: &mut Engine<'_, B>, tokenizer: &Tokenizer, job: &Job) -> Result<Started, Error> {
    let tokens = match &job.prompt {
        PromptInput::Text(t) => tokenizer.encode(t, true)?,
        PromptInput::Tokens(t) => t.clone(),
        PromptInput::Chat(messages) => tokenizer.encode(&tokenizer.apply_chat_template(messages, true)?, false)?,
    };
    let seqs = engine.submit(Request {
        prompt: Prompt::Tokens(tokens.clone()),
        n: job.n,
        sampling: job.sampling.clone(),
        stop: StopConditions {
            max_new_tokens: job.max_tokens,
            stop_tokens: tokenizer.eos_ids().to_vec(),
            stop_strings: job.stop.clone(),
        },
    })?;
    // The prompt's log-probabilities: its first token, scored for the rest (the prefix cache
    // shares the blocks with the samples' prompt).
    let scoring = match tokens.split_first() {
        Some((&first, rest)) if job.prompt_logprobs && !rest.is_empty() => {
            let s = engine.add(vec![first])?;
            if let Err(e) = engine.score_with_alternatives(s, vec![rest.to_vec()], job.sampling.top_logprobs) {
                let _ = engine.release(s);
                for &q in &seqs {
                    let _ = engine.cancel(q);
                }
                return Err(e);
            }
            Some(s)
        }
        _ => None,
    };
    Ok(Started {
        prompt: tokens,
        seqs,
        scoring,
    })
}

fn cancel<B: Backend>(engine: &mut Engine<'_, B>, seqs: &[SeqId], owner: &mut HashMap<SeqId, (u64, usize)>) {
    for s in seqs {
        if owner.remove(s).is_some() {
            let _ = engine.cancel(*s);
        }
    }
}

/// One token's text (a piece of a multi-byte character decodes to U+FFFD, as OpenAI's API
/// shows it).
fn token_text(tokenizer: &Tokenizer, token: u32) -> String {
    tokenizer.decode(&[token]).unwrap_or_default()
}

/// Alternatives with their tokens' texts.
fn named(tokenizer: &Tokenizer, top: &[(u32, f32)]) -> Vec<(String, f32)> {
    top.iter().map(|&(t, l)| (token_text(tokenizer, t), l)).collect()
}
