//! `qmtot tot`, `draw`, `distill` and `bench tot`: argument parsing and display around
//! `qmtot::tot`.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::search_args::{SearchArgs, TreeMethod};
use crate::{cpu_backend, cpu_model, load, pick_device, CudaBackend, EngineArgs, Loaded, Picked, RunArgs};
use qmtot::backend::Backend;
use qmtot::engine::Engine;
use qmtot::error::{Error, Result};
use qmtot::eval::datasets::{self, Question};
use qmtot::eval::{distill, harness};
use qmtot::tot::{NodeStatus, Runner, Tree};

#[derive(Args)]
pub struct TotArgs {
    /// The question's text (with --option for each option).
    #[arg(long, conflicts_with = "from", required_unless_present = "from")]
    question: Option<String>,
    /// An option, as LETTER=TEXT (repeatable, in order).
    #[arg(long = "option", value_parser = parse_option)]
    options: Vec<(char, String)>,
    /// The correct letter, if known (shown against the decision).
    #[arg(long)]
    answer: Option<char>,
    /// Take the question from a question file (MedQA / MMLU / MedMCQA JSONL)…
    #[arg(long, requires = "id")]
    from: Option<PathBuf>,
    /// …by its id (as in results files, e.g. `mmlu-medical-sample:3`) or its 1-based position.
    #[arg(long)]
    id: Option<String>,
    /// Write the whole tree as JSON (draw it with `qmtot draw`).
    #[arg(long)]
    trace: Option<PathBuf>,
    #[command(flatten)]
    search: SearchArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

fn parse_option(s: &str) -> std::result::Result<(char, String), String> {
    let (l, t) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LETTER=TEXT"))?;
    let mut chars = l.trim().chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Ok((c.to_ascii_uppercase(), t.trim().to_string())),
        _ => Err(format!("{l:?}: an option letter is one letter")),
    }
}

fn question_of(a: &TotArgs) -> Result<Question> {
    if let (Some(path), Some(id)) = (&a.from, &a.id) {
        let set = datasets::load(path, &Default::default())?;
        let by_position = id
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| set.questions.get(i));
        return set
            .questions
            .iter()
            .find(|q| &q.id == id)
            .or(by_position)
            .cloned()
            .ok_or_else(|| {
                let ids: Vec<&str> = set.questions.iter().take(3).map(|q| q.id.as_str()).collect();
                Error::InvalidArgument(format!(
                    "{}: no question {id:?} (ids look like {ids:?})",
                    path.display()
                ))
            });
    }
    let stem = a.question.clone().unwrap_or_default();
    if stem.trim().is_empty() || a.options.len() < 2 {
        return Err(Error::InvalidArgument(
            "a question needs text and at least two --option".into(),
        ));
    }
    let letters: Vec<char> = a.options.iter().map(|o| o.0).collect();
    let expected: Vec<char> = ('A'..).take(letters.len()).collect();
    if letters != expected {
        return Err(Error::InvalidArgument(format!(
            "options must be lettered {expected:?} in order, got {letters:?}"
        )));
    }
    if let Some(g) = a.answer {
        if !letters.contains(&g.to_ascii_uppercase()) {
            return Err(Error::InvalidArgument(format!("--answer {g} is not an option")));
        }
    }
    Ok(Question {
        id: "cli".into(),
        stem,
        options: a.options.clone(),
        answer: a.answer.map(|c| c.to_ascii_uppercase()),
        meta: Default::default(),
    })
}

pub fn cmd_tot(a: TotArgs) -> Result<()> {
    let q = question_of(&a)?;
    with_model!(a.run, loaded => tot_on(&a, &q, loaded))
}

/// `1.3.2`: the node's sibling positions from the root, 1-based.
fn label(tree: &Tree, node: usize) -> String {
    let key: Vec<String> = tree.path_key(node).iter().map(|i| (i + 1).to_string()).collect();
    key.join(".")
}

fn shorten(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// One line per evaluated node.
fn node_line(tree: &Tree, id: usize) -> String {
    let n = tree.node(id);
    let mut parts = Vec::new();
    if let Some(v) = n.value {
        parts.push(format!("value {:.2}", v.value));
    }
    if let Some(p) = n.sufficient {
        parts.push(format!("enough {p:.2}"));
    }
    if let Some(p) = &n.letters {
        let best = qmtot::engine::sampler::argmax(p) as usize;
        parts.push(format!("{} {:.2}", tree.options[best].0, p[best]));
    }
    let verdict = match n.status {
        NodeStatus::Leaf => format!(
            "⇒ answers {}{}",
            n.answer.unwrap_or('?'),
            if n.forced { " (forced)" } else { "" }
        ),
        NodeStatus::Pruned => "✗ pruned".into(),
        _ => "→ expand".into(),
    };
    format!(
        "{}{:<7} {:<70} {} {verdict}",
        "  ".repeat(n.depth),
        label(tree, id),
        shorten(&n.thought, 70),
        parts.join(", ")
    )
}

fn tot_on<B: Backend>(a: &TotArgs, q: &Question, loaded: Loaded<B>) -> Result<()> {
    let Loaded { model, tokenizer } = loaded;
    let prompts = a.search.rendered(&tokenizer)?;
    let config = a.search.runner_config(TreeMethod::Tot)?;
    let mut engine = Engine::new(&model, Some(&tokenizer), a.engine.config())?;
    println!("Question: {}", q.stem.trim());
    for (l, t) in &q.options {
        println!("  {l}. {t}");
    }
    let s = &config.search;
    println!(
        "\ngrowing the tree: {:?}, k = {}, d = {}, sufficiency {}, {:?} vote, temperature {} [{}]\n",
        s.strategy,
        s.branching,
        s.depth,
        if s.sufficiency { "at every node" } else { "off" },
        s.vote,
        config.sampling.temperature,
        model.backend_name()
    );
    let mut printed: HashSet<usize> = HashSet::new();
    let mut finished = None;
    let stats = Runner::new(&tokenizer, &prompts, config)?.solve_all(
        &mut engine,
        std::slice::from_ref(q),
        1,
        |solved| {
            finished = Some(solved);
            Ok(())
        },
        |_, tree| {
            // A node's line is printed once its fate is known: leaf, pruned, or expanding.
            for n in &tree.nodes[1..] {
                if n.status.is_decided() && printed.insert(n.id) {
                    println!("{}", node_line(tree, n.id));
                }
            }
        },
    )?;
    let solved = finished.ok_or_else(|| Error::InvalidArgument("the search ended without a decision".into()))?;
    let tree = &solved.tree;
    let d = tree.decision.as_ref().expect("finished searches decide");
    println!();
    let votes: Vec<String> = d.votes.iter().map(|(l, v)| format!("{l}: {v:.2}")).collect();
    match d.answer {
        Some(ans) => println!(
            "answer: {ans}. {} ({:?} vote over {} leaves; {})",
            q.option(ans).unwrap_or(""),
            d.vote,
            tree.leaves().count(),
            votes.join(", ")
        ),
        None => println!("no answer"),
    }
    if let Some(leaf) = d.leaf {
        println!("support (path {}):", label(tree, leaf));
        for t in tree.thoughts(leaf) {
            println!("  {}", t.trim());
        }
    }
    if let Some(g) = q.answer {
        println!("gold: {g} — {}", if d.answer == Some(g) { "correct" } else { "wrong" });
    }
    eprintln!(
        "[{}] {} thoughts, {} tokens generated, {} prompt tokens computed, {} reused by sharing | {:.1} s, {} engine steps, peak KV blocks {} of {}",
        model.backend_name(),
        tree.thought_count(),
        solved.tokens.generated,
        solved.tokens.prefilled,
        solved.tokens.reused,
        stats.wall_seconds,
        stats.engine_steps,
        stats.peak_kv_blocks,
        stats.kv_blocks
    );
    if let Some(path) = &a.trace {
        let json = serde_json::to_string_pretty(tree).expect("trees serialize");
        std::fs::write(path, json).map_err(|e| Error::io(path, e))?;
        eprintln!(
            "tree written to {} (draw it: qmtot draw {} -o tree.html)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct DrawArgs {
    /// A tree trace (`qmtot tot --trace FILE.json`).
    trace: PathBuf,
    /// The HTML page to write.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

pub fn cmd_draw(a: DrawArgs) -> Result<()> {
    qmtot::tot::draw::draw_file(&a.trace, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct DistillArgs {
    /// Questions with known answers (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// SFT examples to write (chat-messages JSONL).
    #[arg(long)]
    out: PathBuf,
    /// Keep at most this fraction of the questions.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// Where the cot and tot runs go (resumable); default `<out>.work`.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Questions in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[command(flatten)]
    search: SearchArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn cmd_distill(a: DistillArgs) -> Result<()> {
    if !(a.fraction > 0.0 && a.fraction <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "--fraction {} must be in (0, 1]",
            a.fraction
        )));
    }
    let questions = super::load_questions(&a.data, &Default::default(), a.limit, true)?;
    with_model!(a.run, loaded => distill_on(&a, &questions, loaded))
}

fn distill_on<B: Backend>(a: &DistillArgs, questions: &[Question], loaded: Loaded<B>) -> Result<()> {
    let Loaded { model, tokenizer } = loaded;
    let prompts = a.search.rendered(&tokenizer)?;
    let work = a.work.clone().unwrap_or_else(|| {
        let mut w = a.out.clone().into_os_string();
        w.push(".work");
        PathBuf::from(w)
    });
    let mut engine = Engine::new(&model, Some(&tokenizer), a.engine.config())?;
    let mut runs = Vec::new();
    for m in [TreeMethod::Cot, TreeMethod::Tot] {
        let bar = progress_bar(questions.len(), m.name());
        let (records, _) = harness::run_search(
            &mut engine,
            &tokenizer,
            &prompts,
            a.search.runner_config(m)?,
            m.name(),
            questions,
            &work.join(m.name()),
            a.concurrency,
            |p| show_progress(&bar, p),
        )?;
        bar.finish_and_clear();
        runs.push(records);
    }
    let (cot, tot) = (&runs[0], &runs[1]);
    let picks = distill::select(tot, cot, a.fraction, questions.len());
    let n = distill::write_sft(&a.out, &picks, tot, questions, &prompts)?;
    let reached = tot
        .iter()
        .filter(|r| r.tree.as_ref().and_then(distill::best_correct_leaf).is_some())
        .count();
    println!(
        "{n} examples written to {} ({} of {} trees reached the gold answer; {} of the kept ones cot got wrong; runs in {})",
        a.out.display(),
        reached,
        questions.len(),
        picks.iter().filter(|p| p.cot_wrong).count(),
        work.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchTotArgs {
    /// Question file (default: the MMLU medical set from scripts/fetch-data).
    #[arg(long, default_value = "data/mmlu-medical.jsonl")]
    data: PathBuf,
    /// Questions (the first N).
    #[arg(long, default_value_t = 20)]
    questions: usize,
    /// Questions in flight in the shared run (the unshared run takes one at a time).
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    #[command(flatten)]
    search: SearchArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn cmd_bench_tot(a: BenchTotArgs) -> Result<()> {
    let questions = super::load_questions(&a.data, &Default::default(), Some(a.questions), false)?;
    with_model!(a.run, loaded => bench_tot_on(&a, &questions, loaded))
}

fn bench_tot_on<B: Backend>(a: &BenchTotArgs, questions: &[Question], loaded: Loaded<B>) -> Result<()> {
    let Loaded { model, tokenizer } = loaded;
    let prompts = a.search.rendered(&tokenizer)?;
    let config = a.search.runner_config(TreeMethod::Tot)?;
    println!("backend:  {}", model.backend_name());
    println!("cpu:      {}", cpu_model());
    println!(
        "{} questions from {}, {:?}, k = {}, d = {}, temperature {}, seed {}",
        questions.len(),
        a.data.display(),
        config.search.strategy,
        config.search.branching,
        config.search.depth,
        config.sampling.temperature,
        config.sampling.seed
    );
    println!(
        "{:<10} {:>11} {:>9} {:>16} {:>13} {:>12} {:>10} {:>9}",
        "setup", "concurrency", "wall s", "tokens computed", "cache tokens", "thoughts/s", "gen tok/s", "peak KV"
    );
    let bench = qmtot::bench::tot::TotBench {
        prompts: &prompts,
        config: &config,
        engine: a.engine.config(),
        concurrency: a.concurrency,
    };
    let mut runs = Vec::new();
    for sharing in [true, false] {
        let r = qmtot::bench::tot::run(&model, &tokenizer, bench, questions, sharing)?;
        let s = &r.stats;
        println!(
            "{:<10} {:>11} {:>9.1} {:>16} {:>13} {:>12.2} {:>10.1} {:>9}",
            if sharing { "shared" } else { "unshared" },
            if sharing { a.concurrency } else { 1 },
            s.wall_seconds,
            s.computed_tokens,
            s.cached_tokens,
            s.thoughts_per_second(),
            s.generated_per_second(),
            s.peak_kv_blocks
        );
        runs.push(r);
    }
    let (shared, unshared) = (&runs[0], &runs[1]);
    let same = shared
        .answers
        .iter()
        .zip(&unshared.answers)
        .filter(|(x, y)| x == y)
        .count();
    println!(
        "speed-up: {:.2}x wall time, {:.2}x fewer tokens computed; same answer on {same} of {} questions; thoughts {} vs {}",
        unshared.stats.wall_seconds / shared.stats.wall_seconds.max(1e-9),
        unshared.stats.computed_tokens as f64 / shared.stats.computed_tokens.max(1) as f64,
        questions.len(),
        shared.stats.thoughts,
        unshared.stats.thoughts
    );
    Ok(())
}

pub fn progress_bar(total: usize, method: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} questions, {msg}, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(method.to_string());
    bar
}

pub fn show_progress(bar: &ProgressBar, p: harness::Progress) {
    bar.set_position(p.done as u64);
    if p.scored > 0 {
        bar.set_message(format!("accuracy {:.1}%", 100.0 * p.correct as f64 / p.scored as f64));
    }
}
