//! One sequence over its own small KV cache, without the engine: the shortest path from
//! tokens to logits, for benchmarks of the raw forward and for tests that need a reference
//! run "alone, no sharing".

use crate::backend::{Backend, StepInput};
use crate::error::Result;
use crate::kv::{BlockPool, BlockTable, DEFAULT_BLOCK_SIZE};
use crate::model::{KvCache, Llama};

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
        let step = StepInput::one_sequence(
            tokens.to_vec(),
            start as u32,
            appended.slots,
            self.table.block_ids(),
            if all_logits { (0..n).collect() } else { vec![n - 1] },
        );
        model.forward(&mut self.cache, &step)
    }
}
