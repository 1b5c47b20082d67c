//! Bad requests and flags: each a typed error (library) or a clear message and exit status 1
//! (CLI), never a panic.

mod common;

use std::process::Command;

use qmtot::backend::cpu::CpuBackend;
use qmtot::backend::StepInput;
use qmtot::engine::{generate, GenerateRequest, SamplingParams, StopConditions};
use qmtot::error::Error;
use qmtot::model::Llama;
use qmtot::tokenizer::Tokenizer;

use common::TinySpec;

fn tiny() -> (tempfile::NamedTempFile, Llama<CpuBackend>, Tokenizer) {
    common::load_tiny_model(
        TinySpec {
            context: 64,
            ..TinySpec::default()
        },
        3,
    )
}

fn request(prompt: Vec<u32>, max_new: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams::default(),
        stop: StopConditions {
            max_new_tokens: max_new,
            ..Default::default()
        },
        prefill_chunk: 512,
    }
}

#[test]
fn empty_prompt_is_an_error() {
    let (_f, model, tok) = tiny();
    assert!(matches!(
        generate(&model, &tok, &request(vec![], 4), |_| Ok(())),
        Err(Error::EmptyPrompt)
    ));
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let (_f, model, tok) = tiny();
    match generate(&model, &tok, &request(vec![1; 65], 0), |_| Ok(())) {
        Err(Error::PromptTooLong {
            tokens: 65,
            max_new: 0,
            context: 64,
        }) => {}
        other => panic!("expected PromptTooLong, got {:?}", other.err()),
    }
    // Fits alone, but not with the tokens asked for.
    assert!(matches!(
        generate(&model, &tok, &request(vec![1; 60], 5), |_| Ok(())),
        Err(Error::PromptTooLong {
            tokens: 60,
            max_new: 5,
            context: 64
        })
    ));
    // Exactly the context is fine.
    let out = generate(&model, &tok, &request(vec![1; 60], 4), |_| Ok(())).unwrap();
    assert_eq!(out.tokens.len(), 4);
}

#[test]
fn zero_threads_is_an_error() {
    assert!(matches!(CpuBackend::new(0), Err(Error::InvalidArgument(m)) if m.contains("--threads")));
}

#[test]
fn out_of_range_tokens_positions_and_slots_are_errors() {
    let (_f, model, _) = tiny();
    let mut kv = model.new_kv_cache(4, 16).unwrap();
    let good = StepInput {
        tokens: vec![5],
        positions: vec![0],
        slots: vec![0],
        row_seq: vec![0],
        block_tables: vec![vec![0]],
        logit_rows: vec![0],
        groups: vec![],
    };
    assert!(model.forward(&mut kv, &good).is_ok());
    let bad_token = StepInput {
        tokens: vec![96],
        ..good.clone()
    };
    assert!(matches!(
        model.forward(&mut kv, &bad_token),
        Err(Error::TokenOutOfRange { id: 96, vocab: 96 })
    ));
    let bad_pos = StepInput {
        positions: vec![64],
        block_tables: vec![vec![0, 1, 2, 3, 0]],
        slots: vec![0],
        ..good.clone()
    };
    assert!(model.forward(&mut kv, &bad_pos).is_err());
    let bad_block = StepInput {
        block_tables: vec![vec![9]],
        slots: vec![9 * 16],
        ..good.clone()
    };
    assert!(model.forward(&mut kv, &bad_block).is_err());
    let wrong_slot = StepInput {
        slots: vec![3],
        ..good.clone()
    };
    assert!(model.forward(&mut kv, &wrong_slot).is_err());
    let bad_logit_row = StepInput {
        logit_rows: vec![1],
        ..good.clone()
    };
    assert!(model.forward(&mut kv, &bad_logit_row).is_err());
    let ragged = StepInput {
        positions: vec![],
        ..good.clone()
    };
    assert!(model.forward(&mut kv, &ragged).is_err());
}

#[test]
fn malformed_sharing_groups_are_errors() {
    use qmtot::backend::SharedPrefix;
    let (_f, model, _) = tiny();
    let mut kv = model.new_kv_cache(4, 16).unwrap();
    // Two sequences sharing block 0 (positions 0..16), each with its own block 1 or 2;
    // first write the prefix through sequence 0, then decode one row each at position 16.
    let prefix = StepInput::one_sequence(vec![5; 16], 0, (0..16).collect(), vec![0], vec![]);
    model.forward(&mut kv, &prefix).unwrap();
    let good = StepInput {
        tokens: vec![6, 7],
        positions: vec![16, 16],
        slots: vec![16, 32],
        row_seq: vec![0, 1],
        block_tables: vec![vec![0, 1], vec![0, 2]],
        logit_rows: vec![0, 1],
        groups: vec![SharedPrefix {
            seqs: vec![0, 1],
            blocks: 1,
        }],
    };
    assert!(model.forward(&mut kv, &good).is_ok());
    let cases = [
        (
            "empty group",
            vec![SharedPrefix {
                seqs: vec![],
                blocks: 1,
            }],
        ),
        (
            "unknown sequence",
            vec![SharedPrefix {
                seqs: vec![0, 2],
                blocks: 1,
            }],
        ),
        (
            "prefix not shared",
            vec![SharedPrefix {
                seqs: vec![0, 1],
                blocks: 2,
            }],
        ),
        (
            "sequence in two groups",
            vec![
                SharedPrefix {
                    seqs: vec![0, 1],
                    blocks: 1,
                },
                SharedPrefix {
                    seqs: vec![1],
                    blocks: 1,
                },
            ],
        ),
    ];
    for (what, groups) in cases {
        let step = StepInput { groups, ..good.clone() };
        assert!(
            matches!(model.forward(&mut kv, &step), Err(Error::InvalidArgument(_))),
            "{what} accepted"
        );
    }
    // A row inside the shared prefix cannot use it as a cascade prefix.
    let inside = StepInput {
        tokens: vec![6, 7],
        positions: vec![15, 16],
        slots: vec![15, 32],
        ..good.clone()
    };
    assert!(matches!(
        model.forward(&mut kv, &inside),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn invalid_sampling_parameters_are_errors() {
    let (_f, model, tok) = tiny();
    let mut req = request(vec![1, 2, 3], 2);
    req.sampling.top_p = 0.0;
    assert!(matches!(
        generate(&model, &tok, &req, |_| Ok(())),
        Err(Error::InvalidArgument(_))
    ));
}

// ---- the CLI -----------------------------------------------------------------------------

fn qmtot(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qmtot")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["generate", "--help"],
        &["info", "--help"],
        &["bench", "--help"],
        &["bench", "decode", "--help"],
        &["bench", "tree", "--help"],
    ] {
        let (code, stdout, _) = qmtot(args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage"), "{args:?}: {stdout}");
    }
    let (_, stdout, _) = qmtot(&["generate", "--help"]);
    for flag in [
        "--prompt",
        "--chat",
        "--system",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--model",
        "--threads",
        "--device",
        "--n",
        "--kv-blocks",
    ] {
        assert!(stdout.contains(flag), "generate --help lacks {flag}");
    }
}

#[test]
fn cli_rejects_bad_input_with_a_message_and_status_1() {
    let model = common::model_path();
    let model = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--prompt", "", "--model", model], "the prompt is empty"),
        (
            &["generate", "--prompt", "hi", "--threads", "0", "--model", model],
            "--threads",
        ),
        (
            &["generate", "--prompt", "hi", "--model", "/nonexistent/x.gguf"],
            "/nonexistent/x.gguf",
        ),
        (
            &["generate", "--prompt", "hi", "--max-tokens", "9000", "--model", model],
            "exceeds the model's context of 8192",
        ),
        (
            &["generate", "--prompt", "hi", "--temperature=-1", "--model", model],
            "temperature",
        ),
        (&["info", "--model", "/nonexistent/x.gguf"], "/nonexistent/x.gguf"),
        (
            &["generate", "--prompt", "hi", "--n", "0", "--model", model],
            "n must be at least 1",
        ),
        (
            &["generate", "--prompt", "hi", "--kv-blocks", "1", "--model", model],
            "KV blocks",
        ),
        (
            &["bench", "decode", "--shape", "gpt2", "--random-weights", "--batch", "1"],
            "llama3-8b or llama2-70b",
        ),
        (
            &["bench", "decode", "--shape", "llama3-8b", "--batch", "1"],
            "--shape needs --random-weights",
        ),
        (
            &["bench", "decode", "--shape", "llama3-8b", "--random-weights"],
            "give --batch",
        ),
        (&["bench", "tree", "--random-weights"], "--random-weights needs --shape"),
        (&["bench", "kernels", "--parts", "softmax"], "--parts \"softmax\""),
        (&["bench", "kernels", "--contexts", "0"], "positive sizes"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = qmtot(args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn asking_for_cuda_without_a_driver_is_an_error_not_a_panic() {
    if qmtot::backend::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let model = common::model_path();
    let (code, _, stderr) = qmtot(&[
        "generate",
        "--prompt",
        "hi",
        "--device",
        "cuda",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("error: backend cuda") && !stderr.contains("panicked"),
        "{stderr}"
    );
    // auto falls back to the CPU and says so.
    let (code, _, stderr) = qmtot(&[
        "generate",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--device",
        "auto",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("using the CPU"), "{stderr}");
}

#[test]
fn cli_answers_the_readme_question_and_reports_stats() {
    let model = common::model_path();
    let (code, stdout, stderr) = qmtot(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim_end(), "The capital of France is Paris.");
    for field in ["prompt tokens: 37", "prefill:", "decode:", "time to first token:"] {
        assert!(stderr.contains(field), "stats line lacks {field:?}: {stderr}");
    }
}

#[test]
fn cli_info_describes_the_model() {
    let model = common::model_path();
    let (code, stdout, stderr) = qmtot(&["info", "--model", model.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    for line in ["layers:          30", "tensors:         272", "tied output:     true"] {
        assert!(stdout.contains(line), "info lacks {line:?}:\n{stdout}");
    }
    for (ty, n) in [("Q4_1", 210), ("Q8_0", 1), ("F32", 61)] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(ty))
            .unwrap_or_else(|| panic!("no {ty} row:\n{stdout}"));
        let count: usize = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(count, n, "{row}");
    }
}
