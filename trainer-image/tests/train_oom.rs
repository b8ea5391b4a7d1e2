//! Out-of-memory recovery with a real allocation failure: the trainer runs under an address-space
//! limit (`prlimit --as`, the kernel refuses the mapping and libtorch's allocator fails with
//! "can't allocate memory") that a batch of 32 long sequences does not fit in but a smaller
//! micro-batch does. The run halves its micro-batch from the same step, finishes, reports the
//! micro-batch it ended with, and its losses equal (within 1e-4) those of a run that used that
//! micro-batch from the start.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const STEPS: usize = 3;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_finetune-trainer")
}

fn write_job(root: &Path, name: &str, micro: Option<usize>) -> PathBuf {
    let micro = micro.map_or_else(String::new, |m| format!(", microBatchSize: {m}"));
    let yaml = format!(
        "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: {name}}}
spec:
  baseModel: {{uri: \"file://{}\"}}
  dataset:
    train: {{uri: \"file://{}\"}}
    format: text
  adapter: {{type: lora, lora: {{rank: 4, alpha: 8, dropout: 0.0}}}}
  hyperparameters: {{maxSteps: {STEPS}, learningRate: 1.0e-2, batchSize: 32, maxSeqLength: 1024, seed: 5{micro}}}
  forgettingGuard: {{disabled: true}}
  resources: {{gpus: 0}}
",
        root.join("model").display(),
        root.join("train.jsonl").display(),
    );
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Runs the job (under `prlimit --as=LIMIT` when given); returns stderr and the summary.
fn run(root: &Path, job: &Path, out: &str, limit: Option<u64>) -> (String, Value) {
    let mut cmd = match limit {
        Some(bytes) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--as={bytes}")).arg("--").arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let o = cmd
        .args(["--device", "cpu", "run"])
        .arg(job)
        .arg("--output")
        .arg(root.join(out))
        .env("FINETUNE_STATUS_PORT", "0")
        .env("FINETUNE_TERMINATION_LOG", root.join(format!("{out}.term")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{out}: {:?}\n{err}", o.status);
    let summary = std::fs::read(root.join(out).join("training_summary.json")).unwrap();
    (err, serde_json::from_slice(&summary).unwrap())
}

fn losses(summary: &Value) -> Vec<f64> {
    summary["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["loss"].as_f64().unwrap())
        .collect()
}

fn peak_virtual(summary: &Value) -> u64 {
    summary["peak_virtual_bytes"].as_u64().expect("VmPeak")
}

#[test]
fn a_batch_that_cannot_fit_halves_its_micro_batch_and_trains_as_if_started_smaller() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    train_support::write_tiny_model(&root.join("model"), 8);
    // The tiny model's context, long enough for the long texts (rotary tables only).
    let mut config = train_support::config();
    config["max_position_embeddings"] = 2048.into();
    std::fs::write(root.join("model/config.json"), config.to_string()).unwrap();
    // Lines of 600–1000 words (one token each), so activations dominate the process's memory.
    train_support::write_text_lines(&root.join("train.jsonl"), 96, 99, 600..1000);
    // What the address space peaks at with 2 sequences per forward pass, and with all 32.
    let (_, small) = run(root, &write_job(root, "small", Some(2)), "small", None);
    let (_, big) = run(root, &write_job(root, "big", None), "big", None);
    let (vm_small, vm_big) = (peak_virtual(&small), peak_virtual(&big));
    let gap = vm_big.saturating_sub(vm_small);
    eprintln!(
        "VmPeak: micro-batch 2 {} MiB, 32 {} MiB",
        vm_small >> 20,
        vm_big >> 20
    );
    assert!(
        gap > 100 << 20,
        "32 sequences need only {} MiB more",
        gap >> 20
    );
    // A quarter of the way up: 32 sequences cannot be allocated, 2 can.
    let limit = vm_small + gap / 4;
    let job = write_job(root, "limited", None);
    let (err, limited) = run(root, &job, "limited", Some(limit));
    for line in err.lines().filter(|l| l.contains("memory")) {
        eprintln!("trainer: {line}");
    }
    assert!(err.contains("can't allocate memory"), "{err}");
    assert!(err.contains("out of memory at step 1"), "{err}");
    let micro = limited["metrics"]["microBatchSize"]
        .as_u64()
        .unwrap_or_else(|| panic!("no microBatchSize in {}", limited["metrics"]));
    assert!((1..32).contains(&micro), "{micro}");
    let term: Value =
        serde_json::from_slice(&std::fs::read(root.join("limited.term")).unwrap()).unwrap();
    assert_eq!(term["metrics"]["microBatchSize"].as_u64(), Some(micro));
    // No step lost, and the same losses as a run that used that micro-batch from the start.
    let (_, reference) = run(
        root,
        &write_job(root, "reference", Some(micro as usize)),
        "reference",
        None,
    );
    let (a, b) = (losses(&limited), losses(&reference));
    assert_eq!(a.len(), STEPS);
    assert_eq!(b.len(), STEPS);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-4, "step {}: {x} vs {y}", step + 1);
    }
    eprintln!(
        "limit {} MiB: micro-batch 32 -> {micro}; losses {a:?} vs {b:?}",
        limit >> 20
    );
}
