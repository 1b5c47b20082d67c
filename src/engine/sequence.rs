//! One sequence's state inside the engine: its tokens, how many of them have K/V in the
//! cache, its block table, and the task it is running.
//!
//! Invariants between steps:
//! * `table` covers exactly positions `0..computed` (a preempted sequence has an empty table
//!   and `computed == 0`: it recomputes when it runs again).
//! * `computed ≤ tokens.len()`; the tokens `computed..` are *pending* and go through the model
//!   in later steps (a prompt chunk, or the one token a decoding sequence sampled last).
//! * `next_logits` is `Some` only when `computed == tokens.len()`: the distribution of the next
//!   token, shared (by `Arc`) between siblings forked after it was computed, and with the
//!   other rows of its step until the step's draws are done ([`LogitsRow`]).

use std::sync::Arc;
use std::time::Instant;

use super::sampler::Sampler;
use super::stop::{StopConditions, StopMatcher};
use super::CandidateScore;
use crate::kv::BlockTable;
use crate::tokenizer::TextStream;

/// One row of a step's logits `[vocab]`, shared without copying: the step's `[rows, vocab]`
/// buffer and where the row starts. Dereferences to the row's `[f32]`.
///
/// Rows of one step share its buffer, so a row kept past the step would keep the whole step
/// alive; [`detach_kept_rows`] gives such rows buffers of their own.
#[derive(Clone)]
pub(crate) struct LogitsRow {
    step: Arc<Vec<f32>>,
    start: usize,
    vocab: usize,
}

impl LogitsRow {
    /// Row `row` of a step's `[rows, vocab]` logits.
    pub fn new(step: &Arc<Vec<f32>>, row: usize, vocab: usize) -> Self {
        debug_assert!((row + 1) * vocab <= step.len());
        Self {
            step: step.clone(),
            start: row * vocab,
            vocab,
        }
    }

    /// Whether the row is the whole of its buffer (nothing else is kept alive through it).
    fn is_alone(&self) -> bool {
        self.step.len() == self.vocab
    }
}

impl std::ops::Deref for LogitsRow {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.step[self.start..self.start + self.vocab]
    }
}

/// Gives every row in `rows` that still lies in a shared step buffer a buffer of its own, one
/// copy per distinct row (sequences that shared a row keep sharing its copy). The engine runs
/// this on the rows that outlive a step (a prefilled sequence waiting for its caller, a scored
/// prompt), so a step's buffer is freed once its generating rows are drawn, while the rows a
/// step's draws consume are never copied.
pub(crate) fn detach_kept_rows<'a>(rows: impl Iterator<Item = &'a mut LogitsRow>) {
    let mut copies: std::collections::HashMap<(*const f32, usize), LogitsRow> = Default::default();
    for row in rows {
        if row.is_alone() {
            continue;
        }
        let key = (row.step.as_ptr(), row.start);
        let copy = copies.entry(key).or_insert_with(|| LogitsRow {
            step: Arc::new(row.to_vec()),
            start: 0,
            vocab: row.vocab,
        });
        *row = copy.clone();
    }
}

/// A sequence's handle. Ids are never reused within one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

pub(crate) struct Sequence {
    pub tokens: Vec<u32>,
    pub computed: usize,
    pub table: BlockTable,
    pub next_logits: Option<LogitsRow>,
    pub task: Task,
    /// When the current task started (engine-wide counter): lower runs first, higher is
    /// preempted first.
    pub order: u64,
    /// A fan-out child waits for its parent's prompt before it gets the parent's blocks.
    pub waiting_for: Option<SeqId>,
    /// Leading full blocks already offered to the prefix cache.
    pub cached_blocks: usize,
    /// Engine-internal (a fan-out parent or a candidate being scored): not visible to callers.
    pub hidden: bool,
}

impl Sequence {
    pub fn new(tokens: Vec<u32>, block_size: usize) -> Self {
        Self {
            tokens,
            computed: 0,
            table: BlockTable::new(block_size),
            next_logits: None,
            task: Task::Idle,
            order: 0,
            waiting_for: None,
            cached_blocks: 0,
            hidden: false,
        }
    }

    /// A sibling sharing every block (and the next-token logits, if known) of `self`.
    pub fn fork(&self) -> Self {
        Self {
            tokens: self.tokens.clone(),
            computed: self.computed,
            table: self.table.fork(),
            next_logits: self.next_logits.clone(),
            task: Task::Idle,
            order: 0,
            waiting_for: None,
            cached_blocks: self.cached_blocks,
            hidden: false,
        }
    }

    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether the sequence holds blocks.
    pub fn is_resident(&self) -> bool {
        !self.table.is_empty()
    }

    /// Whether the scheduler should give it rows now.
    pub fn wants_rows(&self) -> bool {
        self.waiting_for.is_none() && self.pending() > 0 && self.task.computes()
    }

    /// Drops the blocks; the tokens stay and are recomputed when the sequence runs again.
    pub fn evict_kv(&mut self) {
        self.table = BlockTable::new(self.table.block_size());
        self.computed = 0;
        self.next_logits = None;
        self.cached_blocks = 0;
    }
}

pub(crate) enum Task {
    /// Nothing to do; holds its blocks for a later fork, continuation or score.
    Idle,
    /// Compute the pending tokens and keep the next-token logits (then `Idle`).
    Prefill,
    Generate(Box<Generating>),
    /// Log-probabilities of candidate continuations.
    Score(Scoring),
    /// Engine-internal: a candidate's tokens after its parent, whose rows' logits are kept.
    Candidate(Candidate),
    /// Engine-internal: computes a prompt once, then hands its blocks to `children`.
    FanOut {
        children: Vec<SeqId>,
    },
}

impl Task {
    /// Whether this task runs pending tokens through the model.
    pub fn computes(&self) -> bool {
        match self {
            Task::Idle => false,
            Task::Score(s) => !s.started,
            _ => true,
        }
    }
}

pub(crate) struct Generating {
    pub sampler: Sampler,
    pub stop: StopConditions,
    pub matcher: StopMatcher,
    pub text_stream: TextStream,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub prompt_tokens: usize,
    pub started: Instant,
    pub first_token: Option<Instant>,
    /// This step's draw, made ahead with every other sequence's in parallel
    /// (`Engine::advance`); taken by the same step.
    pub drawn: Option<super::Sampled>,
}

pub(crate) struct Scoring {
    pub candidates: Vec<Vec<u32>>,
    /// Per candidate: log p of each of its tokens (and the alternatives) once known.
    pub results: Vec<Option<CandidateScore>>,
    /// Whether the first tokens were scored and the candidate children spawned.
    pub started: bool,
    /// Most likely tokens reported at each candidate position (0 = none).
    pub alternatives: usize,
}

pub(crate) struct Candidate {
    pub parent: SeqId,
    pub index: usize,
    /// Position of the candidate's first token (= the parent's length).
    pub base: usize,
    pub tokens: Vec<u32>,
    /// `logprobs[j]` = log p(tokens[j]); `[0]` comes from the parent's logits.
    pub logprobs: Vec<f32>,
    /// How many alternatives to report per position, and `top[j]` = those at `tokens[j]`.
    pub alternatives: usize,
    pub top: Vec<Vec<(u32, f32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_share_their_step_until_detached_and_then_share_one_copy() {
        let step = Arc::new((0..12).map(|v| v as f32).collect::<Vec<f32>>());
        let (a, b) = (LogitsRow::new(&step, 1, 4), LogitsRow::new(&step, 2, 4));
        assert_eq!(&*a, &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(&*b, &[8.0, 9.0, 10.0, 11.0]);
        // Two forks holding row 1, one holding row 2.
        let mut kept = [a.clone(), a, b];
        detach_kept_rows(kept.iter_mut());
        assert_eq!(Arc::strong_count(&step), 1, "nothing holds the step's buffer now");
        assert!(Arc::ptr_eq(&kept[0].step, &kept[1].step), "the forks share one copy");
        assert!(!Arc::ptr_eq(&kept[0].step, &kept[2].step));
        assert_eq!(&*kept[1], &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(&*kept[2], &[8.0, 9.0, 10.0, 11.0]);
        // A row alone in its buffer is left as it is.
        let alone = kept[2].step.clone();
        detach_kept_rows(kept.iter_mut());
        assert!(Arc::ptr_eq(&kept[2].step, &alone));
    }
}
