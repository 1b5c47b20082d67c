//! Baselines that QM-ToT is compared with. So far `direct`: the log-likelihood of each option
//! letter after the question, as lm-evaluation-harness scores `medqa_4options`:
//!
//! ```text
//! Question: <stem>
//! A. <option A>
//! B. <option B>
//! …
//! Answer:
//! ```
//!
//! followed by the candidates `" A"`, `" B"`, … Every question of a batch is one engine
//! sequence, scored in the same steps (continuous batching), so a set of questions costs about
//! one prefill of all their prompts.

use std::collections::HashMap;

use super::datasets::Question;
use crate::backend::Backend;
use crate::engine::{Engine, Event, SeqId};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The `direct` prompt of a question.
pub fn direct_prompt(q: &Question) -> String {
    let mut s = format!("Question: {}\n", q.stem.trim());
    for (l, t) in &q.options {
        s.push_str(&format!("{l}. {}\n", t.trim()));
    }
    s.push_str("Answer:");
    s
}

/// One question's `direct` result.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectResult {
    pub id: String,
    /// `(letter, log p(" letter" | prompt))` in option order.
    pub scores: Vec<(char, f32)>,
    /// The most likely letter (the first on ties).
    pub predicted: char,
    /// Tokens computed for it: the prompt and the candidates.
    pub prompt_tokens: usize,
}

/// The token ids of `" A"`, `" B"`, … for a question's letters: each must be one token, as
/// the letter-likelihood method assumes.
pub fn letter_tokens(tokenizer: &Tokenizer, q: &Question) -> Result<Vec<Vec<u32>>> {
    q.options
        .iter()
        .map(|(l, _)| {
            let ids = tokenizer.encode(&format!(" {l}"), false)?;
            if ids.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "the tokenizer maps \" {l}\" to nothing"
                )));
            }
            Ok(ids)
        })
        .collect()
}

/// Scores every question with `direct`, all in flight at once on `engine`.
pub fn direct<B: Backend>(
    engine: &mut Engine<'_, B>,
    tokenizer: &Tokenizer,
    questions: &[Question],
) -> Result<Vec<DirectResult>> {
    let mut pending: HashMap<SeqId, (usize, usize)> = HashMap::new();
    for (i, q) in questions.iter().enumerate() {
        let prompt = tokenizer.encode(&direct_prompt(q), true)?;
        let letters = letter_tokens(tokenizer, q)?;
        let n = prompt.len() + letters.iter().map(Vec::len).sum::<usize>();
        let seq = engine.add(prompt)?;
        engine.score(seq, letters)?;
        pending.insert(seq, (i, n));
    }
    let mut results: Vec<Option<DirectResult>> = vec![None; questions.len()];
    while !pending.is_empty() {
        for event in engine.step_with_progress()? {
            match event {
                Event::Scored { seq, scores } => {
                    let Some((i, prompt_tokens)) = pending.remove(&seq) else {
                        continue;
                    };
                    let q = &questions[i];
                    let scores: Vec<(char, f32)> = q
                        .options
                        .iter()
                        .map(|o| o.0)
                        .zip(scores.iter().map(|s| s.total()))
                        .collect();
                    let predicted = scores
                        .iter()
                        .fold(None::<(char, f32)>, |best, &(l, s)| match best {
                            Some((_, b)) if b >= s => best,
                            _ => Some((l, s)),
                        })
                        .map_or('?', |(l, _)| l);
                    results[i] = Some(DirectResult {
                        id: q.id.clone(),
                        scores,
                        predicted,
                        prompt_tokens,
                    });
                    engine.release(seq)?;
                }
                Event::Failed { error, .. } => return Err(error),
                _ => {}
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every question was scored"))
        .collect())
}
