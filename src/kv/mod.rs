//! Paged KV-cache bookkeeping, host-only (no device needed to test it).
//!
//! The K/V themselves live in a backend's store (`[layer][block][slot][kv head][dim]`); this
//! module decides which block each token of each sequence goes to. A block is owned through
//! [`BlockRef`] handles that carry its refcount: cloning a handle shares the block, dropping
//! the last handle returns it to the free list. [`BlockTable`] maps a sequence's positions to
//! blocks, forks by sharing, and copies a shared, partly filled last block before writing into
//! it (copy-on-write; the copies are handed to the backend as one batch).

mod pool;
mod radix;
mod table;

pub use pool::{BlockPool, BlockRef, CachedBlock, PoolStats};
pub use radix::RadixCache;
pub use table::{Appended, BlockTable};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
