//! `/v1/tot` on the engine thread: each request is a [`Runner`] solving one question, its
//! jobs batched into the same engine steps as every other request. Decided nodes can be
//! streamed as they come; a client that goes away has its search aborted and its sequences
//! freed.

use std::collections::HashSet;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::Backend;
use crate::engine::{Engine, Event, SeqId};
use crate::error::Error;
use crate::eval::datasets::Question;
use crate::tot::{Node, Rendered, Runner, RunnerConfig, Solved};

pub struct TotJob {
    pub question: Question,
    pub config: RunnerConfig,
    /// Send each node once its fate is known.
    pub stream: bool,
    pub reply: UnboundedSender<TotUpdate>,
}

#[derive(Debug)]
pub enum TotUpdate {
    Node(Box<Node>),
    Done(Box<Solved>),
    Failed(Error),
}

struct TotRun<'r> {
    runner: Runner<'r>,
    reply: UnboundedSender<TotUpdate>,
    stream: bool,
    sent: HashSet<usize>,
    /// The client is gone or the search failed: abort at the next chance.
    dead: bool,
}

/// The ToT requests in flight.
#[derive(Default)]
pub struct TotRuns<'r> {
    runs: Vec<TotRun<'r>>,
}

impl<'r> TotRuns<'r> {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn start(&mut self, job: TotJob, tokenizer: &'r crate::tokenizer::Tokenizer, prompts: &'r Rendered) {
        let started = Runner::new(tokenizer, prompts, job.config).and_then(|mut runner| {
            runner.start(0, &job.question)?;
            Ok(runner)
        });
        match started {
            Ok(runner) => self.runs.push(TotRun {
                runner,
                reply: job.reply,
                stream: job.stream,
                sent: HashSet::new(),
                dead: false,
            }),
            Err(e) => {
                let _ = job.reply.send(TotUpdate::Failed(e));
            }
        }
    }

    /// Hands the searches' new jobs to the engine and answers the decided questions; drops
    /// dead runs (freeing their sequences).
    pub fn advance<B: Backend>(&mut self, engine: &mut Engine<'_, B>) {
        for run in &mut self.runs {
            if run.dead {
                continue;
            }
            let result = run
                .runner
                .dispatch(engine)
                .and_then(|()| run.runner.take_finished(engine));
            match result {
                Ok(mut done) => {
                    if let Some(solved) = done.pop() {
                        let _ = run.reply.send(TotUpdate::Done(Box::new(solved)));
                        run.dead = true; // finished: nothing left to free
                    }
                }
                Err(e) => {
                    let _ = run.reply.send(TotUpdate::Failed(e));
                    run.dead = true;
                }
            }
        }
        self.reap(engine);
    }

    /// Fails every run (a failed step; or the engine idle while searches wait, which would
    /// otherwise hang them).
    pub fn fail_all<B: Backend>(&mut self, engine: &mut Engine<'_, B>, why: &str) {
        for run in &mut self.runs {
            let _ = run.reply.send(TotUpdate::Failed(Error::InvalidArgument(why.into())));
            run.dead = true;
        }
        self.reap(engine);
    }

    /// Whether one of the runs waits for `seq`'s events.
    pub fn owns(&self, seq: SeqId) -> bool {
        self.runs.iter().any(|r| r.runner.owns(seq))
    }

    /// Gives `event` to the run waiting for it.
    pub fn handle<B: Backend>(&mut self, engine: &mut Engine<'_, B>, seq: SeqId, event: Event) {
        let Some(run) = self.runs.iter_mut().find(|r| r.runner.owns(seq)) else {
            return;
        };
        let TotRun {
            runner,
            reply,
            stream,
            sent,
            dead,
        } = run;
        let mut gone = false;
        let result = runner.handle(engine, event, &mut |_, tree| {
            if !*stream {
                return;
            }
            for n in &tree.nodes[1..] {
                if n.status.is_decided()
                    && sent.insert(n.id)
                    && reply.send(TotUpdate::Node(Box::new(n.clone()))).is_err()
                {
                    gone = true;
                }
            }
        });
        if let Err(e) = result {
            let _ = reply.send(TotUpdate::Failed(e));
            *dead = true;
        }
        if gone || reply.is_closed() {
            *dead = true;
        }
    }

    fn reap<B: Backend>(&mut self, engine: &mut Engine<'_, B>) {
        for run in self.runs.iter_mut().filter(|r| r.dead) {
            run.runner.abort(engine);
        }
        self.runs.retain(|r| !r.dead);
    }
}
