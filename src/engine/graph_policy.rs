//! Which decode steps with sharing groups the engine captures as graphs, and which of those
//! graphs it keeps ([`crate::engine::EngineConfig::cascade_graphs`]).
//!
//! A graph with sharing groups serves one group layout (rows, context bucket, and each
//! group's member rows and shared blocks). Sibling groups live for a thought of many steps,
//! but rows come and go as siblings stop and each new fork is a new layout, so a layout is
//! captured only once it has repeated ([`GROUP_GRAPH_MIN_STEPS`]), and only the most recently
//! replayed [`MAX_GROUP_GRAPHS`] graphs are kept (each holds its step's buffers). Pure
//! bookkeeping: the engine owns the graphs.

use std::collections::HashMap;
use std::hash::Hash;

/// Steps of one group layout before its graph is captured: a capture costs about a forward
/// and an instantiation, which a layout seen once or twice does not repay.
pub const GROUP_GRAPH_MIN_STEPS: usize = 3;
/// Graphs with sharing groups kept at once; the least recently replayed goes first.
pub const MAX_GROUP_GRAPHS: usize = 8;

#[derive(Debug)]
pub struct GroupGraphPolicy<K> {
    /// Steps counted of each layout that has no graph yet.
    seen: HashMap<K, usize>,
    /// The step at which each kept graph was last used.
    used: HashMap<K, u64>,
}

impl<K> Default for GroupGraphPolicy<K> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            used: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> GroupGraphPolicy<K> {
    /// Counts a step of `key`, which has no graph; true once it has repeated enough to be
    /// captured (the count then starts over, should the capture not keep a graph).
    pub fn ready(&mut self, key: &K) -> bool {
        // Layouts counted long ago belong to sibling groups that have ended.
        if !self.seen.contains_key(key) && self.seen.len() >= 4 * MAX_GROUP_GRAPHS {
            self.seen.clear();
        }
        let n = self.seen.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n < GROUP_GRAPH_MIN_STEPS {
            return false;
        }
        self.seen.remove(key);
        true
    }

    /// The graphs to drop before one more is captured, least recently used first, so that at
    /// most [`MAX_GROUP_GRAPHS`] are kept with it; they are forgotten here.
    pub fn make_room(&mut self) -> Vec<K> {
        let mut dropped = Vec::new();
        while self.used.len() >= MAX_GROUP_GRAPHS {
            let Some(oldest) = self.used.iter().min_by_key(|(_, &at)| at).map(|(k, _)| k.clone()) else {
                break;
            };
            self.used.remove(&oldest);
            dropped.push(oldest);
        }
        dropped
    }

    /// Notes that the graph of `key` is kept and used at step `at`.
    pub fn used(&mut self, key: &K, at: u64) {
        self.used.insert(key.clone(), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_is_captured_on_its_third_step_and_the_oldest_graph_makes_room() {
        let mut p = GroupGraphPolicy::default();
        assert!(!p.ready(&1) && !p.ready(&1));
        assert!(!p.ready(&2));
        assert!(p.ready(&1));
        // Counting starts over once a layout was ready.
        assert!(!p.ready(&1));
        for k in 0..MAX_GROUP_GRAPHS as u64 {
            assert!(p.make_room().is_empty());
            p.used(&k, 10 + k);
        }
        // Graph 0 is replayed again: graph 1 is now the least recently used.
        p.used(&0, 100);
        assert_eq!(p.make_room(), vec![1]);
        p.used(&99, 101);
        assert_eq!(p.make_room(), vec![2]);
    }

    #[test]
    fn layouts_seen_long_ago_are_forgotten() {
        let mut p = GroupGraphPolicy::default();
        assert!(!p.ready(&0) && !p.ready(&0));
        for k in 1..4 * MAX_GROUP_GRAPHS {
            assert!(!p.ready(&k));
        }
        // The table is full: a new layout clears it, so layout 0 starts over.
        assert!(!p.ready(&1000));
        assert!(!p.ready(&0));
        assert!(!p.ready(&0));
        assert!(p.ready(&0));
    }
}
