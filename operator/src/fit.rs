//! "Will it fit?" before a GPU is spent: when a job says how much memory its GPU has
//! (`spec.resources.gpuMemory`) and its base model's shape is known, the operator runs the
//! trainer's memory planner ([`finetune_crds::memory`]) on it before creating any pod. A job whose
//! smallest step (one sequence per forward pass) is predicted not to fit fails at once with reason
//! `WillNotFit`, the numbers, and the changes that would make it fit, instead of being scheduled,
//! loading tens of GB of weights and running out of memory. A job that fits only with a smaller
//! micro-batch than it asks for is left alone: the trainer halves its micro-batch by itself.
//!
//! The operator does not download models, so it knows the shapes of the widely used base models
//! below (their published `config.json` values); for any other model the check is skipped and the
//! trainer's own out-of-memory recovery is what remains.

use finetune_crds::FinetuneJob;
use finetune_crds::memory::{
    self, DeviceKind, MemoryPlan, ModelShape, RunShape, largest_micro_batch, parse_quantity, plan,
};

/// `(Hub repository, config.json fields)` of well-known base models; an `-Instruct` variant has
/// its base's shape.
const KNOWN_MODELS: &[(&str, &str)] = &[
    (
        "meta-llama/Llama-3.1-8B",
        r#"{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"tie_word_embeddings":false}"#,
    ),
    (
        "meta-llama/Llama-3.1-70B",
        r#"{"vocab_size":128256,"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"tie_word_embeddings":false}"#,
    ),
    (
        "meta-llama/Llama-3.2-1B",
        r#"{"vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"tie_word_embeddings":true}"#,
    ),
    (
        "meta-llama/Llama-3.2-3B",
        r#"{"vocab_size":128256,"hidden_size":3072,"intermediate_size":8192,"num_hidden_layers":28,"num_attention_heads":24,"num_key_value_heads":8,"head_dim":128,"tie_word_embeddings":true}"#,
    ),
    (
        "mistralai/Mistral-7B-v0.3",
        r#"{"vocab_size":32768,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"tie_word_embeddings":false}"#,
    ),
    (
        "Qwen/Qwen2.5-7B",
        r#"{"vocab_size":152064,"hidden_size":3584,"intermediate_size":18944,"num_hidden_layers":28,"num_attention_heads":28,"num_key_value_heads":4,"tie_word_embeddings":false}"#,
    ),
    (
        "HuggingFaceTB/SmolLM2-135M",
        r#"{"vocab_size":49152,"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"tie_word_embeddings":true}"#,
    ),
    (
        "HuggingFaceTB/SmolLM2-360M",
        r#"{"vocab_size":49152,"hidden_size":960,"intermediate_size":2560,"num_hidden_layers":32,"num_attention_heads":15,"num_key_value_heads":5,"tie_word_embeddings":true}"#,
    ),
    (
        "HuggingFaceTB/SmolLM2-1.7B",
        r#"{"vocab_size":49152,"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":24,"num_attention_heads":32,"num_key_value_heads":32,"tie_word_embeddings":true}"#,
    ),
];

/// The shape of the model at `uri` when it is an `hf://` URI of a known model.
pub fn known_shape(uri: &str) -> Option<ModelShape> {
    let repo = uri.strip_prefix("hf://")?;
    let repo = repo.split('@').next()?.to_ascii_lowercase();
    let repo = repo.strip_suffix("-instruct").unwrap_or(&repo);
    let (_, config) = KNOWN_MODELS
        .iter()
        .find(|(name, _)| name.to_ascii_lowercase() == repo)?;
    let value = serde_json::from_str(config).expect("the catalog is valid JSON");
    Some(ModelShape::from_config_json(&value).expect("the catalog holds valid configs"))
}

/// Why `job` cannot run on its GPU, with the numbers and the fixes; `None` when it fits, when the
/// GPU's memory or the model's shape is unknown, or when an attempt already ran (a job is judged
/// before it starts, not after).
pub fn refusal(job: &FinetuneJob) -> Option<String> {
    let spec = &job.spec;
    let started = job.status.as_ref().is_some_and(|s| !s.attempts.is_empty());
    if spec.resources.gpus < 1 || started {
        return None;
    }
    let gpu_memory = parse_quantity(&spec.resources.gpu_memory.as_ref()?.0).ok()?;
    let model = known_shape(&spec.base_model.uri)?;
    let run = smallest_step(job);
    if largest_micro_batch(&model, &run, gpu_memory).is_some() {
        return None;
    }
    let predicted = plan(&model, &run);
    Some(format!(
        "{} is predicted to need {} at one sequence of {} tokens per forward pass, more than \
         spec.resources.gpuMemory {} (less {} kept for the CUDA context): {}. {}",
        spec.base_model.uri,
        gib(predicted.total()),
        run.seq_len,
        gib(gpu_memory),
        gib(memory::CUDA_RESERVE_BYTES),
        breakdown(&predicted),
        fixes(&model, &run, gpu_memory)
    ))
}

/// The job's run at one row per forward pass (two for DPO: a pair's chosen and rejected rows).
fn smallest_step(job: &FinetuneJob) -> RunShape {
    RunShape {
        micro_batch: memory::rows_per_example(&job.spec),
        ..RunShape::from_spec(&job.spec, DeviceKind::Cuda)
    }
}

fn breakdown(p: &MemoryPlan) -> String {
    format!(
        "weights {}, adapter {}, gradients {}, optimizer {}, activations {}, logits or layer \
         workspace {}",
        gib(p.weights),
        gib(p.adapter),
        gib(p.gradients),
        gib(p.optimizer),
        gib(p.activations),
        gib(p.logits.max(p.workspace))
    )
}

/// The single changes ([`memory::fixes`]) that would make the smallest step fit.
fn fixes(model: &ModelShape, run: &RunShape, gpu_memory: u64) -> String {
    let fitting: Vec<String> = memory::fixes(model, run, gpu_memory)
        .into_iter()
        .filter(|f| f.fits)
        .map(|f| format!("{} ({})", f.change, gib(f.total)))
        .collect();
    if fitting.is_empty() {
        "No single change of gradientCheckpointing, adapter, baseQuantization or maxSeqLength \
         makes it fit: use a GPU with more memory, or combine them"
            .into()
    } else {
        format!("It would fit with {}", fitting.join(", or "))
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn job(uri: &str, adapter: &str, gpu_memory: &str) -> FinetuneJob {
        let yaml = format!(
            "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: big, namespace: ml}}
spec:
  baseModel: {{uri: \"{uri}\"}}
  dataset: {{train: {{uri: \"pvc://data/train.jsonl\"}}, format: chat}}
  adapter: {adapter}
  hyperparameters: {{maxSteps: 10, batchSize: 4, maxSeqLength: 2048}}
  resources: {{gpus: 1, gpuMemory: {gpu_memory}}}
"
        );
        finetune_crds::parse_manifest(&yaml, "big.yaml").unwrap()
    }

    #[test]
    fn every_catalogued_model_has_its_published_parameter_count() {
        let billions = |uri: &str| known_shape(uri).unwrap().parameters() as f64 / 1e9;
        assert!((billions("hf://meta-llama/Llama-3.1-8B") - 8.03).abs() < 0.01);
        assert!((billions("hf://meta-llama/Llama-3.1-70B-Instruct") - 70.55).abs() < 0.05);
        assert!((billions("hf://meta-llama/Llama-3.2-1B") - 1.24).abs() < 0.01);
        assert!((billions("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main") - 0.135).abs() < 0.001);
        assert!((billions("hf://mistralai/Mistral-7B-v0.3") - 7.25).abs() < 0.01);
        assert!(known_shape("hf://someone/unknown-model").is_none());
        assert!(known_shape("pvc://models/llama").is_none());
    }

    #[test]
    fn full_tuning_70b_on_an_80gi_gpu_will_not_fit_and_says_what_would() {
        let why = refusal(&job(
            "hf://meta-llama/Llama-3.1-70B",
            "{type: full}",
            "80Gi",
        ))
        .expect("70B full fine-tuning does not fit in 80 GiB");
        eprintln!("{why}");
        assert!(
            why.contains("80.0 GiB") && why.contains("weights 131."),
            "{why}"
        );
        assert!(why.contains("use a GPU with more memory"), "{why}");
    }

    #[test]
    fn an_8b_full_tuning_that_fits_with_lora_names_that_fix() {
        let why = refusal(&job("hf://meta-llama/Llama-3.1-8B", "{type: full}", "80Gi"))
            .expect("8B full fine-tuning with AdamW needs more than 80 GiB");
        eprintln!("{why}");
        assert!(
            why.contains("It would fit with") && why.contains("adapter.type: lora"),
            "{why}"
        );
    }

    #[test]
    fn jobs_that_fit_or_cannot_be_judged_are_left_alone() {
        let lora = "{type: lora}";
        assert_eq!(
            refusal(&job("hf://meta-llama/Llama-3.1-8B", lora, "80Gi")),
            None
        );
        // Unknown model, no gpuMemory, or a job that already ran: no judgement.
        assert_eq!(
            refusal(&job("hf://someone/unknown", "{type: full}", "1Gi")),
            None
        );
        let mut no_memory = job("hf://meta-llama/Llama-3.1-70B", "{type: full}", "80Gi");
        no_memory.spec.resources.gpu_memory = None;
        assert_eq!(refusal(&no_memory), None);
        let mut started = job("hf://meta-llama/Llama-3.1-70B", "{type: full}", "80Gi");
        started.status = Some(Default::default());
        started
            .status
            .as_mut()
            .unwrap()
            .attempts
            .push(Default::default());
        assert_eq!(refusal(&started), None);
        let mut huge_gpu = job("hf://meta-llama/Llama-3.1-70B", "{type: full}", "80Gi");
        huge_gpu.spec.resources.gpu_memory = Some(Quantity("2000Gi".into()));
        assert_eq!(refusal(&huge_gpu), None);
    }
}
