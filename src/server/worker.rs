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
use crate::backend::Backend;
use crate::engine::{Engine, Event, FinishReason, Prompt, Request, SamplingParams, SeqId, StopConditions};
use crate::error::Error;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// What to complete.
#[derive(Clone, Debug)]
pub enum PromptInput {
    Text(String),
    /// Rendered through the model's chat template, with the assistant turn opened.
    Chat(Vec<ChatMessage>),
}

pub struct Job {
    pub prompt: PromptInput,
    pub n: usize,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub reply: UnboundedSender<Update>,
}

/// What a request hears back, in order: `Started` (or `Failed`), then tokens and finishes.
#[derive(Debug)]
pub enum Update {
    Started {
        prompt_tokens: usize,
    },
    Token {
        choice: usize,
        text: String,
        token_text: String,
        logprob: f32,
    },
    /// `text` is the whole choice (it may end with text held back from the last tokens).
    Finished {
        choice: usize,
        reason: FinishReason,
        tokens: usize,
        text: String,
    },
    Failed(Error),
}

struct Live {
    reply: UnboundedSender<Update>,
    seqs: Vec<SeqId>,
    open: usize,
}

/// Runs until every sender of `rx` is gone.
pub fn run<B: Backend>(engine: &mut Engine<'_, B>, tokenizer: &Tokenizer, rx: Receiver<Job>, metrics: Arc<Metrics>) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut owner: HashMap<SeqId, (u64, usize)> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Wait when there is nothing to do; otherwise take what arrived and step.
        let first = if engine.is_idle() {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            None
        };
        let mut jobs: Vec<Job> = first.into_iter().collect();
        loop {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if engine.is_idle() && jobs.is_empty() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        for job in jobs {
            next_id += 1;
            match start(engine, tokenizer, &job) {
                Ok((prompt_tokens, seqs)) => {
                    metrics.prompt_tokens(prompt_tokens);
                    for (choice, &s) in seqs.iter().enumerate() {
                        owner.insert(s, (next_id, choice));
                    }
                    if job.reply.send(Update::Started { prompt_tokens }).is_err() {
                        cancel(engine, &seqs, &mut owner);
                        continue;
                    }
                    let open = seqs.len();
                    live.insert(
                        next_id,
                        Live {
                            reply: job.reply,
                            seqs,
                            open,
                        },
                    );
                }
                Err(e) => {
                    let _ = job.reply.send(Update::Failed(e));
                }
            }
        }
        // Before stepping, so that a request that has started is never reported as idle.
        metrics.engine(&engine.stats(), live.len());
        if engine.is_idle() {
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
                continue;
            }
        };
        for event in events {
            let seq = match &event {
                Event::Token { seq, .. } | Event::Finished { seq, .. } | Event::Failed { seq, .. } => *seq,
                _ => continue,
            };
            let Some(&(id, choice)) = owner.get(&seq) else { continue };
            let Some(l) = live.get_mut(&id) else { continue };
            let sent = match event {
                Event::Token {
                    token, logprob, text, ..
                } => {
                    metrics.generated(1);
                    let token_text = tokenizer.decode(&[token]).unwrap_or_default();
                    l.reply.send(Update::Token {
                        choice,
                        text,
                        token_text,
                        logprob,
                    })
                }
                Event::Finished { generation, .. } => {
                    owner.remove(&seq);
                    let _ = engine.release(seq);
                    l.open -= 1;
                    l.reply.send(Update::Finished {
                        choice,
                        reason: generation.finish,
                        tokens: generation.tokens.len(),
                        text: generation.text,
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

/// Tokenizes and submits a job; returns its prompt length and one sequence per sample.
fn start<B: Backend>(
    engine: &mut Engine<'_, B>,
    tokenizer: &Tokenizer,
    job: &Job,
) -> Result<(usize, Vec<SeqId>), Error> {
    let tokens = match &job.prompt {
        PromptInput::Text(t) => tokenizer.encode(t, true)?,
        PromptInput::Chat(messages) => tokenizer.encode(&tokenizer.apply_chat_template(messages, true)?, false)?,
    };
    let prompt_tokens = tokens.len();
    let seqs = engine.submit(Request {
        prompt: Prompt::Tokens(tokens),
        n: job.n,
        sampling: job.sampling.clone(),
        stop: StopConditions {
            max_new_tokens: job.max_tokens,
            stop_tokens: tokenizer.eos_ids().to_vec(),
            stop_strings: job.stop.clone(),
        },
    })?;
    Ok((prompt_tokens, seqs))
}

fn cancel<B: Backend>(engine: &mut Engine<'_, B>, seqs: &[SeqId], owner: &mut HashMap<SeqId, (u64, usize)>) {
    for s in seqs {
        if owner.remove(s).is_some() {
            let _ = engine.cancel(*s);
        }
    }
}
