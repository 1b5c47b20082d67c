//! A fixed pool of KV blocks with refcounts carried by the handles themselves.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

struct PoolState {
    /// Ids of free blocks; allocation pops from the end.
    free: Vec<u32>,
    /// `refcount[id]`: live handles of block `id` (0 = free).
    refcount: Vec<u32>,
    /// `cache_holds[id]`: how many of those handles are [`CachedBlock`]s (prefix-cache nodes).
    cache_holds: Vec<u32>,
}

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    // The state is a pair of plain vectors updated in single statements, so a panic elsewhere
    // while the lock was held cannot leave it half-updated: recover from poisoning.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pool. Cheap to clone (shares the same blocks).
#[derive(Clone)]
pub struct BlockPool {
    state: Arc<Mutex<PoolState>>,
    block_size: usize,
}

/// Occupancy of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    pub free: usize,
    pub used: usize,
    /// Blocks with more than one owner (refcount > 1; a prefix-cache node counts as an owner).
    pub shared: usize,
    /// Blocks held by the prefix cache (possibly by sequences too).
    pub cached: usize,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 || n_blocks == 0 || n_blocks > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "KV pool of {n_blocks} blocks of {block_size} tokens"
            )));
        }
        Ok(Self {
            state: Arc::new(Mutex::new(PoolState {
                // Reversed so that blocks are handed out 0, 1, 2, … (easier to read in tests).
                free: (0..n_blocks as u32).rev().collect(),
                refcount: vec![0; n_blocks],
                cache_holds: vec![0; n_blocks],
            })),
            block_size,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        lock(&self.state).refcount.len()
    }

    /// One free block, owned by the returned handle.
    pub fn alloc(&self) -> Result<BlockRef> {
        Ok(self.alloc_n(1)?.pop().expect("one block"))
    }

    /// `n` free blocks, all or none.
    pub fn alloc_n(&self, n: usize) -> Result<Vec<BlockRef>> {
        let mut s = lock(&self.state);
        if s.free.len() < n {
            return Err(Error::OutOfBlocks {
                needed: n,
                free: s.free.len(),
                total: s.refcount.len(),
            });
        }
        let at = s.free.len() - n;
        let ids: Vec<u32> = s.free.drain(at..).rev().collect();
        for &id in &ids {
            s.refcount[id as usize] = 1;
        }
        Ok(ids
            .into_iter()
            .map(|id| BlockRef {
                id,
                state: Arc::clone(&self.state),
            })
            .collect())
    }

    pub fn stats(&self) -> PoolStats {
        let s = lock(&self.state);
        PoolStats {
            total: s.refcount.len(),
            free: s.free.len(),
            used: s.refcount.iter().filter(|&&r| r > 0).count(),
            shared: s.refcount.iter().filter(|&&r| r > 1).count(),
            cached: s.cache_holds.iter().filter(|&&c| c > 0).count(),
        }
    }

    /// Snapshot of every block's owner count, indexed by block id (for tests and debugging).
    pub fn refcounts(&self) -> Vec<u32> {
        lock(&self.state).refcount.clone()
    }

    /// Checks the pool's own invariants: every free id is listed once and has no owner, every
    /// block with no owner is free, and cache holds never exceed owners.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let s = lock(&self.state);
        let mut listed = vec![false; s.refcount.len()];
        for &id in &s.free {
            let i = id as usize;
            if listed[i] {
                return Err(format!("block {id} is on the free list twice"));
            }
            listed[i] = true;
            if s.refcount[i] != 0 {
                return Err(format!("block {id} is free but has {} owners", s.refcount[i]));
            }
        }
        for (i, (&rc, &ch)) in s.refcount.iter().zip(&s.cache_holds).enumerate() {
            if rc == 0 && !listed[i] {
                return Err(format!("block {i} has no owner but is not free"));
            }
            if ch > rc {
                return Err(format!("block {i}: {ch} cache holds but {rc} owners"));
            }
        }
        Ok(())
    }
}

/// An owning handle to one block. `Clone` adds an owner; `Drop` removes one and frees the
/// block when it was the last. No code decrements a refcount by hand.
pub struct BlockRef {
    id: u32,
    state: Arc<Mutex<PoolState>>,
}

impl BlockRef {
    /// Physical block id (index into the backend's store).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Current number of owners.
    pub fn refcount(&self) -> u32 {
        lock(&self.state).refcount[self.id as usize]
    }

    pub fn is_shared(&self) -> bool {
        self.refcount() > 1
    }
}

impl Clone for BlockRef {
    fn clone(&self) -> Self {
        lock(&self.state).refcount[self.id as usize] += 1;
        Self {
            id: self.id,
            state: Arc::clone(&self.state),
        }
    }
}

impl Drop for BlockRef {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        let rc = &mut s.refcount[self.id as usize];
        *rc -= 1;
        if *rc == 0 {
            s.free.push(self.id);
        }
    }
}

/// A prefix-cache node's hold on a block: an owner like any [`BlockRef`], counted separately
/// so the pool can report how many blocks the cache keeps alive.
pub struct CachedBlock {
    block: BlockRef,
}

impl CachedBlock {
    pub fn new(block: BlockRef) -> Self {
        lock(&block.state).cache_holds[block.id as usize] += 1;
        Self { block }
    }

    pub fn block(&self) -> &BlockRef {
        &self.block
    }
}

impl Drop for CachedBlock {
    fn drop(&mut self) {
        // The inner handle drops right after this and releases the owner count itself.
        lock(&self.block.state).cache_holds[self.block.id as usize] -= 1;
    }
}

impl std::fmt::Debug for BlockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockRef({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_free_their_block_on_last_drop() {
        let pool = BlockPool::new(4, 16).unwrap();
        let a = pool.alloc().unwrap();
        let b = a.clone();
        assert_eq!(a.refcount(), 2);
        assert_eq!(
            pool.stats(),
            PoolStats {
                total: 4,
                free: 3,
                used: 1,
                shared: 1,
                cached: 0
            }
        );
        drop(a);
        assert_eq!(b.refcount(), 1);
        assert_eq!(pool.stats().free, 3);
        drop(b);
        assert_eq!(
            pool.stats(),
            PoolStats {
                total: 4,
                free: 4,
                used: 0,
                shared: 0,
                cached: 0
            }
        );
    }

    #[test]
    fn cache_holds_are_owners_counted_apart() {
        let pool = BlockPool::new(2, 16).unwrap();
        let a = pool.alloc().unwrap();
        let cached = CachedBlock::new(a.clone());
        assert_eq!((pool.stats().cached, pool.stats().shared), (1, 1));
        drop(a);
        assert_eq!((pool.stats().cached, pool.stats().used), (1, 1));
        assert_eq!(cached.block().refcount(), 1);
        drop(cached);
        assert_eq!((pool.stats().cached, pool.stats().free), (0, 2));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn running_out_is_an_error_and_allocates_nothing() {
        let pool = BlockPool::new(3, 16).unwrap();
        let _held = pool.alloc_n(2).unwrap();
        match pool.alloc_n(2) {
            Err(Error::OutOfBlocks {
                needed: 2,
                free: 1,
                total: 3,
            }) => {}
            other => panic!("expected OutOfBlocks, got {other:?}"),
        }
        assert_eq!(pool.stats().free, 1);
    }
}
