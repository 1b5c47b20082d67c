//! `qmtot bench tree`: what a tree of thoughts costs per decode step. `K` sequences continue
//! one `P`-token prefix by `S` sampled tokens each, decoding together one row per sequence per
//! step, in four setups:
//!
//! * `single`: one sequence (the yardstick: a chain, not a tree);
//! * `independent`: `K` sequences that each computed and store the prefix (no sharing);
//! * `forked`: one prefix, forked `K` times (shared blocks, plain paged attention);
//! * `cascade`: forked, with the shared prefix's attention computed once per group.
//!
//! Each setup reports the median and mean time of its `S` decode steps, the KV blocks in use
//! at the end, and the wall time of its prefill (one `P`-token prompt, or `K` of them for
//! `independent`), which the steps do not include.

use std::time::Instant;

use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig, SamplingParams, SchedulerConfig, StopConditions};
use crate::error::Result;
use crate::model::Llama;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeMode {
    Single,
    Independent,
    Forked,
    Cascade,
}

impl TreeMode {
    pub const ALL: [TreeMode; 4] = [
        TreeMode::Single,
        TreeMode::Independent,
        TreeMode::Forked,
        TreeMode::Cascade,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TreeMode::Single => "single",
            TreeMode::Independent => "independent",
            TreeMode::Forked => "forked",
            TreeMode::Cascade => "cascade",
        }
    }
}

/// The tree and how it runs.
#[derive(Clone, Copy, Debug)]
pub struct TreeBenchOptions {
    /// Sibling sequences (K).
    pub siblings: usize,
    /// Shared prefix length (P) and tokens generated per sibling (S).
    pub prefix: usize,
    pub suffix: usize,
    /// Draw tokens on the device where the backend can ([`EngineConfig::device_sampling`]).
    pub device_sampling: bool,
    /// Replay captured graphs for decode steps ([`EngineConfig::graphs`]), and with
    /// `cascade_graphs` for those with a sharing group too ([`EngineConfig::cascade_graphs`]).
    pub graphs: bool,
    pub cascade_graphs: bool,
}

#[derive(Clone, Debug)]
pub struct TreeBenchResult {
    pub mode: TreeMode,
    pub sequences: usize,
    pub median_step_ms: f64,
    pub mean_step_ms: f64,
    /// Per timed step, on average: wall time in the forward (including the logits' copy to
    /// the host) and drawing tokens on the host; the rest of a step is the engine's own work.
    pub forward_ms: f64,
    pub draw_ms: f64,
    /// Wall time of the prefill, untimed in the steps.
    pub prefill_ms: f64,
    /// Blocks in use after the last step.
    pub blocks_used: usize,
    pub blocks_shared: usize,
}

/// Runs one setup. Token ids are deterministic and valid for any vocabulary; sampling is at
/// temperature 1 with a different seed per sibling, so the siblings diverge as thoughts do.
pub fn run<B: Backend>(model: &Llama<B>, mode: TreeMode, options: TreeBenchOptions) -> Result<TreeBenchResult> {
    let TreeBenchOptions {
        siblings,
        prefix,
        suffix,
        device_sampling,
        graphs,
        cascade_graphs,
    } = options;
    let k = if mode == TreeMode::Single { 1 } else { siblings.max(1) };
    crate::engine::check_prompt(prefix, suffix, model.config.context_length)?;
    let bs = crate::kv::DEFAULT_BLOCK_SIZE;
    let config = EngineConfig {
        // Room for every sequence's own copy of everything, so no setup is squeezed.
        kv_blocks: k * (prefix + suffix).div_ceil(bs) + 2 * k + 1,
        block_size: bs,
        scheduler: SchedulerConfig {
            max_batch_tokens: prefix.max(k),
            max_seqs: k,
        },
        prefix_cache: false,
        cascade_min_blocks: (mode == TreeMode::Cascade).then_some(1),
        // Off by default, to compare the attention setups alone.
        graphs,
        cascade_graphs,
        device_sampling,
    };
    let mut engine = Engine::new(model, None, config)?;
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..prefix as u64)
        .map(|i| ((i * 2_654_435_761 + 1000) % vocab) as u32)
        .collect();

    // Prefill (not in the steps): one prompt forked, or K prompts computed separately.
    let prefill_start = Instant::now();
    let seqs = match mode {
        TreeMode::Independent => {
            let ids = (0..k).map(|_| engine.add(prompt.clone())).collect::<Result<Vec<_>>>()?;
            for &id in &ids {
                engine.prefill(id)?;
            }
            engine.run_until_idle()?;
            ids
        }
        _ => {
            let root = engine.add(prompt.clone())?;
            engine.prefill(root)?;
            engine.run_until_idle()?;
            let ids = engine.fork(root, k)?;
            engine.release(root)?;
            ids
        }
    };
    let prefill_ms = prefill_start.elapsed().as_secs_f64() * 1e3;
    for (i, &id) in seqs.iter().enumerate() {
        let sampling = SamplingParams {
            temperature: 1.0,
            seed: 1000 + i as u64,
            ..SamplingParams::default()
        };
        let stop = StopConditions {
            max_new_tokens: suffix,
            ..StopConditions::default()
        };
        engine.generate(id, sampling, stop)?;
    }
    let mut steps_ms = Vec::with_capacity(suffix);
    let before = engine.stats();
    while !engine.is_idle() {
        let t = Instant::now();
        engine.step()?;
        steps_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let after = engine.stats();
    let pool = after.pool;
    let timed_steps = steps_ms.len().max(1) as f64;
    let per_step = |d: std::time::Duration| d.as_secs_f64() * 1e3 / timed_steps;
    let mean_step_ms = steps_ms.iter().sum::<f64>() / timed_steps;
    steps_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(TreeBenchResult {
        mode,
        sequences: k,
        median_step_ms: steps_ms.get(steps_ms.len() / 2).copied().unwrap_or(0.0),
        mean_step_ms,
        forward_ms: per_step(after.forward_time - before.forward_time),
        draw_ms: per_step(after.draw_time - before.draw_time),
        prefill_ms,
        blocks_used: pool.used,
        blocks_shared: pool.shared,
    })
}
