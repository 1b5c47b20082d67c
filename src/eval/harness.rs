//! `qmtot eval`: runs a method over a question set, appending one JSON line per finished
//! question to `<out>/results.jsonl` (written whole and flushed before the next batch starts),
//! so a killed run resumes where it stopped: ids already in the file are skipped, and a torn
//! last line (the process died mid-write) is cut off before appending. Ends with a report
//! (`report.md`, `report.json`): accuracy with a 95% confidence interval, per topic, and
//! throughput.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::baselines;
use super::datasets::Question;
use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One finished question, as written to `results.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub id: String,
    pub method: String,
    pub gold: Option<char>,
    pub predicted: Option<char>,
    /// `(letter, score)` per option.
    pub scores: Vec<(char, f32)>,
    pub topic: Option<String>,
    /// Wall time of the batch this question ran in, divided among its questions.
    pub seconds: f64,
}

pub const RESULTS: &str = "results.jsonl";

/// Records already in `path`, after cutting off a torn last line.
pub fn read_results(path: &Path) -> Result<Vec<EvalRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new()); // no results yet
    };
    let complete = match text.rfind('\n') {
        Some(end) => end + 1,
        None => 0,
    };
    if complete < text.len() {
        // A line without its newline was being written when the run died: drop it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(complete as u64).map_err(|e| Error::io(path, e))?;
    }
    text[..complete]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Dataset {
                path: path.to_path_buf(),
                line: i + 1,
                reason: format!("not a result record: {e}"),
            })
        })
        .collect()
}

/// Runs `direct` over the questions not yet in `<out>/results.jsonl`, `concurrency` at a time;
/// returns every record (old and new) in question order.
pub fn run_direct<B: Backend>(
    engine: &mut Engine<'_, B>,
    tokenizer: &Tokenizer,
    questions: &[Question],
    out: &Path,
    concurrency: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<EvalRecord>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let path = out.join(RESULTS);
    let mut records = read_results(&path)?;
    let done: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
    let todo: Vec<&Question> = questions.iter().filter(|q| !done.contains(&q.id)).collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    progress(questions.len() - todo.len(), questions.len());
    for batch in todo.chunks(concurrency.max(1)) {
        let t = Instant::now();
        let owned: Vec<Question> = batch.iter().map(|q| (*q).clone()).collect();
        let results = baselines::direct(engine, tokenizer, &owned)?;
        let seconds = t.elapsed().as_secs_f64() / batch.len() as f64;
        let mut lines = String::new();
        for (q, r) in owned.iter().zip(results) {
            let rec = EvalRecord {
                id: q.id.clone(),
                method: "direct".into(),
                gold: q.answer,
                predicted: Some(r.predicted),
                scores: r.scores,
                topic: q.meta.get("topic").or_else(|| q.meta.get("subject_name")).cloned(),
                seconds,
            };
            lines.push_str(&serde_json::to_string(&rec).expect("records serialize"));
            lines.push('\n');
            records.push(rec);
        }
        file.write_all(lines.as_bytes())
            .and_then(|()| file.flush())
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        progress(records.len(), questions.len());
    }
    let order: BTreeMap<&str, usize> = questions.iter().enumerate().map(|(i, q)| (q.id.as_str(), i)).collect();
    records.retain(|r| order.contains_key(r.id.as_str()));
    records.sort_by_key(|r| order[r.id.as_str()]);
    Ok(records)
}

/// Accuracy with a 95% Wilson interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
}

impl Accuracy {
    pub fn of(correct: usize, total: usize) -> Self {
        let n = total.max(1) as f64;
        let p = correct as f64 / n;
        let z = 1.959_964f64;
        let denom = 1.0 + z * z / n;
        let centre = (p + z * z / (2.0 * n)) / denom;
        let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
        Self {
            correct,
            total,
            accuracy: p,
            ci95: ((centre - half).max(0.0), (centre + half).min(1.0)),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub method: String,
    pub data: PathBuf,
    pub overall: Accuracy,
    /// Questions without a gold answer are not counted.
    pub per_topic: BTreeMap<String, Accuracy>,
    pub seconds_per_question: f64,
}

impl Report {
    /// `accuracy 38.9% (7/18), 95% CI 20.3–61.4%`.
    pub fn accuracy_line(&self) -> String {
        let a = &self.overall;
        format!(
            "accuracy {:.1}% ({}/{}), 95% CI {:.1}–{:.1}%",
            100.0 * a.accuracy,
            a.correct,
            a.total,
            100.0 * a.ci95.0,
            100.0 * a.ci95.1
        )
    }
}

pub fn report(method: &str, data: &Path, records: &[EvalRecord]) -> Report {
    let scored: Vec<&EvalRecord> = records.iter().filter(|r| r.gold.is_some()).collect();
    let hit = |r: &EvalRecord| r.gold == r.predicted;
    let mut topics: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &scored {
        let e = topics
            .entry(r.topic.clone().unwrap_or_else(|| "(none)".into()))
            .or_default();
        e.0 += hit(r) as usize;
        e.1 += 1;
    }
    Report {
        method: method.into(),
        data: data.to_path_buf(),
        overall: Accuracy::of(scored.iter().filter(|r| hit(r)).count(), scored.len()),
        per_topic: topics.into_iter().map(|(t, (c, n))| (t, Accuracy::of(c, n))).collect(),
        seconds_per_question: records.iter().map(|r| r.seconds).sum::<f64>() / records.len().max(1) as f64,
    }
}

/// Writes `report.json` and `report.md` into `out`.
pub fn write_report(out: &Path, r: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(r).expect("reports serialize");
    let path = out.join("report.json");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    let mut md = format!(
        "# {} on {}\n\n{}; {:.3} s per question\n\n| topic | accuracy | n |\n|---|---|---|\n",
        r.method,
        r.data.display(),
        r.accuracy_line(),
        r.seconds_per_question
    );
    for (t, a) in &r.per_topic {
        md.push_str(&format!("| {t} | {:.1}% | {} |\n", 100.0 * a.accuracy, a.total));
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_brackets_the_rate() {
        let a = Accuracy::of(50, 100);
        assert!((a.accuracy - 0.5).abs() < 1e-12);
        assert!(
            (a.ci95.0 - 0.4038).abs() < 1e-3 && (a.ci95.1 - 0.5962).abs() < 1e-3,
            "{a:?}"
        );
        let none = Accuracy::of(0, 10);
        assert_eq!(none.ci95.0, 0.0);
        assert!(none.ci95.1 > 0.2 && none.ci95.1 < 0.35);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESULTS);
        let rec = EvalRecord {
            id: "q:1".into(),
            method: "direct".into(),
            gold: Some('A'),
            predicted: Some('B'),
            scores: vec![('A', -1.0), ('B', -0.5)],
            topic: None,
            seconds: 0.1,
        };
        let line = serde_json::to_string(&rec).unwrap();
        std::fs::write(&path, format!("{line}\n{}", &line[..10])).unwrap();
        assert_eq!(read_results(&path).unwrap(), vec![rec]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{line}\n"));
    }
}
