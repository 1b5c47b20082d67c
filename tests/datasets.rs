//! Question-set parsers: each format, MMLU's junk header rows, malformed lines (an error naming
//! the file and line, or skipped and counted), 5-option questions, missing answers, and the
//! full MMLU medical subset fetched by scripts/fetch-data.

mod common;

use std::path::{Path, PathBuf};

use qmtot::eval::datasets::{self, Format, LoadOptions, MMLU_MEDICAL_TOPICS};
use qmtot::Error;

use common::data_path;

fn parse(name: &str, text: &str, opts: &LoadOptions) -> qmtot::Result<datasets::Dataset> {
    datasets::parse(Path::new(name), text, opts)
}

#[test]
fn medqa_sample_parses_with_letters_answers_and_meta() {
    let d = datasets::load(data_path("medqa-sample.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(d.questions.len(), 5);
    let q = &d.questions[0];
    assert_eq!(q.id, "medqa-sample:1");
    assert!(q.stem.starts_with("A 22-year-old male marathon runner"));
    assert_eq!(q.options.iter().map(|o| o.0).collect::<String>(), "ABCD");
    assert_eq!(q.answer, Some('C'));
    assert_eq!(q.option('C'), Some("pectoralis minor"));
    assert_eq!(q.meta.get("meta_info").map(String::as_str), Some("fewshot"));
    assert!(q.meta.contains_key("explanation"));
    assert!(d.skipped_bad.is_empty() && d.skipped_junk.is_empty());
}

#[test]
fn medqa_five_options_and_a_missing_answer() {
    let text = r#"{"question": "Q1?", "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "answer_idx": "E", "answer": "e", "meta_info": "step1"}
{"question": "Q2?", "options": {"B": "b", "A": "a", "C": "c", "D": "d"}}
"#;
    let d = parse("five.jsonl", text, &LoadOptions::default()).unwrap();
    assert_eq!(d.questions[0].options.len(), 5);
    assert_eq!(d.questions[0].answer, Some('E'));
    assert_eq!(d.questions[1].answer, None);
    assert_eq!(
        d.questions[1].options[0],
        ('A', "a".to_string()),
        "options come in letter order"
    );
}

#[test]
fn mmlu_sample_skips_the_two_junk_rows_and_filters_topics() {
    let d = datasets::load(data_path("mmlu-medical-sample.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(d.questions.len(), 18);
    assert_eq!(d.skipped_junk, vec![1, 11]);
    let q = &d.questions[0];
    assert_eq!(q.id, "mmlu-medical-sample:2");
    assert_eq!(q.options.iter().map(|o| o.0).collect::<String>(), "ABCD");
    assert!(q.answer.is_some());
    assert_eq!(q.meta.get("topic").map(String::as_str), Some("anatomy"));
    let only = LoadOptions {
        topics: Some(vec!["medical genetics".into()]),
        ..Default::default()
    };
    let g = datasets::load(data_path("mmlu-medical-sample.jsonl"), &only).unwrap();
    assert_eq!(g.questions.len(), 3);
    assert!(g.questions.iter().all(|q| q.meta["topic"] == "medical genetics"));
}

#[test]
fn medmcqa_uses_one_based_cop_and_its_ids() {
    let text = r#"{"id": "abc-1", "question": "Which nerve?", "opa": "ulnar", "opb": "radial", "opc": "median", "opd": "axillary", "cop": 3, "subject_name": "Anatomy"}
{"question": "No answer here", "opa": "w", "opb": "x", "opc": "y", "opd": "z"}
"#;
    let d = parse("medmcqa.jsonl", text, &LoadOptions::default()).unwrap();
    assert_eq!(d.questions[0].id, "abc-1");
    assert_eq!(d.questions[0].answer, Some('C'));
    assert_eq!(d.questions[0].option('C'), Some("median"));
    assert_eq!(d.questions[1].id, "medmcqa:2");
    assert_eq!(d.questions[1].answer, None);
    let zero = r#"{"question": "Q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 0}"#;
    assert!(matches!(
        parse("m.jsonl", zero, &LoadOptions::default()),
        Err(Error::Dataset { line: 1, .. })
    ));
}

#[test]
fn malformed_lines_name_file_and_line_or_are_skipped_and_counted() {
    let good = r#"{"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}"#;
    let cases = [
        ("not json {", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (r#"{"question": "Q?", "options": {"A": "a", "C": "c"}}"#, "without gaps"),
        (
            r#"{"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "D"}"#,
            "not one of the options",
        ),
        (
            r#"{"question": "Q?", "options": {"A": "a", "B": "b"}, "answer_idx": "A", "answer": "b"}"#,
            "is not option A",
        ),
        (r#"{"question": "", "options": {"A": "a", "B": "b"}}"#, "empty"),
        (r#"{"options": {"A": "a", "B": "b"}}"#, "missing field `question`"),
    ];
    for (bad, needle) in cases {
        let text = format!("{good}\n\n{bad}\n{good}\n");
        match parse("set.jsonl", &text, &LoadOptions::default()) {
            Err(e @ Error::Dataset { line: 3, .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with("set.jsonl:3: ") && msg.contains(needle), "{msg}");
            }
            other => panic!("{bad}: expected an error at line 3, got {other:?}"),
        }
        let skip = LoadOptions {
            skip_bad: true,
            ..Default::default()
        };
        let d = parse("set.jsonl", &text, &skip).unwrap();
        assert_eq!(d.questions.len(), 2, "{bad}");
        assert_eq!(d.skipped_bad.len(), 1);
        assert_eq!(d.skipped_bad[0].0, 3);
    }
    // An unknown format on the first line, and a missing file.
    assert!(matches!(
        parse("x.jsonl", r#"{"foo": 1}"#, &LoadOptions::default()),
        Err(Error::Dataset { line: 1, .. })
    ));
    assert!(matches!(
        datasets::load("/nonexistent/q.jsonl", &LoadOptions::default()),
        Err(Error::Io { .. })
    ));
    // A given format wins over detection.
    let forced = LoadOptions {
        format: Some(Format::Mmlu),
        ..Default::default()
    };
    assert!(parse("x.jsonl", good, &forced).is_err());
}

/// data/mmlu-medical.jsonl, fetched (sha256-checked) by scripts/fetch-data when missing.
fn mmlu_medical() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("data/mmlu-medical.jsonl");
    if !path.is_file() {
        let status = std::process::Command::new("python3")
            .arg(root.join("scripts/fetch-data"))
            .arg(root.join("data"))
            .status()
            .expect("python3 runs scripts/fetch-data");
        assert!(status.success(), "scripts/fetch-data failed");
    }
    path
}

#[test]
fn the_full_mmlu_medical_subset_has_1089_questions_in_six_topics() {
    let d = datasets::load(mmlu_medical(), &LoadOptions::default()).unwrap();
    assert_eq!(d.questions.len(), 1089);
    assert!(d.skipped_bad.is_empty() && d.skipped_junk.is_empty());
    for (topic, n) in MMLU_MEDICAL_TOPICS.iter().zip([135, 265, 144, 173, 100, 272]) {
        assert_eq!(
            d.questions.iter().filter(|q| q.meta["topic"] == *topic).count(),
            n,
            "{topic}"
        );
    }
    assert!(d.questions.iter().all(|q| q.answer.is_some() && q.options.len() == 4));
    let ids: std::collections::HashSet<_> = d.questions.iter().map(|q| &q.id).collect();
    assert_eq!(ids.len(), 1089, "ids are unique");
}

#[test]
fn direct_scores_equal_an_unbatched_forward_per_option() {
    use qmtot::backend::cpu::CpuBackend;
    use qmtot::config::ModelConfig;
    use qmtot::engine::sampler::log_softmax;
    use qmtot::engine::{Engine, EngineConfig, SequenceKv};
    use qmtot::eval::baselines::{self, direct_prompt};
    use qmtot::formats::gguf::GgufFile;
    use qmtot::model::Llama;
    use qmtot::tokenizer::Tokenizer;

    let g = GgufFile::open(common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = Llama::load(
        CpuBackend::new(2).unwrap(),
        ModelConfig::from_gguf(&g).unwrap(),
        &g,
        |_, _| {},
    )
    .unwrap();
    let mut questions = datasets::load(data_path("medqa-sample.jsonl"), &LoadOptions::default())
        .unwrap()
        .questions;
    questions.extend(
        datasets::load(data_path("mmlu-medical-sample.jsonl"), &LoadOptions::default())
            .unwrap()
            .questions
            .into_iter()
            .take(4),
    );
    let mut engine = Engine::new(&model, Some(&tok), EngineConfig::default()).unwrap();
    let results = baselines::direct(&mut engine, &tok, &questions).unwrap();
    assert_eq!(results.len(), questions.len());
    for (q, r) in questions.iter().zip(&results) {
        assert_eq!(r.id, q.id);
        let prompt = tok.encode(&direct_prompt(q), true).unwrap();
        let logits = SequenceKv::new(&model, prompt.len())
            .unwrap()
            .extend(&model, &prompt, false)
            .unwrap();
        let lp = log_softmax(&logits);
        for (&(letter, got), cand) in r.scores.iter().zip(baselines::letter_tokens(&tok, q).unwrap()) {
            assert_eq!(cand.len(), 1, "\" {letter}\" is one token");
            let want = lp[cand[0] as usize];
            // Same f32 forward; batched prefill differs only in cascade summation order.
            assert!((got - want).abs() < 1e-4, "{}: {letter}: {got} vs {want}", q.id);
        }
        let best = r.scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(r.scores.iter().find(|s| s.1 == best).unwrap().0, r.predicted);
    }
    // Every question was computed once (no sequence left behind).
    assert_eq!(engine.stats().sequences, 0);
}
