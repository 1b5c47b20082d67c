//! The OpenAI wire format: request bodies (parsed strictly: an unknown field is an error, so a
//! client's typo is not silently ignored), responses, streamed chunks and errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use crate::engine::sampler::MAX_TOP_LOGPROBS;
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

/// `/v1/completions`' `prompt`: a string, token ids, or a batch of either (OpenAI's four
/// forms). Token ids are used as given (no BOS added), as lm-evaluation-harness sends them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a completion request.
#[derive(Clone, Debug, PartialEq)]
pub enum OnePrompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Most prompts in one completion request, and most choices (prompts × n) in all.
pub const MAX_PROMPTS: usize = 256;
pub const MAX_CHOICES: usize = 1024;

impl PromptField {
    /// The prompts, at least one and at most [`MAX_PROMPTS`]. (An empty list parses as
    /// `Texts`: it is refused here whatever its element type would have been.)
    pub fn prompts(self) -> Result<Vec<OnePrompt>, ApiError> {
        let all = match self {
            PromptField::Text(t) => vec![OnePrompt::Text(t)],
            PromptField::Texts(v) => v.into_iter().map(OnePrompt::Text).collect(),
            PromptField::Tokens(t) => vec![OnePrompt::Tokens(t)],
            PromptField::TokenLists(v) => v.into_iter().map(OnePrompt::Tokens).collect(),
        };
        match all.len() {
            0 => Err(ApiError::bad("prompt must not be an empty list", Some("prompt"))),
            n if n > MAX_PROMPTS => Err(ApiError::bad(
                format!("at most {MAX_PROMPTS} prompts per request (got {n})"),
                Some("prompt"),
            )),
            _ => Ok(all),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    pub max_tokens: Option<usize>,
    /// Return the tokens' log-probabilities with this many most likely alternatives each
    /// (0 = the tokens' own only; at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
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

/// The messages as the tokenizer's chat template takes them.
pub fn chat_messages(messages: &[ChatMessageIn]) -> Vec<crate::tokenizer::ChatMessage> {
    messages
        .iter()
        .map(|m| crate::tokenizer::ChatMessage::new(&m.role, &m.content))
        .collect()
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    /// Alternatives per token (0..=[`MAX_TOP_LOGPROBS`]); needs `logprobs: true`.
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub unknown: Unknown,
}

/// `POST /tokenize` (vLLM's shape): a text or chat messages → token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Add the model's special tokens (a BOS where it wants one); default true.
    pub add_special_tokens: Option<bool>,
    /// With `messages`: open the assistant's turn; default true.
    pub add_generation_prompt: Option<bool>,
    pub model: Option<String>,
}

/// `POST /detokenize`: token ids → text.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
    pub model: Option<String>,
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

/// Alternatives per token asked for, checked (`param` names the field for the error).
pub fn alternatives(k: Option<usize>, param: &str) -> Result<usize, ApiError> {
    match k.unwrap_or(0) {
        k if k > MAX_TOP_LOGPROBS => Err(ApiError::bad(
            format!("{param} must be at most {MAX_TOP_LOGPROBS}"),
            Some(param),
        )),
        k => Ok(k),
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
