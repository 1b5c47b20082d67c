//! Command-line pieces beyond `main.rs`'s dispatch: the tree methods' options and the
//! `tot` / `draw` / `distill` / `bench tot` commands.

pub mod search_args;
pub mod tot;

use std::path::Path;

use qmtot::error::{Error, Result};
use qmtot::eval::datasets::{self, LoadOptions, Question};

/// A question file's questions (with answers only, if asked), the first `limit` of them;
/// skipped malformed lines are reported; an error when none remain.
pub fn load_questions(
    path: &Path,
    opts: &LoadOptions,
    limit: Option<usize>,
    need_answers: bool,
) -> Result<Vec<Question>> {
    let set = datasets::load(path, opts)?;
    if !set.skipped_bad.is_empty() {
        eprintln!(
            "skipped {} malformed line(s): {:?}",
            set.skipped_bad.len(),
            set.skipped_bad
        );
    }
    let mut questions = set.questions;
    if need_answers {
        questions.retain(|q| q.answer.is_some());
    }
    if let Some(n) = limit {
        questions.truncate(n);
    }
    if questions.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no questions to run{}",
            path.display(),
            if need_answers { " (with answers)" } else { "" }
        )));
    }
    Ok(questions)
}
