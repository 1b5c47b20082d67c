//! The tree of thoughts of one question: nodes with their thought text, scores and status, and
//! the final decision. This is also the trace format (`--trace FILE.json`, `qmtot draw`), so
//! everything here is plain data that serializes.
//!
//! Invariants: `nodes[i].id == i`; node 0 is the root (no thought, depth 0); a child's depth is
//! its parent's plus one; `children` lists ids in the order the thoughts were sampled, and
//! `index` is a node's position among its siblings (so `path_key` names a node the same way in
//! every run, whatever order the engine finished things in).

use serde::{Deserialize, Serialize};

use super::search::Vote;

pub type NodeId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Created; its evaluations are running.
    Open,
    /// Evaluated, not an answer; waiting for the search to expand or prune it.
    Evaluated,
    /// Its children are being sampled.
    Expanding,
    /// Its children exist.
    Expanded,
    /// Dropped by the search (value below the threshold, or outside the beam).
    Pruned,
    /// Answers the question (sufficient, or forced at the depth limit).
    Leaf,
}

impl NodeStatus {
    /// Whether the node's fate is known: an answer, pruned, or chosen for expansion.
    pub fn is_decided(self) -> bool {
        matches!(
            self,
            NodeStatus::Leaf | NodeStatus::Pruned | NodeStatus::Expanding | NodeStatus::Expanded
        )
    }
}

/// The step evaluator's verdict: probabilities of sure / likely / impossible (renormalized over
/// the three) and the expected value under the configured weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepValue {
    pub sure: f32,
    pub likely: f32,
    pub impossible: f32,
    pub value: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    pub depth: usize,
    /// Position among its siblings.
    pub index: usize,
    /// The reasoning step this node adds (empty at the root).
    pub thought: String,
    /// Tokens generated for the thought.
    pub tokens: usize,
    /// log p of the thought's tokens.
    pub logprob: f32,
    pub status: NodeStatus,
    pub value: Option<StepValue>,
    /// P(yes) of "can the question be answered now".
    pub sufficient: Option<f32>,
    /// P(option letter), in option order.
    pub letters: Option<Vec<f32>>,
    /// P(yes) of "is this path convincing" (leaves).
    pub judge: Option<f32>,
    /// The leaf's answer.
    pub answer: Option<char>,
    /// The answer was forced (depth limit, or no leaf was found).
    pub forced: bool,
    /// The leaf's weight in the vote (see `Search`).
    pub path_score: Option<f32>,
    /// Evaluation jobs still running.
    #[serde(skip)]
    pub(crate) waiting: usize,
}

impl Node {
    fn new(id: NodeId, parent: Option<NodeId>, depth: usize, index: usize) -> Self {
        Self {
            id,
            parent,
            children: Vec::new(),
            depth,
            index,
            thought: String::new(),
            tokens: 0,
            logprob: 0.0,
            status: NodeStatus::Open,
            value: None,
            sufficient: None,
            letters: None,
            judge: None,
            answer: None,
            forced: false,
            path_score: None,
            waiting: 0,
        }
    }
}

/// What the search concluded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub answer: Option<char>,
    pub vote: Vote,
    /// Votes per letter, in option order (counts for a majority vote, weights otherwise).
    pub votes: Vec<(char, f32)>,
    /// The leaf that best supports the answer.
    pub leaf: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub question_id: String,
    pub stem: String,
    pub options: Vec<(char, String)>,
    pub gold: Option<char>,
    pub nodes: Vec<Node>,
    pub decision: Option<Decision>,
}

impl Tree {
    /// A tree holding only the root.
    pub fn new(question_id: &str, stem: &str, options: Vec<(char, String)>, gold: Option<char>) -> Self {
        Self {
            question_id: question_id.into(),
            stem: stem.into(),
            options,
            gold,
            nodes: vec![Node::new(0, None, 0, 0)],
            decision: None,
        }
    }

    pub const ROOT: NodeId = 0;

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    /// Adds a child of `parent` and returns its id.
    pub(crate) fn add_child(&mut self, parent: NodeId) -> NodeId {
        let id = self.nodes.len();
        let depth = self.nodes[parent].depth + 1;
        let index = self.nodes[parent].children.len();
        self.nodes.push(Node::new(id, Some(parent), depth, index));
        self.nodes[parent].children.push(id);
        id
    }

    /// Node ids from the root to `id`, both included.
    pub fn path(&self, id: NodeId) -> Vec<NodeId> {
        let mut path = vec![id];
        let mut at = id;
        while let Some(p) = self.nodes[at].parent {
            path.push(p);
            at = p;
        }
        path.reverse();
        path
    }

    /// Sibling indices from the root to `id`: a name for the node that does not depend on
    /// the order nodes were created in.
    pub fn path_key(&self, id: NodeId) -> Vec<usize> {
        self.path(id).iter().skip(1).map(|&n| self.nodes[n].index).collect()
    }

    /// The thoughts from the root to `id`, in order.
    pub fn thoughts(&self, id: NodeId) -> Vec<&str> {
        self.path(id)
            .iter()
            .skip(1)
            .map(|&n| self.nodes[n].thought.as_str())
            .collect()
    }

    /// Leaves (answering nodes) in id order.
    pub fn leaves(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.status == NodeStatus::Leaf)
    }

    /// Thoughts in the tree (every node but the root).
    pub fn thought_count(&self) -> usize {
        self.nodes.len() - 1
    }

    pub fn letters(&self) -> Vec<char> {
        self.options.iter().map(|o| o.0).collect()
    }
}
