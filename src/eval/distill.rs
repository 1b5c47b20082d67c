//! Distillation: tree-derived reasoning as supervised fine-tuning data.
//!
//! From ToT runs on questions with known answers, keep for each question the best-scoring
//! path whose leaf reaches the correct answer (path score × P(correct letter)); prefer
//! questions the `cot` baseline got wrong (the hard, informative ones), then higher scores;
//! keep at most `fraction` of the input. Each example is one chat in the `messages` form SFT
//! trainers read: system, user = the question with its instruction, assistant = the path's
//! steps and the answer.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::datasets::Question;
use super::harness::EvalRecord;
use crate::error::{Error, Result};
use crate::tokenizer::ChatMessage;
use crate::tot::{NodeId, Rendered, Tree};

/// One chosen example.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub id: String,
    pub leaf: NodeId,
    pub score: f32,
    pub cot_wrong: bool,
}

/// The best correct leaf of a tree: `(leaf, path score × P(gold letter))`.
pub fn best_correct_leaf(tree: &Tree) -> Option<(NodeId, f32)> {
    let gold = tree.gold?;
    let g = tree.letters().iter().position(|&l| l == gold)?;
    tree.leaves()
        .filter(|n| n.answer == Some(gold) && n.id != Tree::ROOT)
        .map(|n| {
            let p = n.letters.as_ref().map_or(0.0, |l| l[g]);
            (n.id, n.path_score.unwrap_or(1.0) * p)
        })
        .fold(None, |best: Option<(NodeId, f32)>, (n, s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((n, s)),
        })
}

/// Chooses the examples: questions whose tree reached the gold answer, cot failures first,
/// then by score; at most `ceil(fraction × total)`.
pub fn select(tot: &[EvalRecord], cot: &[EvalRecord], fraction: f64, total: usize) -> Vec<Pick> {
    let cot_right: HashMap<&str, bool> = cot.iter().map(|r| (r.id.as_str(), r.correct())).collect();
    let mut picks: Vec<Pick> = tot
        .iter()
        .filter_map(|r| {
            let (leaf, score) = best_correct_leaf(r.tree.as_ref()?)?;
            Some(Pick {
                id: r.id.clone(),
                leaf,
                score,
                cot_wrong: !cot_right.get(r.id.as_str()).copied().unwrap_or(false),
            })
        })
        .collect();
    picks.sort_by(|a, b| {
        b.cot_wrong
            .cmp(&a.cot_wrong)
            .then(b.score.total_cmp(&a.score))
            .then(a.id.cmp(&b.id))
    });
    let cap = (fraction.clamp(0.0, 1.0) * total as f64).ceil() as usize;
    picks.truncate(cap);
    picks
}

#[derive(Serialize)]
struct Example<'a> {
    id: &'a str,
    messages: Vec<ChatMessage>,
}

/// Writes the picks as chat-messages JSONL; returns how many were written.
pub fn write_sft(
    path: &Path,
    picks: &[Pick],
    tot: &[EvalRecord],
    questions: &[Question],
    prompts: &Rendered,
) -> Result<usize> {
    let trees: HashMap<&str, &Tree> = tot
        .iter()
        .filter_map(|r| Some((r.id.as_str(), r.tree.as_ref()?)))
        .collect();
    let by_id: HashMap<&str, &Question> = questions.iter().map(|q| (q.id.as_str(), q)).collect();
    let mut out = String::new();
    for p in picks {
        let (Some(tree), Some(q)) = (trees.get(p.id.as_str()), by_id.get(p.id.as_str())) else {
            return Err(Error::InvalidArgument(format!(
                "distill: no tree or question for {}",
                p.id
            )));
        };
        let answer = tree.node(p.leaf).answer.expect("picked leaves answer");
        let user = format!("{}\n\n{}", prompts.prompts.question_text(q), prompts.prompts.generate);
        let example = Example {
            id: &p.id,
            messages: vec![
                ChatMessage::new("system", &prompts.prompts.system),
                ChatMessage::new("user", &user),
                ChatMessage::new("assistant", &prompts.assistant_text(&tree.thoughts(p.leaf), answer)),
            ],
        };
        out.push_str(&serde_json::to_string(&example).expect("examples serialize"));
        out.push('\n');
    }
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(out.as_bytes()).map_err(|e| Error::io(path, e))?;
    Ok(picks.len())
}
