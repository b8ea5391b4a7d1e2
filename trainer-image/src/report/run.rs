//! Reading a finished run from its output directory, and nothing outside it:
//! `training_summary.json` (required: without it there is no run to show) and
//! `adapter_config.json` (optional: the base model and LoRA settings of a LoRA run).
//!
//! Both are read as `serde_json::Value` and picked apart leniently, key by key: a summary from an
//! older or newer trainer (or a section another change reshapes, like contamination) still gives
//! a report, with what it lacks shown as absent rather than failing the whole page.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const SUMMARY_FILE: &str = "training_summary.json";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// What the report shows, as read from the output directory.
pub struct Run {
    pub dir: PathBuf,
    pub summary: Value,
    pub adapter_config: Option<Value>,
    /// Problems with optional files, shown on the page instead of failing it.
    pub notes: Vec<String>,
}

/// One logged optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub step: f64,
    pub loss: f64,
    pub learning_rate: f64,
    /// The step's tokens over its wall time.
    pub tokens_per_second: f64,
}

impl Run {
    /// A run made of a summary alone (the unit tests' pages).
    #[cfg(test)]
    pub fn from_summary(summary: Value) -> Self {
        Self {
            dir: PathBuf::new(),
            summary,
            adapter_config: None,
            notes: vec![],
        }
    }

    /// Reads the run in `dir`; a missing or malformed summary is an error naming the file.
    pub fn read(dir: &Path) -> Result<Run> {
        let path = dir.join(SUMMARY_FILE);
        let summary = read_json(&path).map_err(|e| match e {
            Error::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::format(
                    &path,
                    "not found: the report needs the summary a finished `finetune-trainer run` writes",
                )
            }
            other => other,
        })?;
        if !summary.is_object() {
            return Err(Error::format(&path, "expected a JSON object"));
        }
        let mut notes = Vec::new();
        let adapter_path = dir.join(ADAPTER_CONFIG_FILE);
        let adapter_config = if adapter_path.exists() {
            read_json(&adapter_path)
                .map_err(|e| notes.push(format!("{e} (base model not shown)")))
                .ok()
        } else {
            None
        };
        Ok(Run {
            dir: dir.to_path_buf(),
            summary,
            adapter_config,
            notes,
        })
    }

    /// `summary.history`: every logged step, in order. A record without a loss still counts as a
    /// step (its loss is NaN, which breaks the curve there) so nothing is silently renumbered.
    pub fn steps(&self) -> Vec<Step> {
        array(&self.summary, "history")
            .iter()
            .map(|r| {
                let tokens = num(r, "tokens").unwrap_or(f64::NAN);
                let seconds = num(r, "seconds").unwrap_or(f64::NAN);
                Step {
                    step: num(r, "step").unwrap_or(f64::NAN),
                    loss: num(r, "loss").unwrap_or(f64::NAN),
                    learning_rate: num(r, "learning_rate").unwrap_or(f64::NAN),
                    tokens_per_second: if seconds > 0.0 {
                        tokens / seconds
                    } else {
                        f64::NAN
                    },
                }
            })
            .collect()
    }

    /// Eval loss per step, starting with the loss before the first update (step 0) when known.
    pub fn eval_losses(&self) -> Vec<(f64, f64)> {
        let initial = num(&self.summary, "initial_eval_loss").map(|l| (0.0, l));
        let evals = array(&self.summary, "evals")
            .iter()
            .filter_map(|e| Some((num(e, "step")?, num(e, "eval_loss")?)));
        initial.into_iter().chain(evals).collect()
    }

    /// Retention probe scores during training, as (step, score).
    pub fn retention_scores(&self) -> Vec<(f64, f64)> {
        array(&self.summary, "retention.scores")
            .iter()
            .filter_map(|r| Some((num(r, "step")?, num(r, "score")?)))
            .collect()
    }

    /// A summary value by dotted path.
    pub fn get(&self, path: &str) -> Option<&Value> {
        get(&self.summary, path)
    }

    pub fn num(&self, path: &str) -> Option<f64> {
        num(&self.summary, path)
    }

    pub fn text(&self, path: &str) -> Option<String> {
        text(&self.summary, path)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// `v.a.b.c` for the path `"a.b.c"`; `None` where any step is missing.
pub fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// A number (JSON numbers only: a string "1.5" is not silently taken as one).
pub fn num(v: &Value, path: &str) -> Option<f64> {
    get(v, path).and_then(Value::as_f64)
}

/// A string as is, or any other scalar as its JSON text; `None` for null, arrays and objects.
pub fn text(v: &Value, path: &str) -> Option<String> {
    match get(v, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
        other => Some(other.to_string()),
    }
}

/// An array, or an empty slice when the key is missing or is not an array.
pub fn array<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_summary_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Run::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains(SUMMARY_FILE) && e.contains("not found"), "{e}");
    }

    #[test]
    fn a_malformed_summary_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SUMMARY_FILE), "{\"steps\": ").unwrap();
        let e = Run::read(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains(SUMMARY_FILE) && e.contains("invalid JSON"),
            "{e}"
        );
        std::fs::write(dir.path().join(SUMMARY_FILE), "[1, 2]").unwrap();
        let e = Run::read(dir.path()).err().unwrap().to_string();
        assert!(e.contains(SUMMARY_FILE) && e.contains("object"), "{e}");
    }

    #[test]
    fn a_malformed_adapter_config_is_a_note_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SUMMARY_FILE), "{}").unwrap();
        std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), "not json").unwrap();
        let run = Run::read(dir.path()).unwrap();
        assert!(run.adapter_config.is_none());
        assert!(
            run.notes[0].contains(ADAPTER_CONFIG_FILE),
            "{:?}",
            run.notes
        );
    }

    #[test]
    fn steps_and_evals_are_read_leniently() {
        let run = Run {
            dir: PathBuf::new(),
            summary: json!({
                "initial_eval_loss": 3.0,
                "history": [
                    {"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens": 100, "seconds": 0.5},
                    {"step": 2, "learning_rate": 1e-3, "tokens": 100, "seconds": 0.0},
                ],
                "evals": [{"step": 2, "eval_loss": 2.0}, {"step": 3}],
                "retention": {"scores": "not a list"},
            }),
            adapter_config: None,
            notes: vec![],
        };
        let steps = run.steps();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].tokens_per_second, 200.0);
        assert!(steps[1].loss.is_nan() && steps[1].tokens_per_second.is_nan());
        assert_eq!(run.eval_losses(), vec![(0.0, 3.0), (2.0, 2.0)]);
        assert!(run.retention_scores().is_empty());
        assert_eq!(text(&run.summary, "history"), None);
        assert_eq!(run.text("initial_eval_loss").as_deref(), Some("3.0"));
    }
}
