//! `qmtot eval` killed with SIGKILL part-way resumes on rerun: every question id ends up in
//! results.jsonl exactly once, none lost, none duplicated.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::data_path;

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Starts `qmtot eval` with `method` (and its options), kills it (SIGKILL) once 3 results are
/// in, reruns it, and checks that every question is in the results exactly once.
fn kill_and_resume(method: &[&str]) {
    let model = common::model_path();
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("results.jsonl");
    let data = data_path("mmlu-medical-sample.jsonl");
    let args = |concurrency: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qmtot"));
        c.args(["eval", "--threads", "1", "--concurrency", concurrency])
            .args(["--method"])
            .args(method)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out.path())
            .arg("--model")
            .arg(&model)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // One question per batch, so the run is still going when a few results are in.
    let mut child = args("1").spawn().unwrap();
    let start = Instant::now();
    while lines(&results).len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no results appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "eval ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = lines(&results).len();
    assert!(partial < 18, "the run finished before the kill ({partial} results)");

    let status = args("4").status().unwrap();
    assert!(status.success());
    let ids: Vec<String> = lines(&results)
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 18, "every question once: {ids:?}");
    assert_eq!(unique.len(), 18);
    assert!(out.path().join("report.md").is_file());
}

#[test]
fn a_killed_direct_eval_resumes_without_losing_or_repeating_questions() {
    kill_and_resume(&["direct"]);
}

#[test]
fn a_killed_tot_eval_resumes_without_losing_or_repeating_questions() {
    // A small tree (k = 2, d = 1, 4-token steps) keeps the run short; its records carry trees.
    kill_and_resume(&["tot", "-k", "2", "--depth", "1", "--step-tokens", "4"]);
}
