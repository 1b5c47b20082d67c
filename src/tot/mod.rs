//! QM-ToT: tree-of-thought search over multiple-choice questions, inside the engine.
//!
//! * [`tree`]: the tree of one question (also the trace format);
//! * [`search`]: BFS / beam / DFS as a state machine that hands out jobs;
//! * [`aggregate`]: path scores and the vote over the leaves;
//! * [`prompts`]: the prompt templates and their chat-template rendering;
//! * [`runner`]: carries the jobs out on the [`Engine`](crate::engine::Engine), every node a
//!   sequence (expand = fork, prune = release), many questions per step;
//! * [`draw`]: a tree as a self-contained HTML page with an SVG picture.

pub mod aggregate;
pub mod draw;
pub mod prompts;
pub mod runner;
pub mod search;
pub mod tree;

pub use prompts::{Prompts, Rendered};
pub use runner::{ForkRecord, RunStats, Runner, RunnerConfig, Solved, TokenCounts};
pub use search::{Action, Job, JobKind, Outcome, Search, SearchConfig, StepKind, Strategy, Thought, Vote};
pub use tree::{Decision, Node, NodeId, NodeStatus, StepValue, Tree};
