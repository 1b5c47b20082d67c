//! A fixed pool of KV blocks with refcounts carried by the handles themselves.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

struct PoolState {
    /// Ids of free blocks; allocation pops from the end.
    free: Vec<u32>,
    /// `refcount[id]`: live handles of block `id` (0 = free).
    refcount: Vec<u32>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    pub free: usize,
    pub used: usize,
    /// Blocks with more than one owner.
    pub shared: usize,
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
        }
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
                shared: 1
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
                shared: 0
            }
        );
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
