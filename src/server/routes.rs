//! HTTP handlers: authorization, admission (the queue limit), parsing into a worker job, and
//! the answer, whole or streamed as server-sent events in OpenAI's chunk format.

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

use super::api::{finish_reason, no_unknown, ApiError, ChatRequest, Common, CompletionRequest, TotRequest, Usage};
use super::metrics::Metrics;
use super::tot_jobs::{TotJob, TotUpdate};
use super::worker::{Job, PromptInput, Update, Work};
use super::ServerConfig;
use crate::error::Error;
use crate::tokenizer::ChatMessage;

#[derive(Clone)]
pub struct AppState {
    pub jobs: std::sync::mpsc::Sender<Work>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    pub model_name: Arc<String>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/tot", post(tot))
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

/// Which endpoint a job came from (the response shapes differ).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

struct Parsed {
    prompt: PromptInput,
    common: Common,
    max_tokens: usize,
    logprobs: bool,
    /// `/v1/completions` with `echo`: the prompt, put before each choice's text.
    echo: Option<String>,
}

async fn completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = authorize(&st, &headers).and_then(|()| {
        let r: CompletionRequest = serde_json::from_slice(&body).map_err(bad_body)?;
        no_unknown(&r.unknown)?;
        let echo = r.echo == Some(true);
        if echo && r.common.stream == Some(true) {
            return Err(ApiError::bad("echo with stream is not supported", Some("echo")));
        }
        Ok(Parsed {
            common: r.common.clone(),
            max_tokens: r.max_tokens.unwrap_or(16),
            logprobs: r.logprobs.is_some(),
            echo: echo.then(|| r.prompt.clone()),
            prompt: PromptInput::Text(r.prompt),
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
        Ok(Parsed {
            common: r.common.clone(),
            max_tokens: r.max_completion_tokens.or(r.max_tokens).unwrap_or(256),
            logprobs: r.logprobs == Some(true),
            echo: None,
            prompt: PromptInput::Chat(
                r.messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect(),
            ),
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

async fn respond(st: AppState, parsed: Result<Parsed, ApiError>, kind: Kind) -> Response {
    let result = async {
        let p = parsed?;
        let sampling = p.common.sampling()?;
        let n = p.common.n()?;
        let slot = admit(&st)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            prompt: p.prompt,
            n,
            sampling,
            max_tokens: p.max_tokens,
            stop: p.common.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
            prompt_logprobs: p.echo.is_some() && p.logprobs,
            reply: tx,
        };
        st.jobs.send(Work::Generate(job)).map_err(|_| engine_stopped())?;
        let prompt_tokens = match rx.recv().await {
            Some(Update::Started { prompt_tokens }) => prompt_tokens,
            Some(Update::Failed(e)) => return Err(refused(e)),
            _ => return Err(refused(Error::InvalidArgument("the engine dropped the request".into()))),
        };
        let head = Head {
            id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, unique()),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            model: st.model_name.to_string(),
            kind,
            logprobs: p.logprobs,
            n,
            prompt_tokens,
            echo: p.echo,
        };
        Ok(if p.common.stream == Some(true) {
            stream_response(head, rx, slot)
        } else {
            whole_response(head, rx, slot).await?
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
    logprobs: bool,
    n: usize,
    prompt_tokens: usize,
    echo: Option<String>,
}

/// One choice as it accumulates.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<String>,
    logprobs: Vec<Option<f32>>,
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

    fn logprobs_json(&self, c: &Choice) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => {
                let mut offset = 0;
                let offsets: Vec<usize> = c
                    .tokens
                    .iter()
                    .map(|t| {
                        let o = offset;
                        offset += t.len();
                        o
                    })
                    .collect();
                json!({"tokens": c.tokens, "token_logprobs": c.logprobs, "top_logprobs": null, "text_offset": offsets})
            }
            Kind::Chat => json!({"content": c.tokens.iter().zip(&c.logprobs).map(|(t, l)| json!({
                "token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": []
            })).collect::<Vec<_>>()}),
        }
    }

    fn choice_json(&self, index: usize, c: &Choice) -> Value {
        match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": c.text, "logprobs": self.logprobs_json(c), "finish_reason": c.finish})
            }
            Kind::Chat => json!({"index": index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": self.logprobs_json(c), "finish_reason": c.finish}),
        }
    }

    /// A streamed chunk for one choice: new text (and its tokens' log-probabilities) and/or
    /// the finish reason.
    fn chunk(&self, index: usize, text: &str, lp: &Choice, finish: Option<&str>, first: bool) -> String {
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

async fn whole_response(head: Head, mut rx: UnboundedReceiver<Update>, _slot: Admitted) -> Result<Response, ApiError> {
    let mut choices: Vec<Choice> = (0..head.n).map(|_| Choice::default()).collect();
    let mut prompt: Option<(Vec<String>, Vec<Option<f32>>)> = None;
    // Choices, and the prompt's scores when echoing them.
    let mut open = head.n + (head.echo.is_some() && head.logprobs) as usize;
    while open > 0 {
        match rx.recv().await {
            Some(Update::Token {
                choice,
                token_text,
                logprob,
                ..
            }) => {
                choices[choice].tokens.push(token_text);
                choices[choice].logprobs.push(Some(logprob));
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
            Some(Update::PromptLogprobs { tokens, logprobs }) => {
                prompt = Some((tokens, logprobs));
                open -= 1;
            }
            Some(Update::Failed(e)) => return Err(engine_failed(e)),
            Some(Update::Started { .. }) => {}
            None => {
                return Err(engine_failed(Error::InvalidArgument(
                    "the engine dropped the request".into(),
                )))
            }
        }
    }
    if let Some(echo) = &head.echo {
        // The prompt before each choice; its tokens' log-probabilities before the choice's.
        let (tokens, logprobs) = prompt.unwrap_or_default();
        for c in &mut choices {
            c.text.insert_str(0, echo);
            c.tokens.splice(0..0, tokens.iter().cloned());
            c.logprobs.splice(0..0, logprobs.iter().copied());
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

/// Streaming state: the receiver, what each choice has sent, and the queue place.
struct Streaming {
    head: Head,
    rx: UnboundedReceiver<Update>,
    sent: Vec<String>,
    started: Vec<bool>,
    open: usize,
    done: bool,
    _slot: Admitted,
}

fn stream_response(head: Head, rx: UnboundedReceiver<Update>, slot: Admitted) -> Response {
    let n = head.n;
    let state = Streaming {
        head,
        rx,
        sent: vec![String::new(); n],
        started: vec![false; n],
        open: n,
        done: false,
        _slot: slot,
    };
    // Dropping the stream (the client went away) drops the receiver: the worker sees it at the
    // next token and cancels the request.
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if s.open == 0 {
                s.done = true;
                return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data("[DONE]")), s));
            }
            match s.rx.recv().await {
                Some(Update::Token {
                    choice,
                    text,
                    token_text,
                    logprob,
                }) => {
                    if text.is_empty() && !s.head.logprobs {
                        continue; // held back (a partial character or a possible stop string)
                    }
                    let lp = Choice {
                        tokens: vec![token_text],
                        logprobs: vec![Some(logprob)],
                        ..Default::default()
                    };
                    let first = !s.started[choice];
                    s.started[choice] = true;
                    s.sent[choice].push_str(&text);
                    let data = s.head.chunk(choice, &text, &lp, None, first);
                    return Some((Ok(SseEvent::default().data(data)), s));
                }
                Some(Update::Finished {
                    choice, reason, text, ..
                }) => {
                    // Text held back until the end (it was not a stop string after all).
                    let tail = text.strip_prefix(s.sent[choice].as_str()).unwrap_or("").to_string();
                    let first = !s.started[choice];
                    s.started[choice] = true;
                    s.open -= 1;
                    let empty = Choice::default();
                    let data = s.head.chunk(choice, &tail, &empty, Some(finish_reason(&reason)), first);
                    return Some((Ok(SseEvent::default().data(data)), s));
                }
                Some(Update::Failed(e)) => {
                    s.done = true;
                    let data = engine_failed(e).body().to_string();
                    return Some((Ok(SseEvent::default().data(data)), s));
                }
                Some(Update::Started { .. } | Update::PromptLogprobs { .. }) => {}
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
