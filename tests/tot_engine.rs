//! QM-ToT on the real default model with a tiny budget (k = 2, d = 2, 6-token steps, 3
//! questions): the runs complete with an answer each, every child's sequence shares its
//! parent's KV blocks, evaluators reuse the node's tokens instead of recomputing them, and the
//! prefix cache serves later questions the common system-prompt prefix.

mod common;

use qmtot::backend::cpu::CpuBackend;
use qmtot::engine::{Engine, EngineConfig};
use qmtot::eval::datasets::{self, Question};
use qmtot::tot::{Prompts, Rendered, RunStats, Runner, RunnerConfig, SearchConfig, Solved};

fn questions() -> Vec<Question> {
    let set = datasets::load(common::data_path("mmlu-medical-sample.jsonl"), &Default::default()).unwrap();
    set.questions.into_iter().take(3).collect()
}

fn tiny_config(sharing: bool) -> RunnerConfig {
    RunnerConfig {
        step_tokens: 6,
        sharing,
        ..RunnerConfig::new(SearchConfig {
            branching: 2,
            ..SearchConfig::published()
        })
    }
}

struct Run {
    solved: Vec<Solved>,
    stats: RunStats,
    forks: Vec<qmtot::tot::ForkRecord>,
    pool_used_after: usize,
}

fn run(
    model: &qmtot::model::Llama<CpuBackend>,
    tok: &qmtot::tokenizer::Tokenizer,
    config: RunnerConfig,
    engine_config: EngineConfig,
    concurrency: usize,
) -> Run {
    let prompts = Rendered::new(Prompts::builtin(), tok).unwrap();
    let mut engine = Engine::new(model, Some(tok), engine_config).unwrap();
    let mut solved = Vec::new();
    let (stats, forks) = {
        let mut runner = Runner::new(tok, &prompts, config).unwrap();
        runner.record_forks();
        let stats = runner
            .solve_all(
                &mut engine,
                &questions(),
                concurrency,
                |s| {
                    solved.push(s);
                    Ok(())
                },
                |_, _| {},
            )
            .unwrap();
        (stats, runner.forks().to_vec())
    };
    engine.pool().check_invariants().unwrap();
    let (tables, _) = engine.block_holders();
    assert!(
        tables.is_empty(),
        "every sequence released at the end, {} left",
        tables.len()
    );
    solved.sort_by_key(|s| s.index);
    Run {
        solved,
        stats,
        forks,
        pool_used_after: engine.stats().pool.used - engine.stats().pool.cached,
    }
}

#[test]
fn tot_on_the_real_model_forks_nodes_and_shares_their_blocks() {
    let (model, tok) = common::load_smollm2(CpuBackend::new(2).unwrap());
    // Prefix cache off: shared blocks can only come from forks.
    let no_cache = EngineConfig {
        prefix_cache: false,
        ..EngineConfig::default()
    };
    let shared = run(&model, &tok, tiny_config(true), no_cache, 3);
    assert_eq!(shared.solved.len(), 3);
    assert_eq!(shared.pool_used_after, 0, "all blocks back in the pool");
    for s in &shared.solved {
        let tree = &s.tree;
        // k = 2, d = 2: 2 children of the root, and 2 under each one that did not answer.
        assert!(
            tree.thought_count() >= 2 && tree.thought_count() <= 6,
            "{}",
            tree.thought_count()
        );
        let d = tree.decision.as_ref().expect("decided");
        assert!(d.answer.is_some_and(|a| tree.letters().contains(&a)));
        assert!(tree.leaves().count() >= 1);
        assert!(s.tokens.generated > 0 && s.tokens.generated <= 6 * tree.thought_count());
    }
    // Every expansion: the children share all of the parent's full blocks (and, at the root,
    // the prompt's blocks with each other).
    assert!(
        shared.forks.len() >= 3 * 2,
        "root and depth-1 expansions of 3 questions"
    );
    let mut parent_checks = 0;
    for f in &shared.forks {
        let first = &f.children[0];
        for c in &f.children[1..] {
            let common = first.iter().zip(c).take_while(|(a, b)| a == b).count();
            assert!(
                common >= 1,
                "siblings share their prompt's leading blocks: {first:?} vs {c:?}"
            );
        }
        if let Some(parent) = &f.parent {
            parent_checks += 1;
            let full = parent.len() - 1; // the last one may be partial (copied on write)
            for c in &f.children {
                assert_eq!(&c[..full], &parent[..full], "a child shares its parent's blocks");
            }
        }
    }
    assert!(
        parent_checks >= 3,
        "depth-1 nodes were expanded from their own sequences"
    );
    // Evaluators and children reuse the node's tokens: far fewer computed than requested.
    let tokens = shared.stats.tokens;
    assert!(tokens.reused > 2 * tokens.prefilled, "{tokens:?}");
    let computed = shared.stats.computed_tokens;
    assert!(
        computed <= tokens.prefilled + tokens.generated + tokens.prefilled / 5,
        "the model computed {computed} rows for {tokens:?}"
    );

    // The same search without sharing recomputes every prefix.
    let unshared = run(&model, &tok, tiny_config(false), no_cache, 1);
    assert_eq!(unshared.stats.tokens.reused, 0);
    assert!(
        unshared.stats.computed_tokens > 2 * computed,
        "unshared {} vs shared {computed}",
        unshared.stats.computed_tokens
    );
    assert!(unshared.forks.iter().all(|f| f.parent.is_none()));
}

#[test]
fn later_questions_reuse_the_cached_system_prompt() {
    let (model, tok) = common::load_smollm2(CpuBackend::new(2).unwrap());
    // One question at a time, prefix cache on: questions 2 and 3 find the first one's
    // leading blocks (the chat template's system turn) in the cache.
    let r = run(&model, &tok, tiny_config(true), EngineConfig::default(), 1);
    assert_eq!(r.solved.len(), 3);
    let block = EngineConfig::default().block_size;
    assert!(
        r.stats.cached_tokens >= 2 * block,
        "cached tokens {} (expected at least one block for each later question)",
        r.stats.cached_tokens
    );
}
