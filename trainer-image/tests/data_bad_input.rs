//! Bad data files: every error names `file:line` (or the file, when there is no line) and maps to
//! exit code 2. Also `eval`'s loader rejects the same lines.

use std::path::{Path, PathBuf};

use finetune_trainer::Error;
use finetune_trainer::data::testing::{byte_tokenizer, chatml};
use finetune_trainer::data::{DataFormat, Encoder, LoadOptions, load_preference, load_samples};
use finetune_trainer::eval::load_examples;
use finetune_trainer::text::{ChatTemplate, TextTokenizer};

struct Env {
    dir: tempfile::TempDir,
    tok: TextTokenizer,
    template: ChatTemplate,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path(), "<|im_end|>");
    Env {
        dir,
        tok,
        template: chatml(),
    }
}

impl Env {
    fn file(&self, name: &str, lines: &[&str]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(
            &p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        p
    }

    fn load(&self, path: &Path, format: DataFormat) -> Result<usize, Error> {
        let enc = Encoder {
            tokenizer: &self.tok,
            template: Some(&self.template),
            options: LoadOptions::sft(),
        };
        if format == DataFormat::Preference {
            load_preference(path, &enc).map(|v| v.len())
        } else {
            load_samples(path, format, &enc).map(|v| v.len())
        }
    }

    /// Loads `lines` as `format` and checks the error starts with `<path>:<line>: ` and contains `want`.
    fn expect(&self, format: DataFormat, lines: &[&str], line: usize, want: &str) {
        let p = self.file("bad.jsonl", lines);
        let err = self.load(&p, format).unwrap_err();
        let msg = err.to_string();
        let prefix = format!("{}:{line}: ", p.display());
        assert!(
            msg.starts_with(&prefix),
            "{msg:?} does not start with {prefix:?}"
        );
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        assert!(matches!(err, Error::Data { .. }));
        assert_eq!(err.exit_code(), 2);
    }
}

const GOOD: &str =
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;

#[test]
fn invalid_json_line() {
    env().expect(
        DataFormat::Chat,
        &[GOOD, "", "{\"messages\": [", GOOD],
        3,
        "invalid JSON",
    );
}

#[test]
fn missing_role() {
    env().expect(
        DataFormat::Chat,
        &[
            GOOD,
            r#"{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        ],
        2,
        "message 0: missing `role`",
    );
}

#[test]
fn unknown_role() {
    env().expect(
        DataFormat::Chat,
        &[r#"{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#],
        1,
        "unknown role `human`",
    );
}

#[test]
fn empty_assistant_turn() {
    env().expect(
        DataFormat::Chat,
        &[GOOD, GOOD, r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}"#],
        3,
        "message 1: empty assistant turn",
    );
    env().expect(
        DataFormat::Instruction,
        &[r#"{"instruction": "do", "output": "  "}"#],
        1,
        "empty assistant turn",
    );
}

#[test]
fn no_assistant_turn() {
    env().expect(
        DataFormat::Chat,
        &[r#"{"messages": [{"role": "user", "content": "hi"}]}"#],
        1,
        "no assistant turn",
    );
}

#[test]
fn wrong_or_unknown_format() {
    // A line of another format: says which format it looks like.
    env().expect(
        DataFormat::Chat,
        &[GOOD, r#"{"text": "plain"}"#],
        2,
        "looks like text data",
    );
    env().expect(
        DataFormat::Text,
        &[GOOD],
        1,
        "format text: expected a string field `text`",
    );
    env().expect(
        DataFormat::Instruction,
        &[r#"{"output": "x"}"#],
        1,
        "`instruction`",
    );
    env().expect(
        DataFormat::Preference,
        &[r#"{"prompt": "p", "chosen": "c"}"#],
        1,
        "`rejected`",
    );
    env().expect(
        DataFormat::Chat,
        &[r#"{"foo": 1}"#],
        1,
        "format chat: expected {\"messages\": [...]}",
    );
    env().expect(DataFormat::Text, &["[1, 2]"], 1, "expected a JSON object");
    // A format name that does not exist.
    let err = "parquet".parse::<DataFormat>().unwrap_err();
    assert!(
        err.to_string().contains("unknown data format `parquet`"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn empty_and_missing_files() {
    let e = env();
    let p = e.file("empty.jsonl", &["", "   "]);
    let err = e.load(&p, DataFormat::Chat).unwrap_err();
    assert!(
        err.to_string().contains("empty.jsonl: empty data file"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    let missing = e.dir.path().join("absent.jsonl");
    let err = e.load(&missing, DataFormat::Text).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("absent.jsonl"), "{err}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn eval_loader_rejects_the_same_lines() {
    let e = env();
    let p = e.file(
        "eval.jsonl",
        &[
            GOOD,
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}"#,
        ],
    );
    let err = load_examples(&p, DataFormat::Chat, &e.tok, Some(&e.template), 64).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!("{}:2: ", p.display())),
        "{err}"
    );
    let ok = e.file("ok.jsonl", &[GOOD, GOOD]);
    let ex = load_examples(&ok, DataFormat::Chat, &e.tok, Some(&e.template), 8).unwrap();
    assert_eq!(ex.len(), 2, "eval keeps duplicates");
    assert!(
        ex.iter().all(|x| x.ids.len() == 8),
        "eval truncates to max_length"
    );
    let err = load_examples(&ok, DataFormat::Preference, &e.tok, Some(&e.template), 8).unwrap_err();
    assert!(matches!(err, Error::Usage(_)));
}
