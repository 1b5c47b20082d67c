//! Radix prefix cache: a tree over the token ids of full KV blocks.
//!
//! Every edge is labelled with one block's `block_size` token ids and every node below the
//! root holds that block ([`CachedBlock`], an owner like any other). A path from the root spells
//! a token prefix whose K/V are already computed, so a new sequence that starts with those
//! tokens takes the blocks instead of recomputing them.
//!
//! Rules:
//! * Only full blocks enter the tree: a full block is never written again (appends go to a
//!   fresh block; copy-on-write only ever copies a partial last block), so its contents are
//!   fixed once its K/V are computed. Callers insert blocks only after the forward that wrote
//!   them.
//! * If a prefix is already cached under other physical blocks (two sequences computed it
//!   independently), the cached block wins and the newcomer's stays private to it.
//! * A node can be evicted when it is a leaf and the tree is its block's only owner. Eviction
//!   takes the least recently used such leaves first (a lookup or insert touches every node on
//!   its path, so a parent is never older than its children) and may then expose the parent.

use std::collections::{BinaryHeap, HashMap};

use super::pool::{BlockRef, CachedBlock};

/// Index of a node in the slab; the root is 0.
type NodeId = usize;
const ROOT: NodeId = 0;

struct Node {
    /// The block's token ids (empty for the root).
    tokens: Vec<u32>,
    /// `None` only for the root.
    block: Option<CachedBlock>,
    parent: NodeId,
    /// Children by their block's token ids.
    children: HashMap<Vec<u32>, NodeId>,
    /// Logical time of the last lookup or insert through this node.
    last_used: u64,
}

pub struct RadixCache {
    block_size: usize,
    /// Node slab; `None` marks a free slot (listed in `free_slots`).
    nodes: Vec<Option<Node>>,
    free_slots: Vec<NodeId>,
    clock: u64,
}

impl RadixCache {
    pub fn new(block_size: usize) -> Self {
        let root = Node {
            tokens: Vec::new(),
            block: None,
            parent: ROOT,
            children: HashMap::new(),
            last_used: 0,
        };
        Self {
            block_size,
            nodes: vec![Some(root)],
            free_slots: Vec::new(),
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Cached blocks (nodes below the root).
    pub fn len(&self) -> usize {
        self.nodes.len() - self.free_slots.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id].as_ref().expect("live node id")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id].as_mut().expect("live node id")
    }

    /// The blocks of the longest cached prefix of `tokens`, at most `max_blocks` of them, as
    /// new owning handles (the caller's sequence shares them). Touches the matched path.
    pub fn match_prefix(&mut self, tokens: &[u32], max_blocks: usize) -> Vec<BlockRef> {
        self.clock += 1;
        let now = self.clock;
        let mut out = Vec::new();
        let mut at = ROOT;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let Some(&child) = self.node(at).children.get(chunk) else {
                break;
            };
            let node = self.node_mut(child);
            node.last_used = now;
            out.push(node.block.as_ref().expect("non-root node").block().clone());
            at = child;
        }
        out
    }

    /// Inserts the full blocks of a sequence: `blocks[i]` holds tokens
    /// `tokens[i·bs .. (i+1)·bs]`; a trailing partial block is ignored. Returns how many
    /// blocks were newly cached.
    pub fn insert(&mut self, tokens: &[u32], blocks: &[BlockRef]) -> usize {
        self.clock += 1;
        let now = self.clock;
        let mut added = 0;
        let mut at = ROOT;
        for (chunk, block) in tokens.chunks_exact(self.block_size).zip(blocks) {
            let next = match self.node(at).children.get(chunk) {
                Some(&child) => child,
                None => {
                    let node = Node {
                        tokens: chunk.to_vec(),
                        block: Some(CachedBlock::new(block.clone())),
                        parent: at,
                        children: HashMap::new(),
                        last_used: now,
                    };
                    let id = match self.free_slots.pop() {
                        Some(id) => {
                            self.nodes[id] = Some(node);
                            id
                        }
                        None => {
                            self.nodes.push(Some(node));
                            self.nodes.len() - 1
                        }
                    };
                    self.node_mut(at).children.insert(chunk.to_vec(), id);
                    added += 1;
                    id
                }
            };
            self.node_mut(next).last_used = now;
            at = next;
        }
        added
    }

    /// Whether `id` can go now: a leaf whose block only the tree owns.
    fn evictable(&self, id: NodeId) -> bool {
        let n = self.node(id);
        id != ROOT && n.children.is_empty() && n.block.as_ref().is_some_and(|b| b.block().refcount() == 1)
    }

    /// Frees up to `want` blocks by dropping least-recently-used evictable leaves; returns how
    /// many were freed.
    pub fn evict(&mut self, want: usize) -> usize {
        if want == 0 {
            return 0;
        }
        // Min-heap on last use (Reverse ordering), refilled as parents become leaves.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u64, NodeId)>> = (1..self.nodes.len())
            .filter(|&id| self.nodes[id].is_some() && self.evictable(id))
            .map(|id| std::cmp::Reverse((self.node(id).last_used, id)))
            .collect();
        let mut freed = 0;
        while freed < want {
            let Some(std::cmp::Reverse((_, id))) = heap.pop() else {
                break;
            };
            let node = self.nodes[id].take().expect("heap holds live nodes");
            self.free_slots.push(id);
            let parent = node.parent;
            self.node_mut(parent).children.remove(&node.tokens);
            drop(node); // releases the block
            freed += 1;
            if self.evictable(parent) {
                heap.push(std::cmp::Reverse((self.node(parent).last_used, parent)));
            }
        }
        freed
    }

    /// Drops every node (blocks that sequences still hold stay with them).
    pub fn clear(&mut self) {
        let block_size = self.block_size;
        *self = Self::new(block_size);
    }

    /// Physical block ids the tree holds, one entry per node (for invariant checks).
    pub fn block_ids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .flatten()
            .filter_map(|n| n.block.as_ref().map(|b| b.block().id()))
            .collect()
    }

    /// Every node below the root as (the full token prefix its path spells, its block id), in
    /// no particular order (for invariant checks: the block holds the K/V of the last
    /// `block_size` of those tokens, computed after all the ones before).
    pub fn entries(&self) -> Vec<(Vec<u32>, u32)> {
        let mut out = Vec::with_capacity(self.len());
        for (id, slot) in self.nodes.iter().enumerate() {
            let Some(node) = slot else { continue };
            let Some(block) = &node.block else { continue };
            let mut path = vec![id];
            let mut at = node.parent;
            while at != ROOT {
                path.push(at);
                at = self.node(at).parent;
            }
            let prefix = path
                .iter()
                .rev()
                .flat_map(|&n| self.node(n).tokens.iter().copied())
                .collect();
            out.push((prefix, block.block().id()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockPool, BlockTable};

    /// A table holding `tokens` (K/V notionally computed).
    fn filled(pool: &BlockPool, tokens: &[u32]) -> BlockTable {
        let mut t = BlockTable::new(pool.block_size());
        t.append(pool, tokens.len()).unwrap();
        t
    }

    #[test]
    fn longest_prefix_of_full_blocks_is_reused() {
        let pool = BlockPool::new(16, 4).unwrap();
        let mut cache = RadixCache::new(4);
        let a: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
        let ta = filled(&pool, &a);
        assert_eq!(cache.insert(&a, ta.blocks()), 2);
        assert_eq!(cache.insert(&a, ta.blocks()), 0, "inserting twice adds nothing");
        let ids = ta.block_ids();
        drop(ta);
        // The tree keeps the two full blocks; the partial one went back to the pool.
        assert_eq!(pool.stats().used, 2);
        assert_eq!(pool.stats().cached, 2);

        let b: Vec<u32> = (0..6).chain([99, 98, 97]).collect(); // shares block 0 only
        let hit = cache.match_prefix(&b, usize::MAX);
        assert_eq!(hit.iter().map(BlockRef::id).collect::<Vec<_>>(), vec![ids[0]]);
        assert_eq!(cache.match_prefix(&a, 1).len(), 1, "max_blocks caps the match");
        assert_eq!(cache.match_prefix(&a, usize::MAX).len(), 2);
        assert!(cache.match_prefix(&[7, 7, 7, 7], usize::MAX).is_empty());
    }

    #[test]
    fn eviction_is_lru_leaf_first_and_spares_blocks_in_use() {
        let pool = BlockPool::new(16, 2).unwrap();
        let mut cache = RadixCache::new(2);
        let old = [1, 2, 3, 4];
        let new = [1, 2, 5, 6];
        let t_old = filled(&pool, &old);
        cache.insert(&old, t_old.blocks());
        drop(t_old);
        let t_new = filled(&pool, &new);
        cache.insert(&new, t_new.blocks()); // shares node [1,2] (the cached block wins)
        let held = cache.match_prefix(&new, usize::MAX); // a sequence now owns [1,2] and [5,6]
        drop(t_new);
        assert_eq!(cache.len(), 3);
        // Only [3,4] is an unreferenced leaf; [1,2] is referenced and a parent.
        assert_eq!(cache.evict(10), 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.match_prefix(&old, usize::MAX).len(), 1);
        drop(held);
        // Now the leaf [5,6] goes first, which exposes [1,2].
        assert_eq!(cache.evict(10), 2);
        assert!(cache.is_empty());
        assert_eq!(pool.stats().free, 16);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn eviction_order_follows_last_use() {
        let pool = BlockPool::new(16, 2).unwrap();
        let mut cache = RadixCache::new(2);
        for seq in [[1, 1], [2, 2], [3, 3]] {
            let t = filled(&pool, &seq);
            cache.insert(&seq, t.blocks());
        }
        drop(cache.match_prefix(&[1, 1], 1)); // [1,1] is now the most recent
        assert_eq!(cache.evict(2), 2);
        assert_eq!(cache.match_prefix(&[1, 1], 1).len(), 1);
        assert!(cache.match_prefix(&[2, 2], 1).is_empty());
        assert!(cache.match_prefix(&[3, 3], 1).is_empty());
    }
}
