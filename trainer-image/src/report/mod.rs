//! `report.html`: a picture of one finished run, written into its output directory by
//! `finetune-trainer report OUTPUT_DIR` and at the end of every training run.
//!
//! One self-contained file a person opens in a browser: loss, learning-rate and tokens/s curves as
//! inline SVG (drawn here, no JavaScript), eval and retention before/after, the retention answers
//! that changed side by side, contamination findings and the run's details. It reads only files
//! in the output directory, loads nothing from the network, and escapes everything it shows.
//!
//! One job per file: [`run`] reads the directory, [`svg`] draws charts, [`charts`] picks the
//! curves, [`answers`] and [`contamination`] render those sections, [`html`] holds escaping and
//! the page shell, [`page`] puts the document together.

mod answers;
mod charts;
mod contamination;
pub mod html;
mod page;
pub mod run;
pub mod svg;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const REPORT_FILE: &str = "report.html";

/// What [`write_report`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: usize,
    /// Logged steps drawn in the curves.
    pub steps: usize,
}

/// Reads the run in `output_dir` and writes `output_dir/report.html`.
pub fn write_report(output_dir: &Path) -> Result<Written> {
    let run = run::Run::read(output_dir)?;
    let html = page::render(&run);
    let path = output_dir.join(REPORT_FILE);
    write_atomically(&path, html.as_bytes())?;
    Ok(Written {
        path,
        bytes: html.len(),
        steps: run.steps().len(),
    })
}

/// Writes a temporary file beside `path` and renames it over `path`, so a browser (or a reader
/// copying the output directory) sees the old report or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map_or("report".into(), |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_gives_a_report_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let summary = serde_json::json!({
            "job": "j<1>", "steps": 2, "total_steps": 2, "adapter": "lora",
            "history": [
                {"step": 1, "loss": 2.0, "learning_rate": 1e-3, "tokens": 10, "seconds": 1.0},
                {"step": 2, "loss": 1.5, "learning_rate": 5e-4, "tokens": 10, "seconds": 1.0},
            ],
        });
        std::fs::write(dir.path().join(run::SUMMARY_FILE), summary.to_string()).unwrap();
        let w = write_report(dir.path()).unwrap();
        assert_eq!(w.steps, 2);
        let html = std::fs::read_to_string(&w.path).unwrap();
        assert_eq!(html.len(), w.bytes);
        assert!(html.contains(r#"data-series="train-loss""#), "{html}");
        assert!(html.contains("j&lt;1&gt;") && !html.contains("j<1>"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_summary() {
        let e = write_report(Path::new("/nonexistent/run")).unwrap_err();
        assert!(e.to_string().contains("training_summary.json"), "{e}");
    }
}
