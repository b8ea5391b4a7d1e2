//! `finetune-trainer plan JOB.yaml`: the memory planner ([`finetune_crds::memory`]) on a job's
//! model config, without loading a weight, so that a 70B config answers as fast as a tiny one.
//! With `--device-memory` it also answers the operator's question: the largest micro-batch that
//! fits, and when none does, which change would make the job fit.

use std::path::PathBuf;

use finetune_crds::memory::{self, DeviceKind, MemoryPlan, ModelShape, RunShape};
use serde_json::json;

use crate::error::{Error, Result};
use crate::load::ModelSource;
use crate::model::ModelConfig;
use crate::train::plan::{Environment, Plan, RunOptions};
use crate::train::setup::resolved_precision;
use crate::train::stop::Stop;

impl From<&ModelConfig> for ModelShape {
    fn from(c: &ModelConfig) -> Self {
        ModelShape {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            tie_word_embeddings: c.tie_word_embeddings,
        }
    }
}

/// What `plan` prints.
pub struct Report {
    pub model: ModelShape,
    pub run: RunShape,
    pub plan: MemoryPlan,
    pub device_memory: Option<u64>,
    pub largest_micro_batch: Option<i64>,
    pub fixes: Vec<String>,
}

/// Reads the manifest and the model's config (HF `config.json` or GGUF metadata) and plans the
/// run on `device` (`auto` follows the job: CUDA when it asks for a GPU).
pub fn plan_job(job: PathBuf, device: &str, device_memory: Option<&str>) -> Result<Report> {
    let opts = RunOptions {
        job,
        output: None,
        checkpoint_dir: None,
        device: device.to_string(),
        init_adapter: None,
    };
    let p = Plan::new(&opts, &Environment::from_process()).map_err(stop_to_error)?;
    let kind = match p.device.as_str() {
        "cpu" => DeviceKind::Cpu,
        "cuda" | "auto" => DeviceKind::Cuda,
        other => {
            return Err(Error::Usage(format!(
                "--device {other}: expected auto, cpu or cuda"
            )));
        }
    };
    if p.remote_base.is_some() && !p.model_path.exists() {
        return Err(Error::Usage(format!(
            "spec.baseModel.uri: {} is not in the model cache yet ({}); plan reads only its config, so point it at a local copy",
            p.spec().base_model.uri,
            p.model_path.display()
        )));
    }
    let config = ModelSource::open(&p.model_path)?.config()?;
    let model = ModelShape::from(&config);
    // `precision: auto` as the trainer would run it here (bfloat16 on a CPU with native bf16).
    let mut spec = p.spec().clone();
    spec.hyperparameters.precision = resolved_precision(&p, kind == DeviceKind::Cuda);
    let run = RunShape::from_spec(&spec, kind);
    let device_memory = device_memory
        .map(|q| {
            memory::parse_quantity(q).map_err(|e| Error::Usage(format!("--device-memory: {e}")))
        })
        .transpose()?;
    let largest = device_memory.and_then(|m| memory::largest_micro_batch(&model, &run, m));
    let fixes = match (device_memory, largest) {
        (Some(m), None) => fixes(&model, &run, m),
        _ => Vec::new(),
    };
    Ok(Report {
        plan: memory::plan(&model, &run),
        model,
        run,
        device_memory,
        largest_micro_batch: largest,
        fixes,
    })
}

fn stop_to_error(s: Stop) -> Error {
    match s {
        Stop::Invalid { message, param } => Error::Usage(match param {
            Some(p) if !message.contains(&p) => format!("{p}: {message}"),
            _ => message,
        }),
        other => Error::Usage(format!("{other:?}")),
    }
}

/// [`memory::fixes`] as lines.
fn fixes(model: &ModelShape, run: &RunShape, device_memory: u64) -> Vec<String> {
    memory::fixes(model, run, device_memory)
        .into_iter()
        .map(|f| {
            let verdict = if f.fits { "fits" } else { "still too much" };
            format!("{} ({}, {verdict})", f.change, gib(f.total))
        })
        .collect()
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 10.0 {
        format!("{g:.1} GiB")
    } else if g >= 0.1 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        let m = &self.model;
        let r = &self.run;
        json!({
            "model": {"parameters": m.parameters(), "vocab_size": m.vocab_size,
                      "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                      "num_layers": m.num_layers, "num_heads": m.num_heads,
                      "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                      "tie_word_embeddings": m.tie_word_embeddings},
            "run": {"device": format!("{:?}", r.device).to_lowercase(), "micro_batch": r.micro_batch,
                    "seq_len": r.seq_len, "gradient_checkpointing": r.gradient_checkpointing,
                    "lora_rank": r.lora.as_ref().map(|l| l.0), "lora_dropout": r.lora_dropout,
                    "compute_bytes": r.compute_bytes, "attention_mask": r.attention_mask,
                    "base_quantization": r.base_quantization},
            "plan": self.plan,
            "total": self.plan.total(),
            "device_memory": self.device_memory,
            "largest_micro_batch": self.largest_micro_batch,
            "fixes": self.fixes,
        })
    }

    /// The human table.
    pub fn table(&self) -> String {
        let p = &self.plan;
        let r = &self.run;
        let mut s = format!(
            "model: {:.2} B parameters, {} layers, hidden {}, vocab {}\nrun: {:?}, micro-batch {} x {} tokens, {}{}, {} bytes/activation{}{}\n\n",
            self.model.parameters() as f64 / 1e9,
            self.model.num_layers,
            self.model.hidden_size,
            self.model.vocab_size,
            r.device,
            r.micro_batch,
            r.seq_len,
            match &r.lora {
                Some((rank, t)) => format!("LoRA r{rank} on {}", t.join(",")),
                None => "full fine-tuning".into(),
            },
            match r.base_quantization {
                Some(q) => format!(" over a {q:?} base"),
                None => String::new(),
            },
            r.compute_bytes,
            if r.gradient_checkpointing {
                ", checkpointing"
            } else {
                ""
            },
            if r.attention_mask {
                ", masked attention"
            } else {
                ""
            },
        );
        for (name, v) in [
            ("weights", p.weights),
            ("adapter", p.adapter),
            ("gradients", p.gradients),
            ("optimizer", p.optimizer),
            ("activations", p.activations),
            ("logits", p.logits),
            ("workspace", p.workspace),
            ("runtime", p.runtime),
        ] {
            s += &format!("  {name:<12} {:>12}\n", gib(v));
        }
        s += &format!(
            "  {:<12} {:>12}  (logits and workspace do not overlap: the larger counts)\n",
            "total",
            gib(p.total())
        );
        s += &format!(
            "\nactivations per token: {} without checkpointing, {} with\n",
            per_token(p.per_token_plain),
            per_token(p.per_token_checkpointed)
        );
        if let Some(m) = self.device_memory {
            match self.largest_micro_batch {
                Some(b) => s += &format!("largest micro-batch in {}: {b}\n", gib(m)),
                None => {
                    let reserve = match self.run.device {
                        DeviceKind::Cuda => format!(
                            " (less {} kept for the CUDA context)",
                            gib(memory::CUDA_RESERVE_BYTES)
                        ),
                        DeviceKind::Cpu => String::new(),
                    };
                    s += &format!(
                        "not even one row fits in {}{reserve}; what would help:\n",
                        gib(m)
                    );
                    for f in &self.fixes {
                        s += &format!("  - {f}\n");
                    }
                }
            }
        }
        s
    }
}

fn per_token(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}
