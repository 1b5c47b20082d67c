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
