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
  hyperparameters: {{maxSteps: {STEPS}, learningRate: 1.0e-2, batchSize: 32, maxSeqLength: 1024, seed: 5, precision: fp32{micro}}}
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

/// Runs the job as a group of two ranks started by hand (rank 0 under `prlimit --as=LIMIT` when
/// given, so only it can run out of memory: its own summary measured the peak the limit is set
/// from); returns both ranks' stderr and rank 0's summary.
fn run_group(root: &Path, job: &Path, out: &str, rank0_limit: Option<u64>) -> ([String; 2], Value) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let mut cmd = match (rank, rank0_limit) {
                (0, Some(bytes)) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--as={bytes}")).arg("--").arg(bin());
                    c
                }
                _ => Command::new(bin()),
            };
            cmd.args(["--device", "cpu", "run"])
                .arg(job)
                .arg("--output")
                .arg(root.join(out))
                .env("FINETUNE_STATUS_PORT", "0")
                .env("FINETUNE_DIST_TIMEOUT_SECONDS", "120")
                .env("OMP_NUM_THREADS", "1")
                .env("WORLD_SIZE", "2")
                .env("RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let errs: Vec<String> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    for (rank, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "{out} rank {rank}: {:?}\n{}",
            o.status,
            errs[rank]
        );
    }
    let summary = std::fs::read(root.join(out).join("training_summary.json")).unwrap();
    (
        [errs[0].clone(), errs[1].clone()],
        serde_json::from_slice(&summary).unwrap(),
    )
}

#[test]
fn one_rank_out_of_memory_makes_the_whole_group_halve_together() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    train_support::write_tiny_model(&root.join("model"), 8);
    let mut config = train_support::config();
    config["max_position_embeddings"] = 2048.into();
    std::fs::write(root.join("model/config.json"), config.to_string()).unwrap();
    train_support::write_text_lines(&root.join("train.jsonl"), 96, 99, 600..1000);
    // A rank's share of a batch of 32 is 16 sequences.
    let (_, small) = run_group(root, &write_job(root, "g-small", Some(2)), "g-small", None);
    let (_, big) = run_group(root, &write_job(root, "g-big", None), "g-big", None);
    let (vm_small, vm_big) = (peak_virtual(&small), peak_virtual(&big));
    assert!(vm_big > vm_small + (50 << 20), "{vm_small} vs {vm_big}");
    let limit = vm_small + (vm_big - vm_small) / 2;
    let ([err0, err1], limited) = run_group(
        root,
        &write_job(root, "g-limited", None),
        "g-limited",
        Some(limit),
    );
    assert!(err0.contains("can't allocate memory"), "{err0}");
    assert!(
        err1.contains("out of memory on another rank of the group"),
        "{err1}"
    );
    let micro = limited["metrics"]["microBatchSize"].as_u64().unwrap();
    assert!((1..16).contains(&micro), "{micro}");
    // Both ranks ended on the same micro-batch: the run equals one that started there.
    let (_, reference) = run_group(
        root,
        &write_job(root, "g-reference", Some(micro as usize)),
        "g-reference",
        None,
    );
    let (a, b) = (losses(&limited), losses(&reference));
    assert_eq!(a.len(), STEPS);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-4, "step {}: {x} vs {y}", step + 1);
    }
}
