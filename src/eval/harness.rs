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
use crate::tot::{Rendered, RunStats, Runner, RunnerConfig, TokenCounts, Tree};

/// One finished question, as written to `results.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub id: String,
    pub method: String,
    pub gold: Option<char>,
    /// `None` = no valid answer (counted wrong, reported apart).
    pub predicted: Option<char>,
    /// `(letter, score)` per option: log-likelihood for `direct`, votes for tree methods.
    pub scores: Vec<(char, f32)>,
    pub topic: Option<String>,
    /// `direct`: the batch's wall time divided among its questions; tree methods: the
    /// question's own time from first job to decision (questions overlap).
    pub seconds: f64,
    #[serde(default)]
    pub tokens: TokenCounts,
    /// Thoughts in the tree (0 for `direct`).
    #[serde(default)]
    pub thoughts: usize,
    /// The whole tree (tree methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<Tree>,
}

impl EvalRecord {
    pub fn new(q: &Question, method: &str) -> Self {
        Self {
            id: q.id.clone(),
            method: method.into(),
            gold: q.answer,
            predicted: None,
            scores: Vec::new(),
            topic: q.meta.get("topic").or_else(|| q.meta.get("subject_name")).cloned(),
            seconds: 0.0,
            tokens: TokenCounts::default(),
            thoughts: 0,
            tree: None,
        }
    }

    pub fn correct(&self) -> bool {
        self.gold.is_some() && self.gold == self.predicted
    }
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

/// The results file of a run folder, opened for appending after reading what it holds.
struct ResultsFile {
    path: PathBuf,
    file: std::fs::File,
    records: Vec<EvalRecord>,
}

impl ResultsFile {
    fn open(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join(RESULTS);
        let records = read_results(&path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file, records })
    }

    /// The questions not yet in the file, in order.
    fn todo<'q>(&self, questions: &'q [Question]) -> Vec<&'q Question> {
        let done: HashSet<&str> = self.records.iter().map(|r| r.id.as_str()).collect();
        questions.iter().filter(|q| !done.contains(q.id.as_str())).collect()
    }

    /// Appends whole lines and flushes them to disk before returning.
    fn append(&mut self, new: Vec<EvalRecord>) -> Result<()> {
        let mut lines = String::new();
        for rec in &new {
            lines.push_str(&serde_json::to_string(rec).expect("records serialize"));
            lines.push('\n');
        }
        self.file
            .write_all(lines.as_bytes())
            .and_then(|()| self.file.flush())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))?;
        self.records.extend(new);
        Ok(())
    }

    fn progress(&self, total: usize) -> Progress {
        Progress {
            done: self.records.len(),
            total,
            correct: self.records.iter().filter(|r| r.correct()).count(),
            scored: self.records.iter().filter(|r| r.gold.is_some()).count(),
        }
    }

    /// Every record of `questions`, in question order.
    fn finish(mut self, questions: &[Question]) -> Vec<EvalRecord> {
        let order: BTreeMap<&str, usize> = questions.iter().enumerate().map(|(i, q)| (q.id.as_str(), i)).collect();
        self.records.retain(|r| order.contains_key(r.id.as_str()));
        self.records.sort_by_key(|r| order[r.id.as_str()]);
        self.records
    }
}

/// Where a run stands, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub correct: usize,
    /// Finished questions with a gold answer.
    pub scored: usize,
}

/// Runs `direct` over the questions not yet in `<out>/results.jsonl`, `concurrency` at a time;
/// returns every record (old and new) in question order.
pub fn run_direct<B: Backend>(
    engine: &mut Engine<'_, B>,
    tokenizer: &Tokenizer,
    questions: &[Question],
    out: &Path,
    concurrency: usize,
    mut progress: impl FnMut(Progress),
) -> Result<Vec<EvalRecord>> {
    let mut results = ResultsFile::open(out)?;
    let todo: Vec<Question> = results.todo(questions).into_iter().cloned().collect();
    progress(results.progress(questions.len()));
    for batch in todo.chunks(concurrency.max(1)) {
        let t = Instant::now();
        let scored = baselines::direct(engine, tokenizer, batch)?;
        let seconds = t.elapsed().as_secs_f64() / batch.len() as f64;
        let new = batch
            .iter()
            .zip(scored)
            .map(|(q, r)| EvalRecord {
                predicted: Some(r.predicted),
                scores: r.scores,
                seconds,
                tokens: TokenCounts {
                    prefilled: r.prompt_tokens,
                    ..Default::default()
                },
                ..EvalRecord::new(q, "direct")
            })
            .collect();
        results.append(new)?;
        progress(results.progress(questions.len()));
    }
    Ok(results.finish(questions))
}

/// Runs a tree method (`tot`, or `cot` / `sc` as chains) over the questions not yet in
/// `<out>/results.jsonl`, keeping `concurrency` questions in flight; each question's record is
/// appended and flushed as soon as it is decided. Returns every record in question order, and
/// this invocation's run statistics.
#[allow(clippy::too_many_arguments)]
pub fn run_search<'m, B: Backend>(
    engine: &mut Engine<'m, B>,
    tokenizer: &'m Tokenizer,
    prompts: &Rendered,
    config: RunnerConfig,
    method: &str,
    questions: &[Question],
    out: &Path,
    concurrency: usize,
    mut progress: impl FnMut(Progress),
) -> Result<(Vec<EvalRecord>, RunStats)> {
    let mut results = ResultsFile::open(out)?;
    let todo: Vec<Question> = results.todo(questions).into_iter().cloned().collect();
    progress(results.progress(questions.len()));
    let mut runner = Runner::new(tokenizer, prompts, config)?;
    let stats = runner.solve_all(
        engine,
        &todo,
        concurrency,
        |solved| {
            let q = &todo[solved.index];
            let decision = solved.tree.decision.clone();
            let rec = EvalRecord {
                predicted: decision.as_ref().and_then(|d| d.answer),
                scores: decision.map(|d| d.votes).unwrap_or_default(),
                seconds: solved.seconds,
                tokens: solved.tokens,
                thoughts: solved.tree.thought_count(),
                tree: Some(solved.tree),
                ..EvalRecord::new(q, method)
            };
            results.append(vec![rec])?;
            progress(results.progress(questions.len()));
            Ok(())
        },
        |_, _| {},
    )?;
    Ok((results.finish(questions), stats))
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

/// Mean tokens per question.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TokenMeans {
    pub generated: f64,
    pub prefilled: f64,
    pub reused: f64,
}

/// This invocation's throughput (a resumed run reports only its own part).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throughput {
    pub stats: RunStats,
    pub thoughts_per_second: f64,
    pub generated_tokens_per_second: f64,
    /// Share of the model's input tokens the radix prefix cache supplied.
    pub prefix_cache_hit_rate: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub method: String,
    pub data: PathBuf,
    /// Invalid answers count as wrong.
    pub overall: Accuracy,
    /// Questions without a valid answer.
    pub invalid: usize,
    pub invalid_rate: f64,
    /// Questions without a gold answer are not counted.
    pub per_topic: BTreeMap<String, Accuracy>,
    pub seconds_per_question: f64,
    pub tokens_per_question: TokenMeans,
    pub thoughts_per_question: f64,
    pub throughput: Option<Throughput>,
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

pub fn report(method: &str, data: &Path, records: &[EvalRecord], run: Option<&RunStats>) -> Report {
    let scored: Vec<&EvalRecord> = records.iter().filter(|r| r.gold.is_some()).collect();
    let mut topics: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &scored {
        let e = topics
            .entry(r.topic.clone().unwrap_or_else(|| "(none)".into()))
            .or_default();
        e.0 += r.correct() as usize;
        e.1 += 1;
    }
    let n = records.len().max(1) as f64;
    let mean = |f: &dyn Fn(&EvalRecord) -> f64| records.iter().map(f).sum::<f64>() / n;
    let invalid = records.iter().filter(|r| r.predicted.is_none()).count();
    Report {
        method: method.into(),
        data: data.to_path_buf(),
        overall: Accuracy::of(scored.iter().filter(|r| r.correct()).count(), scored.len()),
        invalid,
        invalid_rate: invalid as f64 / n,
        per_topic: topics.into_iter().map(|(t, (c, n))| (t, Accuracy::of(c, n))).collect(),
        seconds_per_question: mean(&|r| r.seconds),
        tokens_per_question: TokenMeans {
            generated: mean(&|r| r.tokens.generated as f64),
            prefilled: mean(&|r| r.tokens.prefilled as f64),
            reused: mean(&|r| r.tokens.reused as f64),
        },
        thoughts_per_question: mean(&|r| r.thoughts as f64),
        throughput: run.map(|s| Throughput {
            stats: s.clone(),
            thoughts_per_second: s.thoughts_per_second(),
            generated_tokens_per_second: s.generated_per_second(),
            prefix_cache_hit_rate: s.cache_hit_rate(),
        }),
    }
}

/// Writes `report.json` and `report.md` into `out`.
pub fn write_report(out: &Path, r: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(r).expect("reports serialize");
    let path = out.join("report.json");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    let t = &r.tokens_per_question;
    let mut md = format!(
        "# {} on {}\n\n{}\n\n\
         - invalid answers: {} ({:.1}%, counted wrong)\n\
         - per question: {:.2} s, {:.1} thoughts, tokens generated {:.0} / prefilled {:.0} / reused {:.0}\n",
        r.method,
        r.data.display(),
        r.accuracy_line(),
        r.invalid,
        100.0 * r.invalid_rate,
        r.seconds_per_question,
        r.thoughts_per_question,
        t.generated,
        t.prefilled,
        t.reused,
    );
    if let Some(tp) = &r.throughput {
        let s = &tp.stats;
        md.push_str(&format!(
            "- this invocation: {} questions in {:.1} s wall, {:.2} thoughts/s, {:.1} generated tok/s, \
             prefix-cache hit rate {:.1}%, peak KV blocks {} of {}\n",
            s.questions,
            s.wall_seconds,
            tp.thoughts_per_second,
            tp.generated_tokens_per_second,
            100.0 * tp.prefix_cache_hit_rate,
            s.peak_kv_blocks,
            s.kv_blocks,
        ));
    }
    md.push_str("\n| topic | accuracy | 95% CI | n |\n|---|---|---|---|\n");
    for (name, a) in &r.per_topic {
        md.push_str(&format!(
            "| {name} | {:.1}% | {:.1}–{:.1}% | {} |\n",
            100.0 * a.accuracy,
            100.0 * a.ci95.0,
            100.0 * a.ci95.1,
            a.total
        ));
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
            tokens: TokenCounts::default(),
            thoughts: 0,
            tree: None,
        };
        let line = serde_json::to_string(&rec).unwrap();
        std::fs::write(&path, format!("{line}\n{}", &line[..10])).unwrap();
        assert_eq!(read_results(&path).unwrap(), vec![rec]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{line}\n"));
    }
}
