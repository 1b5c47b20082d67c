//! `qmtot serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! Threads: the caller's thread runs the engine ([`worker`]) — it owns the model, which need
//! not be `Send` — and a tokio runtime on other threads runs the HTTP side (axum). They talk
//! over channels: a job per request one way, updates (tokens, finishes) the other. Every
//! request in flight advances in the same batched engine steps; `n > 1` computes the prompt
//! once and forks it.
//!
//! Endpoints: `GET /health`, `GET /metrics` (Prometheus text), `GET /v1/models`,
//! `POST /v1/completions`, `POST /v1/chat/completions` (`n`, `max_tokens`, `temperature`,
//! `top_p`, `stop`, `seed`, `logprobs` with alternatives, `stream`, and on completions `echo`
//! and prompts as text, token ids or batches of either), and vLLM's tokenizer endpoints
//! (`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, which
//! lm-evaluation-harness's `local-completions` model uses as its tokenizer). Errors come in OpenAI's shape: a malformed
//! body or an unknown field is 400, a prompt longer than the context is 400 naming the limit,
//! a full queue is 429 with `Retry-After`, a wrong API key 401.

pub mod api;
pub mod metrics;
pub mod routes;
pub mod tot_jobs;
pub mod worker;

use std::sync::Arc;

use crate::backend::Backend;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Requests accepted at once (running or waiting); more get 429.
    pub max_queue: usize,
    /// The name `/v1/models` reports.
    pub model_name: String,
    pub engine: EngineConfig,
}

/// Serves on `listener` until the process ends (or the HTTP side fails). Runs the engine on
/// the calling thread.
pub fn serve<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    listener: std::net::TcpListener,
    config: ServerConfig,
) -> Result<()> {
    let mut engine = Engine::new(model, Some(tokenizer), config.engine)?;
    let (jobs, rx) = std::sync::mpsc::channel();
    let metrics = Arc::new(metrics::Metrics::default());
    let state = routes::AppState {
        jobs,
        metrics: metrics.clone(),
        model_name: Arc::new(config.model_name.clone()),
        tokenizer: Arc::new(tokenizer.clone()),
        context: model.config.context_length,
        config: Arc::new(config),
    };
    listener.set_nonblocking(true).map_err(|e| Error::io("<listener>", e))?;
    let http = std::thread::Builder::new()
        .name("qmtot-http".into())
        .spawn(move || -> std::io::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, routes::router(state)).await
            })
        })
        .map_err(|e| Error::io("<http thread>", e))?;
    // The state (and with it the job sender) lives in the HTTP thread: when it ends, `rx`
    // disconnects and the worker returns.
    worker::run(&mut engine, tokenizer, rx, metrics);
    match http.join() {
        Ok(r) => r.map_err(|e| Error::io("<http>", e)),
        Err(_) => Err(Error::InvalidArgument("the HTTP thread panicked".into())),
    }
}
