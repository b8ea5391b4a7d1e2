//! Offline manifest validation: the `check` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use finetune_crds::{Adapter, FinetuneJob, InvalidManifest, read_manifest, read_manifest_text};

/// Exit status when a manifest is invalid (the trainer contract's "invalid input").
const INVALID: u8 = 2;

/// Checks every file, prints one line per file (and one per problem), and fails when any is bad.
pub fn run(files: &[PathBuf]) -> ExitCode {
    let mut invalid = 0;
    for file in files {
        match check_file(file) {
            Ok(summary) => println!("ok       {}  {summary}", file.display()),
            Err(error) => {
                invalid += 1;
                println!("INVALID  {error}");
            }
        }
    }
    println!("{} manifests checked, {invalid} invalid", files.len());
    if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(INVALID)
    }
}

/// Validates one manifest according to its `kind` and describes it in a few words.
fn check_file(path: &Path) -> Result<String, InvalidManifest> {
    let kind = read_manifest_text(path)
        .ok()
        .and_then(|text| kind_of(&text));
    match kind.as_deref() {
        Some("Adapter") => {
            let adapter: Adapter = read_manifest(path)?;
            Ok(format!("Adapter for {}", adapter.spec.base_model.uri))
        }
        _ => {
            let job: FinetuneJob = read_manifest(path)?;
            let spec = &job.spec;
            Ok(format!(
                "FinetuneJob {:?}/{:?} on {}",
                spec.method.kind, spec.adapter.kind, spec.base_model.uri
            ))
        }
    }
}

fn kind_of(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("kind:"))
        .map(|kind| kind.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_field_of_a_bad_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sft-lora-smollm2.yaml");
        let text = std::fs::read_to_string(example)
            .unwrap()
            .replace("rank: 16", "rank: 0");
        std::fs::write(&path, text).unwrap();
        let error = check_file(&path).unwrap_err();
        assert_eq!(error.first_field(), Some("spec.adapter.lora.rank"));
        assert_eq!(run(&[path]), ExitCode::from(INVALID));
    }

    #[test]
    fn accepts_an_adapter() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adapter.yaml");
        assert!(
            check_file(&example)
                .unwrap()
                .starts_with("Adapter for pvc://")
        );
    }
}
