//! Server counters and the engine's latest state, rendered in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use crate::engine::EngineStats;

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub bad_requests: AtomicU64,
    pub disconnects: AtomicU64,
    pub in_flight: AtomicU64,
    generated_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    engine: EngineStats,
    running: usize,
    /// Most KV blocks in use (sequences and prefix cache) seen after a step.
    peak_blocks: usize,
    /// (time, generated tokens) at the last rate sample, and the rate.
    last: Option<(Instant, u64)>,
    tokens_per_second: f64,
}

impl Metrics {
    pub fn generated(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Relaxed);
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Relaxed);
    }

    pub fn disconnected(&self) {
        self.disconnects.fetch_add(1, Relaxed);
    }

    /// The engine's state after a step (or when it went idle).
    pub fn engine(&self, stats: &EngineStats, running: usize) {
        let mut s = self.state.lock().expect("metrics lock");
        s.engine = stats.clone();
        s.running = running;
        s.peak_blocks = s.peak_blocks.max(stats.pool.used);
        let now = Instant::now();
        let generated = self.generated_tokens.load(Relaxed);
        match s.last {
            Some((t, g)) if now.duration_since(t).as_secs_f64() >= 1.0 => {
                s.tokens_per_second = (generated - g) as f64 / now.duration_since(t).as_secs_f64();
                s.last = Some((now, generated));
            }
            Some(_) => {}
            None => s.last = Some((now, generated)),
        }
        if running == 0 {
            s.tokens_per_second = 0.0;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let s = self.state.lock().expect("metrics lock");
        let e = &s.engine;
        let hit = e.cached_tokens as f64 / (e.cached_tokens + e.computed_tokens).max(1) as f64;
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        put(
            "qmtot_requests_total",
            "counter",
            "Requests accepted.",
            self.requests.load(Relaxed) as f64,
        );
        put(
            "qmtot_requests_rejected_busy_total",
            "counter",
            "Requests refused with 429.",
            self.rejected_busy.load(Relaxed) as f64,
        );
        put(
            "qmtot_requests_bad_total",
            "counter",
            "Requests refused with 4xx other than 429.",
            self.bad_requests.load(Relaxed) as f64,
        );
        put(
            "qmtot_client_disconnects_total",
            "counter",
            "Requests cancelled because the client went away.",
            self.disconnects.load(Relaxed) as f64,
        );
        put(
            "qmtot_requests_in_flight",
            "gauge",
            "Requests accepted and not yet answered (the queue).",
            self.in_flight.load(Relaxed) as f64,
        );
        put(
            "qmtot_requests_running",
            "gauge",
            "Requests the engine is working on.",
            s.running as f64,
        );
        put(
            "qmtot_generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Relaxed) as f64,
        );
        put(
            "qmtot_prompt_tokens_total",
            "counter",
            "Prompt tokens received.",
            self.prompt_tokens.load(Relaxed) as f64,
        );
        put(
            "qmtot_generated_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last second or more.",
            s.tokens_per_second,
        );
        put(
            "qmtot_engine_steps_total",
            "counter",
            "Batched forward steps.",
            e.steps as f64,
        );
        put(
            "qmtot_computed_tokens_total",
            "counter",
            "Rows run through the model.",
            e.computed_tokens as f64,
        );
        put(
            "qmtot_cached_tokens_total",
            "counter",
            "Tokens served by the prefix cache.",
            e.cached_tokens as f64,
        );
        put(
            "qmtot_prefix_cache_hit_rate",
            "gauge",
            "Cached tokens / (cached + computed).",
            hit,
        );
        put(
            "qmtot_kv_blocks_total",
            "gauge",
            "KV blocks in the pool.",
            e.pool.total as f64,
        );
        put(
            "qmtot_kv_blocks_used",
            "gauge",
            "KV blocks held by sequences or the prefix cache.",
            e.pool.used as f64,
        );
        put(
            "qmtot_kv_blocks_peak",
            "gauge",
            "Most KV blocks in use after any step so far.",
            s.peak_blocks as f64,
        );
        put(
            "qmtot_kv_blocks_shared",
            "gauge",
            "KV blocks with more than one holder.",
            e.pool.shared as f64,
        );
        put(
            "qmtot_kv_blocks_cached",
            "gauge",
            "KV blocks held by the prefix cache.",
            e.pool.cached as f64,
        );
        put(
            "qmtot_sequences",
            "gauge",
            "Sequences held by the engine.",
            e.sequences as f64,
        );
        out
    }
}
