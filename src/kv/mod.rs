//! Paged KV-cache bookkeeping, host-only (no device needed to test it).
//!
//! The K/V themselves live in a backend's store (`[layer][block][slot][kv head][dim]`); this
//! module decides which block each token of each sequence goes to.
//!
//! **Ownership.** A block is owned through [`BlockRef`] handles that carry its refcount:
//! cloning a handle adds an owner, dropping one removes it, and the last drop returns the
//! block to the free list. Owners are sequences' [`BlockTable`]s and the prefix cache's nodes
//! ([`CachedBlock`], counted apart in [`PoolStats::cached`]); nothing decrements by hand.
//!
//! **Fork.** [`BlockTable::fork`] clones the table's handles: every block is shared, no K/V
//! moves, and the cost is independent of the prefix's K/V size.
//!
//! **Copy-on-write.** Full blocks are never written again. Appending into a partly filled last
//! block that another owner shares first swaps in a fresh private block and reports the copy
//! `(src, dst)`; the caller applies all copies of a step as one batch before the forward, and
//! holds the old handle ([`Appended::sources`]) until then so the source cannot be reused.
//!
//! **Prefix cache.** [`RadixCache`] keeps full, computed blocks keyed by their tokens, so a
//! new sequence starting with the same tokens takes them instead of recomputing; it evicts
//! least-recently-used blocks that no sequence holds.

mod pool;
mod radix;
mod table;

pub use pool::{BlockPool, BlockRef, CachedBlock, PoolStats};
pub use radix::RadixCache;
pub use table::{Appended, BlockTable};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
