//! Command-line options of the tree methods (`tot`, and `cot` / `sc` as chains), shared by
//! `qmtot eval`, `tot`, `distill` and `bench tot`.

use std::path::PathBuf;

use clap::Args;

use qmtot::engine::SamplingParams;
use qmtot::error::{Error, Result};
use qmtot::eval::harness::read_results;
use qmtot::tokenizer::Tokenizer;
use qmtot::tot::{Prompts, Rendered, RunnerConfig, SearchConfig, StepKind, Strategy, Vote};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    Bfs,
    Beam,
    Dfs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VoteArg {
    Majority,
    Weighted,
    Best,
}

#[derive(Args, Clone, Debug)]
pub struct SearchArgs {
    /// Thoughts proposed per expanded node (k).
    #[arg(short = 'k', long, default_value_t = 3)]
    pub branching: usize,
    /// Depth limit (d): nodes at this depth give a forced answer.
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// bfs (expand every unanswered node), beam (keep the --breadth best per level), dfs (best
    /// child first, pruning by --value-threshold, until --max-leaves leaves).
    #[arg(long, value_enum, default_value_t = StrategyArg::Bfs)]
    pub strategy: StrategyArg,
    /// Beam breadth; setting it turns on beam search with value pruning.
    #[arg(long)]
    pub breadth: Option<usize>,
    /// DFS: stop after this many answering leaves.
    #[arg(long, default_value_t = 3)]
    pub max_leaves: usize,
    /// Prune nodes whose step value (sure = 1, likely = 0.5, impossible = 0) is below this.
    #[arg(long)]
    pub value_threshold: Option<f32>,
    /// How leaves' answers become one.
    #[arg(long, value_enum, default_value_t = VoteArg::Majority)]
    pub vote: VoteArg,
    /// Do not ask at every node whether it can already be answered.
    #[arg(long)]
    pub no_sufficiency: bool,
    /// P(yes) from which a node counts as able to answer.
    #[arg(long, default_value_t = 0.5)]
    pub sufficiency_threshold: f32,
    /// Sampling temperature of thoughts (cot is always greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling mass of thoughts (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Base seed; each node's seed derives from it, the question id and the node's path.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per reasoning step.
    #[arg(long, default_value_t = 64)]
    pub step_tokens: usize,
    /// Most tokens per chain (cot, sc).
    #[arg(long, default_value_t = 256)]
    pub chain_tokens: usize,
    /// sc: chains per question.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// sc: choose the number of chains so that sc generates about as many tokens per question
    /// as the tot run in this folder did (mean tot tokens / mean chain tokens of the cot run
    /// given by --budget-chains-from, else / --chain-tokens).
    #[arg(long)]
    pub match_budget: Option<PathBuf>,
    /// sc with --match-budget: a cot run folder whose mean chain length sets the divisor.
    #[arg(long, requires = "match_budget")]
    pub budget_chains_from: Option<PathBuf>,
    /// Prompt templates (TOML, like prompts/qmtot.toml; default: the built-in ones).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Every request recomputes its prefix (no forks, no prefix cache): the benchmark's
    /// baseline.
    #[arg(long)]
    pub no_sharing: bool,
}

/// A tree method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeMethod {
    Tot,
    Cot,
    Sc,
}

impl TreeMethod {
    pub fn name(self) -> &'static str {
        match self {
            TreeMethod::Tot => "tot",
            TreeMethod::Cot => "cot",
            TreeMethod::Sc => "sc",
        }
    }
}

impl SearchArgs {
    pub fn rendered(&self, tokenizer: &Tokenizer) -> Result<Rendered> {
        let prompts = match &self.prompts {
            Some(p) => Prompts::load(p)?,
            None => Prompts::builtin(),
        };
        Rendered::new(prompts, tokenizer)
    }

    /// The search of the published rollout, changed by the options.
    pub fn tot_config(&self) -> SearchConfig {
        let strategy = match (self.strategy, self.breadth) {
            (StrategyArg::Dfs, _) => Strategy::Dfs {
                max_leaves: self.max_leaves,
            },
            (_, Some(breadth)) => Strategy::Beam { breadth },
            (StrategyArg::Beam, None) => Strategy::Beam {
                breadth: self.branching,
            },
            (StrategyArg::Bfs, None) => Strategy::Bfs,
        };
        SearchConfig {
            strategy,
            branching: self.branching,
            depth: self.depth,
            sufficiency: !self.no_sufficiency,
            sufficiency_threshold: self.sufficiency_threshold,
            value_threshold: self.value_threshold,
            vote: match self.vote {
                VoteArg::Majority => Vote::Majority,
                VoteArg::Weighted => Vote::Weighted,
                VoteArg::Best => Vote::Best,
            },
            step: StepKind::Line,
        }
    }

    pub fn runner_config(&self, method: TreeMethod) -> Result<RunnerConfig> {
        let (search, temperature) = match method {
            TreeMethod::Tot => (self.tot_config(), self.temperature),
            TreeMethod::Cot => (SearchConfig::chains(1), 0.0),
            TreeMethod::Sc => (SearchConfig::chains(self.sc_samples()?), self.temperature),
        };
        let config = RunnerConfig {
            search,
            sampling: SamplingParams {
                temperature,
                top_p: self.top_p,
                seed: self.seed,
                ..Default::default()
            },
            step_tokens: self.step_tokens,
            chain_tokens: self.chain_tokens,
            sharing: !self.no_sharing,
        };
        config.search.validate()?;
        config.sampling.validate()?;
        Ok(config)
    }

    /// Chains per question for `sc`.
    fn sc_samples(&self) -> Result<usize> {
        let Some(tot_dir) = &self.match_budget else {
            return Ok(self.samples);
        };
        let mean_generated = |dir: &PathBuf| -> Result<f64> {
            let records = read_results(&dir.join(qmtot::eval::harness::RESULTS))?;
            if records.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{}: no results to match",
                    dir.display()
                )));
            }
            Ok(records.iter().map(|r| r.tokens.generated as f64).sum::<f64>() / records.len() as f64)
        };
        let budget = mean_generated(tot_dir)?;
        let per_chain = match &self.budget_chains_from {
            Some(cot) => mean_generated(cot)?,
            None => self.chain_tokens as f64,
        };
        let n = (budget / per_chain.max(1.0)).round().max(1.0) as usize;
        eprintln!(
            "sc: {n} chains per question (tot generated {budget:.0} tokens per question, a chain about {per_chain:.0})"
        );
        Ok(n)
    }
}
