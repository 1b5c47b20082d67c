//! The OpenAI wire format: request bodies (parsed strictly: an unknown field is an error, so a
//! client's typo is not silently ignored), responses, streamed chunks and errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::{FinishReason, SamplingParams};

/// A string or a list of strings (`stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Fields both endpoints share.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub n: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    pub stream: Option<bool>,
    /// Accepted and ignored (OpenAI clients may send it).
    pub user: Option<String>,
    /// Only 0 is supported.
    pub presence_penalty: Option<f32>,
    /// Only 0 is supported.
    pub frequency_penalty: Option<f32>,
}

/// What no field took. (serde's `deny_unknown_fields` does not combine with `flatten`, so
/// each request collects the rest and checks it with [`no_unknown`].)
pub type Unknown = std::collections::BTreeMap<String, Value>;

/// A request body with no unknown field.
pub fn no_unknown(rest: &Unknown) -> Result<(), ApiError> {
    match rest.keys().next() {
        None => Ok(()),
        Some(k) => Err(ApiError::bad(
            format!(
                "unknown field {k:?}{}",
                if rest.len() > 1 { " (and others)" } else { "" }
            ),
            Some(k),
        )),
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: String,
    pub max_tokens: Option<usize>,
    /// Return the sampled tokens' log-probabilities (top alternatives are not computed: any
    /// value asks for the sampled ones).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: String,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// Most samples per request.
pub const MAX_N: usize = 128;

impl Common {
    /// Sampling parameters with OpenAI's defaults (temperature 1, top_p 1), checked.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|p| p != 0.0) {
                return Err(ApiError::bad(format!("{name} is not supported (only 0)"), Some(name)));
            }
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or(0),
            ..Default::default()
        };
        p.validate()
            .map_err(|e| ApiError::bad(e.to_string(), Some("temperature")))?;
        Ok(p)
    }

    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::bad("n must be at least 1", Some("n"))),
            n if n > MAX_N => Err(ApiError::bad(format!("n must be at most {MAX_N}"), Some("n"))),
            n => Ok(n),
        }
    }
}

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A failure on the server's side.
    pub fn server(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// OpenAI's name for why a choice ended.
pub fn finish_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        FinishReason::Cancelled => "cancelled",
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /v1/tot`: one question, its options and the search's parameters (defaults: the
/// published QM-ToT rollout).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotRequest {
    pub question: String,
    /// Letter → text, e.g. `{"A": "…", "B": "…"}`; letters A, B, C… in order.
    pub options: std::collections::BTreeMap<String, String>,
    /// The correct letter, if known (the response then says whether the search found it).
    pub answer: Option<String>,
    pub k: Option<usize>,
    pub depth: Option<usize>,
    /// `bfs`, `beam` or `dfs`.
    pub strategy: Option<String>,
    pub breadth: Option<usize>,
    pub max_leaves: Option<usize>,
    pub value_threshold: Option<f32>,
    /// `majority`, `weighted` or `best`.
    pub vote: Option<String>,
    pub sufficiency: Option<bool>,
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
    pub step_tokens: Option<usize>,
    pub stream: Option<bool>,
    pub model: Option<String>,
}

impl TotRequest {
    /// The question and the runner's configuration, checked.
    pub fn job(&self) -> Result<(crate::eval::datasets::Question, crate::tot::RunnerConfig), ApiError> {
        use crate::tot::{RunnerConfig, SearchConfig, Strategy, Vote};
        let letters: Vec<char> = self.options.keys().filter_map(|k| k.chars().next()).collect();
        let expected: Vec<char> = ('A'..).take(self.options.len()).collect();
        if self.options.len() < 2 || letters != expected || self.options.keys().any(|k| k.len() != 1) {
            return Err(ApiError::bad(
                format!(
                    "options must be lettered A, B, … in order (at least two); got {:?}",
                    self.options.keys().collect::<Vec<_>>()
                ),
                Some("options"),
            ));
        }
        if self.question.trim().is_empty() {
            return Err(ApiError::bad("question must not be empty", Some("question")));
        }
        let answer = match &self.answer {
            None => None,
            Some(a) => Some(
                a.chars()
                    .next()
                    .filter(|c| a.len() == 1 && letters.contains(c))
                    .ok_or_else(|| ApiError::bad(format!("answer {a:?} is not an option letter"), Some("answer")))?,
            ),
        };
        let base = SearchConfig::published();
        let breadth = self.breadth;
        let strategy = match self.strategy.as_deref() {
            None | Some("bfs") if breadth.is_none() => Strategy::Bfs,
            None | Some("bfs") | Some("beam") => Strategy::Beam {
                breadth: breadth.unwrap_or(self.k.unwrap_or(base.branching)),
            },
            Some("dfs") => Strategy::Dfs {
                max_leaves: self.max_leaves.unwrap_or(3),
            },
            Some(other) => {
                return Err(ApiError::bad(
                    format!("unknown strategy {other:?} (bfs, beam, dfs)"),
                    Some("strategy"),
                ))
            }
        };
        let vote = match self.vote.as_deref() {
            None | Some("majority") => Vote::Majority,
            Some("weighted") => Vote::Weighted,
            Some("best") => Vote::Best,
            Some(other) => {
                return Err(ApiError::bad(
                    format!("unknown vote {other:?} (majority, weighted, best)"),
                    Some("vote"),
                ))
            }
        };
        let search = SearchConfig {
            strategy,
            branching: self.k.unwrap_or(base.branching),
            depth: self.depth.unwrap_or(base.depth),
            sufficiency: self.sufficiency.unwrap_or(true),
            value_threshold: self.value_threshold,
            vote,
            ..base
        };
        search.validate().map_err(|e| ApiError::bad(e.to_string(), None))?;
        if search.branching > 16 || search.depth > 6 {
            return Err(ApiError::bad("k is at most 16 and depth at most 6 here", Some("k")));
        }
        let mut config = RunnerConfig::new(search);
        config.sampling.temperature = self.temperature.unwrap_or(config.sampling.temperature);
        config.sampling.seed = self.seed.unwrap_or(0);
        config
            .sampling
            .validate()
            .map_err(|e| ApiError::bad(e.to_string(), Some("temperature")))?;
        config.step_tokens = self.step_tokens.unwrap_or(config.step_tokens).clamp(1, 512);
        let question = crate::eval::datasets::Question {
            id: "request".into(),
            stem: self.question.clone(),
            options: self
                .options
                .iter()
                .map(|(k, v)| (k.chars().next().expect("checked"), v.clone()))
                .collect(),
            answer,
            meta: Default::default(),
        };
        Ok((question, config))
    }
}
