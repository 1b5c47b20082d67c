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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tot::NodeStatus;

    /// A tree whose leaves answer `answers` with P(letter) = `p` and path score 1.
    fn tree(id: &str, gold: char, answers: &[(char, f32)]) -> Tree {
        let mut t = Tree::new(id, "stem", vec![('A', "a".into()), ('B', "b".into())], Some(gold));
        for &(a, p) in answers {
            let n = t.add_child(Tree::ROOT);
            let node = t.node_mut(n);
            node.thought = format!("Step 1: think {a}");
            node.status = NodeStatus::Leaf;
            node.answer = Some(a);
            node.letters = Some(if a == 'A' { vec![p, 1.0 - p] } else { vec![1.0 - p, p] });
            node.path_score = Some(1.0);
        }
        t
    }

    fn record(id: &str, gold: char, predicted: char, tree: Option<Tree>) -> EvalRecord {
        let q = Question {
            id: id.into(),
            stem: "stem".into(),
            options: vec![('A', "a".into()), ('B', "b".into())],
            answer: Some(gold),
            meta: Default::default(),
        };
        EvalRecord {
            predicted: Some(predicted),
            tree,
            ..EvalRecord::new(&q, "x")
        }
    }

    #[test]
    fn picks_correct_paths_cot_failures_first_and_caps_the_fraction() {
        let tot = vec![
            record(
                "q1",
                'A',
                'A',
                Some(tree("q1", 'A', &[('A', 0.9), ('A', 0.6), ('B', 0.8)])),
            ),
            record("q2", 'B', 'A', Some(tree("q2", 'B', &[('A', 0.9)]))), // never reached B
            record("q3", 'B', 'B', Some(tree("q3", 'B', &[('B', 0.55)]))),
            record("q4", 'A', 'A', Some(tree("q4", 'A', &[('A', 0.7)]))),
        ];
        let cot = vec![
            record("q1", 'A', 'A', None),
            record("q3", 'B', 'A', None), // cot wrong: goes first despite its low score
            record("q4", 'A', 'A', None),
        ];
        let picks = select(&tot, &cot, 1.0, 4);
        let ids: Vec<&str> = picks.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, vec!["q3", "q1", "q4"], "q2 never reached its answer");
        assert!(picks[0].cot_wrong && !picks[1].cot_wrong);
        assert_eq!(picks[1].leaf, 1, "q1's best correct leaf is the 0.9 one");
        assert_eq!(select(&tot, &cot, 0.5, 4).len(), 2);
    }

    #[test]
    fn writes_chat_messages_jsonl() {
        let tok_free_prompts = Rendered::plain(crate::tot::Prompts::builtin());
        let q = Question {
            id: "q1".into(),
            stem: "Which?".into(),
            options: vec![('A', "a".into()), ('B', "b".into())],
            answer: Some('A'),
            meta: Default::default(),
        };
        let tot = vec![record("q1", 'A', 'A', Some(tree("q1", 'A', &[('A', 0.9)])))];
        let picks = select(&tot, &[], 1.0, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        assert_eq!(write_sft(&path, &picks, &tot, &[q], &tok_free_prompts).unwrap(), 1);
        let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        let m = line["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(roles, vec!["system", "user", "assistant"]);
        assert!(m[1]["content"]
            .as_str()
            .unwrap()
            .contains("Question: Which?\nA. a\nB. b"));
        assert_eq!(m[2]["content"].as_str().unwrap(), "Step 1: think A\nThe answer is A.");
    }
}
