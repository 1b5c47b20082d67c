//! `qmtot bench tot`: the QM-ToT search over a question set, twice:
//!
//! * `shared`: every node a sequence (expand = fork, evaluators fork the node), prefix cache
//!   and cascade attention on, `concurrency` questions in flight;
//! * `unshared`: every generator and evaluator request a fresh sequence of its full prompt
//!   (no forks, no prefix cache, no cascade), one question at a time: a ToT driver talking to
//!   a server one request at a time, without prefix reuse.
//!
//! Both use the same seeds, so with identical logits they make identical trees; the answers
//! are compared.

use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig};
use crate::error::Result;
use crate::eval::datasets::Question;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::tot::{Rendered, RunStats, Runner, RunnerConfig};

/// One setup's run.
#[derive(Clone, Debug)]
pub struct TotBenchRun {
    pub stats: RunStats,
    /// The decided answer per question, in question order.
    pub answers: Vec<Option<char>>,
}

/// What both setups share.
#[derive(Clone, Copy, Debug)]
pub struct TotBench<'a> {
    pub prompts: &'a Rendered,
    pub config: &'a RunnerConfig,
    pub engine: EngineConfig,
    /// Questions in flight in the shared setup (the unshared one takes one at a time).
    pub concurrency: usize,
}

/// Runs the search over `questions` with or without sharing.
pub fn run<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    bench: TotBench<'_>,
    questions: &[Question],
    sharing: bool,
) -> Result<TotBenchRun> {
    let engine_config = if sharing { bench.engine } else { bench.engine.unshared() };
    let mut engine = Engine::new(model, Some(tokenizer), engine_config)?;
    let config = RunnerConfig {
        sharing,
        ..bench.config.clone()
    };
    let mut answers = vec![None; questions.len()];
    let mut runner = Runner::new(tokenizer, bench.prompts, config)?;
    let stats = runner.solve_all(
        &mut engine,
        questions,
        if sharing { bench.concurrency } else { 1 },
        |solved| {
            answers[solved.index] = solved.tree.decision.and_then(|d| d.answer);
            Ok(())
        },
        |_, _| {},
    )?;
    Ok(TotBenchRun { stats, answers })
}
