//! HTTP handlers: authorization, admission (the queue limit), parsing into a worker job, and
//! the answer, whole or streamed as server-sent events in OpenAI's chunk format.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{
    alternatives, chat_messages, finish_reason, no_unknown, ApiError, ChatRequest, Common, CompletionRequest,
    DetokenizeRequest, OnePrompt, TokenizeRequest, TotRequest, Usage, MAX_CHOICES,
};
use super::metrics::Metrics;
use super::tot_jobs::{TotJob, TotUpdate};
use super::worker::{Job, PromptInput, Update, Work};
use super::ServerConfig;
use crate::error::Error;
use crate::tokenizer::Tokenizer;

#[derive(Clone)]
pub struct AppState {
    pub jobs: std::sync::mpsc::Sender<Work>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    pub model_name: Arc<String>,
    /// For the tokenizer endpoints, answered here without the engine.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's context length.
    pub context: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/tot", post(tot))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 429 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// Equal-length byte strings compared without an early exit.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.config.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same_secret(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError {
            status: 401,
            message: "missing or wrong API key (Authorization: Bearer KEY)".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

/// A place in the queue, given back when the response is done (streams carry it along).
struct Admitted(Arc<Metrics>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

fn admit(st: &AppState) -> Result<Admitted, ApiError> {
    let m = &st.metrics;
    if m.in_flight.fetch_add(1, Relaxed) as usize >= st.config.max_queue {
        m.in_flight.fetch_sub(1, Relaxed);
        m.rejected_busy.fetch_add(1, Relaxed);
        return Err(ApiError {
            status: 429,
            message: format!(
                "the server is busy ({} requests queued); retry shortly",
                st.config.max_queue
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("busy"),
        });
    }
    m.requests.fetch_add(1, Relaxed);
    Ok(Admitted(m.clone()))
}

fn bad_body(e: serde_json::Error) -> ApiError {
    ApiError::bad(format!("invalid request body: {e}"), None)
}

async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.model_name.as_str(), "object": "model", "created": 0, "owned_by": "qmtot"}]
    }))
    .into_response()
}

/// `POST /tokenize`: `{"tokens", "count", "max_model_len"}` (vLLM's shape, which
/// lm-evaluation-harness's `tokenizer_backend=remote` uses).
async fn tokenize(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = (|| {
        authorize(&st, &headers)?;
        let r: TokenizeRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        let special = r.add_special_tokens.unwrap_or(true);
        let text = match (r.prompt, r.messages) {
            (Some(p), None) => p,
            (None, Some(m)) => st
                .tokenizer
                .apply_chat_template(&chat_messages(&m), r.add_generation_prompt.unwrap_or(true))
                .map_err(refused)?,
            _ => return Err(ApiError::bad("give exactly one of prompt and messages", Some("prompt"))),
        };
        let tokens = st.tokenizer.encode(&text, special).map_err(refused)?;
        Ok(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": st.context}))
    })();
    json_or_error(result)
}

/// A JSON answer, or the error in OpenAI's shape.
fn json_or_error(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /detokenize`: `{"prompt": text}`.
async fn detokenize(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = (|| {
        authorize(&st, &headers)?;
        let r: DetokenizeRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        let vocab = st.tokenizer.vocab_size();
        if let Some(&id) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(refused(Error::TokenOutOfRange { id, vocab }));
        }
        let text = st.tokenizer.decode(&r.tokens).map_err(refused)?;
        Ok(json!({ "prompt": text }))
    })();
    json_or_error(result)
}

/// `GET /tokenizer_info`: the special tokens, the chat template and the context length.
async fn tokenizer_info(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    let t = &st.tokenizer;
    let name = |id: Option<u32>| id.and_then(|i| t.id_to_token(i));
    axum::Json(json!({
        "eos_token": name(t.eos_ids().first().copied()),
        "bos_token": name(t.bos_id()),
        "pad_token": null,
        "add_bos_token": t.adds_bos(),
        "chat_template": t.chat_template(),
        "model_max_length": st.context,
        "vocab_size": t.vocab_size(),
    }))
    .into_response()
}

/// Which endpoint a job came from (the response shapes differ).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

struct Parsed {
    prompts: Vec<PromptInput>,
    common: Common,
    max_tokens: usize,
    /// Return log-probabilities, with this many alternatives per token.
    logprobs: Option<usize>,
    /// `/v1/completions` with `echo`: each prompt is put before its choices' text.
    echo: bool,
}

async fn completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = authorize(&st, &headers).and_then(|()| {
        let r: CompletionRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        no_unknown(&r.unknown)?;
        let logprobs = match r.logprobs {
            None => None,
            k => Some(alternatives(k, "logprobs")?),
        };
        Ok(Parsed {
            common: r.common.clone(),
            max_tokens: r.max_tokens.unwrap_or(16),
            logprobs,
            echo: r.echo == Some(true),
            prompts: r
                .prompt
                .prompts()?
                .into_iter()
                .map(|p| match p {
                    OnePrompt::Text(t) => PromptInput::Text(t),
                    OnePrompt::Tokens(t) => PromptInput::Tokens(t),
                })
                .collect(),
        })
    });
    respond(st, parsed, Kind::Completion).await
}

async fn chat(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = authorize(&st, &headers).and_then(|()| {
        let r: ChatRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        no_unknown(&r.unknown)?;
        if r.messages.is_empty() {
            return Err(ApiError::bad("messages must not be empty", Some("messages")));
        }
        if r.top_logprobs.is_some() && r.logprobs != Some(true) {
            return Err(ApiError::bad("top_logprobs needs logprobs: true", Some("top_logprobs")));
        }
        let logprobs = match r.logprobs {
            Some(true) => Some(alternatives(r.top_logprobs, "top_logprobs")?),
            _ => None,
        };
        Ok(Parsed {
            common: r.common.clone(),
            max_tokens: r.max_completion_tokens.or(r.max_tokens).unwrap_or(256),
            logprobs,
            echo: false,
            prompts: vec![PromptInput::Chat(chat_messages(&r.messages))],
        })
    });
    respond(st, parsed, Kind::Chat).await
}

/// Maps an engine refusal to an HTTP error.
fn refused(e: Error) -> ApiError {
    match e {
        Error::PromptTooLong { .. } | Error::EmptyPrompt | Error::KvCapacity { .. } => {
            ApiError::bad(e.to_string(), Some("prompt"))
        }
        Error::InvalidArgument(_) | Error::ChatTemplate(_) | Error::TokenOutOfRange { .. } => {
            ApiError::bad(e.to_string(), None)
        }
        other => engine_failed(other),
    }
}

/// A request's updates: those that came while its prompts were starting, then the channel.
struct Updates {
    early: VecDeque<Update>,
    rx: UnboundedReceiver<Update>,
}

impl Updates {
    async fn recv(&mut self) -> Option<Update> {
        match self.early.pop_front() {
            Some(u) => Some(u),
            None => self.rx.recv().await,
        }
    }
}

async fn respond(st: AppState, parsed: Result<Parsed, ApiError>, kind: Kind) -> Response {
    let result = async {
        let p = parsed?;
        let mut sampling = p.common.sampling()?;
        sampling.top_logprobs = p.logprobs.unwrap_or(0);
        let n = p.common.n()?;
        let prompts = p.prompts.len();
        if prompts * n > MAX_CHOICES {
            return Err(ApiError::bad(
                format!("prompts × n is at most {MAX_CHOICES} (got {prompts} × {n})"),
                Some("n"),
            ));
        }
        let slot = admit(&st)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = p.common.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        for (index, prompt) in p.prompts.into_iter().enumerate() {
            let job = Job {
                prompt,
                index,
                n,
                sampling: sampling.clone(),
                max_tokens: p.max_tokens,
                stop: stop.clone(),
                prompt_logprobs: p.echo && p.logprobs.is_some(),
                echo: p.echo,
                reply: tx.clone(),
            };
            st.jobs.send(Work::Generate(job)).map_err(|_| engine_stopped())?;
        }
        drop(tx);
        // Every prompt started (or the request fails; dropping the receiver then cancels the
        // prompts that did start). Other prompts' tokens may come first: they are kept.
        let mut updates = Updates {
            early: VecDeque::new(),
            rx,
        };
        let mut prompt_tokens = 0;
        let mut echo: Vec<Option<String>> = vec![None; prompts];
        let mut started = 0;
        while started < prompts {
            match updates.rx.recv().await {
                Some(Update::Started {
                    index,
                    prompt_tokens: t,
                    text,
                }) => {
                    prompt_tokens += t;
                    echo[index] = text;
                    started += 1;
                }
                Some(Update::Failed(e)) => return Err(refused(e)),
                Some(other) => updates.early.push_back(other),
                None => return Err(refused(Error::InvalidArgument("the engine dropped the request".into()))),
            }
        }
        let head = Head {
            id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, unique()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            model: st.model_name.to_string(),
            kind,
            logprobs: p.logprobs,
            n,
            choices: prompts * n,
            prompt_tokens,
            echo: if p.echo { echo } else { Vec::new() },
        };
        Ok(if p.common.stream == Some(true) {
            stream_response(head, updates, slot)
        } else {
            whole_response(head, updates, slot).await?
        })
    }
    .await;
    result.unwrap_or_else(|e| {
        if e.status != 429 {
            st.metrics.bad_requests.fetch_add(1, Relaxed);
        }
        e.into_response()
    })
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// Log-probabilities asked for, with this many alternatives per token.
    logprobs: Option<usize>,
    /// Choices per prompt; choice `c` belongs to prompt `c / n`.
    n: usize,
    /// Choices in all (prompts × n).
    choices: usize,
    /// Over every prompt.
    prompt_tokens: usize,
    /// With `echo`: each prompt's text (else empty).
    echo: Vec<Option<String>>,
}

impl Head {
    fn echoes(&self) -> bool {
        !self.echo.is_empty()
    }

    /// Whether the prompts are scored (echo with log-probabilities): one more update each.
    fn scores_prompts(&self) -> bool {
        self.echoes() && self.logprobs.is_some()
    }
}

/// Tokens with their log-probabilities and alternatives: a choice's, a prompt's or a chunk's.
#[derive(Clone, Default)]
struct TokenLogprobs {
    tokens: Vec<String>,
    /// `None` for a prompt's first token (it has no context).
    logprobs: Vec<Option<f32>>,
    top: Vec<Option<Vec<(String, f32)>>>,
}

impl TokenLogprobs {
    fn one(token: String, logprob: f32, top: Vec<(String, f32)>) -> Self {
        Self {
            tokens: vec![token],
            logprobs: vec![Some(logprob)],
            top: vec![Some(top)],
        }
    }

    /// `other` before these.
    fn prepend(&mut self, other: &TokenLogprobs) {
        self.tokens.splice(0..0, other.tokens.iter().cloned());
        self.logprobs.splice(0..0, other.logprobs.iter().copied());
        self.top.splice(0..0, other.top.iter().cloned());
    }
}

/// One choice as it accumulates.
#[derive(Default)]
struct Choice {
    text: String,
    lp: TokenLogprobs,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn logprobs_json(&self, lp: &TokenLogprobs) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => {
                let mut offset = 0;
                let offsets: Vec<usize> = lp
                    .tokens
                    .iter()
                    .map(|t| {
                        let o = offset;
                        offset += t.len();
                        o
                    })
                    .collect();
                // Per token: the alternatives and the token itself (OpenAI's legacy shape:
                // up to k + 1 entries); null where the token has no log-probability.
                let top: Vec<Value> = lp
                    .tokens
                    .iter()
                    .zip(&lp.logprobs)
                    .zip(&lp.top)
                    .map(|((t, l), alts)| match l {
                        None => Value::Null,
                        Some(l) => {
                            let mut m = serde_json::Map::new();
                            for (s, v) in alts.iter().flatten() {
                                m.entry(s.clone()).or_insert(json!(v));
                            }
                            m.entry(t.clone()).or_insert(json!(l));
                            Value::Object(m)
                        }
                    })
                    .collect();
                json!({"tokens": lp.tokens, "token_logprobs": lp.logprobs, "top_logprobs": top, "text_offset": offsets})
            }
            Kind::Chat => {
                let entry = |t: &str, l: &Option<f32>| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
                json!({"content": lp.tokens.iter().zip(&lp.logprobs).zip(&lp.top).map(|((t, l), alts)| {
                    let mut e = entry(t, l);
                    e["top_logprobs"] = alts.iter().flatten().map(|(s, v)| entry(s, &Some(*v))).collect();
                    e
                }).collect::<Vec<_>>()})
            }
        }
    }

    fn choice_json(&self, index: usize, c: &Choice) -> Value {
        match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": c.text, "logprobs": self.logprobs_json(&c.lp), "finish_reason": c.finish})
            }
            Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": self.logprobs_json(&c.lp), "finish_reason": c.finish}),
        }
    }

    /// A streamed chunk for one choice: new text (and its tokens' log-probabilities) and/or
    /// the finish reason.
    fn chunk(&self, index: usize, text: &str, lp: &TokenLogprobs, finish: Option<&str>, first: bool) -> String {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": text, "logprobs": self.logprobs_json(lp), "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": self.logprobs_json(lp), "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
            .to_string()
    }
}

fn engine_failed(e: Error) -> ApiError {
    ApiError::server(500, e.to_string())
}

/// The engine thread is gone (the server is shutting down).
fn engine_stopped() -> ApiError {
    ApiError::server(503, "the engine has stopped")
}

fn dropped() -> ApiError {
    engine_failed(Error::InvalidArgument("the engine dropped the request".into()))
}

async fn whole_response(head: Head, mut updates: Updates, _slot: Admitted) -> Result<Response, ApiError> {
    let mut choices: Vec<Choice> = (0..head.choices).map(|_| Choice::default()).collect();
    let prompts = head.echo.len();
    let mut prompt_lp: Vec<TokenLogprobs> = vec![TokenLogprobs::default(); prompts];
    // Choices, and the prompts' scores when echoing them.
    let mut open = head.choices + if head.scores_prompts() { prompts } else { 0 };
    while open > 0 {
        match updates.recv().await {
            Some(Update::Token {
                choice,
                token_text,
                logprob,
                top,
                ..
            }) => {
                let lp = &mut choices[choice].lp;
                lp.tokens.push(token_text);
                lp.logprobs.push(Some(logprob));
                lp.top.push(Some(top));
            }
            Some(Update::Finished {
                choice,
                reason,
                tokens,
                text,
            }) => {
                let c = &mut choices[choice];
                c.text = text;
                c.finish = Some(finish_reason(&reason));
                c.completion_tokens = tokens;
                open -= 1;
            }
            Some(Update::PromptLogprobs {
                index,
                tokens,
                logprobs,
                top,
            }) => {
                prompt_lp[index] = TokenLogprobs { tokens, logprobs, top };
                open -= 1;
            }
            Some(Update::Failed(e)) => return Err(engine_failed(e)),
            Some(Update::Started { .. }) => {}
            None => return Err(dropped()),
        }
    }
    if head.echoes() {
        // Each prompt before its choices; its tokens' log-probabilities before theirs.
        for (i, c) in choices.iter_mut().enumerate() {
            let prompt = i / head.n;
            c.text.insert_str(0, head.echo[prompt].as_deref().unwrap_or(""));
            c.lp.prepend(&prompt_lp[prompt]);
        }
    }
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let usage = Usage {
        prompt_tokens: head.prompt_tokens,
        completion_tokens,
        total_tokens: head.prompt_tokens + completion_tokens,
    };
    let body = json!({
        "id": head.id, "object": head.object(false), "created": head.created, "model": head.model,
        "choices": choices.iter().enumerate().map(|(i, c)| head.choice_json(i, c)).collect::<Vec<_>>(),
        "usage": usage,
    });
    Ok(axum::Json(body).into_response())
}

/// Streaming state: the updates, what each choice has sent, chunks ready to go, and the queue
/// place.
struct Streaming {
    head: Head,
    updates: Updates,
    sent: Vec<String>,
    started: Vec<bool>,
    /// Chunks to send before reading more updates.
    ready: VecDeque<String>,
    /// With echo and log-probabilities, a choice's chunks wait until its prompt's echo (which
    /// carries the prompt's log-probabilities) has gone out.
    echoed: Vec<bool>,
    held: Vec<Vec<String>>,
    /// Updates still to come: one finish per choice and one score per echoed prompt.
    open: usize,
    done: bool,
    _slot: Admitted,
}

impl Streaming {
    /// The echo chunk of each choice of `prompt`, then what those choices held back.
    fn echo(&mut self, prompt: usize, lp: &TokenLogprobs) {
        let text = self.head.echo[prompt].clone().unwrap_or_default();
        for c in prompt * self.head.n..(prompt + 1) * self.head.n {
            let data = self.head.chunk(c, &text, lp, None, false);
            self.ready.push_back(data);
            self.echoed[c] = true;
            self.started[c] = true;
            self.ready.extend(self.held[c].drain(..));
        }
    }

    fn emit(&mut self, choice: usize, data: String) {
        if self.echoed[choice] {
            self.ready.push_back(data);
        } else {
            self.held[choice].push(data);
        }
    }
}

fn stream_response(head: Head, updates: Updates, slot: Admitted) -> Response {
    let choices = head.choices;
    let prompts = head.echo.len();
    let open = choices + if head.scores_prompts() { prompts } else { 0 };
    let mut state = Streaming {
        sent: vec![String::new(); choices],
        started: vec![false; choices],
        ready: VecDeque::new(),
        echoed: vec![!head.scores_prompts(); choices],
        held: vec![Vec::new(); choices],
        open,
        done: false,
        head,
        updates,
        _slot: slot,
    };
    if state.head.echoes() && !state.head.scores_prompts() {
        // Echo without log-probabilities: the prompts' text goes first.
        for p in 0..prompts {
            state.echo(p, &TokenLogprobs::default());
        }
    }
    // Dropping the stream (the client went away) drops the receiver: the worker sees it at the
    // next token and cancels the request.
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.ready.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            if s.open == 0 {
                s.done = true;
                return Some((Ok(SseEvent::default().data("[DONE]")), s));
            }
            match s.updates.recv().await {
                Some(Update::Token {
                    choice,
                    text,
                    token_text,
                    logprob,
                    top,
                }) => {
                    if text.is_empty() && s.head.logprobs.is_none() {
                        continue; // held back (a partial character or a possible stop string)
                    }
                    let lp = TokenLogprobs::one(token_text, logprob, top);
                    let first = !s.started[choice];
                    s.started[choice] = true;
                    s.sent[choice].push_str(&text);
                    let data = s.head.chunk(choice, &text, &lp, None, first);
                    s.emit(choice, data);
                }
                Some(Update::Finished {
                    choice, reason, text, ..
                }) => {
                    // Text held back until the end (it was not a stop string after all).
                    let tail = text.strip_prefix(s.sent[choice].as_str()).unwrap_or("").to_string();
                    let first = !s.started[choice];
                    s.started[choice] = true;
                    s.open -= 1;
                    let data = s.head.chunk(
                        choice,
                        &tail,
                        &TokenLogprobs::default(),
                        Some(finish_reason(&reason)),
                        first,
                    );
                    s.emit(choice, data);
                }
                Some(Update::PromptLogprobs {
                    index,
                    tokens,
                    logprobs,
                    top,
                }) => {
                    s.open -= 1;
                    s.echo(index, &TokenLogprobs { tokens, logprobs, top });
                }
                Some(Update::Failed(e)) => {
                    s.done = true;
                    s.ready.clear();
                    let data = engine_failed(e).body().to_string();
                    return Some((Ok(SseEvent::default().data(data)), s));
                }
                Some(Update::Started { .. }) => {}
                None => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// The final `/v1/tot` object.
fn tot_body(id: &str, model: &str, solved: &crate::tot::Solved) -> Value {
    let tree = &solved.tree;
    let d = tree.decision.as_ref();
    let answer = d.and_then(|d| d.answer);
    json!({
        "id": id,
        "object": "tot",
        "model": model,
        "answer": answer.map(|a| a.to_string()),
        "correct": tree.gold.map(|g| Some(g) == answer),
        "votes": d.map(|d| d.votes.iter().map(|(l, v)| (l.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()),
        "support": d.and_then(|d| d.leaf).map(|l| tree.thoughts(l)).unwrap_or_default(),
        "thoughts": tree.thought_count(),
        "usage": {
            "generated_tokens": solved.tokens.generated,
            "prompt_tokens_computed": solved.tokens.prefilled,
            "prompt_tokens_reused": solved.tokens.reused,
        },
        "seconds": solved.seconds,
        "tree": tree,
    })
}

async fn tot(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        authorize(&st, &headers)?;
        let r: TotRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        let (question, config) = r.job()?;
        let slot = admit(&st)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stream_nodes = r.stream == Some(true);
        let job = TotJob {
            question,
            config,
            stream: stream_nodes,
            reply: tx,
        };
        st.jobs.send(Work::Tot(job)).map_err(|_| engine_stopped())?;
        let id = format!("tot-{}", unique());
        let model = st.model_name.to_string();
        if !stream_nodes {
            let _slot = slot;
            return loop {
                match rx.recv().await {
                    Some(TotUpdate::Done(solved)) => {
                        break Ok(axum::Json(tot_body(&id, &model, &solved)).into_response())
                    }
                    Some(TotUpdate::Failed(e)) => break Err(refused(e)),
                    Some(TotUpdate::Node(_)) => {}
                    None => {
                        break Err(engine_failed(Error::InvalidArgument(
                            "the engine dropped the request".into(),
                        )))
                    }
                }
            };
        }
        // Streamed: one event per decided node, then the whole answer, then [DONE].
        let events = stream::unfold((rx, Some(slot), false), move |(mut rx, slot, done)| {
            let (id, model) = (id.clone(), model.clone());
            async move {
                if done {
                    return None;
                }
                let data = match rx.recv().await {
                    Some(TotUpdate::Node(n)) => json!({"object": "tot.node", "node": n}).to_string(),
                    Some(TotUpdate::Done(solved)) => {
                        let body = tot_body(&id, &model, &solved).to_string();
                        return Some((
                            Ok::<_, std::convert::Infallible>(SseEvent::default().data(body)),
                            (rx, slot, true),
                        ));
                    }
                    Some(TotUpdate::Failed(e)) => engine_failed(e).body().to_string(),
                    None => return None,
                };
                Some((Ok(SseEvent::default().data(data)), (rx, slot, false)))
            }
        });
        let done = stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
        Ok(Sse::new(futures_util::StreamExt::chain(events, done))
            .keep_alive(KeepAlive::default())
            .into_response())
    }
    .await;
    result.unwrap_or_else(|e: ApiError| {
        if e.status != 429 {
            st.metrics.bad_requests.fetch_add(1, Relaxed);
        }
        e.into_response()
    })
}
