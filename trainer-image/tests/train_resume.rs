//! Exact resume: a run killed with SIGKILL at two random steps and restarted twice ends with an
//! adapter bitwise identical to an uninterrupted run (CPU, same seed, LoRA dropout on); a truncated
//! checkpoint is detected and skipped; SIGTERM checkpoints and exits 143 with a termination message;
//! `/status` and `/metrics` answer while training.

mod train_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use finetune_trainer::train::checkpoint;

const HYPER: &str = "{maxSteps: 12, learningRate: 1.0e-2, batchSize: 2, gradientAccumulationSteps: 2, \
                     maxSeqLength: 64, warmupSteps: 2, scheduler: cosine, weightDecay: 0.01, seed: 7}";
const EXTRA: &str = "  evaluation: {everySteps: 4}\n  checkpoint: {everySteps: 1, keepLast: 3}\n";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_finetune-trainer")
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    job: PathBuf,
}

fn setup() -> Setup {
    setup_with(|root| {
        train_support::write_text_data(&root.join("train.jsonl"), 40);
        format!("{{uri: \"file://{}\"}}", root.join("train.jsonl").display())
    })
}

/// [`setup`] training on a 3:1 mixture of two text files of 12 and 36 lines.
fn setup_mixture() -> Setup {
    setup_with(|root| {
        let (a, b) = (root.join("a.jsonl"), root.join("b.jsonl"));
        train_support::write_text_data_seeded(&a, 12, 1);
        train_support::write_text_data_seeded(&b, 36, 2);
        format!(
            "{{sources: [{{uri: \"file://{}\", weight: 3}}, {{uri: \"file://{}\", weight: 1}}]}}",
            a.display(),
            b.display()
        )
    })
}

/// The tiny model and a job on the data `write_data` writes under the root; it returns the YAML
/// of `spec.dataset.train`.
fn setup_with(write_data: impl FnOnce(&Path) -> String) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    train_support::write_tiny_model(&root.join("model"), 3);
    let train = write_data(&root);
    let job = train_support::write_job_training_on(
        &root.join("job.yaml"),
        &root.join("model"),
        &train,
        HYPER,
        EXTRA,
    );
    Setup {
        _tmp: tmp,
        root,
        job,
    }
}

fn spawn(s: &Setup, out: &str) -> Child {
    Command::new(bin())
        .args(["--device", "cpu", "run"])
        .arg(&s.job)
        .arg("--output")
        .arg(s.root.join(out))
        .env("FINETUNE_STATUS_PORT", "0")
        .env(
            "FINETUNE_TERMINATION_LOG",
            s.root.join(format!("{out}.term")),
        )
        .env_remove("FINETUNE_CHECKPOINT_DIR")
        .env_remove("FINETUNE_OUTPUT_DIR")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs to the end; returns (exit code, stderr).
fn run(s: &Setup, out: &str) -> (i32, String) {
    let mut child = spawn(s, out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().code().unwrap_or(-1), err)
}

/// Runs until the progress line of `step` appears, then applies `action` to the child; returns
/// the child's exit status and the stderr seen.
fn run_until(
    s: &Setup,
    out: &str,
    step: i64,
    action: impl FnOnce(&mut Child, &str),
) -> (Option<i32>, String) {
    let mut child = spawn(s, out);
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let needle = format!("step {step}/");
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.starts_with(&needle) {
            action(&mut child, &seen);
            break;
        }
    }
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    seen.push_str(&rest);
    (child.wait().unwrap().code(), seen)
}

fn random_below(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (t ^ (t >> 7)) % n
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Rewrites the setup's job, replacing `from` by `to` (which must occur).
fn edit_job(s: &Setup, from: &str, to: &str) {
    let job = std::fs::read_to_string(&s.job).unwrap();
    assert!(job.contains(from), "{from} not in the job:\n{job}");
    std::fs::write(&s.job, job.replace(from, to)).unwrap();
}

/// Runs the job into `out`, SIGKILLs it at a random step in `first..first + span`, runs it again
/// to the end and asserts that it resumed and that its adapter equals `reference` bit for bit.
fn killed_once_resumes_to(s: &Setup, out: &str, first: i64, span: u64, reference: &[u8]) {
    let kill_at = first + random_below(span) as i64;
    let kill = |c: &mut Child, _: &str| c.kill().unwrap(); // SIGKILL
    let (code, err) = run_until(s, out, kill_at, kill);
    assert_eq!(code, None, "the run should die by signal: {err}");
    let (code, err) = run(s, out);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from"), "{err}");
    assert!(
        reference == bytes(&s.root.join(out).join("adapter_model.safetensors")),
        "{out}: the adapter after a kill at step {kill_at} differs from the uninterrupted run's"
    );
}

#[test]
fn sigkill_twice_then_resume_is_bitwise_identical() {
    let s = setup();
    let (code, err) = run(&s, "straight");
    assert_eq!(code, 0, "{err}");
    let reference = bytes(&s.root.join("straight/adapter_model.safetensors"));

    let k1 = 3 + random_below(4) as i64; // 3..=6
    let k2 = k1 + 2 + random_below(3) as i64; // k1+2..=k1+4 (< 12)
    eprintln!("killing at steps {k1} and {k2}");
    let kill = |c: &mut Child, _: &str| c.kill().unwrap(); // SIGKILL
    let (code, err) = run_until(&s, "killed", k1, kill);
    assert_eq!(code, None, "first run should die by signal: {err}");
    let (code, err) = run_until(&s, "killed", k2, kill);
    assert_eq!(code, None, "second run should die by signal: {err}");
    assert!(
        err.contains("resumed from"),
        "second run did not resume:\n{err}"
    );
    let (code, err) = run(&s, "killed");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resumed from"),
        "third run did not resume:\n{err}"
    );
    let resumed = bytes(&s.root.join("killed/adapter_model.safetensors"));
    assert!(
        reference == resumed,
        "adapter after kills at {k1} and {k2} differs from the uninterrupted run"
    );
    // The summaries agree on the loss history too.
    let summary = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&bytes(&s.root.join(d).join("training_summary.json"))).unwrap()
    };
    let history = |d: &str| -> Vec<serde_json::Value> {
        let mut h = summary(d)["history"].as_array().unwrap().clone();
        for r in &mut h {
            r.as_object_mut().unwrap().remove("seconds");
        }
        h
    };
    assert_eq!(history("straight"), history("killed"));
    let term: serde_json::Value =
        serde_json::from_slice(&bytes(&s.root.join("killed.term"))).unwrap();
    assert_eq!(term["step"], 12);
    assert!(term["resumedFromStep"].as_i64().unwrap() >= k2 - 1);

    // Truncate the newest checkpoint's adapter: it is detected and the one before is used.
    let ckpts = s.root.join("killed/checkpoints");
    let list = checkpoint::list(&ckpts);
    assert!(list.len() >= 2, "{list:?}");
    let (newest, dir) = &list[0];
    let f = dir.join("adapter_model.safetensors");
    let data = bytes(&f);
    std::fs::write(&f, &data[..data.len() / 2]).unwrap();
    let err = checkpoint::verify(dir).unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    let (picked, _) = checkpoint::latest_valid(&ckpts).unwrap();
    assert_eq!(picked, list[1].0);
    assert!(picked < *newest);
    // A rerun resumes from the older one and again ends bitwise identical.
    let (code, err) = run(&s, "killed");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipping corrupt checkpoint"), "{err}");
    assert!(reference == bytes(&s.root.join("killed/adapter_model.safetensors")));
}

#[test]
fn a_checkpointed_run_killed_and_resumed_ends_bitwise_identical_to_the_plain_run() {
    let s = setup();
    let (code, err) = run(&s, "plain");
    assert_eq!(code, 0, "{err}");
    let reference = bytes(&s.root.join("plain/adapter_model.safetensors"));
    // The same job on the same model and data, with activation checkpointing.
    edit_job(&s, "seed: 7}", "seed: 7, gradientCheckpointing: true}");
    killed_once_resumes_to(&s, "killed", 3, 6, &reference);
}

/// A LoRA run over a base held as `how` (`baseQuantization`, logged as `label`) trains another
/// adapter than over the float base, and killed once it resumes to its own straight run bitwise.
fn quantized_base_resumes_bitwise(how: &str, label: &str) {
    let s = setup();
    let (code, err) = run(&s, "full-precision");
    assert_eq!(code, 0, "{err}");
    edit_job(
        &s,
        "dropout: 0.1}",
        &format!("dropout: 0.1, baseQuantization: {how}}}"),
    );
    let (code, err) = run(&s, "straight");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("quantized ({label})")), "{err}");
    let reference = bytes(&s.root.join("straight/adapter_model.safetensors"));
    assert!(
        reference != bytes(&s.root.join("full-precision/adapter_model.safetensors")),
        "the {label} base trained the same adapter as the full-precision one"
    );
    killed_once_resumes_to(&s, "killed", 3, 6, &reference);
}

#[test]
fn a_qlora_run_killed_and_resumed_ends_bitwise_identical_and_differs_from_full_precision() {
    quantized_base_resumes_bitwise("nf4", "Nf4");
}

#[test]
fn an_int8_base_killed_and_resumed_ends_bitwise_identical_and_differs_from_full_precision() {
    quantized_base_resumes_bitwise("int8", "Int8");
}

/// `precision: auto` is bfloat16 on CPUs with native bf16: a bf16 run (the base and activations
/// in bfloat16, the adapter and its optimizer state float32) resumes as exactly as a float32 one.
#[test]
fn a_bf16_run_killed_and_resumed_ends_bitwise_identical_and_differs_from_fp32() {
    let s = setup();
    let (code, err) = run(&s, "fp32");
    assert_eq!(code, 0, "{err}");
    edit_job(&s, "precision: fp32", "precision: bf16");
    let (code, err) = run(&s, "straight");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("BFloat16"), "{err}");
    let reference = bytes(&s.root.join("straight/adapter_model.safetensors"));
    assert!(
        reference != bytes(&s.root.join("fp32/adapter_model.safetensors")),
        "the bf16 run trained the same adapter as the float32 one"
    );
    killed_once_resumes_to(&s, "killed", 3, 6, &reference);
}

#[test]
fn a_mixture_killed_and_resumed_ends_bitwise_identical_and_reports_its_sources() {
    let s = setup_mixture();
    let (code, err) = run(&s, "straight");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("mixture source 0"), "{err}");
    let reference = bytes(&s.root.join("straight/adapter_model.safetensors"));
    killed_once_resumes_to(&s, "killed", 4, 5, &reference);
    // Each source's digest and samples per epoch, in spec order, drawn 3:1 (to the nearest
    // sample) from what the two files hold after the eval split.
    let term: serde_json::Value =
        serde_json::from_slice(&bytes(&s.root.join("killed.term"))).unwrap();
    let sources = term["datasetSources"].as_array().unwrap();
    let samples: Vec<f64> = sources
        .iter()
        .map(|x| x["samples"].as_f64().unwrap())
        .collect();
    assert_eq!(samples.len(), 2, "{term}");
    assert!((samples[0] / samples[1] - 3.0).abs() <= 0.15, "{term}");
    let digest = |i: usize| sources[i]["digest"].as_str().unwrap().to_string();
    assert!(digest(0).len() == 64 && digest(0) != digest(1), "{term}");
}

fn http_get(addr: &str, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

#[test]
fn sigterm_checkpoints_and_exits_143_and_status_server_answers() {
    let s = setup();
    let mut status = String::new();
    let mut metrics = String::new();
    let (code, err) = run_until(&s, "term", 3, |c, seen| {
        let port = seen
            .lines()
            .find_map(|l| l.strip_prefix("status server on http://"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|a| a.rsplit(':').next())
            .expect("status server line")
            .to_string();
        let addr = format!("127.0.0.1:{port}");
        status = http_get(&addr, "/status");
        metrics = http_get(&addr, "/metrics");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
    });
    assert_eq!(code, Some(143), "{err}");
    assert!(
        status.contains("\"phase\"") && status.contains("\"totalSteps\":12"),
        "{status}"
    );
    for m in [
        "finetune_trainer_step",
        "finetune_trainer_train_loss",
        "finetune_trainer_learning_rate",
        "finetune_trainer_tokens_per_second",
        "finetune_trainer_process_resident_memory_bytes",
        "finetune_trainer_eta_seconds",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let term: serde_json::Value =
        serde_json::from_slice(&bytes(&s.root.join("term.term"))).unwrap();
    let step = term["checkpointStep"].as_i64().expect("checkpointStep");
    assert!(step >= 3, "{term}");
    assert!(
        s.root
            .join(format!("term/checkpoints/step-{step}/manifest.json"))
            .exists()
    );
    // Resuming finishes the run.
    let (code, err) = run(&s, "term");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from"), "{err}");
}

#[test]
fn invalid_manifest_exits_2_with_the_field() {
    let s = setup();
    let bad = s.root.join("bad.yaml");
    let text = std::fs::read_to_string(&s.job)
        .unwrap()
        .replace("rank: 4", "rank: 0");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(bin())
        .args(["--device", "cpu", "run"])
        .arg(&bad)
        .arg("--output")
        .arg(s.root.join("bad"))
        .env("FINETUNE_TERMINATION_LOG", s.root.join("bad.term"))
        .env("FINETUNE_STATUS_PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let term: serde_json::Value = serde_json::from_slice(&bytes(&s.root.join("bad.term"))).unwrap();
    assert_eq!(term["error"]["param"], "spec.adapter.lora.rank", "{term}");
}
