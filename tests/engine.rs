//! The engine on the real model: forked sequences give the logits of running alone
//! (copy-on-write included), the radix cache computes only new tokens, the scheduler finishes
//! every request under a pool too small for all of them, scoring matches log-softmax, and
//! bad requests get typed errors.

mod common;

use qmtot::backend::cpu::CpuBackend;
use qmtot::backend::Backend;
use qmtot::engine::sampler::log_softmax;
use qmtot::engine::{
    Engine, EngineConfig, Event, FinishReason, Generation, Prompt, Request, SamplingParams, SchedulerConfig, SeqId,
    SequenceKv, StopConditions,
};
use qmtot::error::Error;
use qmtot::model::Llama;
use qmtot::tokenizer::Tokenizer;

use common::{assert_close, cpu_backends, load_smollm2};

fn prompt(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap()
}

/// Next-token logits of `tokens` run alone: one sequence, its own cache, no sharing.
fn alone<B: Backend>(model: &Llama<B>, tokens: &[u32]) -> Vec<f32> {
    SequenceKv::new(model, tokens.len())
        .unwrap()
        .extend(model, tokens, false)
        .unwrap()
}

fn small_config(kv_blocks: usize) -> EngineConfig {
    EngineConfig {
        kv_blocks,
        ..EngineConfig::default()
    }
}

/// Prefills `ids` together and checks each one's next-token logits against running alone.
fn prefill_and_compare<B: Backend>(engine: &mut Engine<'_, B>, model: &Llama<B>, ids: &[SeqId], what: &str) {
    for &id in ids {
        engine.prefill(id).unwrap();
    }
    let events = engine.run_until_idle().unwrap();
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Ready { .. })).count(),
        ids.len()
    );
    for &id in ids {
        let tokens = engine.tokens(id).unwrap().to_vec();
        let got = engine.next_logits(id).unwrap().expect("ready").to_vec();
        // 1e-4: both are f32 forwards over the same weights; they differ only where the
        // shared run sums attention in another order (cascade merges the shared prefix by
        // log-sum-exp), ≈1e-6 relative per layer. A wrong block (a sibling's token leaking
        // through a shared block) moves logits by far more than this.
        assert_close(&format!("{what}: {id}"), &got, &alone(model, &tokens), 1e-4, 1e-4);
    }
}

#[test]
fn forked_children_match_running_alone_including_copy_on_write_and_grandchildren() {
    for (name, backend) in cpu_backends() {
        let (model, tok) = load_smollm2(backend);
        let mut engine = Engine::new(&model, Some(&tok), small_config(64)).unwrap();
        // 37 tokens: two full blocks and a partly filled third, which the children share and
        // must copy before writing.
        let root = engine
            .add(prompt(&tok, "The three most common causes of chest pain in adults are"))
            .unwrap();
        let root_len = engine.tokens(root).unwrap().len();
        assert_ne!(root_len % 16, 0, "the test needs a partial last block");
        prefill_and_compare(&mut engine, &model, &[root], &format!("{name} root"));

        let children = engine.fork(root, 4).unwrap();
        let used_before = engine.stats().pool.used;
        let tails = [
            " angina",
            " reflux, anxiety and",
            " a",
            " pulmonary embolism, pneumonia",
        ];
        for (&c, tail) in children.iter().zip(tails) {
            engine.append(c, &tok.encode(tail, false).unwrap()).unwrap();
        }
        prefill_and_compare(&mut engine, &model, &children, &format!("{name} children"));
        let st = engine.stats();
        assert!(
            st.block_copies >= 4,
            "{name}: each child copies the shared partial block"
        );
        // The two full prompt blocks are stored once: the children added at most their
        // copied block plus new blocks for their tails.
        assert!(st.pool.used <= used_before + 4 * 2, "{name}: {st:?}");

        // Grandchildren of child 1, one of which continues right inside the copied block.
        let grandchildren = engine.fork(children[1], 2).unwrap();
        engine
            .append(grandchildren[0], &tok.encode(" heartburn", false).unwrap())
            .unwrap();
        engine
            .append(
                grandchildren[1],
                &tok.encode(" costochondritis and panic attacks", false).unwrap(),
            )
            .unwrap();
        prefill_and_compare(&mut engine, &model, &grandchildren, &format!("{name} grandchildren"));

        // The parents are untouched by their children's writes.
        for &id in [root].iter().chain(&children) {
            let tokens = engine.tokens(id).unwrap().to_vec();
            let got = engine.next_logits(id).unwrap().expect("still computed").to_vec();
            assert_close(
                &format!("{name} parent {id}"),
                &got,
                &alone(&model, &tokens),
                1e-4,
                1e-4,
            );
        }
        for id in [root].into_iter().chain(children).chain(grandchildren) {
            engine.release(id).unwrap();
        }
        let st = engine.stats();
        assert_eq!(
            st.pool.used, st.pool.cached,
            "{name}: only the prefix cache holds blocks now"
        );
        assert_eq!(st.sequences, 0);
    }
}

#[test]
fn forked_decoding_matches_decoding_alone() {
    let (model, tok) = load_smollm2(CpuBackend::new(2).unwrap());
    let mut engine = Engine::new(&model, Some(&tok), small_config(64)).unwrap();
    let root = engine
        .add(prompt(
            &tok,
            "Question: Which vitamin deficiency causes scurvy?\nAnswer:",
        ))
        .unwrap();
    engine.prefill(root).unwrap();
    engine.run_until_idle().unwrap();
    let kids = engine.fork(root, 3).unwrap();
    let stop = StopConditions {
        max_new_tokens: 12,
        ..Default::default()
    };
    for (i, &k) in kids.iter().enumerate() {
        let sampling = SamplingParams {
            temperature: 0.9,
            seed: 7 + i as u64,
            ..Default::default()
        };
        engine.generate(k, sampling, stop.clone()).unwrap();
    }
    let events = engine.run_until_idle().unwrap();
    let mut finished = 0;
    for e in events {
        if let Event::Finished { seq, generation } = e {
            finished += 1;
            // Replay the sampled tokens alone: each step's logits give the same log-prob.
            let mut tokens = engine.tokens(root).unwrap().to_vec();
            for (&t, &lp) in generation.tokens.iter().zip(&generation.logprobs) {
                let want = log_softmax(&alone(&model, &tokens))[t as usize];
                assert!(
                    (lp - want).abs() < 1e-3,
                    "{seq}: token {t} log-prob {lp} vs alone {want}"
                );
                tokens.push(t);
            }
            assert_eq!(engine.tokens(seq).unwrap(), &tokens[..]);
        }
    }
    assert_eq!(finished, 3);
}

#[test]
fn a_cached_prefix_is_not_recomputed_and_gives_cold_logits() {
    for (name, backend) in cpu_backends().into_iter().step_by(3) {
        let (model, tok) = load_smollm2(backend);
        let mut engine = Engine::new(&model, Some(&tok), small_config(64)).unwrap();
        let question = prompt(
            &tok,
            "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm. \
             Which enzyme rises first? Options: A) troponin B) CK-MB C) myoglobin D) LDH.",
        );
        let mut first = question.clone();
        first.extend(tok.encode(" Evaluate the step: is it sound?", false).unwrap());
        let mut second = question.clone();
        second.extend(tok.encode(" Which option is best supported?", false).unwrap());

        let a = engine.add(first).unwrap();
        prefill_and_compare(&mut engine, &model, &[a], &format!("{name} first"));
        engine.release(a).unwrap();

        let before = engine.stats();
        let b = engine.add(second.clone()).unwrap();
        prefill_and_compare(&mut engine, &model, &[b], &format!("{name} second"));
        let after = engine.stats();
        // The shared question's full blocks come from the cache; only the rest is computed.
        let shared_blocks = question.len() / 16;
        let reused = shared_blocks * 16;
        assert!(shared_blocks >= 2, "the test needs a question of several blocks");
        assert_eq!(after.cached_tokens - before.cached_tokens, reused, "{name}");
        assert_eq!(
            after.computed_tokens - before.computed_tokens,
            second.len() - reused,
            "{name}"
        );
    }
}

/// Greedy continuation of `p` computed alone, for comparison.
fn greedy_alone<B: Backend>(model: &Llama<B>, p: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = p.to_vec();
    for _ in 0..n {
        let logits = alone(model, &tokens);
        tokens.push(qmtot::engine::sampler::argmax(&logits));
    }
    tokens[p.len()..].to_vec()
}

fn greedy(n: usize) -> (SamplingParams, StopConditions) {
    (
        SamplingParams::default(),
        StopConditions {
            max_new_tokens: n,
            ..Default::default()
        },
    )
}

fn finished(events: Vec<Event>) -> Vec<(SeqId, Generation)> {
    let mut out: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Finished { seq, generation } => Some((seq, generation)),
            Event::Failed { seq, error } => panic!("{seq} failed: {error}"),
            _ => None,
        })
        .collect();
    out.sort_by_key(|(s, _)| *s);
    out
}

#[test]
fn every_request_completes_correctly_when_the_pool_is_too_small_for_all() {
    let (model, tok) = load_smollm2(CpuBackend::new(2).unwrap());
    let prompts: Vec<Vec<u32>> = [
        "The liver produces",
        "Insulin is secreted by the",
        "The most common cause of community-acquired pneumonia is",
        "Aspirin irreversibly inhibits",
        "The normal adult resting heart rate is",
        "Hemoglobin carries oxygen using",
    ]
    .iter()
    .map(|t| prompt(&tok, t))
    .collect();
    let new_tokens = 20;
    // Each request needs 2–3 blocks at its longest, six of them need ~15; the pool has 7.
    let config = EngineConfig {
        kv_blocks: 7,
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            max_seqs: 6,
        },
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, Some(&tok), config).unwrap();
    let (sampling, stop) = greedy(new_tokens);
    let ids: Vec<SeqId> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(Request {
                    prompt: Prompt::Tokens(p.clone()),
                    n: 1,
                    sampling: sampling.clone(),
                    stop: stop.clone(),
                })
                .unwrap()[0]
        })
        .collect();
    let done = finished(engine.run_until_idle().unwrap());
    assert_eq!(done.len(), prompts.len());
    assert!(engine.stats().preemptions > 0, "the pool must have been too small");
    for ((seq, g), (id, p)) in done.iter().zip(ids.iter().zip(&prompts)) {
        assert_eq!(seq, id);
        assert_eq!(g.finish, FinishReason::Length);
        assert_eq!(g.tokens, greedy_alone(&model, p, new_tokens), "{seq}");
    }
    for id in ids {
        engine.release(id).unwrap();
    }
    engine.pool().check_invariants().unwrap();
}

#[test]
fn n_samples_share_the_prompt_and_greedy_samples_agree() {
    let (model, tok) = load_smollm2(CpuBackend::new(2).unwrap());
    let mut engine = Engine::new(&model, Some(&tok), small_config(64)).unwrap();
    let p = prompt(&tok, "The function of the kidney is to");
    let (sampling, stop) = greedy(10);
    let ids = engine
        .submit(Request {
            prompt: Prompt::Tokens(p.clone()),
            n: 4,
            sampling,
            stop,
        })
        .unwrap();
    let done = finished(engine.run_until_idle().unwrap());
    assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), ids);
    let want = greedy_alone(&model, &p, 10);
    for (_, g) in &done {
        assert_eq!(g.tokens, want);
    }
    // The prompt ran once, then four rows per step.
    assert_eq!(engine.stats().computed_tokens, p.len() + 4 * 9);
}

#[test]
fn scores_are_log_softmax_of_running_alone() {
    let (model, tok) = load_smollm2(CpuBackend::new(2).unwrap());
    let mut engine = Engine::new(&model, Some(&tok), small_config(64)).unwrap();
    let p = prompt(
        &tok,
        "Question: Which organ produces bile? A) liver B) heart C) lung\nAnswer:",
    );
    let seq = engine.add(p.clone()).unwrap();
    let candidates: Vec<Vec<u32>> = [" A", " B", " C", " A) liver", " the gallbladder stores it"]
        .iter()
        .map(|c| tok.encode(c, false).unwrap())
        .collect();
    assert!(candidates.iter().any(|c| c.len() == 1) && candidates.iter().any(|c| c.len() > 2));
    engine.score(seq, candidates.clone()).unwrap();
    let events = engine.run_until_idle().unwrap();
    let Some(Event::Scored { seq: s, scores }) = events.into_iter().find(|e| matches!(e, Event::Scored { .. })) else {
        panic!("no scores")
    };
    assert_eq!(s, seq);
    for (c, score) in candidates.iter().zip(&scores) {
        let mut ctx = p.clone();
        let mut want = Vec::new();
        for &t in c {
            want.push(log_softmax(&alone(&model, &ctx))[t as usize]);
            ctx.push(t);
        }
        assert_close(&format!("candidate {c:?}"), &score.logprobs, &want, 1e-4, 1e-4);
    }
    assert_eq!(engine.stats().sequences, 1, "candidate forks are gone");
    // The scored sequence is idle again and can generate.
    let (sampling, stop) = greedy(2);
    engine.generate(seq, sampling, stop).unwrap();
    assert_eq!(finished(engine.run_until_idle().unwrap()).len(), 1);
}

#[test]
fn oversize_requests_are_typed_errors_and_cancel_frees_blocks() {
    let (model, tok) = load_smollm2(CpuBackend::new(2).unwrap());
    let config = EngineConfig {
        kv_blocks: 4,
        prefix_cache: false,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, Some(&tok), config).unwrap();
    let (sampling, stop) = greedy(40);
    let req = |p: Vec<u32>| Request {
        prompt: Prompt::Tokens(p),
        n: 1,
        sampling: sampling.clone(),
        stop: stop.clone(),
    };
    // 30 + 40 tokens need 5 blocks of 16; the pool has 4.
    assert!(matches!(
        engine.submit(req(vec![1; 30])),
        Err(Error::KvCapacity {
            needed_blocks: 5,
            total_blocks: 4,
            ..
        })
    ));
    let context = model.config.context_length;
    assert!(matches!(
        engine.submit(req(vec![1; context])),
        Err(Error::PromptTooLong { .. })
    ));
    assert!(matches!(engine.submit(req(vec![])), Err(Error::EmptyPrompt)));
    assert!(matches!(
        engine.submit(req(vec![u32::MAX])),
        Err(Error::TokenOutOfRange { .. })
    ));
    assert_eq!(engine.stats().sequences, 0, "failed submissions leave nothing behind");

    let id = engine.submit(req(prompt(&tok, "The spleen"))).unwrap()[0];
    for _ in 0..3 {
        engine.step().unwrap();
    }
    assert!(engine.stats().pool.used > 0);
    let partial = engine.cancel(id).unwrap().expect("it was generating");
    assert_eq!(partial.finish, FinishReason::Cancelled);
    assert!(!partial.tokens.is_empty());
    assert_eq!(engine.stats().pool.used, 0, "cancel returns every block");
    assert!(engine.is_idle());
    assert!(engine.release(id).is_err(), "a cancelled id is gone");
}
