//! The engine under random use on a tiny model with a small KV pool: random submits (n ≥ 1,
//! greedy and sampled), forks, appends, prefills, scores, cancels and releases interleaved with
//! steps. After every operation the pool's owners must equal the engine's holders; every
//! finished generation and every score must equal what the same tokens give run alone (so no
//! K/V was lost, shared wrongly or corrupted by preemption, copy-on-write or the prefix cache);
//! releasing everything leaves only the prefix cache holding blocks.
//!
//! Seeded; `QMTOT_ENGINE_FUZZ_OPS` sets the operations per seed (default 1500 in release, 100
//! in debug).

mod common;

use qmtot::backend::cpu::CpuBackend;
use qmtot::engine::sampler::log_softmax;
use qmtot::engine::{
    Engine, EngineConfig, Event, Prompt, Request, SamplingParams, SchedulerConfig, SeqId, SequenceKv, StopConditions,
};
use qmtot::model::Llama;

use common::{load_tiny_model, TinySpec};

/// splitmix64: a tiny deterministic generator for the test's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        // A small alphabet, so prompts share prefixes and the cache gets hits.
        (0..n).map(|_| (self.below(6) * (vocab / 6)) as u32).collect()
    }
}

/// log-softmax of the next-token logits of `tokens` run alone.
fn alone(model: &Llama<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let logits = SequenceKv::new(model, tokens.len())
        .unwrap()
        .extend(model, tokens, false)
        .unwrap();
    log_softmax(&logits)
}

/// Tolerance on log-probabilities: f32 forwards over the same weights that differ only where
/// cascade attention sums the shared prefix in another order (≈1e-6 relative); a wrong or
/// stale K/V entry moves log-probs of this random model by ≥ 1e-2.
const TOL: f32 = 1e-4;

fn check_owners(engine: &Engine<'_, CpuBackend>, what: &str) {
    let pool = engine.pool();
    pool.check_invariants().unwrap_or_else(|e| panic!("{what}: {e}"));
    let (tables, cached) = engine.block_holders();
    let mut holders = vec![0u32; pool.n_blocks()];
    for id in tables.iter().flatten().chain(&cached) {
        holders[*id as usize] += 1;
    }
    assert_eq!(pool.refcounts(), holders, "{what}: refcounts vs holders");
}

fn run(seed: u64, ops: usize) {
    let spec = TinySpec::default();
    let (_file, model, _) = load_tiny_model(spec, 3);
    let config = EngineConfig {
        kv_blocks: 24,
        block_size: 4,
        scheduler: SchedulerConfig {
            max_batch_tokens: 16,
            max_seqs: 6,
        },
        prefix_cache: seed % 2 == 0,
        cascade_min_blocks: Some(1),
        graphs: true,
        cascade_graphs: true,
        device_sampling: false,
    };
    let mut engine = Engine::new(&model, None, config).unwrap();
    let mut rng = Rng(seed);
    let questions: Vec<Vec<u32>> = (0..3).map(|q| rng.tokens(5 + 3 * q, spec.vocab)).collect();
    // Visible sequences we hold, and the prompt each generation started from.
    let mut live: Vec<SeqId> = Vec::new();
    let mut prompts: std::collections::HashMap<SeqId, Vec<u32>> = Default::default();
    let mut scored: std::collections::HashMap<SeqId, (Vec<u32>, Vec<Vec<u32>>)> = Default::default();
    let (mut finished, mut scores, mut preempted_any) = (0, 0, false);

    for op in 0..ops {
        let what = format!("seed {seed} op {op}");
        match rng.below(11) {
            0..=2 => {
                let len = rng.below(10);
                let max_new = 1 + rng.below(8);
                let n = 1 + rng.below(3);
                // One of three shared "questions", then a tail of its own.
                let mut prompt = questions[rng.below(questions.len())].clone();
                prompt.extend(rng.tokens(len, spec.vocab));
                let req = Request {
                    prompt: Prompt::Tokens(prompt),
                    n,
                    sampling: SamplingParams {
                        temperature: if rng.below(2) == 0 { 0.0 } else { 1.0 },
                        seed: rng.next(),
                        ..Default::default()
                    },
                    stop: StopConditions {
                        max_new_tokens: max_new,
                        ..Default::default()
                    },
                };
                let Prompt::Tokens(p) = &req.prompt else { unreachable!() };
                let p = p.clone();
                for id in engine.submit(req).unwrap() {
                    prompts.insert(id, p.clone());
                    live.push(id);
                }
            }
            3 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                if let Ok(kids) = engine.fork(s, 1 + rng.below(2)) {
                    for k in kids {
                        live.push(k);
                    }
                }
            }
            4 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                let n_extra = 1 + rng.below(6);
                let extra = rng.tokens(n_extra, spec.vocab);
                if engine.append(s, &extra).is_ok() {
                    let sampling = SamplingParams {
                        temperature: 1.0,
                        seed: rng.next(),
                        ..Default::default()
                    };
                    let stop = StopConditions {
                        max_new_tokens: 1 + rng.below(5),
                        ..Default::default()
                    };
                    let prompt = engine.tokens(s).unwrap().to_vec();
                    if engine.generate(s, sampling, stop).is_ok() {
                        prompts.insert(s, prompt);
                    }
                }
            }
            5 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                let cands: Vec<Vec<u32>> = (0..1 + rng.below(3))
                    .map(|_| {
                        let len = 1 + rng.below(3);
                        rng.tokens(len, spec.vocab)
                    })
                    .collect();
                let base = engine.tokens(s).unwrap().to_vec();
                if engine.score(s, cands.clone()).is_ok() {
                    scored.insert(s, (base, cands));
                }
            }
            7 if !live.is_empty() => {
                // Compute an idle sequence's pending tokens (its forks then share them).
                let s = live[rng.below(live.len())];
                let _ = engine.prefill(s);
            }
            6 if !live.is_empty() => {
                let i = rng.below(live.len());
                let s = live.swap_remove(i);
                if rng.below(2) == 0 {
                    engine.cancel(s).unwrap();
                } else {
                    engine.release(s).unwrap();
                }
                prompts.remove(&s);
                scored.remove(&s);
            }
            _ => {
                for event in engine.step().unwrap() {
                    match event {
                        Event::Finished { seq, generation } => {
                            finished += 1;
                            let mut ctx = prompts.remove(&seq).expect("a generation we started");
                            for (&t, &lp) in generation.tokens.iter().zip(&generation.logprobs) {
                                let want = alone(&model, &ctx)[t as usize];
                                assert!((lp - want).abs() < TOL, "{what}: {seq} token {t}: {lp} vs alone {want}");
                                ctx.push(t);
                            }
                        }
                        Event::Scored { seq, scores: got } => {
                            scores += 1;
                            let (base, cands) = scored.remove(&seq).expect("a score we started");
                            for (c, sc) in cands.iter().zip(&got) {
                                let mut ctx = base.clone();
                                for (&t, &lp) in c.iter().zip(&sc.logprobs) {
                                    let want = alone(&model, &ctx)[t as usize];
                                    assert!((lp - want).abs() < TOL, "{what}: score {c:?}: {lp} vs {want}");
                                    ctx.push(t);
                                }
                            }
                        }
                        Event::Failed { seq, error } => panic!("{what}: {seq} failed: {error}"),
                        Event::Ready { .. } | Event::Token { .. } => {}
                    }
                }
            }
        }
        preempted_any |= engine.stats().preemptions > 0;
        check_owners(&engine, &what);
    }
    // Drain, then release everything: only the prefix cache may still hold blocks.
    engine.run_until_idle().unwrap();
    for s in live {
        engine.release(s).unwrap();
    }
    check_owners(&engine, &format!("seed {seed} end"));
    let st = engine.stats();
    assert_eq!(st.sequences, 0);
    assert_eq!(st.pool.used, st.pool.cached, "seed {seed}: only cache blocks remain");
    eprintln!(
        "seed {seed}: {ops} ops, {finished} generations and {scores} scores checked, {} preemptions, {} COW copies, {} cached tokens",
        st.preemptions, st.block_copies, st.cached_tokens
    );
    assert!(
        finished > 0 && (ops < 200 || preempted_any),
        "seed {seed}: the run exercised too little"
    );
}

fn ops() -> usize {
    std::env::var("QMTOT_ENGINE_FUZZ_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 100 } else { 1500 })
}

#[test]
fn random_engine_use_keeps_owners_consistent_and_outputs_equal_to_running_alone() {
    for seed in [1, 2, 3, 4] {
        run(seed, ops());
    }
}
