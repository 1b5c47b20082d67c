//! The tree search over a scripted fake model: deterministic thoughts and scores keyed by the
//! node's path label ("2.1" = the first child of the root's second child), KV blocks tracked
//! with the real block pool (every node a block table forked from its parent), so the tests
//! see which nodes were visited, pruned, forced and released.

use std::collections::HashMap;

use qmtot::kv::{BlockPool, BlockTable};
use qmtot::tot::{
    Action, Job, JobKind, NodeId, NodeStatus, Outcome, Search, SearchConfig, StepValue, Strategy, Thought, Tree, Vote,
};

const BLOCK: usize = 4;

/// Scores by path label; anything not scripted gets the defaults.
#[derive(Default)]
struct Script {
    value: HashMap<&'static str, f32>,
    sufficient: HashMap<&'static str, f32>,
    /// P(letter) over A, B, C, D.
    letters: HashMap<&'static str, [f32; 4]>,
    judge: HashMap<&'static str, f32>,
}

struct Fake {
    script: Script,
    pool: BlockPool,
    /// Block tables of the nodes not yet released.
    tables: HashMap<NodeId, BlockTable>,
    /// Every job run, as (kind, node label).
    log: Vec<(JobKind, String)>,
    released: Vec<String>,
}

fn label(tree: &Tree, node: NodeId) -> String {
    let key: Vec<String> = tree.path_key(node).iter().map(|i| (i + 1).to_string()).collect();
    if key.is_empty() {
        "root".into()
    } else {
        key.join(".")
    }
}

impl Fake {
    fn new(script: Script) -> Self {
        let pool = BlockPool::new(4096, BLOCK).unwrap();
        let mut root = BlockTable::new(BLOCK);
        root.append(&pool, 10).unwrap(); // the question
        Self {
            script,
            pool,
            tables: HashMap::from([(Tree::ROOT, root)]),
            log: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Runs the search to the end, answering every job in the order handed out.
    fn run(&mut self, search: &mut Search) {
        let mut guard = 0;
        while !search.is_done() {
            guard += 1;
            assert!(guard < 10_000, "the search does not end");
            let actions = search.poll();
            assert!(!actions.is_empty(), "a search that is not done must have work");
            for action in actions {
                match action {
                    Action::Release(node) => {
                        self.released.push(label(search.tree(), node));
                        self.tables.remove(&node);
                    }
                    Action::Run(job) => {
                        let outcome = self.outcome(search.tree(), job);
                        let created = search.complete(job, outcome).unwrap();
                        // A child's table is a fork of its parent's plus its thought's tokens.
                        for c in created {
                            let mut t = self.tables[&job.node].fork();
                            t.append(&self.pool, 6).unwrap();
                            self.tables.insert(c, t);
                        }
                    }
                }
            }
        }
        // What is left once decided: releases only.
        for action in search.poll() {
            let Action::Release(node) = action else {
                panic!("a job after the decision: {action:?}")
            };
            self.released.push(label(search.tree(), node));
            self.tables.remove(&node);
        }
    }

    fn outcome(&mut self, tree: &Tree, job: Job) -> Outcome {
        let l = label(tree, job.node);
        self.log.push((job.kind, l.clone()));
        let s = &self.script;
        let key = l.as_str();
        if !matches!(job.kind, JobKind::Propose { .. }) {
            // An evaluator forks the node and appends its question, then lets go.
            // (A released node asked again — the root's forced answer — starts afresh.)
            let mut eval = match self.tables.get(&job.node) {
                Some(t) => t.fork(),
                None => BlockTable::new(BLOCK),
            };
            eval.append(&self.pool, 3).unwrap();
        }
        match job.kind {
            JobKind::Propose { k } => Outcome::Proposed(
                (0..k)
                    .map(|i| Thought {
                        text: if l == "root" {
                            format!("{}", i + 1)
                        } else {
                            format!("{l}.{}", i + 1)
                        },
                        tokens: 6,
                        logprob: -1.0,
                    })
                    .collect(),
            ),
            JobKind::Value => {
                let v = s.value.get(key).copied().unwrap_or(0.5);
                Outcome::Value(StepValue {
                    sure: v,
                    likely: 0.0,
                    impossible: 1.0 - v,
                    value: v,
                })
            }
            JobKind::Sufficiency => Outcome::Sufficiency(s.sufficient.get(key).copied().unwrap_or(0.1)),
            JobKind::Answer => Outcome::Answer(s.letters.get(key).copied().unwrap_or([0.4, 0.3, 0.2, 0.1]).to_vec()),
            JobKind::Judge => Outcome::Judge(s.judge.get(key).copied().unwrap_or(0.5)),
        }
    }

    fn proposed(&self) -> Vec<&str> {
        self.log
            .iter()
            .filter(|(k, _)| matches!(k, JobKind::Propose { .. }))
            .map(|(_, l)| l.as_str())
            .collect()
    }
}

fn question() -> Tree {
    Tree::new(
        "q:1",
        "Which nerve?",
        ['A', 'B', 'C', 'D']
            .iter()
            .map(|&l| (l, format!("option {l}")))
            .collect(),
        Some('B'),
    )
}

fn labels_with(tree: &Tree, status: NodeStatus) -> Vec<String> {
    let mut v: Vec<String> = tree
        .nodes
        .iter()
        .filter(|n| n.status == status)
        .map(|n| label(tree, n.id))
        .collect();
    v.sort();
    v
}

/// Every node's blocks went back to the pool.
fn assert_all_released(fake: &Fake, tree: &Tree) {
    assert!(
        fake.tables.is_empty(),
        "nodes never released: {:?}",
        fake.tables.keys().collect::<Vec<_>>()
    );
    assert_eq!(fake.pool.stats().used, 0, "blocks still held");
    let mut released = fake.released.clone();
    released.sort();
    released.dedup();
    assert_eq!(released.len(), tree.nodes.len(), "every node released once");
}

#[test]
fn published_rollout_expands_to_depth_two_forces_answers_and_takes_the_majority() {
    let mut letters = HashMap::new();
    // Depth-2 leaves under "1" say B, the rest say A by default — 3 B and 6 A, unless "2"
    // stops early: then 3 B + 3 A + "2" itself.
    letters.insert("1.1", [0.1, 0.7, 0.1, 0.1]);
    letters.insert("1.2", [0.1, 0.7, 0.1, 0.1]);
    letters.insert("1.3", [0.1, 0.7, 0.1, 0.1]);
    letters.insert("2", [0.0, 0.9, 0.05, 0.05]);
    let script = Script {
        sufficient: HashMap::from([("2", 0.8)]),
        letters,
        ..Default::default()
    };
    let mut fake = Fake::new(script);
    let mut search = Search::new(SearchConfig::published(), question()).unwrap();
    fake.run(&mut search);
    let tree = search.tree();
    // "2" was sufficient: a leaf at depth 1, never expanded.
    assert_eq!(fake.proposed(), vec!["root", "1", "3"]);
    assert_eq!(tree.nodes.len(), 1 + 3 + 6);
    let leaves = labels_with(tree, NodeStatus::Leaf);
    assert_eq!(leaves, vec!["1.1", "1.2", "1.3", "2", "3.1", "3.2", "3.3"]);
    for n in tree.leaves() {
        assert_eq!(n.forced, n.depth == 2, "forced answers exactly at the depth limit");
    }
    // No values or judges in the published rollout.
    assert!(fake
        .log
        .iter()
        .all(|(k, _)| !matches!(k, JobKind::Value | JobKind::Judge)));
    // Sufficiency asked at every depth-1 node, never at depth 2.
    let asked: Vec<&str> = fake
        .log
        .iter()
        .filter(|(k, _)| *k == JobKind::Sufficiency)
        .map(|(_, l)| l.as_str())
        .collect();
    assert_eq!(asked, vec!["1", "2", "3"]);
    let d = tree.decision.as_ref().unwrap();
    assert_eq!(d.answer, Some('B'), "4 B votes against 3 A: {:?}", d.votes);
    assert_eq!(d.votes[1], ('B', 4.0));
    assert_eq!(d.votes[0], ('A', 3.0));
    assert_all_released(&fake, tree);
}

#[test]
fn beam_keeps_the_best_per_level_and_releases_the_pruned() {
    let script = Script {
        value: HashMap::from([
            ("1", 0.2),
            ("2", 0.9),
            ("3", 0.6),
            ("2.1", 0.3),
            ("2.2", 0.8),
            ("2.3", 0.1),
        ]),
        ..Default::default()
    };
    let mut fake = Fake::new(script);
    let config = SearchConfig {
        strategy: Strategy::Beam { breadth: 1 },
        depth: 3,
        sufficiency: false,
        ..SearchConfig::published()
    };
    let mut search = Search::new(config, question()).unwrap();
    fake.run(&mut search);
    let tree = search.tree();
    assert_eq!(fake.proposed(), vec!["root", "2", "2.2"]);
    assert_eq!(labels_with(tree, NodeStatus::Pruned), vec!["1", "2.1", "2.3", "3"]);
    assert_eq!(labels_with(tree, NodeStatus::Leaf), vec!["2.2.1", "2.2.2", "2.2.3"]);
    // Pruned nodes were released as soon as their level was decided: before the next level's
    // proposals came back.
    let pos = |l: &str| fake.released.iter().position(|r| r == l).unwrap();
    assert!(pos("1") < pos("2.1") && pos("3") < pos("2.1"));
    assert_all_released(&fake, tree);
}

#[test]
fn dfs_goes_best_first_prunes_below_the_threshold_and_stops_at_max_leaves() {
    let script = Script {
        value: HashMap::from([
            ("1", 0.9),
            ("2", 0.2),
            ("3", 0.6),
            ("1.1", 0.4),
            ("1.2", 0.7),
            ("1.3", 0.8),
        ]),
        sufficient: HashMap::from([("1.2", 0.9)]),
        ..Default::default()
    };
    let mut fake = Fake::new(script);
    let config = SearchConfig {
        strategy: Strategy::Dfs { max_leaves: 2 },
        depth: 3,
        value_threshold: Some(0.5),
        ..SearchConfig::published()
    };
    let mut search = Search::new(config, question()).unwrap();
    fake.run(&mut search);
    let tree = search.tree();
    // root → 1 (best) → 1.3 (best unanswered child; 1.2 answered, 1.1 pruned) → forced leaves.
    assert_eq!(fake.proposed(), vec!["root", "1", "1.3"]);
    assert_eq!(labels_with(tree, NodeStatus::Pruned), vec!["1.1", "2", "3"]);
    assert_eq!(
        labels_with(tree, NodeStatus::Leaf),
        vec!["1.2", "1.3.1", "1.3.2", "1.3.3"]
    );
    assert!(tree.leaves().all(|n| n.forced == (n.depth == 3)));
    assert_all_released(&fake, tree);
}

/// Two weak leaves say A; one strong leaf says B.
fn vote_script() -> Script {
    Script {
        value: HashMap::from([("1", 0.2), ("2", 0.2), ("3", 0.95)]),
        letters: HashMap::from([
            ("1", [0.5, 0.3, 0.1, 0.1]),
            ("2", [0.5, 0.3, 0.1, 0.1]),
            ("3", [0.05, 0.9, 0.05, 0.0]),
        ]),
        judge: HashMap::from([("1", 0.2), ("2", 0.2), ("3", 0.9)]),
        ..Default::default()
    }
}

fn vote_with(vote: Vote) -> (Option<char>, Vec<(char, f32)>, Option<NodeId>) {
    let mut fake = Fake::new(vote_script());
    let config = SearchConfig {
        depth: 1,
        vote,
        ..SearchConfig::published()
    };
    let mut search = Search::new(config, question()).unwrap();
    fake.run(&mut search);
    let judged = fake.log.iter().filter(|(k, _)| *k == JobKind::Judge).count();
    assert_eq!(judged, if vote == Vote::Majority { 0 } else { 3 });
    assert_all_released(&fake, search.tree());
    let d = search.tree().decision.clone().unwrap();
    (d.answer, d.votes, d.leaf)
}

#[test]
fn every_vote_rule_picks_its_answer() {
    let (answer, votes, _) = vote_with(Vote::Majority);
    assert_eq!(answer, Some('A'));
    assert_eq!(&votes[..2], &[('A', 2.0), ('B', 1.0)]);
    // Weighted: A = 2 × (mean(0.2, 0.2) × 0.5) = 0.2; B = mean(0.9, 0.95) × 0.9 ≈ 0.8325.
    let (answer, votes, leaf) = vote_with(Vote::Weighted);
    assert_eq!(answer, Some('B'));
    assert!(
        (votes[0].1 - 0.2).abs() < 1e-5 && (votes[1].1 - 0.8325).abs() < 1e-4,
        "{votes:?}"
    );
    assert_eq!(leaf, Some(3));
    let (answer, _, leaf) = vote_with(Vote::Best);
    assert_eq!((answer, leaf), (Some('B'), Some(3)));
}

#[test]
fn a_search_that_prunes_everything_asks_the_root() {
    let script = Script {
        letters: HashMap::from([("root", [0.1, 0.1, 0.7, 0.1])]),
        ..Default::default()
    };
    let mut fake = Fake::new(script);
    let config = SearchConfig {
        value_threshold: Some(0.9), // every default value (0.5) is below
        ..SearchConfig::published()
    };
    let mut search = Search::new(config, question()).unwrap();
    fake.run(&mut search);
    let tree = search.tree();
    assert_eq!(labels_with(tree, NodeStatus::Pruned), vec!["1", "2", "3"]);
    assert!(tree.node(Tree::ROOT).forced);
    assert_eq!(tree.decision.as_ref().unwrap().answer, Some('C'));
    assert_eq!(fake.pool.stats().used, 0);
}

#[test]
fn mismatched_outcomes_and_bad_configs_are_errors() {
    let mut search = Search::new(SearchConfig::published(), question()).unwrap();
    let actions = search.poll();
    let Action::Run(job) = actions[0] else {
        panic!("first action proposes")
    };
    assert!(search.complete(job, Outcome::Judge(0.5)).is_err());
    assert!(search
        .complete(
            Job {
                node: 99,
                kind: JobKind::Value
            },
            Outcome::Judge(0.5)
        )
        .is_err());
    for bad in [
        SearchConfig {
            branching: 0,
            ..SearchConfig::published()
        },
        SearchConfig {
            depth: 0,
            ..SearchConfig::published()
        },
        SearchConfig {
            strategy: Strategy::Beam { breadth: 0 },
            ..SearchConfig::published()
        },
        SearchConfig {
            value_threshold: Some(1.5),
            ..SearchConfig::published()
        },
    ] {
        assert!(Search::new(bad, question()).is_err(), "{bad:?}");
    }
}
