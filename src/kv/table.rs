//! A sequence's block table: position `p` lives in block `blocks[p / block_size]` at offset
//! `p % block_size`.

use super::pool::{BlockPool, BlockRef};
use crate::error::Result;

/// What [`BlockTable::append`] reserved.
#[derive(Debug, Default)]
pub struct Appended {
    /// Slots (`block · block_size + offset`) for the new positions, in order.
    pub slots: Vec<u32>,
    /// Block copies `(src, dst)` the backend must apply before the forward that writes these
    /// slots: a shared, partly filled last block was replaced by a private copy.
    pub copies: Vec<(u32, u32)>,
    /// This table's former handles on the copy sources. Keep them until the copies are
    /// applied: otherwise a source whose other owners go away in the meantime could be freed,
    /// reallocated and overwritten (say, as the destination of another copy) first.
    pub sources: Vec<BlockRef>,
}

#[derive(Clone, Debug)]
pub struct BlockTable {
    blocks: Vec<BlockRef>,
    /// Tokens stored (positions `0..len`).
    len: usize,
    block_size: usize,
}

impl BlockTable {
    pub fn new(block_size: usize) -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
            block_size,
        }
    }

    /// A table over `blocks`, all full (e.g. a prefix taken from the radix cache).
    pub fn from_full_blocks(blocks: Vec<BlockRef>, block_size: usize) -> Self {
        Self {
            len: blocks.len() * block_size,
            blocks,
            block_size,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Physical block ids in position order.
    pub fn block_ids(&self) -> Vec<u32> {
        self.blocks.iter().map(BlockRef::id).collect()
    }

    pub fn blocks(&self) -> &[BlockRef] {
        &self.blocks
    }

    /// Slot of position `p` (which must be `< len`).
    pub fn slot(&self, p: usize) -> u32 {
        self.blocks[p / self.block_size].id() * self.block_size as u32 + (p % self.block_size) as u32
    }

    /// A second table sharing every block of this one (no K/V is copied).
    pub fn fork(&self) -> Self {
        self.clone()
    }

    /// Keeps positions `0..len` and drops the blocks past them. A kept partial last block may
    /// hold stale K/V beyond `len`: the next append overwrites it (in place when the block is
    /// private, after a copy when shared), so nothing reads it.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.blocks.truncate(len.div_ceil(self.block_size));
        self.len = len;
    }

    /// Reserves positions `len .. len + n`, allocating blocks as needed (all or nothing). If
    /// the last block is shared with another table and not full, it is first replaced by a
    /// private copy, reported in `copies`.
    pub fn append(&mut self, pool: &BlockPool, n: usize) -> Result<Appended> {
        let bs = self.block_size;
        let in_last = self.len % bs;
        let cow = in_last != 0 && n > 0 && self.blocks.last().is_some_and(BlockRef::is_shared);
        let new_blocks = (self.len + n).div_ceil(bs) - self.blocks.len();
        let mut fresh = pool.alloc_n(new_blocks + cow as usize)?;
        let mut copies = Vec::new();
        let mut sources = Vec::new();
        if cow {
            let private = fresh.pop().expect("allocated above");
            let last = self.blocks.last_mut().expect("cow implies a last block");
            copies.push((last.id(), private.id()));
            sources.push(std::mem::replace(last, private));
        }
        self.blocks.extend(fresh);
        let start = self.len;
        self.len += n;
        Ok(Appended {
            slots: (start..self.len).map(|p| self.slot(p)).collect(),
            copies,
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_allocates_blocks_and_maps_slots() {
        let pool = BlockPool::new(8, 4).unwrap();
        let mut t = BlockTable::new(4);
        let a = t.append(&pool, 6).unwrap();
        assert_eq!(a.slots, vec![0, 1, 2, 3, 4, 5]);
        assert!(a.copies.is_empty());
        assert_eq!(t.block_ids(), vec![0, 1]);
        let b = t.append(&pool, 3).unwrap();
        assert_eq!(b.slots, vec![6, 7, 8]);
        assert_eq!(t.block_ids(), vec![0, 1, 2]);
        drop(t);
        assert_eq!(pool.stats().free, 8);
    }

    #[test]
    fn fork_shares_and_append_copies_a_shared_partial_block() {
        let pool = BlockPool::new(8, 4).unwrap();
        let mut parent = BlockTable::new(4);
        parent.append(&pool, 6).unwrap(); // blocks 0 (full), 1 (2 of 4)
        let mut child = parent.fork();
        assert_eq!(pool.stats().shared, 2);
        let a = child.append(&pool, 1).unwrap();
        assert_eq!(a.copies, vec![(1, 2)]);
        assert_eq!(child.block_ids(), vec![0, 2]);
        assert_eq!(a.slots, vec![2 * 4 + 2]);
        drop(a); // the copy is applied: the child's hold on the source ends
                 // The full block stays shared; the partial one is now private to each.
        assert_eq!(pool.stats().shared, 1);
        // The parent owns block 1 alone now, so it appends in place.
        let b = parent.append(&pool, 1).unwrap();
        assert!(b.copies.is_empty());
        assert_eq!(b.slots, vec![4 + 2]);
    }

    #[test]
    fn truncate_drops_trailing_blocks_and_a_shared_partial_block_is_copied_on_append() {
        let pool = BlockPool::new(8, 4).unwrap();
        let mut parent = BlockTable::new(4);
        parent.append(&pool, 8).unwrap(); // blocks 0, 1 full
        let mut child = parent.fork();
        child.truncate(5); // block 1 kept, partial, still shared with the parent
        assert_eq!((child.len(), child.block_ids()), (5, vec![0, 1]));
        let a = child.append(&pool, 1).unwrap();
        assert_eq!(
            a.copies,
            vec![(1, 2)],
            "writing position 5 must not touch the parent's block"
        );
        child.truncate(2);
        assert_eq!(child.block_ids(), vec![0]);
        drop(a);
        assert_eq!(pool.stats().used, 2, "the child's copy went back to the pool");
    }
}
