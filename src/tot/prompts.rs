//! The QM-ToT prompt templates (`prompts/qmtot.toml`, embedded; `--prompts FILE` overrides)
//! and their rendering through the model's chat template.
//!
//! The chat template is rendered once with marker strings in place of the user content, the
//! assistant content and a follow-up user turn; the text between the markers gives the
//! template's pieces:
//!
//! ```text
//! head ‹user content› user_end ‹assistant: steps…› turn ‹evaluator question› tail ‹reply›
//! ```
//!
//! A question's root sequence is `head + question + instruction + user_end`; a node appends
//! its steps; an evaluator appends `turn + ask + tail + reply` to a fork of the node and scores
//! its fixed answers. Models without a chat template get plain-text pieces.

use std::path::Path;

use serde::Deserialize;

use super::search::StepKind;
use crate::error::{Error, Result};
use crate::eval::datasets::Question;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// The built-in prompts.
pub const DEFAULT_PROMPTS: &str = include_str!("../../prompts/qmtot.toml");

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompts {
    pub system: String,
    pub question: String,
    pub option: String,
    pub generate: String,
    pub chain: String,
    pub step_prefix: String,
    pub value: ValuePrompt,
    pub sufficiency: YesNoPrompt,
    pub answer: AnswerPrompt,
    pub judge: YesNoPrompt,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValuePrompt {
    pub ask: String,
    pub reply: String,
    /// sure, likely, impossible.
    pub candidates: [String; 3],
    pub weights: [f32; 3],
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YesNoPrompt {
    pub ask: String,
    pub reply: String,
    pub yes: String,
    pub no: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerPrompt {
    pub ask: String,
    pub reply: String,
    pub letter: String,
}

impl Prompts {
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_PROMPTS, Path::new("prompts/qmtot.toml")).expect("the built-in prompts parse")
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let p: Prompts =
            toml::from_str(text).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let bad = |m: &str| Err(Error::InvalidArgument(format!("{}: {m}", path.display())));
        if !p.question.contains("{stem}") || !p.question.contains("{options}") {
            return bad("`question` must contain {stem} and {options}");
        }
        if !p.answer.letter.contains("{letter}") {
            return bad("`answer.letter` must contain {letter}");
        }
        if p.value.candidates.iter().any(String::is_empty) || p.sufficiency.yes.is_empty() || p.judge.yes.is_empty() {
            return bad("answer candidates must not be empty");
        }
        if p.value.weights.iter().any(|w| !w.is_finite()) {
            return bad("value weights must be finite");
        }
        Ok(p)
    }

    /// The question with its options.
    pub fn question_text(&self, q: &Question) -> String {
        let options: Vec<String> = q
            .options
            .iter()
            .map(|(l, t)| {
                self.option
                    .replace("{letter}", &l.to_string())
                    .replace("{text}", t.trim())
            })
            .collect();
        self.question
            .replace("{stem}", q.stem.trim())
            .replace("{options}", &options.join("\n"))
    }
}

/// Which evaluator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evaluator {
    Value,
    Sufficiency,
    Answer,
    Judge,
}

/// Prompts rendered for one model: the chat template's pieces, ready to concatenate.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub prompts: Prompts,
    head: String,
    user_end: String,
    turn: String,
    tail: String,
    /// Whether the pieces come from a chat template (which writes its own special tokens).
    templated: bool,
}

const USER: &str = "\u{27E6}qmtot:user\u{27E7}";
const ASSISTANT: &str = "\u{27E6}qmtot:assistant\u{27E7}";
const ASK: &str = "\u{27E6}qmtot:ask\u{27E7}";

impl Rendered {
    /// Plain-text pieces, for models without a chat template.
    pub fn plain(prompts: Prompts) -> Self {
        Self {
            prompts,
            head: String::new(),
            user_end: "\n\n".into(),
            turn: "\n\n".into(),
            tail: "\n".into(),
            templated: false,
        }
    }

    pub fn new(prompts: Prompts, tokenizer: &Tokenizer) -> Result<Self> {
        if tokenizer.chat_template().is_none() {
            return Ok(Self::plain(prompts));
        }
        let mut messages = vec![
            ChatMessage::new("user", USER),
            ChatMessage::new("assistant", ASSISTANT),
            ChatMessage::new("user", ASK),
        ];
        let with_system = {
            let mut m = vec![ChatMessage::new("system", &prompts.system)];
            m.extend(messages.iter().cloned());
            m
        };
        // Some templates refuse a system turn: fold it into the user's then.
        let text = match tokenizer.apply_chat_template(&with_system, true) {
            Ok(t) => t,
            Err(_) => {
                messages[0] = ChatMessage::new("user", &format!("{}\n\n{USER}", prompts.system));
                tokenizer.apply_chat_template(&messages, true)?
            }
        };
        let cut = |s: &str, marker: &str| -> Result<(String, String)> {
            s.split_once(marker)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::ChatTemplate(format!("the template dropped the message {marker:?}")))
        };
        let (head, rest) = cut(&text, USER)?;
        let (user_end, rest) = cut(&rest, ASSISTANT)?;
        let (turn, tail) = cut(&rest, ASK)?;
        Ok(Self {
            prompts,
            head,
            user_end,
            turn,
            tail,
            templated: true,
        })
    }

    /// Whether to let the tokenizer add its special tokens (BOS) to the root text.
    pub fn add_special(&self) -> bool {
        !self.templated
    }

    /// The root sequence's text: system, question and instruction, up to the assistant's
    /// first step.
    pub fn root(&self, q: &Question, step: StepKind) -> String {
        let instruction = match step {
            StepKind::Line => &self.prompts.generate,
            StepKind::Chain => &self.prompts.chain,
        };
        let system = if self.templated {
            String::new() // in `head` already
        } else {
            format!("{}\n\n", self.prompts.system)
        };
        format!(
            "{}{system}{}\n\n{instruction}{}",
            self.head,
            self.prompts.question_text(q),
            self.user_end
        )
    }

    /// The text that opens step `n` (1-based).
    pub fn step_prefix(&self, n: usize) -> String {
        self.prompts.step_prefix.replace("{n}", &n.to_string())
    }

    /// What an evaluator appends to a node: the follow-up question and the reply's start.
    pub fn evaluator_suffix(&self, e: Evaluator) -> String {
        let (ask, reply) = match e {
            Evaluator::Value => (&self.prompts.value.ask, &self.prompts.value.reply),
            Evaluator::Sufficiency => (&self.prompts.sufficiency.ask, &self.prompts.sufficiency.reply),
            Evaluator::Answer => (&self.prompts.answer.ask, &self.prompts.answer.reply),
            Evaluator::Judge => (&self.prompts.judge.ask, &self.prompts.judge.reply),
        };
        format!("{}{ask}{}{reply}", self.turn, self.tail)
    }

    /// The fixed answers an evaluator scores, as text, in the order its outcome lists them.
    pub fn candidates(&self, e: Evaluator, letters: &[char]) -> Vec<String> {
        let p = &self.prompts;
        match e {
            Evaluator::Value => p.value.candidates.to_vec(),
            Evaluator::Sufficiency => vec![p.sufficiency.yes.clone(), p.sufficiency.no.clone()],
            Evaluator::Judge => vec![p.judge.yes.clone(), p.judge.no.clone()],
            Evaluator::Answer => letters
                .iter()
                .map(|l| p.answer.letter.replace("{letter}", &l.to_string()))
                .collect(),
        }
    }

    /// The assistant text of a finished path, for distillation: the steps, then the answer.
    pub fn assistant_text(&self, thoughts: &[&str], answer: char) -> String {
        let mut s: String = thoughts.iter().map(|t| format!("{}\n", t.trim_end())).collect();
        s.push_str(&format!(
            "{}{}.",
            self.prompts.answer.reply,
            self.prompts.answer.letter.replace("{letter}", &answer.to_string())
        ));
        s.trim_start().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prompts_parse_and_bad_files_are_errors() {
        let p = Prompts::builtin();
        assert_eq!(p.value.candidates[0], "sure");
        let err = Prompts::parse("system = 1", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("x.toml"), "{err}");
        let missing = DEFAULT_PROMPTS.replace("{options}", "");
        assert!(Prompts::parse(&missing, Path::new("y.toml")).is_err());
    }
}
