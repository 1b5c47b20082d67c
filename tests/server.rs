//! `qmtot serve` over loopback with a hand-rolled HTTP/1.1 client (so the test depends on no
//! client library): every endpoint, streaming and not, the error cases, the API key, n > 1
//! sharing the prompt's blocks, a client that disconnects mid-stream, and a full queue.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use qmtot::backend::cpu::CpuBackend;
use qmtot::engine::EngineConfig;
use qmtot::server::{serve, ServerConfig};
use serde_json::{json, Value};

const KEY: &str = "test-key-123";

/// Starts a server on an ephemeral loopback port in its own thread; returns the port.
fn start(max_queue: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (model, tok) = common::load_smollm2(CpuBackend::new(2).unwrap());
        let config = ServerConfig {
            api_key: Some(KEY.into()),
            max_queue,
            model_name: "smollm2-test".into(),
            engine: EngineConfig::default(),
        };
        serve(&model, &tok, listener, config).unwrap();
    });
    // Ready when /health answers.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() && get(port, "/health", None).0 == 200 {
            return port;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the server did not come up");
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

fn send(port: u16, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    s
}

fn read_reply(mut s: TcpStream) -> Reply {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[split + 4..];
    let body = if headers.get("transfer-encoding").is_some_and(|v| v == "chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn get(port: u16, path: &str, key: Option<&str>) -> (u16, String) {
    let r = read_reply(send(port, "GET", path, key, None));
    (r.status, r.body)
}

fn post(port: u16, path: &str, body: &Value) -> Reply {
    read_reply(send(port, "POST", path, Some(KEY), Some(&body.to_string())))
}

/// The `data:` payloads of a server-sent-event body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| d.trim().to_string())
        .collect()
}

fn metric(port: u16, name: &str) -> f64 {
    let (status, text) = get(port, "/metrics", Some(KEY));
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

/// Waits until the engine holds no sequence (bounded).
fn wait_idle(port: u16) {
    let t = Instant::now();
    while metric(port, "qmtot_sequences") > 0.0 || metric(port, "qmtot_requests_running") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "requests never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(v["error"]["type"].is_string(), "OpenAI error shape: {v}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

#[test]
fn endpoints_streaming_errors_sharing_and_disconnects() {
    let port = start(64);

    // Health needs no key; everything else does.
    assert_eq!(get(port, "/health", None).0, 200);
    assert_eq!(get(port, "/v1/models", None).0, 401);
    assert_eq!(get(port, "/v1/models", Some("wrong")).0, 401);
    let (status, models) = get(port, "/v1/models", Some(KEY));
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "smollm2-test"
    );

    // Chat, greedy: the model's known answer.
    let chat = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "max_tokens": 12, "temperature": 0});
    let r = post(port, "/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(v["object"], "chat.completion");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // The same streamed: chunks concatenate to the same text, then [DONE].
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let r = post(port, "/v1/chat/completions", &streamed);
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/event-stream"));
    let data = sse_data(&r.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text, "streamed text equals the whole answer");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Completions with logprobs and a stop string.
    let r = post(
        port,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 1, "stop": ["."]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().contains("Paris") && !c["text"].as_str().unwrap().contains('.'));
    assert_eq!(c["finish_reason"], "stop");
    let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(!lps.is_empty() && lps.iter().all(|l| l.as_f64().unwrap() <= 0.0));

    // echo + logprobs with max_tokens 0 (how lm-evaluation-harness scores log-likelihoods):
    // the last prompt token's log-probability equals qmtot's own `direct` score of that letter.
    let set = qmtot::eval::datasets::load(common::data_path("mmlu-medical-sample.jsonl"), &Default::default()).unwrap();
    let q = &set.questions[0];
    let (model, tok) = common::load_smollm2(CpuBackend::new(1).unwrap());
    let mut engine = qmtot::engine::Engine::new(&model, Some(&tok), EngineConfig::default()).unwrap();
    let direct = qmtot::eval::baselines::direct(&mut engine, &tok, std::slice::from_ref(q)).unwrap();
    for &(letter, want) in &direct[0].scores[..2] {
        let prompt = format!("{} {letter}", qmtot::eval::baselines::direct_prompt(q));
        let r = post(
            port,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let c = &v["choices"][0];
        assert_eq!(c["text"].as_str().unwrap(), prompt, "echo returns the prompt");
        let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
        assert!(lps[0].is_null(), "the first token has no context");
        assert_eq!(lps.len() as u64, v["usage"]["prompt_tokens"].as_u64().unwrap());
        let got = lps.last().unwrap().as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() <= 1e-3,
            "letter {letter}: served {got} vs direct {want}"
        );
        assert_eq!(
            c["logprobs"]["tokens"].as_array().unwrap().last().unwrap(),
            &json!(format!(" {letter}"))
        );
    }

    // n = 8 shares the prompt: peak KV blocks ≈ one prompt + 8 suffixes, not 8 prompts.
    let prompt = "Medicine is the science and practice of caring for patients. ".repeat(12);
    let r = post(
        port,
        "/v1/completions",
        &json!({"prompt": prompt, "n": 8, "max_tokens": 8, "temperature": 0.9, "seed": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 8);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    let prompt_blocks = (prompt_tokens / 16.0).ceil();
    let peak = metric(port, "qmtot_kv_blocks_peak");
    assert!(
        peak <= prompt_blocks + 8.0 * 2.0 + 8.0, // + blocks the prefix cache kept from earlier requests
        "peak {peak} blocks for a {prompt_blocks}-block prompt and 8 short samples"
    );
    assert!(peak < 8.0 * prompt_blocks, "not 8 copies of the prompt");

    // Errors: malformed JSON, unknown field, too long, bad n, no key.
    assert_error(
        &read_reply(send(port, "POST", "/v1/completions", Some(KEY), Some("{not json"))),
        400,
        "invalid request body",
    );
    assert_error(
        &post(port, "/v1/completions", &json!({"prompt": "x", "bogus": 1})),
        400,
        "bogus",
    );
    let long = "word ".repeat(9000);
    assert_error(
        &post(port, "/v1/completions", &json!({"prompt": long, "max_tokens": 4})),
        400,
        "context",
    );
    assert_error(
        &post(port, "/v1/completions", &json!({"prompt": "x", "n": 0})),
        400,
        "n must",
    );
    assert_error(
        &read_reply(send(port, "POST", "/v1/chat/completions", None, Some("{}"))),
        401,
        "API key",
    );

    // /v1/tot: a small tree, whole and streamed node by node.
    let tot = json!({"question": "Which organ collects urine before it leaves the body?",
                     "options": {"A": "Bladder", "B": "Kidney", "C": "Ureter", "D": "Urethra"},
                     "answer": "A", "k": 2, "depth": 2, "step_tokens": 6, "seed": 1});
    let r = post(port, "/v1/tot", &tot);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let answer = v["answer"].as_str().unwrap().to_string();
    assert!(["A", "B", "C", "D"].contains(&answer.as_str()));
    assert_eq!(v["correct"], json!(answer == "A"));
    let nodes = v["tree"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len() - 1, v["thoughts"].as_u64().unwrap() as usize);
    assert!(
        nodes.len() >= 3 && nodes.len() <= 7,
        "k = 2, d = 2: {} nodes",
        nodes.len()
    );
    assert!(
        v["usage"]["prompt_tokens_reused"].as_u64().unwrap() > v["usage"]["prompt_tokens_computed"].as_u64().unwrap()
    );
    let mut streamed_tot = tot.clone();
    streamed_tot["stream"] = json!(true);
    let r = post(port, "/v1/tot", &streamed_tot);
    assert_eq!(r.status, 200);
    let data = sse_data(&r.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let objects: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, node_events) = objects.split_last().unwrap();
    assert_eq!(last["object"], "tot");
    assert_eq!(
        last["answer"].as_str().unwrap(),
        answer,
        "same seed, same tree, same answer"
    );
    assert_eq!(node_events.len(), nodes.len() - 1, "one event per thought");
    assert!(node_events.iter().all(|e| e["object"] == "tot.node"));
    assert_error(
        &post(
            port,
            "/v1/tot",
            &json!({"question": "q", "options": {"A": "x", "C": "y"}}),
        ),
        400,
        "lettered",
    );
    wait_idle(port);

    // A client that disconnects mid-stream: its request is cancelled and its blocks freed.
    wait_idle(port);
    let before = metric(port, "qmtot_client_disconnects_total");
    let mut s = send(
        port,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(&json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.8, "stream": true}).to_string()),
    );
    let mut first = [0u8; 256];
    let got = s.read(&mut first).unwrap();
    assert!(got > 0 && String::from_utf8_lossy(&first[..got]).contains("200"));
    drop(s);
    let t = Instant::now();
    while metric(port, "qmtot_client_disconnects_total") <= before {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the disconnect was never noticed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_idle(port);
    assert_eq!(
        metric(port, "qmtot_kv_blocks_used"),
        metric(port, "qmtot_kv_blocks_cached"),
        "only the prefix cache holds blocks"
    );
    assert!(
        metric(port, "qmtot_generated_tokens_total") < 400.0 + 200.0,
        "the 400-token request stopped early"
    );
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let port = start(2);
    let body = json!({"prompt": "Tell me a long story about", "max_tokens": 48, "temperature": 0.8}).to_string();
    // Two slow requests fill the queue; the rest are refused until they finish.
    let slow: Vec<TcpStream> = (0..2)
        .map(|_| send(port, "POST", "/v1/completions", Some(KEY), Some(&body)))
        .collect();
    let t = Instant::now();
    while metric(port, "qmtot_requests_in_flight") < 2.0 {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = read_reply(send(port, "POST", "/v1/completions", Some(KEY), Some(&body)));
    assert_error(&r, 429, "busy");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    for s in slow {
        assert_eq!(read_reply(s).status, 200);
    }
    wait_idle(port);
    assert_eq!(metric(port, "qmtot_requests_in_flight"), 0.0);
    assert_eq!(
        post(port, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2})).status,
        200
    );
}

#[test]
fn sixty_four_streaming_clients_complete_or_are_refused_and_free_everything() {
    let port = start(32);
    let clients: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for round in 0..2 {
                    let body = json!({"prompt": format!("Patient {i} presents with"), "max_tokens": 6,
                                      "temperature": 0.7, "seed": i * 2 + round, "stream": true})
                    .to_string();
                    let mut s = send(port, "POST", "/v1/completions", Some(KEY), Some(&body));
                    if i % 8 == 7 && round == 0 {
                        // Some clients hang up mid-stream.
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf);
                        drop(s);
                        outcomes.push(0);
                        continue;
                    }
                    let r = read_reply(s);
                    if r.status == 200 {
                        assert_eq!(
                            sse_data(&r.body).last().map(String::as_str),
                            Some("[DONE]"),
                            "{}",
                            r.body
                        );
                    } else {
                        assert_error(&r, 429, "busy");
                    }
                    outcomes.push(r.status);
                }
                outcomes
            })
        })
        .collect();
    let mut ok = 0;
    for c in clients {
        ok += c
            .join()
            .expect("no client panicked")
            .iter()
            .filter(|&&s| s == 200)
            .count();
    }
    assert!(ok >= 32, "at least a queue's worth of requests completed, got {ok}");
    wait_idle(port);
    assert_eq!(metric(port, "qmtot_requests_in_flight"), 0.0);
    assert_eq!(
        metric(port, "qmtot_kv_blocks_used"),
        metric(port, "qmtot_kv_blocks_cached"),
        "no sequence holds blocks once every client is gone"
    );
}

fn body(r: &Reply) -> Value {
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

/// What lm-evaluation-harness's `local-completions` model sends and reads: the tokenizer
/// endpoints, batches of token-id prompts with `echo`, `max_tokens` 1 and `logprobs` 1, and
/// top alternatives; plus echo with streaming and the new refusals.
#[test]
fn token_prompts_alternatives_echo_streaming_and_tokenizer_endpoints() {
    let port = start(64);

    // Tokenizer endpoints (vLLM's shapes), behind the key like the rest.
    assert_eq!(get(port, "/tokenizer_info", None).0, 401);
    let (status, info) = get(port, "/tokenizer_info", Some(KEY));
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert_eq!(info["model_max_length"], 8192);
    assert!(info["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    let text = "Question: Which nerve?\nA. facial\nAnswer:";
    let t = body(&post(
        port,
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    ));
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(t["count"].as_u64().unwrap() as usize, ids.len());
    assert!(ids.len() > 8);
    let d = body(&post(port, "/detokenize", &json!({ "tokens": ids })));
    assert_eq!(d["prompt"], text, "decode(encode(x)) = x");
    let eos = body(&post(
        port,
        "/tokenize",
        &json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
    ));
    assert_eq!(
        eos["tokens"].as_array().unwrap().len(),
        1,
        "special tokens are matched whole"
    );
    let chat = body(&post(
        port,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    ));
    let chat_text = body(&post(port, "/detokenize", &json!({"tokens": chat["tokens"]})));
    assert!(chat_text["prompt"]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    assert_error(
        &post(port, "/detokenize", &json!({"tokens": [1, 999999]})),
        400,
        "999999",
    );
    assert_error(
        &post(port, "/tokenize", &json!({"prompt": "x", "messages": []})),
        400,
        "exactly one",
    );

    // A batch of token-id prompts (lm-evaluation-harness's log-likelihood payload): one choice
    // per prompt in order, each prompt's log-probabilities the same as when it comes alone as
    // text (batching changes no number beyond f32 noise).
    let texts = ["The capital of France is Paris", "Two plus two is four", "A B C"];
    let id_lists: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let v = body(&post(
                port,
                "/tokenize",
                &json!({"prompt": t, "add_special_tokens": false}),
            ));
            serde_json::from_value(v["tokens"].clone()).unwrap()
        })
        .collect();
    let batch = body(&post(
        port,
        "/v1/completions",
        &json!({"prompt": id_lists, "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0, "seed": 1234}),
    ));
    let choices = batch["choices"].as_array().unwrap();
    assert_eq!(choices.len(), texts.len());
    let total: usize = id_lists.iter().map(Vec::len).sum();
    assert_eq!(batch["usage"]["prompt_tokens"].as_u64().unwrap() as usize, total);
    for (i, (c, text)) in choices.iter().zip(texts).enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["text"].as_str().unwrap().starts_with(text), "echo of prompt {i}");
        let lp = &c["logprobs"];
        let lps = floats(&lp["token_logprobs"]);
        assert_eq!(lps.len(), id_lists[i].len() + 1, "prompt tokens and the one generated");
        assert!(lps[0].is_none() && lps[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)));
        // top_logprobs: null first, then the alternative and the token itself.
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert!(tops[0].is_null());
        for (j, top) in tops.iter().enumerate().skip(1) {
            let m = top.as_object().unwrap();
            assert!((1..=2).contains(&m.len()), "k = 1 plus the token: {m:?}");
            let token = lp["tokens"][j].as_str().unwrap();
            assert_eq!(m[token].as_f64(), lps[j], "the token's own entry");
            let best = m.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
            assert!(best >= lps[j].unwrap());
        }
        // The generated token is greedy: it is the best of its alternatives.
        let last = tops.last().unwrap().as_object().unwrap();
        let best = last.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert_eq!(Some(best), *lps.last().unwrap());
        let alone = body(&post(
            port,
            "/v1/completions",
            &json!({"prompt": text, "max_tokens": 0, "echo": true, "logprobs": 0}),
        ));
        let alone = floats(&alone["choices"][0]["logprobs"]["token_logprobs"]);
        assert_eq!(alone.len(), id_lists[i].len());
        for (a, b) in alone.iter().zip(&lps).skip(1) {
            assert!((a.unwrap() - b.unwrap()).abs() <= 1e-4, "batched {b:?} vs alone {a:?}");
        }
    }

    // Alternatives agree between the two code paths that make them: scoring a prompt that
    // ends in the greedy continuation, and sampling that continuation.
    let gen = body(&post(
        port,
        "/v1/completions",
        &json!({"prompt": texts[0], "max_tokens": 1, "logprobs": 5, "temperature": 0}),
    ));
    let sampled_top = gen["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(sampled_top.len(), 5, "k = 5 (the greedy token is among them)");
    let extended = format!("{}{}", texts[0], gen["choices"][0]["text"].as_str().unwrap());
    let scored = body(&post(
        port,
        "/v1/completions",
        &json!({"prompt": extended, "max_tokens": 0, "echo": true, "logprobs": 5}),
    ));
    let scored_top = scored["choices"][0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(
        sampled_top.keys().collect::<Vec<_>>(),
        scored_top.keys().collect::<Vec<_>>()
    );
    for (k, v) in &sampled_top {
        assert!(
            (v.as_f64().unwrap() - scored_top[k].as_f64().unwrap()).abs() <= 1e-4,
            "{k:?}"
        );
    }

    // Chat alternatives: top_logprobs entries in OpenAI's chat shape.
    let c = body(&post(
        port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                "logprobs": true, "top_logprobs": 3}),
    ));
    for entry in c["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let alts = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), 3);
        assert_eq!(alts[0]["token"], entry["token"], "greedy: the token is the most likely");
        assert!(alts
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
    }

    // Echo with streaming: per choice, the prompt (with its log-probabilities) comes first and
    // the chunks add up to the whole response, for two prompts × n = 2.
    let req = json!({"prompt": ["The capital of France is", "Two plus two"], "max_tokens": 4, "n": 2,
                     "echo": true, "logprobs": 2, "temperature": 0});
    let whole = body(&post(port, "/v1/completions", &req));
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let r = post(port, "/v1/completions", &streamed);
    assert_eq!(r.status, 200, "{}", r.body);
    let data = sse_data(&r.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut text = vec![String::new(); 4];
    let mut lps: Vec<Vec<Option<f64>>> = vec![Vec::new(); 4];
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        text[i].push_str(c["text"].as_str().unwrap());
        lps[i].extend(floats(&c["logprobs"]["token_logprobs"]));
    }
    for (i, c) in whole["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["text"].as_str().unwrap(), text[i], "choice {i}");
        assert!(text[i].starts_with(["The capital of France is", "Two plus two"][i / 2]));
        let want = floats(&c["logprobs"]["token_logprobs"]);
        assert_eq!(want.len(), lps[i].len());
        for (a, b) in want.iter().zip(&lps[i]) {
            assert_eq!(a.is_none(), b.is_none());
            assert!((a.unwrap_or(0.0) - b.unwrap_or(0.0)).abs() <= 1e-4);
        }
    }

    // Refusals.
    assert_error(
        &post(port, "/v1/completions", &json!({"prompt": "x", "logprobs": 21})),
        400,
        "at most 20",
    );
    assert_error(
        &post(
            port,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        ),
        400,
        "logprobs: true",
    );
    assert_error(&post(port, "/v1/completions", &json!({"prompt": []})), 400, "empty");
    assert_error(
        &post(
            port,
            "/v1/completions",
            &json!({"prompt": [5, 4_000_000], "max_tokens": 1}),
        ),
        400,
        "4000000",
    );
    assert_error(
        &post(port, "/v1/completions", &json!({"prompt": vec!["x"; 20], "n": 100})),
        400,
        "prompts × n",
    );
    wait_idle(port);
    assert_eq!(
        metric(port, "qmtot_kv_blocks_used"),
        metric(port, "qmtot_kv_blocks_cached"),
        "only the prefix cache holds blocks"
    );
}
