//! `qmtot bench decode`: prefill throughput of a fixed-length prompt and decode throughput of
//! greedy generation, on a real model, measured the way llama.cpp's `llama-bench` measures
//! pp512 and tg128: the prompt is one forward from an empty cache; decoding starts from an
//! empty cache too (one seed token) and times one-token steps.

use std::time::Instant;

use crate::backend::Backend;
use crate::engine::{sampler::argmax, SequenceKv};
use crate::error::Result;
use crate::model::Llama;

#[derive(Clone, Debug)]
pub struct DecodeBenchResult {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Median over repetitions.
    pub prefill_tok_per_s: f64,
    pub decode_tok_per_s: f64,
    pub decode_ms_per_token: f64,
}

/// Runs `reps` rounds of: prefill `prompt_tokens` tokens (one forward, empty cache), and,
/// separately, decode `decode_tokens` tokens one step at a time after a one-token seed. Token
/// ids are deterministic and valid for any vocabulary. One untimed warm-up round comes first.
pub fn run<B: Backend>(
    model: &Llama<B>,
    prompt_tokens: usize,
    decode_tokens: usize,
    reps: usize,
) -> Result<DecodeBenchResult> {
    crate::engine::check_prompt(prompt_tokens, 0, model.config.context_length)?;
    crate::engine::check_prompt(1, decode_tokens, model.config.context_length)?;
    let vocab = model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..prompt_tokens as u64)
        .map(|i| ((i * 2_654_435_761 + 1000) % vocab) as u32)
        .collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..=reps.max(1) {
        let mut seq = SequenceKv::new(model, prompt_tokens)?;
        let t = Instant::now();
        seq.extend(model, &prompt, false)?;
        let t_prefill = t.elapsed().as_secs_f64();
        drop(seq);
        let mut seq = SequenceKv::new(model, 1 + decode_tokens)?;
        let mut token = argmax(&seq.extend(model, &prompt[..1], false)?);
        let t = Instant::now();
        for _ in 0..decode_tokens {
            let logits = seq.extend(model, &[token], false)?;
            token = argmax(&logits);
        }
        let t_decode = t.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(prompt_tokens as f64 / t_prefill);
            decode.push(decode_tokens as f64 / t_decode);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let decode_tok_per_s = median(&mut decode);
    Ok(DecodeBenchResult {
        prompt_tokens,
        decode_tokens,
        prefill_tok_per_s: median(&mut prefill),
        decode_tok_per_s,
        decode_ms_per_token: 1000.0 / decode_tok_per_s,
    })
}

#[derive(Clone, Debug)]
pub struct BatchDecodeResult {
    pub batch: usize,
    /// Tokens in each sequence's cache when the timed steps start.
    pub context: usize,
    pub steps: usize,
    /// Median over repetitions: one step decodes one token of every sequence.
    pub ms_per_step: f64,
    pub tok_per_s: f64,
    /// The steps replayed a captured graph (CUDA graphs).
    pub graphs: bool,
}

/// Decode of `batch` independent sequences together, one token each per step, as the engine
/// batches them: each sequence first holds `context` prompt tokens (prefilled one sequence at
/// a time, untimed), then `steps` greedy steps of `batch` rows are timed. Each repetition
/// starts from the prefilled caches again (their extra tokens overwritten); one untimed
/// warm-up repetition comes first. Logits of every row come back to the host and are argmaxed
/// there, as the engine does today. With `graphs`, the decode step is captured once and
/// replayed (on a backend with graphs; elsewhere the steps run as usual).
pub fn run_batched<B: Backend>(
    model: &Llama<B>,
    batch: usize,
    context: usize,
    steps: usize,
    reps: usize,
    graphs: bool,
) -> Result<BatchDecodeResult> {
    use crate::backend::StepInput;
    use crate::kv::DEFAULT_BLOCK_SIZE as BS;
    if batch == 0 || context == 0 || steps == 0 {
        return Err(crate::error::Error::InvalidArgument(
            "batched decode needs a batch, a context and steps".into(),
        ));
    }
    crate::engine::check_prompt(context, steps, model.config.context_length)?;
    let vocab = model.config.vocab_size;
    // Sequence s owns blocks s·per_seq .. (s+1)·per_seq.
    let per_seq = (context + steps).div_ceil(BS);
    let mut kv = model.new_kv_cache(batch * per_seq, BS)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| (0..per_seq).map(|i| (s * per_seq + i) as u32).collect())
        .collect();
    let slot = |s: usize, p: usize| tables[s][p / BS] * BS as u32 + (p % BS) as u32;
    let mut next = vec![0u32; batch];
    for (s, tok) in next.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..context as u64)
            .map(|i| ((i * 2_654_435_761 + 1000 + s as u64 * 7919) % vocab as u64) as u32)
            .collect();
        let slots = (0..context).map(|p| slot(s, p)).collect();
        let step = StepInput::one_sequence(prompt, 0, slots, tables[s].clone(), vec![context as u32 - 1]);
        *tok = argmax(&model.forward(&mut kv, &step)?);
    }
    let first = next.clone();
    let decode_step = |tokens: &[u32], p: usize| {
        StepInput::decode(
            tokens.to_vec(),
            p as u32,
            (0..batch).map(|s| slot(s, p)).collect(),
            tables.clone(),
        )
    };
    let mut graph = match graphs {
        true => model.capture_decode(&mut kv, &decode_step(&first, context), context + steps)?,
        false => None,
    };
    let mut per_step = Vec::new();
    let last_rep = reps.max(1);
    for rep in 0..=last_rep {
        next.clone_from(&first);
        if rep == last_rep {
            // An attached profiler traces the last round's decode steps only (not the prefill).
            model.backend().profile_region(true)?;
        }
        let t = Instant::now();
        for i in 0..steps {
            let step = decode_step(&next, context + i);
            let replayed = match &mut graph {
                Some(g) => model.replay_decode(g, &mut kv, &step)?,
                None => None,
            };
            let logits = match replayed {
                Some(l) => l,
                None => model.forward(&mut kv, &step)?,
            };
            for (s, row) in logits.chunks_exact(vocab).enumerate() {
                next[s] = argmax(row);
            }
        }
        if rep > 0 {
            per_step.push(t.elapsed().as_secs_f64() / steps as f64);
        }
    }
    model.backend().profile_region(false)?;
    per_step.sort_by(f64::total_cmp);
    let sec = per_step[per_step.len() / 2];
    Ok(BatchDecodeResult {
        batch,
        context,
        steps,
        ms_per_step: sec * 1e3,
        tok_per_s: batch as f64 / sec,
        graphs: graph.is_some(),
    })
}
