//! Data parallelism over real c10d (Gloo on CPU, fp32): `launch` with 2 and 4 ranks ends with the
//! same weights as one process with the same global batch (max abs diff ≤ 1e-5) for LoRA SFT,
//! full SFT and DPO; a rank SIGKILLed mid-run stops the group, and the relaunched group resumes
//! from the last checkpoint to the same adapter as an undisturbed run.

mod train_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tch::Tensor;

/// 4 micro-batches of 2 rows per step: one process runs all 4, 2 ranks 2 each, 4 ranks 1 each.
const HYPER: &str = "{maxSteps: 6, learningRate: 1.0e-2, batchSize: 4, microBatchSize: 2, \
                     gradientAccumulationSteps: 2, maxSeqLength: 64, warmupSteps: 1, \
                     scheduler: cosine, weightDecay: 0.01, seed: 7}";
const EXTRA: &str = "  evaluation: {everySteps: 3}\n  checkpoint: {everySteps: 1, keepLast: 2}\n";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_finetune-trainer")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    job: PathBuf,
}

/// The tiny model and a job; `edit` rewrites the job's YAML (adapter, method, data format).
fn setup(write_data: impl FnOnce(&Path) -> PathBuf, edit: impl FnOnce(String) -> String) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    train_support::write_tiny_model(&root.join("model"), 3);
    let data = write_data(&root);
    let job = train_support::write_job(
        &root.join("job.yaml"),
        &root.join("model"),
        &data,
        HYPER,
        EXTRA,
    );
    let yaml = edit(std::fs::read_to_string(&job).unwrap());
    std::fs::write(&job, yaml).unwrap();
    Setup {
        _tmp: tmp,
        root,
        job,
    }
}

fn text_setup(edit: impl FnOnce(String) -> String) -> Setup {
    setup(
        |root| {
            let p = root.join("train.jsonl");
            train_support::write_text_data(&p, 48);
            p
        },
        edit,
    )
}

/// `ranks` processes through `launch` (one thread each); a world of 1 is a plain `run`.
fn spawn(s: &Setup, out: &str, ranks: usize) -> Child {
    let mut cmd = Command::new(bin());
    cmd.args(["--device", "cpu"]);
    if ranks > 1 {
        cmd.args([
            "launch",
            "--nproc-per-node",
            &ranks.to_string(),
            "--threads-per-rank",
            "1",
        ])
        .args([
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &free_port().to_string(),
        ])
        .args(["--grace-seconds", "10", "--"]);
    } else {
        cmd.env("OMP_NUM_THREADS", "1");
    }
    cmd.arg("run")
        .arg(&s.job)
        .arg("--output")
        .arg(s.root.join(out))
        .env("FINETUNE_STATUS_PORT", "0")
        .env(
            "FINETUNE_TERMINATION_LOG",
            s.root.join(format!("{out}.term")),
        )
        .env("FINETUNE_DIST_TIMEOUT_SECONDS", "60")
        .env_remove("FINETUNE_CHECKPOINT_DIR")
        .env_remove("FINETUNE_OUTPUT_DIR")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn run(s: &Setup, out: &str, ranks: usize) -> String {
    let mut child = spawn(s, out, ranks);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(0), "{out} ({ranks} ranks):\n{err}");
    err
}

fn weights(dir: &Path, file: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .into_iter()
        .collect()
}

/// The largest absolute difference between two runs' weights (same names required).
fn max_abs_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| {
            (t.to_kind(tch::Kind::Double) - b[k].to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Runs one process, then each world in `worlds`; returns each group's stderr.
fn assert_same_as_one_process(s: &Setup, file: &str, worlds: &[usize]) -> Vec<String> {
    run(s, "one", 1);
    let one = weights(&s.root.join("one"), file);
    // Training moved the weights: LoRA's B starts at zero.
    let moved = one
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(
        file != "adapter_model.safetensors" || moved > 0.0,
        "the adapter did not train"
    );
    let mut logs = Vec::new();
    for &n in worlds {
        let out = format!("ranks{n}");
        let err = run(s, &out, n);
        logs.push(err.clone());
        assert!(
            err.contains(&format!("rank 1 of {n}: group ready")),
            "{err}"
        );
        let group: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.root.join(&out).join("training_summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(group["ranks"], n, "{group}");
        assert_eq!(
            group["optimizer_sharded"],
            file == "model.safetensors",
            "{group}"
        );
        let diff = max_abs_diff(&one, &weights(&s.root.join(&out), file));
        eprintln!("{file}: {n} ranks vs one process: max abs diff {diff:e}");
        assert!(diff <= 1e-5, "{n} ranks differ from one process by {diff}");
    }
    // Training moved the weights (the comparison is not between two untouched copies).
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.root.join("one/training_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 6, "{summary}");
    logs
}

#[test]
fn lora_sft_on_two_and_four_ranks_equals_one_process() {
    let s = text_setup(|y| y);
    assert_same_as_one_process(&s, "adapter_model.safetensors", &[2, 4]);
}

#[test]
fn full_sft_on_two_ranks_with_sharded_optimizer_state_equals_one_process() {
    let s = text_setup(|y| {
        y.replace(
            "adapter: {type: lora, lora: {rank: 4, alpha: 8, dropout: 0.1}}",
            "adapter: {type: full}",
        )
    });
    let logs = assert_same_as_one_process(&s, "model.safetensors", &[2]);
    // ZeRO stage 1: each rank keeps about half of AdamW's moments.
    for rank in 0..2 {
        let needle = format!("rank {rank} of 2: optimizer state sharded, ");
        let line = logs[0]
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no sharding line for rank {rank}:\n{}", logs[0]));
        let mib: Vec<f64> = line
            .split(&needle)
            .nth(1)
            .unwrap()
            .split(" MiB")
            .next()
            .unwrap()
            .split(" of ")
            .map(|x| x.parse().unwrap())
            .collect();
        let share = mib[0] / mib[1];
        assert!(
            (0.4..=0.6).contains(&share),
            "rank {rank} keeps {share} of the state: {line}"
        );
    }
}

#[test]
fn dpo_on_two_ranks_equals_one_process() {
    let s = setup(
        |root| {
            // A plain chat template for the word-level tiny tokenizer.
            let template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}\
                            {% if add_generation_prompt %}assistant {% endif %}";
            std::fs::write(
                root.join("model/tokenizer_config.json"),
                serde_json::json!({"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>",
                                   "chat_template": template})
                .to_string(),
            )
            .unwrap();
            let p = root.join("pairs.jsonl");
            let lines: Vec<String> = (0..32)
                .map(|i| {
                    serde_json::json!({
                        "prompt": format!("question {i} about the weather"),
                        "chosen": format!("short answer {}", i % 5),
                        "rejected": format!("a much longer and chattier answer number {i}"),
                    })
                    .to_string()
                })
                .collect();
            std::fs::write(&p, lines.join("\n") + "\n").unwrap();
            p
        },
        |y| {
            // DPO splits each batch's pairs over the ranks, so the comparison is without dropout.
            y.replace("format: text", "format: preference")
                .replace("dropout: 0.1", "dropout: 0.0")
                .replace(
                    "  adapter:",
                    "  method: {type: dpo, dpo: {beta: 0.1}}\n  adapter:",
                )
        },
    );
    assert_same_as_one_process(&s, "adapter_model.safetensors", &[2]);
    // One process with micro-batches of one pair (what running out of memory would halve to)
    // makes the same update as whole batches.
    let job = std::fs::read_to_string(&s.job).unwrap();
    std::fs::write(
        &s.job,
        job.replace("microBatchSize: 2", "microBatchSize: 1"),
    )
    .unwrap();
    run(&s, "pairs1", 1);
    let file = "adapter_model.safetensors";
    let diff = max_abs_diff(
        &weights(&s.root.join("one"), file),
        &weights(&s.root.join("pairs1"), file),
    );
    assert!(diff <= 1e-5, "micro-batches of one pair differ by {diff}");
}

/// The launcher's children (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_rank_killed_mid_run_stops_the_group_which_resumes_to_the_same_adapter() {
    // Long enough that the kill lands well before the end.
    let s = text_setup(|y| y.replace("maxSteps: 6", "maxSteps: 40"));
    killed_rank_resumes_to_the_same_weights(&s, "adapter_model.safetensors");
}

#[test]
fn a_sharded_full_fine_tuning_group_resumes_from_its_gathered_optimizer_state() {
    let s = text_setup(|y| {
        y.replace("maxSteps: 6", "maxSteps: 40").replace(
            "adapter: {type: lora, lora: {rank: 4, alpha: 8, dropout: 0.1}}",
            "adapter: {type: full}",
        )
    });
    killed_rank_resumes_to_the_same_weights(&s, "model.safetensors");
}

fn killed_rank_resumes_to_the_same_weights(s: &Setup, file: &str) {
    run(s, "straight", 2);
    let reference = weights(&s.root.join("straight"), file);

    // SIGKILL rank 1 once rank 0 has logged step 3.
    let mut launcher = spawn(s, "killed", 2);
    let mut reader = BufReader::new(launcher.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    let mut killed = false;
    while reader.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if !killed && line.starts_with("step 3/") {
            let kids = children_of(launcher.id());
            assert_eq!(kids.len(), 2, "{kids:?}\n{seen}");
            // Rank 1 is the second child started.
            Command::new("kill")
                .args(["-KILL", &kids[1].to_string()])
                .status()
                .unwrap();
            killed = true;
        }
        line.clear();
    }
    let code = launcher.wait().unwrap().code();
    assert!(killed, "step 3 never logged:\n{seen}");
    assert_ne!(
        code,
        Some(0),
        "the group should fail when a rank dies:\n{seen}"
    );
    assert!(seen.contains("stopping the others"), "{seen}");

    let err = run(s, "killed", 2);
    assert!(err.contains("resumed from"), "{err}");
    let diff = max_abs_diff(&reference, &weights(&s.root.join("killed"), file));
    assert!(
        diff <= 1e-6,
        "resumed group differs from the undisturbed one by {diff}"
    );
}
