//! Seeded property test of the paged KV-cache bookkeeping (`qmtot::kv`) against a simple model.
//!
//! What is modelled: a [`BlockPool`], a [`RadixCache`] over the same block size, and a set of
//! live sequences, each a [`BlockTable`] plus the token ids it holds. The K/V store itself is
//! simulated as one `Option<u32>` per slot (`n_blocks · block_size` of them) holding the token
//! whose K/V were written there; freshly allocated blocks are poisoned (`None`) so stale
//! contents can never pass for the right ones. Random operations do what the scheduler does:
//! submit (reuse the longest cached prefix, prefill the rest), fork (Tree-of-Thought
//! siblings), append (decode / prefill chunks), a batched step (several appends whose
//! copy-on-write copies are applied together, after other sequences may already have been
//! preempted), release (cache the full blocks, drop the table), insert a live sequence's blocks
//! into the cache, preempt, evict. Running out of blocks is made common on purpose (small
//! pools) and handled as the scheduler does: evict cached blocks, then preempt another
//! sequence or give up.
//!
//! Why: the bookkeeping must never leak or double-free a block, never let one sequence's write
//! reach another's K/V, and never serve a cached prefix whose block holds other tokens. After
//! every operation the test checks that
//! 1. each block's refcount equals the number of tables holding it, plus radix nodes holding
//!    it, plus copy sources still pending;
//! 2. the pool's stats agree with that (free + used = total, `cached`, `shared`) and
//!    `check_invariants` passes;
//! 3. every live sequence reads its own tokens back through its table (so copy-on-write never
//!    lets a sibling's write leak into a shared block), and every radix node's block holds
//!    exactly that node's tokens;
//!
//! and along the way that `match_prefix` finds the longest cached prefix, `insert` adds exactly
//! the uncached blocks, `evict` frees what it reports and stops early only when nothing is
//! evictable, a failed append changes nothing, and the copies of one batched step never write
//! a block another copy of the same step reads. At the end, dropping every table and clearing
//! the cache must leave the pool entirely free.
//!
//! The run length is 100,000 operations per seed with optimizations, 5,000 without;
//! `QMTOT_KV_PROPERTY_OPS` overrides it. On failure the seed, block size and operation index
//! are printed.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use qmtot::error::Error;
use qmtot::kv::{Appended, BlockPool, BlockTable, RadixCache};

/// Token ids are drawn from `0..ALPHABET`: small, so that prefixes collide and the cache hits.
const ALPHABET: u64 = 4;
/// Most live sequences at once.
const MAX_SEQS: usize = 16;

/// splitmix64: tiny, deterministic, good enough to drive a property test.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % ALPHABET) as u32).collect()
    }
}

struct Seq {
    table: BlockTable,
    /// Tokens whose K/V are written (`table.len()` of them, except while a step is pending).
    tokens: Vec<u32>,
}

/// How often each interesting thing happened (printed, and checked to be non-zero in long runs
/// so that a change that silently stops exercising a path is noticed).
#[derive(Debug, Default)]
struct Counts {
    submits: usize,
    prefix_hit_blocks: usize,
    forks: usize,
    appends: usize,
    steps: usize,
    cow_copies: usize,
    out_of_blocks: usize,
    preempted_for_room: usize,
    gave_up: usize,
    releases: usize,
    blocks_cached: usize,
    blocks_evicted: usize,
    max_live_seqs: usize,
}

struct Sim {
    pool: BlockPool,
    radix: RadixCache,
    seqs: BTreeMap<u64, Seq>,
    next_id: u64,
    /// The simulated K/V store: the token written into each slot, `None` if poisoned.
    store: Vec<Option<u32>>,
    bs: usize,
    n_blocks: usize,
    /// Longest sequence (tokens); a sequence that would grow past it finishes instead.
    max_len: usize,
    /// Recently finished token lists, from which new submissions take prefixes.
    history: Vec<Vec<u32>>,
    rng: Rng,
    counts: Counts,
}

impl Sim {
    /// `max_blocks`: blocks of the longest sequence; `max_blocks + 1 <= n_blocks` so that any
    /// single sequence (plus one copy-on-write block) fits an otherwise empty pool.
    fn new(seed: u64, bs: usize, n_blocks: usize, max_blocks: usize) -> Self {
        assert!(max_blocks < n_blocks);
        Self {
            pool: BlockPool::new(n_blocks, bs).unwrap(),
            radix: RadixCache::new(bs),
            seqs: BTreeMap::new(),
            next_id: 0,
            store: vec![None; n_blocks * bs],
            bs,
            n_blocks,
            max_len: max_blocks * bs,
            history: Vec::new(),
            rng: Rng(seed),
            counts: Counts::default(),
        }
    }

    fn block_ids(&self, id: u64) -> Vec<u32> {
        self.seqs[&id].table.block_ids()
    }

    fn block(&self, b: u32) -> &[Option<u32>] {
        &self.store[b as usize * self.bs..(b as usize + 1) * self.bs]
    }

    /// What sequence `id` reads back through its table.
    fn read(&self, id: u64) -> Vec<Option<u32>> {
        let t = &self.seqs[&id].table;
        (0..t.len()).map(|p| self.store[t.slot(p) as usize]).collect()
    }

    fn pick(&mut self) -> u64 {
        let i = self.rng.below(self.seqs.len());
        *self.seqs.keys().nth(i).expect("in range")
    }

    fn pick_except(&mut self, keep: &BTreeSet<u64>) -> Option<u64> {
        let candidates: Vec<u64> = self.seqs.keys().copied().filter(|id| !keep.contains(id)).collect();
        (!candidates.is_empty()).then(|| candidates[self.rng.below(candidates.len())])
    }

    fn add_seq(&mut self, seq: Seq) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, seq);
        self.counts.max_live_seqs = self.counts.max_live_seqs.max(self.seqs.len());
        id
    }

    /// Token prefixes spelled by the radix nodes.
    fn cached_prefixes(&self) -> HashSet<Vec<u32>> {
        self.radix.entries().into_iter().map(|(prefix, _)| prefix).collect()
    }

    /// `radix.evict(want)`, checking that it freed exactly what it reports, and that when it
    /// stopped short no evictable node (a leaf whose block only the tree owns) was left.
    fn evict(&mut self, want: usize) -> usize {
        let free0 = self.pool.stats().free;
        let len0 = self.radix.len();
        let freed = self.radix.evict(want);
        assert!(freed <= want, "evict({want}) freed {freed}");
        assert_eq!(
            self.pool.stats().free,
            free0 + freed,
            "evict({want}) reported {freed} freed blocks"
        );
        assert_eq!(self.radix.len(), len0 - freed);
        if freed < want {
            let entries = self.radix.entries();
            let parents: HashSet<&[u32]> = entries.iter().map(|(p, _)| &p[..p.len() - self.bs]).collect();
            let rc = self.pool.refcounts();
            for (prefix, block) in &entries {
                let leaf = !parents.contains(prefix.as_slice());
                assert!(
                    !(leaf && rc[*block as usize] == 1),
                    "evict({want}) stopped at {freed} but leaf {prefix:?} (block {block}) is evictable"
                );
            }
        }
        self.counts.blocks_evicted += freed;
        freed
    }

    /// Reserves `n` more positions for sequence `id`. When the pool is short it evicts cached
    /// blocks, then (usually) preempts a random sequence not in `keep` and retries, or gives up
    /// (`None`, the sequence unchanged). On success the fresh blocks are poisoned and the
    /// copy-on-write decision is checked against the model.
    fn reserve(&mut self, id: u64, n: usize, keep: &BTreeSet<u64>) -> Option<Appended> {
        let bs = self.bs;
        loop {
            let rc0 = self.pool.refcounts();
            let free0 = self.pool.stats().free;
            let seq = self.seqs.get_mut(&id).expect("live sequence");
            let (ids0, len0) = (seq.table.block_ids(), seq.table.len());
            match seq.table.append(&self.pool, n) {
                Ok(a) => {
                    let ids = seq.table.block_ids();
                    assert_eq!(seq.table.len(), len0 + n);
                    assert_eq!(ids.len(), (len0 + n).div_ceil(bs));
                    assert_eq!(a.slots.len(), n);
                    for (k, &slot) in a.slots.iter().enumerate() {
                        assert_eq!(slot, seq.table.slot(len0 + k));
                    }
                    // Copy-on-write exactly when the last block is partly filled and shared.
                    let cow = len0 % bs != 0 && n > 0 && rc0[*ids0.last().unwrap() as usize] > 1;
                    assert_eq!(a.copies.len(), cow as usize, "copies {:?} (len {len0}, +{n})", a.copies);
                    let sources: Vec<u32> = a.sources.iter().map(|b| b.id()).collect();
                    assert_eq!(sources, a.copies.iter().map(|&(s, _)| s).collect::<Vec<_>>());
                    let keep_blocks = ids0.len() - cow as usize;
                    assert_eq!(ids[..keep_blocks], ids0[..keep_blocks], "append changed earlier blocks");
                    if let Some(&(src, dst)) = a.copies.first() {
                        assert_eq!(src, *ids0.last().unwrap());
                        assert_eq!(dst, ids[ids0.len() - 1]);
                    }
                    let fresh: Vec<u32> = a
                        .copies
                        .iter()
                        .map(|&(_, d)| d)
                        .chain(ids[ids0.len()..].iter().copied())
                        .collect();
                    assert_eq!(
                        free0 - self.pool.stats().free,
                        fresh.len(),
                        "blocks taken by the append"
                    );
                    for b in fresh {
                        assert_eq!(rc0[b as usize], 0, "append handed out block {b}, which was in use");
                        let b = b as usize;
                        self.store[b * bs..(b + 1) * bs].fill(None);
                    }
                    self.counts.cow_copies += a.copies.len();
                    return Some(a);
                }
                Err(Error::OutOfBlocks { needed, free, total }) => {
                    self.counts.out_of_blocks += 1;
                    assert_eq!((free, total), (free0, self.n_blocks));
                    assert!(needed > free, "OutOfBlocks with needed {needed} <= free {free}");
                    assert_eq!(seq.table.block_ids(), ids0, "a failed append changed the table");
                    assert_eq!(seq.table.len(), len0, "a failed append changed the table");
                    assert_eq!(
                        self.pool.refcounts(),
                        rc0,
                        "a failed append allocated or released blocks"
                    );
                    if self.evict(needed - free) > 0 {
                        continue;
                    }
                    if self.rng.chance(3, 4) {
                        let mut keep = keep.clone();
                        keep.insert(id);
                        if let Some(victim) = self.pick_except(&keep) {
                            self.seqs.remove(&victim);
                            self.counts.preempted_for_room += 1;
                            continue;
                        }
                    }
                    self.counts.gave_up += 1;
                    return None;
                }
                Err(e) => panic!("unexpected error from append: {e}"),
            }
        }
    }

    /// Applies one step's block copies as a batch: every source is read before any
    /// destination is written, as a parallel copy kernel would.
    fn apply_copies(&mut self, copies: &[(u32, u32)]) {
        let data: Vec<Vec<Option<u32>>> = copies.iter().map(|&(s, _)| self.block(s).to_vec()).collect();
        for (&(_, d), data) in copies.iter().zip(data) {
            let d = d as usize;
            self.store[d * self.bs..(d + 1) * self.bs].copy_from_slice(&data);
        }
    }

    /// The forward's writes: the new tokens' K/V land in their slots.
    fn land(&mut self, id: u64, a: Appended, tokens: &[u32]) {
        assert_eq!(a.slots.len(), tokens.len());
        for (&slot, &t) in a.slots.iter().zip(tokens) {
            self.store[slot as usize] = Some(t);
        }
        self.seqs
            .get_mut(&id)
            .expect("live sequence")
            .tokens
            .extend_from_slice(tokens);
        drop(a); // the copies are applied: the holds on their sources end
    }

    /// Appends `tokens` to sequence `id` right away (reserve, copy, write). Returns the copies
    /// made, or `None` if the pool could not make room (sequence unchanged).
    fn extend(&mut self, id: u64, tokens: &[u32], keep: &BTreeSet<u64>) -> Option<Vec<(u32, u32)>> {
        let a = self.reserve(id, tokens.len(), keep)?;
        let copies = a.copies.clone();
        self.apply_copies(&copies);
        self.land(id, a, tokens);
        Some(copies)
    }

    /// Submits a request: takes the longest cached prefix (leaving at least one token to
    /// compute), prefills the rest. Returns the new sequence, or `None` if it did not fit.
    fn submit_tokens(&mut self, tokens: &[u32]) -> Option<u64> {
        self.counts.submits += 1;
        let bs = self.bs;
        let max_blocks = (tokens.len() - 1) / bs;
        let cached = self.cached_prefixes();
        let expected = (1..=max_blocks)
            .take_while(|&k| cached.contains(&tokens[..k * bs]))
            .count();
        let hits = self.radix.match_prefix(tokens, max_blocks);
        assert_eq!(
            hits.len(),
            expected,
            "match_prefix did not return the longest cached prefix"
        );
        for (k, b) in hits.iter().enumerate() {
            let want: Vec<Option<u32>> = tokens[k * bs..(k + 1) * bs].iter().map(|&t| Some(t)).collect();
            assert_eq!(self.block(b.id()), want, "cached block {} holds other tokens", b.id());
        }
        self.counts.prefix_hit_blocks += hits.len();
        let table = BlockTable::from_full_blocks(hits, bs);
        let done = table.len();
        let id = self.add_seq(Seq {
            table,
            tokens: tokens[..done].to_vec(),
        });
        match self.extend(id, &tokens[done..], &BTreeSet::from([id])) {
            Some(_) => Some(id),
            None => {
                self.seqs.remove(&id);
                None
            }
        }
    }

    fn fork(&mut self, id: u64) -> u64 {
        self.counts.forks += 1;
        let parent = &self.seqs[&id];
        let child = Seq {
            table: parent.table.fork(),
            tokens: parent.tokens.clone(),
        };
        self.add_seq(child)
    }

    /// Caches the full blocks of sequence `id`, checking that exactly the uncached ones enter.
    fn cache(&mut self, id: u64) {
        let bs = self.bs;
        let seq = &self.seqs[&id];
        let full = seq.table.len() / bs;
        let cached = self.cached_prefixes();
        let expected = (1..=full).filter(|&k| !cached.contains(&seq.tokens[..k * bs])).count();
        let added = self.radix.insert(&seq.tokens[..full * bs], &seq.table.blocks()[..full]);
        assert_eq!(
            added, expected,
            "insert added {added} blocks, {expected} were not cached"
        );
        self.counts.blocks_cached += added;
    }

    /// A sequence finishes: its full blocks go to the cache, its table is dropped.
    fn release(&mut self, id: u64) {
        self.counts.releases += 1;
        self.cache(id);
        let seq = self.seqs.remove(&id).expect("live sequence");
        if self.history.len() < 32 {
            self.history.push(seq.tokens);
        } else {
            let i = self.rng.below(self.history.len());
            self.history[i] = seq.tokens;
        }
    }

    // ---- random operations -------------------------------------------------------------------

    fn random_submit(&mut self) {
        let len = self.rng.range(1, self.max_len * 2 / 3);
        let mut tokens = Vec::with_capacity(len);
        if !self.history.is_empty() && self.rng.chance(2, 3) {
            let h = &self.history[self.rng.below(self.history.len())];
            let k = self.rng.range(0, h.len().min(len));
            tokens.extend_from_slice(&h[..k]);
        }
        let rest = self.rng.tokens(len - tokens.len());
        tokens.extend(rest);
        self.submit_tokens(&tokens);
    }

    fn random_fork(&mut self) {
        let id = self.pick();
        let n = self.rng.range(1, 4).min(MAX_SEQS - self.seqs.len());
        for _ in 0..n {
            self.fork(id);
        }
    }

    fn random_append(&mut self) {
        let id = self.pick();
        let n = self.rng.range(1, 2 * self.bs);
        if self.seqs[&id].table.len() + n > self.max_len {
            self.release(id);
            return;
        }
        self.counts.appends += 1;
        let tokens = self.rng.tokens(n);
        if self.extend(id, &tokens, &BTreeSet::from([id])).is_none() && self.rng.chance(1, 2) {
            self.seqs.remove(&id); // could not grow: preempted
        }
    }

    /// One batched engine step: a few sequences each reserve one token (or a prefill chunk);
    /// before the step's copies are applied, other sequences may be preempted or finish and
    /// the cache may evict. Then all copies are applied as one batch and the tokens written.
    fn random_step(&mut self) {
        self.counts.steps += 1;
        let k = self.rng.range(1, self.seqs.len().min(4));
        let mut members: Vec<u64> = self.seqs.keys().copied().collect();
        for i in 0..k {
            let j = self.rng.range(i, members.len() - 1);
            members.swap(i, j);
        }
        members.truncate(k);
        let mut pending: Vec<(u64, Appended, Vec<u32>)> = Vec::new();
        for id in members {
            if !self.seqs.contains_key(&id) {
                continue; // preempted to make room for an earlier member
            }
            let n = if self.rng.chance(1, 4) {
                self.rng.range(1, self.bs)
            } else {
                1
            };
            if self.seqs[&id].table.len() + n > self.max_len {
                continue;
            }
            let tokens = self.rng.tokens(n);
            if let Some(a) = self.reserve(id, n, &BTreeSet::from([id])) {
                pending.push((id, a, tokens));
            }
            pending.retain(|(id, _, _)| self.seqs.contains_key(id));
        }
        let busy: BTreeSet<u64> = pending.iter().map(|(id, _, _)| *id).collect();
        if self.rng.chance(1, 2) {
            for _ in 0..self.rng.range(1, 2) {
                if let Some(victim) = self.pick_except(&busy) {
                    if self.rng.chance(1, 2) {
                        self.release(victim);
                    } else {
                        self.seqs.remove(&victim);
                    }
                }
            }
            let want = self.rng.range(0, self.n_blocks / 4);
            self.evict(want);
        }
        // Mid-step: the pending copies' sources are still held; pending sequences' new (and
        // copied) positions are not written yet, so only the others are read back.
        let sources: Vec<u32> = pending
            .iter()
            .flat_map(|(_, a, _)| a.sources.iter().map(|b| b.id()))
            .collect();
        self.check(&sources, &busy);
        let copies: Vec<(u32, u32)> = pending.iter().flat_map(|(_, a, _)| a.copies.iter().copied()).collect();
        let dsts: BTreeSet<u32> = copies.iter().map(|&(_, d)| d).collect();
        assert_eq!(
            dsts.len(),
            copies.len(),
            "two copies of one step write the same block: {copies:?}"
        );
        for &(s, _) in &copies {
            assert!(
                !dsts.contains(&s),
                "a copy of this step reads block {s}, which another writes: {copies:?}"
            );
        }
        self.apply_copies(&copies);
        for (id, a, tokens) in pending {
            self.land(id, a, &tokens);
        }
    }

    fn choose_op(&mut self) -> &'static str {
        let n = self.seqs.len();
        match self.rng.below(100) {
            _ if n == 0 => "submit",
            0..=17 if n < MAX_SEQS => "submit",
            18..=29 if n < MAX_SEQS => "fork",
            0..=29 => "release",
            30..=54 => "append",
            55..=66 => "step",
            67..=78 => "release",
            79..=83 => "cache",
            84..=90 => "preempt",
            _ => "evict",
        }
    }

    fn random_op(&mut self, op: &str) {
        match op {
            "submit" => self.random_submit(),
            "fork" => self.random_fork(),
            "append" => self.random_append(),
            "step" => self.random_step(),
            "release" => {
                let id = self.pick();
                self.release(id);
            }
            "cache" => {
                let id = self.pick();
                self.cache(id);
            }
            "preempt" => {
                let id = self.pick();
                self.seqs.remove(&id);
            }
            "evict" => {
                let want = self.rng.range(0, self.n_blocks / 2);
                self.evict(want);
            }
            _ => unreachable!("{op}"),
        }
    }

    // ---- invariants --------------------------------------------------------------------------

    fn check_all(&self) {
        self.check(&[], &BTreeSet::new());
    }

    /// The invariants of the module doc. `extra_owners`: blocks held outside tables and the
    /// cache (pending copy sources); `unwritten`: sequences whose reserved positions are not
    /// written yet (their contents are not read back).
    fn check(&self, extra_owners: &[u32], unwritten: &BTreeSet<u64>) {
        let bs = self.bs;
        // 1. Refcounts.
        let mut expected = vec![0u32; self.n_blocks];
        for (id, seq) in &self.seqs {
            let ids = seq.table.block_ids();
            assert_eq!(
                ids.len(),
                seq.table.len().div_ceil(bs),
                "sequence {id}: blocks for its length"
            );
            if !unwritten.contains(id) {
                assert_eq!(seq.table.len(), seq.tokens.len(), "sequence {id}: table and tokens");
            }
            for b in ids {
                expected[b as usize] += 1;
            }
        }
        let radix_ids = self.radix.block_ids();
        assert_eq!(radix_ids.len(), self.radix.len());
        for &b in radix_ids.iter().chain(extra_owners) {
            expected[b as usize] += 1;
        }
        let rc = self.pool.refcounts();
        if rc != expected {
            let (b, (got, want)) = rc.iter().zip(&expected).enumerate().find(|(_, (g, w))| g != w).unwrap();
            let holders: Vec<u64> = self
                .seqs
                .iter()
                .filter(|(_, s)| s.table.block_ids().contains(&(b as u32)))
                .map(|(id, _)| *id)
                .collect();
            panic!(
                "block {b}: refcount {got}, but {want} owners (sequences {holders:?}, {} radix nodes, {} pending)",
                radix_ids.iter().filter(|&&r| r as usize == b).count(),
                extra_owners.iter().filter(|&&r| r as usize == b).count(),
            );
        }
        // 2. Pool stats.
        let stats = self.pool.stats();
        assert_eq!(stats.total, self.n_blocks);
        assert_eq!(stats.free + stats.used, stats.total, "{stats:?}");
        assert_eq!(stats.used, rc.iter().filter(|&&r| r > 0).count(), "{stats:?}");
        assert_eq!(stats.shared, rc.iter().filter(|&&r| r > 1).count(), "{stats:?}");
        let distinct_cached: BTreeSet<u32> = radix_ids.iter().copied().collect();
        assert_eq!(stats.cached, distinct_cached.len(), "{stats:?}");
        if let Err(e) = self.pool.check_invariants() {
            panic!("pool invariants: {e}");
        }
        // 3. Contents.
        for (id, seq) in &self.seqs {
            if unwritten.contains(id) {
                continue;
            }
            for (p, &t) in seq.tokens.iter().enumerate() {
                let slot = seq.table.slot(p);
                assert_eq!(
                    self.store[slot as usize],
                    Some(t),
                    "sequence {id} position {p} (slot {slot}, blocks {:?}) lost its token",
                    seq.table.block_ids()
                );
            }
        }
        for (prefix, b) in self.radix.entries() {
            assert!(!prefix.is_empty() && prefix.len() % bs == 0, "radix prefix {prefix:?}");
            let want: Vec<Option<u32>> = prefix[prefix.len() - bs..].iter().map(|&t| Some(t)).collect();
            assert_eq!(
                self.block(b),
                want,
                "radix node {prefix:?}: block {b} holds other tokens"
            );
        }
    }

    /// Drops every sequence and clears the cache: the pool must be entirely free.
    fn finish(&mut self) {
        self.seqs.clear();
        self.radix.clear();
        assert!(self.radix.is_empty());
        let stats = self.pool.stats();
        assert_eq!(
            (stats.free, stats.used, stats.shared, stats.cached),
            (self.n_blocks, 0, 0, 0),
            "{stats:?}"
        );
        assert!(self.pool.refcounts().iter().all(|&r| r == 0));
        self.pool.check_invariants().unwrap();
    }
}

/// Prints where a run failed when a check panics.
struct FailureContext {
    seed: u64,
    bs: usize,
    n_blocks: usize,
    index: usize,
    op: &'static str,
}

impl Drop for FailureContext {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kv_property FAILED: seed {:#x}, block size {}, {} blocks, operation #{} ({})",
                self.seed, self.bs, self.n_blocks, self.index, self.op
            );
        }
    }
}

fn n_ops() -> usize {
    match std::env::var("QMTOT_KV_PROPERTY_OPS") {
        Ok(v) => v.parse().expect("QMTOT_KV_PROPERTY_OPS must be a number"),
        Err(_) if cfg!(debug_assertions) => 5_000,
        Err(_) => 100_000,
    }
}

fn run(seed: u64, bs: usize, n_blocks: usize, max_blocks: usize) {
    let ops = n_ops();
    let mut sim = Sim::new(seed, bs, n_blocks, max_blocks);
    let mut ctx = FailureContext {
        seed,
        bs,
        n_blocks,
        index: 0,
        op: "start",
    };
    sim.check_all();
    for i in 0..ops {
        ctx.index = i;
        ctx.op = sim.choose_op();
        sim.random_op(ctx.op);
        sim.check_all();
    }
    ctx.index = ops;
    ctx.op = "finish";
    println!(
        "seed {seed:#x}, block size {bs}, {n_blocks} blocks, {ops} operations: {:?}",
        sim.counts
    );
    if ops >= 2_000 {
        let c = &sim.counts;
        for (what, n) in [
            ("prefix-cache hits", c.prefix_hit_blocks),
            // With one-token blocks every block is full: nothing is ever copied.
            ("copy-on-write copies", if bs > 1 { c.cow_copies } else { 1 }),
            ("out-of-blocks", c.out_of_blocks),
            ("preemptions for room", c.preempted_for_room),
            ("given-up appends", c.gave_up),
            ("evictions", c.blocks_evicted),
        ] {
            assert!(n > 0, "the run never exercised {what}: {c:?}");
        }
    }
    sim.finish();
}

#[test]
fn random_ops_block_size_1() {
    run(0x5EED_0001, 1, 32, 12);
}

#[test]
fn random_ops_block_size_3() {
    run(0x5EED_0003, 3, 24, 8);
}

#[test]
fn random_ops_block_size_4() {
    run(0x5EED_0004, 4, 48, 12);
}

#[test]
fn random_ops_block_size_16() {
    run(0x5EED_0016, 16, 64, 10);
}

/// A parent with a half-filled last block forks three children; each child's first write goes
/// to a private copy of that block, the parent then writes in place, and the same holds one
/// level down (grandchildren of a child). Everyone reads back exactly their own tokens.
#[test]
fn forked_children_copy_a_shared_partial_block_before_writing() {
    let mut sim = Sim::new(0, 4, 32, 8);
    let parent = sim.submit_tokens(&[0, 1, 2, 3, 0, 1]).unwrap(); // block 0 full, block 1 half
    let [full, half] = sim.block_ids(parent)[..] else {
        panic!()
    };
    let kids: Vec<u64> = (0..3).map(|_| sim.fork(parent)).collect();
    assert_eq!(sim.pool.refcounts()[half as usize], 4);
    for (i, &kid) in kids.iter().enumerate() {
        let tokens = vec![10 + i as u32; i + 1];
        let copies = sim.extend(kid, &tokens, &BTreeSet::new()).unwrap();
        let ids = sim.block_ids(kid);
        assert_eq!(ids[0], full, "the full block stays shared");
        assert_eq!(copies, vec![(half, ids[1])], "child {i} copies the shared half block");
        sim.check_all();
    }
    // The parent is the half block's only owner now: it writes in place, no copy.
    assert_eq!(sim.pool.refcounts()[half as usize], 1);
    assert_eq!(sim.extend(parent, &[9, 9], &BTreeSet::new()).unwrap(), vec![]);
    assert_eq!(sim.block_ids(parent), vec![full, half]);
    assert_eq!(sim.pool.refcounts()[full as usize], 4);

    // One level down: kid 0 holds 7 tokens (its private block 3/4 full); fork it twice.
    let kid = kids[0];
    let kid_half = sim.block_ids(kid)[1];
    let grandkids = [sim.fork(kid), sim.fork(kid)];
    // Grandchild 0 crosses into a new block: copy the shared block, then one fresh block.
    let copies = sim.extend(grandkids[0], &[20, 21, 22], &BTreeSet::new()).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].0, kid_half);
    assert_eq!(sim.block_ids(grandkids[0]).len(), 3);
    // The kid still shares its block with grandchild 1: it copies too.
    let copies = sim.extend(kid, &[30], &BTreeSet::new()).unwrap();
    assert_eq!(copies.len(), 1);
    // Grandchild 1 is now the block's only owner.
    assert_eq!(sim.extend(grandkids[1], &[40], &BTreeSet::new()).unwrap(), vec![]);
    assert_eq!(sim.block_ids(grandkids[1])[1], kid_half);
    sim.check_all();

    let some = |v: &[u32]| v.iter().map(|&t| Some(t)).collect::<Vec<_>>();
    assert_eq!(sim.read(parent), some(&[0, 1, 2, 3, 0, 1, 9, 9]));
    assert_eq!(sim.read(kids[0]), some(&[0, 1, 2, 3, 0, 1, 10, 30]));
    assert_eq!(sim.read(kids[1]), some(&[0, 1, 2, 3, 0, 1, 11, 11]));
    assert_eq!(sim.read(kids[2]), some(&[0, 1, 2, 3, 0, 1, 12, 12, 12]));
    assert_eq!(sim.read(grandkids[0]), some(&[0, 1, 2, 3, 0, 1, 10, 20, 21, 22]));
    assert_eq!(sim.read(grandkids[1]), some(&[0, 1, 2, 3, 0, 1, 10, 40]));
    sim.finish();
}

/// Finished sequences leave their full blocks in the cache; a new request reuses them; once
/// nothing else holds them, eviction (cascading up from the leaves) returns every block.
#[test]
fn releasing_everything_returns_the_pool_to_free() {
    let mut sim = Sim::new(0, 4, 32, 8);
    let a = sim.submit_tokens(&[1, 2, 3, 0, 1, 2, 3, 0, 1, 2]).unwrap(); // 2 full blocks + 2
    let b = sim.fork(a);
    sim.extend(b, &[3, 3, 3, 3, 3], &BTreeSet::new()).unwrap(); // 3 full + 3
    let c = sim.submit_tokens(&[1, 2, 3, 0, 2, 2, 2, 2, 2]).unwrap(); // nothing cached yet
    for id in [a, b, c] {
        sim.release(id);
        sim.check_all();
    }
    // Cached: [1230] → [1230] → [1233], and [1230] → [2222].
    assert_eq!(sim.radix.len(), 4);
    let stats = sim.pool.stats();
    assert_eq!((stats.used, stats.cached, stats.shared), (4, 4, 0), "{stats:?}");

    // A new request over the same prefix takes 3 cached blocks and computes 1 token.
    let d = sim.submit_tokens(&[1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 3, 7]).unwrap();
    assert_eq!(sim.counts.prefix_hit_blocks, 3);
    assert_eq!(sim.evict(usize::MAX), 1, "only the [2222] leaf is unreferenced");
    sim.release(d);
    sim.check_all();
    assert_eq!(sim.evict(usize::MAX), 3);
    assert!(sim.radix.is_empty());
    assert_eq!(sim.pool.stats().free, 32);
    sim.finish();
}

/// An append that cannot get its blocks (here: one fresh block plus the copy of a shared
/// half block) fails with `OutOfBlocks` and changes nothing; a smaller one then succeeds.
#[test]
fn an_append_that_cannot_get_blocks_allocates_nothing() {
    let pool = BlockPool::new(4, 4).unwrap();
    let mut a = BlockTable::new(4);
    a.append(&pool, 6).unwrap(); // 2 blocks, the second half full
    let mut b = a.fork();
    let _other = pool.alloc().unwrap();
    assert_eq!(pool.stats().free, 1);
    let (rc, stats) = (pool.refcounts(), pool.stats());
    match b.append(&pool, 3) {
        Err(Error::OutOfBlocks {
            needed: 2,
            free: 1,
            total: 4,
        }) => {}
        other => panic!("expected OutOfBlocks {{ needed: 2, free: 1, total: 4 }}, got {other:?}"),
    }
    assert_eq!(pool.refcounts(), rc);
    assert_eq!(pool.stats(), stats);
    assert_eq!((b.len(), b.block_ids()), (6, a.block_ids()));
    pool.check_invariants().unwrap();
    // Filling the half block needs only its copy.
    let appended = b.append(&pool, 2).unwrap();
    assert_eq!(appended.copies, vec![(a.block_ids()[1], 3)]);
    assert_eq!(pool.stats().free, 0);
    drop(appended);
    drop((a, b));
    assert_eq!(pool.stats().free, 3);
}
