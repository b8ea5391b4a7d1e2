//! How a run ends and what it writes: the retention floor (`evaluation.retention.minScore`)
//! with `action: fail` (exit 5, reason in the termination message) and `action: stop` (the last
//! good weights become the output); early stopping (the best step's weights become the output);
//! full fine-tuning (a Hugging Face layout model that loads back and has learned); and the merged
//! model output (`output.merge`).

mod train_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use finetune_trainer::load::ModelSource;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// General prompts in the tiny model's vocabulary; its greedy continuations are the references.
const RETENTION: &str = r#"{"prompt": "the cat sat on"}
{"prompt": "a dog ran to the"}
{"prompt": "every morning the bird"}
{"prompt": "the big red tree"}
{"prompt": "then the small cat"}
{"prompt": "and the blue bird sang"}
{"text": "the dog slept under the tree every night"}
"#;

struct Run {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    code: i32,
    stderr: String,
}

impl Run {
    fn out(&self) -> PathBuf {
        self.root.join("out")
    }
    fn summary(&self) -> Value {
        let p = self.out().join("training_summary.json");
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }
    fn termination(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.root.join("term")).unwrap()).unwrap()
    }
}

/// Writes the tiny model, 40 text lines and the retention set, then runs a job with `adapter`,
/// `hyper` and `extra` (in which `RETENTION` stands for the retention file's path).
fn run_job(hyper: &str, adapter: &str, extra: &str) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    train_support::write_tiny_model(&root.join("model"), 3);
    train_support::write_text_data(&root.join("train.jsonl"), 40);
    std::fs::write(root.join("retention.jsonl"), RETENTION).unwrap();
    let yaml = format!(
        "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: guards}}
spec:
  baseModel: {{uri: \"file://{model}\"}}
  dataset:
    train: {{uri: \"file://{train}\"}}
    evalSplit: 0.2
    format: text
  adapter: {adapter}
  hyperparameters: {hyper}
  checkpoint: {{everySteps: 1, keepLast: 50}}
  resources: {{gpus: 0}}
{extra}",
        extra = extra.replace(
            "RETENTION",
            &root.join("retention.jsonl").display().to_string()
        ),
        model = root.join("model").display(),
        train = root.join("train.jsonl").display(),
        hyper = train_support::pin_fp32(hyper),
    );
    let job = root.join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finetune-trainer"))
        .args(["--device", "cpu", "run"])
        .arg(&job)
        .arg("--output")
        .arg(root.join("out"))
        .env("FINETUNE_STATUS_PORT", "0")
        .env("FINETUNE_TERMINATION_LOG", root.join("term"))
        .env_remove("FINETUNE_CHECKPOINT_DIR")
        .env_remove("FINETUNE_OUTPUT_DIR")
        .output()
        .unwrap();
    Run {
        _tmp: tmp,
        root,
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const LORA: &str = "{type: lora, lora: {rank: 4, alpha: 8, dropout: 0.0}}";
const HYPER: &str = "{maxSteps: 12, learningRate: 3.0e-2, batchSize: 4, maxSeqLength: 64, warmupSteps: 0, seed: 11}";

fn retention_extra(action: &str) -> String {
    format!(
        "  evaluation:\n    everySteps: 3\n    retention: {{minScore: 0.99, action: {action}, data: {{uri: \"file://RETENTION\"}}}}\n"
    )
}

fn run_with_retention(action: &str) -> Run {
    run_job(HYPER, LORA, &retention_extra(action))
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, t) in &ta {
        assert!(
            t.equal(&tb[name]),
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn retention_floor_with_fail_exits_5_and_names_the_reason() {
    let r = run_with_retention("fail");
    assert_eq!(r.code, 5, "{}", r.stderr);
    let term = r.termination();
    let err = &term["error"];
    assert_eq!(err["code"], "retention_below_minimum", "{term}");
    assert_eq!(err["param"], "spec.evaluation.retention.minScore");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("minScore 0.99") && message.contains("base answers kept"),
        "{message}"
    );
}

#[test]
fn retention_floor_with_stop_keeps_the_last_good_weights() {
    let r = run_with_retention("stop");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.summary();
    let reason = s["stop_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("retention score"), "{s}");
    let steps = s["steps"].as_i64().unwrap();
    assert!(steps < 12, "stopped early: {steps}");
    assert_eq!(r.termination()["stopReason"], reason);
    let good = s["retention"]["last_good_step"].as_i64().unwrap();
    let output = r.out().join("adapter_model.safetensors");
    if good == 0 {
        // Nothing passed after training began: the output is the untouched adapter (B = 0).
        for (name, t) in tensors(&output) {
            if name.contains("lora_B") {
                assert_eq!(t.abs().sum(Kind::Float).double_value(&[]), 0.0, "{name}");
            }
        }
    } else {
        let ckpt = r
            .out()
            .join(format!("checkpoints/step-{good}/adapter_model.safetensors"));
        assert_same_tensors(&output, &ckpt);
    }
    // The floor was probed on the cadence and the breach recorded.
    let scores = s["retention"]["scores"].as_array().unwrap();
    assert!(scores.last().unwrap()["score"].as_f64().unwrap() < 0.99);
}

#[test]
fn early_stopping_ends_the_run_and_keeps_the_best_step() {
    // A minDelta no decrease can reach: the first evaluation sets the best, the second cannot
    // improve on it, and patience 1 ends the run there with the first evaluation's weights.
    let r = run_job(
        HYPER,
        LORA,
        "  evaluation: {everySteps: 2, earlyStopping: {patience: 1, minDelta: 100.0}}\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.summary();
    assert_eq!(s["steps"], 4, "{s}");
    assert_eq!(s["best_step"], 2);
    assert_eq!(s["early_stopped"], true);
    assert!(
        s["stop_reason"]
            .as_str()
            .unwrap()
            .starts_with("early stopping"),
        "{s}"
    );
    assert_same_tensors(
        &r.out().join("adapter_model.safetensors"),
        &r.out().join("checkpoints/step-2/adapter_model.safetensors"),
    );
    // Step 4's own weights differ from the result: the fallback really happened.
    let last = tensors(&r.out().join("checkpoints/step-4/adapter_model.safetensors"));
    let out = tensors(&r.out().join("adapter_model.safetensors"));
    assert!(out.iter().any(|(n, t)| !t.equal(&last[n])));
}

#[test]
fn full_finetuning_writes_a_loadable_model_that_learned() {
    let r = run_job(
        "{maxSteps: 8, learningRate: 3.0e-3, batchSize: 4, maxSeqLength: 64, warmupSteps: 0, seed: 5}",
        "{type: full}",
        "  evaluation: {everySteps: 4}\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.summary();
    assert_eq!(s["adapter"], "full");
    let before = s["initial_eval_loss"].as_f64().unwrap();
    let after = s["metrics"]["evalLoss"].as_f64().unwrap();
    assert!(after < before, "eval loss {before} -> {after}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(r.out().join(f).exists(), "{f} missing");
    }
    // Every parameter was trainable (embeddings, norms, projections), and the written model
    // loads back with weights that differ from the base.
    let base = ModelSource::open(&r.root.join("model"))
        .unwrap()
        .load(Kind::Float, Device::Cpu)
        .unwrap()
        .model;
    let tuned = ModelSource::open(&r.out())
        .unwrap()
        .load(Kind::Float, Device::Cpu)
        .unwrap()
        .model;
    let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7]).unsqueeze(0);
    let (lb, lt) = tch::no_grad(|| {
        (
            base.forward(&ids, None, None),
            tuned.forward(&ids, None, None),
        )
    });
    let diff = (lb - lt).abs().max().double_value(&[]);
    assert!(diff > 1e-3, "tuned logits equal the base: {diff}");
    let trainable = s["trainable_parameters"].as_i64().unwrap();
    let total: i64 = tensors(&r.root.join("model/model.safetensors"))
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(trainable, total);
}

#[test]
fn merged_output_is_written_and_listed() {
    // GGUF export needs a byte-level BPE tokenizer (the tiny model's is word-level); the GGUF
    // output is exercised on a BPE model in tests/reference/test_merge_export.py.
    let r = run_job(
        "{maxSteps: 2, learningRate: 1.0e-2, batchSize: 4, maxSeqLength: 64, warmupSteps: 0, seed: 5}",
        LORA,
        "  output: {merge: true}\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let merged = r.out().join("merged");
    for f in ["config.json", "model.safetensors"] {
        assert!(merged.join(f).exists(), "merged/{f} missing");
    }
    // The merged model carries the adapter: it loads as a plain model and matches base + LoRA
    // as the trainer applied it (checked numerically against PEFT in tests/reference).
    let names: Vec<String> = r.termination()["adapter"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"merged/model.safetensors".to_string()),
        "{names:?}"
    );
    ModelSource::open(&merged)
        .unwrap()
        .load(Kind::Float, Device::Cpu)
        .unwrap();
}
