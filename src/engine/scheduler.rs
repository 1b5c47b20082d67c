//! Continuous batching: which rows run in the next step, and what gives way when the KV pool
//! runs short.
//!
//! Every step takes sequences that have pending tokens, decoding ones (one pending token)
//! before prefilling ones, each group oldest task first, until the step holds
//! `max_batch_tokens` rows or `max_seqs` sequences. A prefill longer than the remaining
//! budget is chunked. Each chosen sequence reserves K/V slots for its rows; when the pool
//! cannot supply the blocks, the scheduler, in this order:
//! 1. evicts least-recently-used prefix-cache blocks nobody else holds;
//! 2. preempts a resident sequence that has nothing to compute (idle, or waiting on scored
//!    candidates), least recent first;
//! 3. preempts the newest sequence whose task started after this one's (even one already
//!    chosen for this step, which then drops out of it).
//!
//! A preempted sequence offers its full blocks to the prefix cache, drops its table and
//! recomputes its tokens when it runs again (mostly from the cache, if nothing evicted them).
//! If a step would otherwise be empty, the oldest waiting sequence may also preempt older
//! ones; if it still cannot fit, its task fails with a typed error. Requests are checked
//! against the pool size when submitted, so that only happens to a request that could never
//! fit.

use super::sequence::{SeqId, Task};
use super::{Engine, Event};
use crate::backend::Backend;
use crate::error::Error;
use crate::kv::{Appended, BlockTable};

/// Limits of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Rows (tokens) per forward: decodes count one each, prefill chunks their length.
    pub max_batch_tokens: usize,
    /// Sequences per forward.
    pub max_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_seqs: 64,
        }
    }
}

/// One sequence's share of a step: rows for positions `start .. start + rows`.
pub(crate) struct Planned {
    pub seq: SeqId,
    pub start: usize,
    pub rows: usize,
    pub appended: Appended,
}

impl<B: Backend> Engine<'_, B> {
    /// Plans the next step (see the module doc). Tasks that can never fit are failed into
    /// `events`.
    pub(crate) fn schedule(&mut self, events: &mut Vec<Event>) -> Vec<Planned> {
        let mut candidates: Vec<(bool, u64, SeqId)> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.wants_rows())
            .map(|(&id, s)| (s.pending() > 1, s.order, id))
            .collect();
        candidates.sort_unstable();
        let mut plan = Vec::new();
        let mut budget = self.config.scheduler.max_batch_tokens;
        for &(_, _, id) in &candidates {
            if budget == 0 || plan.len() == self.config.scheduler.max_seqs {
                break;
            }
            // An earlier sequence's reservation may have preempted this one; it still runs.
            self.try_plan(id, &mut plan, &mut budget, false);
        }
        if plan.is_empty() {
            if let Some(&(_, _, oldest)) = candidates.iter().min_by_key(|c| c.1) {
                if !self.try_plan(oldest, &mut plan, &mut budget, true) {
                    let s = &self.seqs[&oldest];
                    let error = Error::KvCapacity {
                        tokens: s.tokens.len(),
                        needed_blocks: s.tokens.len().div_ceil(self.pool.block_size()),
                        total_blocks: self.pool.n_blocks(),
                    };
                    self.fail(oldest, error, events);
                }
            }
        }
        plan
    }

    /// Admits `id` (taking a cached prefix if it holds no blocks) and reserves slots for as
    /// many pending rows as `budget` allows. Returns whether it joined the plan.
    fn try_plan(&mut self, id: SeqId, plan: &mut Vec<Planned>, budget: &mut usize, allow_older: bool) -> bool {
        self.admit(id);
        let seq = &self.seqs[&id];
        let (start, rows) = (seq.computed, seq.pending().min(*budget));
        if rows == 0 {
            return false; // the whole prompt came from the cache
        }
        match self.reserve(id, rows, plan, budget, allow_older) {
            Some(appended) => {
                plan.push(Planned {
                    seq: id,
                    start,
                    rows,
                    appended,
                });
                *budget -= rows;
                true
            }
            None => false,
        }
    }

    /// A sequence without blocks takes the longest cached prefix of its tokens, leaving at
    /// least the rows whose logits it needs to compute.
    fn admit(&mut self, id: SeqId) {
        let Some(radix) = self.radix.as_mut() else {
            return;
        };
        let seq = self.seqs.get_mut(&id).expect("scheduled sequences exist");
        if seq.is_resident() || seq.computed != 0 {
            return;
        }
        let bs = radix.block_size();
        // The last token must run to produce logits; a candidate's rows from its base on.
        let must_compute_from = match &seq.task {
            Task::Candidate(c) => c.base,
            _ => seq.tokens.len() - 1,
        };
        let blocks = radix.match_prefix(&seq.tokens, must_compute_from / bs);
        let n = blocks.len();
        seq.table = BlockTable::from_full_blocks(blocks, bs);
        seq.computed = n * bs;
        seq.cached_blocks = n;
        self.stats.cached_tokens += n * bs;
    }

    /// Appends `rows` positions to `id`'s table, freeing blocks as the module doc says.
    fn reserve(
        &mut self,
        id: SeqId,
        rows: usize,
        plan: &mut Vec<Planned>,
        budget: &mut usize,
        allow_older: bool,
    ) -> Option<Appended> {
        loop {
            let seq = self.seqs.get_mut(&id).expect("scheduled sequences exist");
            let (needed, free) = match seq.table.append(&self.pool, rows) {
                Ok(appended) => return Some(appended),
                Err(Error::OutOfBlocks { needed, free, .. }) => (needed, free),
                Err(_) => return None,
            };
            if let Some(radix) = self.radix.as_mut() {
                if radix.evict(needed - free) > 0 {
                    continue;
                }
            }
            let victim = self.pick_victim(id, allow_older)?;
            if let Some(i) = plan.iter().position(|p| p.seq == victim) {
                *budget += plan.remove(i).rows;
            }
            self.preempt(victim);
        }
    }

    /// The sequence to preempt so that `id` can grow, if any (module doc, steps 2 and 3).
    fn pick_victim(&self, id: SeqId, allow_older: bool) -> Option<SeqId> {
        let order = self.seqs[&id].order;
        let resident = || self.seqs.iter().filter(move |(&s, q)| s != id && q.is_resident());
        let idle = resident()
            .filter(|(_, q)| !q.wants_rows())
            .min_by_key(|(_, q)| q.order)
            .map(|(&s, _)| s);
        idle.or_else(|| {
            resident()
                .filter(|(_, q)| q.wants_rows() && (allow_older || q.order > order))
                .max_by_key(|(_, q)| q.order)
                .map(|(&s, _)| s)
        })
    }

    /// Frees `id`'s blocks (offering the full ones to the prefix cache first); it recomputes
    /// later.
    pub(crate) fn preempt(&mut self, id: SeqId) {
        self.offer_to_cache(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.evict_kv();
            self.stats.preemptions += 1;
        }
    }
}
