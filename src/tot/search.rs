//! Tree search over thoughts, written as a state machine with no model inside: the search
//! hands out [`Action`]s (run this job on that node, release that node) and is told each job's
//! [`Outcome`]. A runner executes the actions on the engine (`runner.rs`), many questions at
//! once; tests execute them on a scripted fake model. The search therefore never blocks and
//! never sees tokens.
//!
//! A node's life: created with its thought → evaluated (the jobs its level needs) → a leaf
//! (sufficient, or forced at the depth limit), or kept for expansion, or pruned. Jobs:
//! * `Propose { k }`: sample `k` next steps from the node (the runner forks it `k` times);
//! * `Value`: step evaluator (sure / likely / impossible);
//! * `Sufficiency`: can the question be answered now (yes / no); issued with `Answer`;
//! * `Answer`: the option letters' distribution (forced at the depth limit);
//! * `Judge`: is the whole path convincing (yes / no), for leaves when the vote weighs paths.
//!
//! Strategies:
//! * `Bfs`: every evaluated non-leaf node below the depth limit is expanded at once (no
//!   waiting for its level); with `value_threshold`, nodes below it are pruned. With `k = 3`,
//!   `d = 2`, sufficiency at every node, a forced answer at depth `d` and a majority vote, this
//!   is the published QM-ToT rollout.
//! * `Beam { breadth }`: level by level; when a level is evaluated, its `breadth` best
//!   non-leaf nodes by value (above `value_threshold`, if set) are expanded, the rest pruned.
//! * `Dfs { max_leaves }`: expands one node at a time, best child first, pruning children
//!   below `value_threshold` (default [`DEFAULT_DFS_THRESHOLD`]); stops after `max_leaves`
//!   leaves or when nothing is left.
//!
//! If a search ends without a leaf (everything pruned), the root is asked for a forced answer,
//! so every question gets one.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::aggregate;
use super::tree::{NodeId, NodeStatus, StepValue, Tree};
use crate::engine::sampler::argmax;
use crate::error::{Error, Result};

/// DFS prunes children whose value is below this unless `value_threshold` says otherwise.
pub const DEFAULT_DFS_THRESHOLD: f32 = 0.3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Bfs,
    Beam { breadth: usize },
    Dfs { max_leaves: usize },
}

/// How the leaves' answers become one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// One vote per leaf; ties go to the letter with more probability mass over the leaves.
    Majority,
    /// Each leaf votes with its path score × the probability of its letter.
    Weighted,
    /// The answer of the leaf with the highest path score × letter probability.
    Best,
}

/// What one generation job produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// One reasoning step (a line).
    Line,
    /// A whole chain of thought (chain-of-thought and self-consistency baselines).
    Chain,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub strategy: Strategy,
    /// Thoughts proposed per expansion (k).
    pub branching: usize,
    /// Depth limit (d): nodes at this depth give a forced answer.
    pub depth: usize,
    /// Ask "can it be answered now" at every node above the depth limit.
    pub sufficiency: bool,
    /// P(yes) from which a node counts as sufficient.
    pub sufficiency_threshold: f32,
    /// Prune nodes whose step value is below this.
    pub value_threshold: Option<f32>,
    pub vote: Vote,
    pub step: StepKind,
}

impl SearchConfig {
    /// The published QM-ToT rollout: k = 3, sufficiency at every node, d = 2, forced answer,
    /// majority vote.
    pub fn published() -> Self {
        Self {
            strategy: Strategy::Bfs,
            branching: 3,
            depth: 2,
            sufficiency: true,
            sufficiency_threshold: 0.5,
            value_threshold: None,
            vote: Vote::Majority,
            step: StepKind::Line,
        }
    }

    /// `n` whole chains of thought, each answered, then a majority vote (`n = 1`: plain
    /// chain of thought; more: self-consistency).
    pub fn chains(n: usize) -> Self {
        Self {
            strategy: Strategy::Bfs,
            branching: n,
            depth: 1,
            sufficiency: false,
            sufficiency_threshold: 0.5,
            value_threshold: None,
            vote: Vote::Majority,
            step: StepKind::Chain,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("search: {m}")));
        if self.branching == 0 {
            return bad("branching (k) must be at least 1");
        }
        if self.depth == 0 {
            return bad("depth (d) must be at least 1");
        }
        match self.strategy {
            Strategy::Beam { breadth: 0 } => return bad("beam breadth must be at least 1"),
            Strategy::Dfs { max_leaves: 0 } => return bad("dfs max leaves must be at least 1"),
            _ => {}
        }
        if !(0.0..=1.0).contains(&self.sufficiency_threshold) {
            return bad("sufficiency threshold must be in [0, 1]");
        }
        if self.value_threshold.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return bad("value threshold must be in [0, 1]");
        }
        Ok(())
    }

    /// Whether nodes need a step value (for pruning, ordering or weighting).
    pub fn needs_value(&self) -> bool {
        !matches!(self.strategy, Strategy::Bfs) || self.value_threshold.is_some() || self.vote != Vote::Majority
    }

    /// Whether leaves need a path judgement.
    pub fn needs_judge(&self) -> bool {
        self.vote != Vote::Majority
    }

    fn prune_below(&self) -> Option<f32> {
        match self.strategy {
            Strategy::Dfs { .. } => Some(self.value_threshold.unwrap_or(DEFAULT_DFS_THRESHOLD)),
            _ => self.value_threshold,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Propose { k: usize },
    Value,
    Sufficiency,
    Answer,
    Judge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Job {
    pub node: NodeId,
    pub kind: JobKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Run(Job),
    /// The node's sequence is no longer needed (expanded, pruned, or a finished leaf).
    Release(NodeId),
}

/// A sampled thought.
#[derive(Clone, Debug, PartialEq)]
pub struct Thought {
    pub text: String,
    pub tokens: usize,
    pub logprob: f32,
}

/// A job's result. Probabilities are renormalized over the job's candidates.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Proposed(Vec<Thought>),
    /// P(sure), P(likely), P(impossible), and the expected value.
    Value(StepValue),
    /// P(yes).
    Sufficiency(f32),
    /// P(letter), in option order.
    Answer(Vec<f32>),
    /// P(yes).
    Judge(f32),
}

pub struct Search {
    config: SearchConfig,
    tree: Tree,
    queue: VecDeque<Action>,
    /// Jobs handed out and not yet completed.
    running: usize,
    /// DFS: nodes to expand, best last.
    stack: Vec<NodeId>,
    done: bool,
}

impl Search {
    /// Starts a search on `tree` (holding its root): the first action proposes the root's
    /// children.
    pub fn new(config: SearchConfig, tree: Tree) -> Result<Self> {
        config.validate()?;
        if tree.options.is_empty() {
            return Err(Error::InvalidArgument("search: a question needs options".into()));
        }
        let mut s = Self {
            config,
            tree,
            queue: VecDeque::new(),
            running: 0,
            stack: Vec::new(),
            done: false,
        };
        s.expand(Tree::ROOT);
        Ok(s)
    }

    pub fn config(&self) -> &SearchConfig {
        &self.config
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn into_tree(self) -> Tree {
        self.tree
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Actions to carry out now (each handed out once).
    pub fn poll(&mut self) -> Vec<Action> {
        let actions: Vec<Action> = self.queue.drain(..).collect();
        self.running += actions.iter().filter(|a| matches!(a, Action::Run(_))).count();
        actions
    }

    /// Records a job's outcome; returns the nodes it created (for `Propose`, one per thought,
    /// in order).
    pub fn complete(&mut self, job: Job, outcome: Outcome) -> Result<Vec<NodeId>> {
        if job.node >= self.tree.nodes.len() || self.running == 0 {
            return Err(Error::InvalidArgument(format!("search: no such job running: {job:?}")));
        }
        self.running -= 1;
        let n_letters = self.tree.options.len();
        let mut created = Vec::new();
        match (job.kind, outcome) {
            (JobKind::Propose { k }, Outcome::Proposed(thoughts)) if thoughts.len() == k => {
                for t in thoughts {
                    let child = self.tree.add_child(job.node);
                    let c = self.tree.node_mut(child);
                    c.thought = t.text;
                    c.tokens = t.tokens;
                    c.logprob = t.logprob;
                    created.push(child);
                }
                self.tree.node_mut(job.node).status = NodeStatus::Expanded;
                self.queue.push_back(Action::Release(job.node));
                for &c in &created {
                    self.evaluate(c);
                }
            }
            (JobKind::Value, Outcome::Value(v)) => {
                self.tree.node_mut(job.node).value = Some(v);
                self.evaluated_part(job.node);
            }
            (JobKind::Sufficiency, Outcome::Sufficiency(p)) => {
                self.tree.node_mut(job.node).sufficient = Some(p);
                self.evaluated_part(job.node);
            }
            (JobKind::Answer, Outcome::Answer(p)) if p.len() == n_letters => {
                self.tree.node_mut(job.node).letters = Some(p);
                self.evaluated_part(job.node);
            }
            (JobKind::Judge, Outcome::Judge(p)) => {
                let node = self.tree.node_mut(job.node);
                node.judge = Some(p);
                self.finish_leaf(job.node);
            }
            (kind, outcome) => {
                return Err(Error::InvalidArgument(format!(
                    "search: outcome {outcome:?} does not fit job {kind:?}"
                )))
            }
        }
        self.progress();
        Ok(created)
    }

    fn run(&mut self, node: NodeId, kind: JobKind) {
        self.queue.push_back(Action::Run(Job { node, kind }));
    }

    fn expand(&mut self, node: NodeId) {
        self.tree.node_mut(node).status = NodeStatus::Expanding;
        self.run(
            node,
            JobKind::Propose {
                k: self.config.branching,
            },
        );
    }

    fn prune(&mut self, node: NodeId) {
        self.tree.node_mut(node).status = NodeStatus::Pruned;
        self.queue.push_back(Action::Release(node));
    }

    /// Issues the evaluation jobs a new node needs.
    fn evaluate(&mut self, node: NodeId) {
        let at_limit = self.tree.node(node).depth >= self.config.depth;
        let mut jobs = Vec::new();
        if self.config.needs_value() {
            jobs.push(JobKind::Value);
        }
        if at_limit {
            self.tree.node_mut(node).forced = true;
            jobs.push(JobKind::Answer);
        } else if self.config.sufficiency {
            jobs.push(JobKind::Sufficiency);
            jobs.push(JobKind::Answer);
        }
        self.tree.node_mut(node).waiting = jobs.len();
        if jobs.is_empty() {
            self.evaluated(node);
        }
        for kind in jobs {
            self.run(node, kind);
        }
    }

    fn evaluated_part(&mut self, node: NodeId) {
        let n = self.tree.node_mut(node);
        n.waiting = n.waiting.saturating_sub(1);
        if n.waiting == 0 {
            self.evaluated(node);
        }
    }

    /// All of a node's evaluations are in: make it a leaf, or keep it for the strategy.
    fn evaluated(&mut self, node: NodeId) {
        let threshold = self.config.sufficiency_threshold;
        let n = self.tree.node(node);
        let answers = n.forced || n.sufficient.is_some_and(|p| p >= threshold);
        if answers {
            let letters = self.tree.letters();
            let n = self.tree.node_mut(node);
            n.status = NodeStatus::Leaf;
            n.answer = n.letters.as_deref().map(|p| letters[argmax(p) as usize]);
            if self.config.needs_judge() {
                self.run(node, JobKind::Judge);
            } else {
                self.finish_leaf(node);
            }
            return;
        }
        self.tree.node_mut(node).status = NodeStatus::Evaluated;
        if let Strategy::Bfs = self.config.strategy {
            if self.below_threshold(node) {
                self.prune(node);
            } else {
                self.expand(node);
            }
        }
        // Beam and DFS decide once the level / sibling group is evaluated (`progress`).
    }

    fn below_threshold(&self, node: NodeId) -> bool {
        match (self.config.prune_below(), self.tree.node(node).value) {
            (Some(t), Some(v)) => v.value < t,
            _ => false,
        }
    }

    /// A leaf is complete: score its path and release it.
    fn finish_leaf(&mut self, leaf: NodeId) {
        let score = aggregate::path_score(&self.tree, leaf);
        self.tree.node_mut(leaf).path_score = Some(score);
        self.queue.push_back(Action::Release(leaf));
    }

    /// Called after every completion: when nothing is running or queued, the strategy's next
    /// move (beam selection, DFS descent) or the end.
    fn progress(&mut self) {
        if self.done || self.running > 0 || self.queue.iter().any(|a| matches!(a, Action::Run(_))) {
            return;
        }
        let waiting: Vec<NodeId> = self
            .tree
            .nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Evaluated)
            .map(|n| n.id)
            .collect();
        match self.config.strategy {
            Strategy::Bfs => {}
            Strategy::Beam { breadth } => {
                let mut keep: Vec<NodeId> = waiting.iter().copied().filter(|&n| !self.below_threshold(n)).collect();
                keep.sort_by(|&a, &b| self.value_of(b).total_cmp(&self.value_of(a)).then(a.cmp(&b)));
                keep.truncate(breadth);
                for n in waiting {
                    if keep.contains(&n) {
                        self.expand(n);
                    } else {
                        self.prune(n);
                    }
                }
            }
            Strategy::Dfs { max_leaves } => {
                // `waiting` are the children of the node just expanded: best on top of the stack.
                let mut children: Vec<NodeId> = Vec::new();
                let fresh: Vec<NodeId> = waiting.into_iter().filter(|n| !self.stack.contains(n)).collect();
                for n in fresh {
                    if self.below_threshold(n) {
                        self.prune(n);
                    } else {
                        children.push(n);
                    }
                }
                children.sort_by(|&a, &b| self.value_of(a).total_cmp(&self.value_of(b)).then(b.cmp(&a)));
                self.stack.extend(children);
                if self.tree.leaves().count() >= max_leaves {
                    for n in std::mem::take(&mut self.stack) {
                        self.prune(n);
                    }
                } else if let Some(next) = self.stack.pop() {
                    self.tree.node_mut(next).status = NodeStatus::Evaluated;
                    self.expand(next);
                }
            }
        }
        if self.queue.iter().any(|a| matches!(a, Action::Run(_))) {
            return;
        }
        if self.tree.leaves().count() == 0 && !self.tree.node(Tree::ROOT).forced {
            // Nothing answered: ask the root.
            let root = self.tree.node_mut(Tree::ROOT);
            root.forced = true;
            root.waiting = 1;
            self.run(Tree::ROOT, JobKind::Answer);
            return;
        }
        self.tree.decision = Some(aggregate::decide(&self.tree, self.config.vote));
        self.done = true;
    }

    fn value_of(&self, n: NodeId) -> f32 {
        self.tree.node(n).value.map_or(0.0, |v| v.value)
    }
}
