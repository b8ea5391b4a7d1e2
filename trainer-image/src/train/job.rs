//! `finetune-trainer run JOB.yaml`: validate the FinetuneJob, resolve its URIs, load model and
//! data, train (resuming from the newest verified checkpoint), evaluate, export, and report through
//! the operator contract: exit code, termination message, `/status` and `/metrics`.
//!
//! Exit codes ([`ExitCode`]): 0 done; 2 invalid manifest or data (the message names the field or
//! `file:line`); 3 NaN/inf loss; 4 out of memory; 5 retention probe below `minScore` with
//! `action: fail`; 143 stopped by SIGTERM after a checkpoint.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use finetune_crds::FinetuneJob;
use finetune_crds::contract::{
    self, ExitCode, ProducedAdapter, TerminationMessage, TrainerError, TrainerPhase, env,
};
use finetune_crds::finetunejob::TrainingMetrics;
use finetune_crds::training::{
    AdapterType, DEFAULT_REPLAY_RATIO, GuardAction, MethodType, Precision,
};
use finetune_crds::uri::{MountRoots, StorageUri};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::data::{
    Batch, BatchPlan, Batcher, ContaminationOptions, CurateOptions, Cursor, DataConfig, DataFormat,
    Encoder, LoadOptions, Origin, Prepared, Sample, build_batch, prepare_preference, prepare_sft,
};
use crate::error::Error;
use crate::export::{self, PEFT_PREFIX};
use crate::load::ModelSource;
use crate::model::lora::LoraExpectation;
use crate::model::{CausalLm, LoraConfig};
use crate::serve::{self, Live};
use crate::train::anchor::{L2ToInit, SelfDistillation};
use crate::train::checkpoint;
use crate::train::dpo::{Dpo, DpoConfig, PairSet, PreferenceMetrics, ReferenceMode};
use crate::train::guard::{self, GuardSource, Replay};
use crate::train::optim::AdamW;
use crate::train::probe::{Probe, ProbeScore};
use crate::train::retention::{RetentionScore, RetentionSet, changed_answers};
use crate::train::schedule::{lr_lambda, warmup_steps};
use crate::train::step::{
    MicroBatch, StepStats, accumulate_gradients, eval_loss, finish_step, train_step,
};
use crate::train::vocab;

/// The manifest path the operator passes.
pub const JOB_FILE_ENV: &str = env::JOB_FILE;

/// Longest greedy answer of the retention probe, in tokens: enough for a short factual answer,
/// and a change in the first few dozen tokens is what matters.
const RETENTION_TOKENS: usize = 32;

/// Where a DPO run without an adapter to switch off caches its reference log-probs (in the
/// checkpoint directory, so a resumed attempt measures rewards from the same reference).
const DPO_REFERENCE_FILE: &str = "dpo_reference_logps.json";

/// The weights a retention breach with `action: stop` falls back to, inside a checkpoint.
const LAST_GOOD_FILE: &str = "last_good.safetensors";

/// Where `run` reads and writes; flags win over the environment.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub job: PathBuf,
    pub output: Option<PathBuf>,
    pub checkpoint_dir: Option<PathBuf>,
    /// `auto`, `cpu` or `cuda` (the global `--device`).
    pub device: String,
    /// The PEFT adapter directory that `spec.adapter.initAdapter` names (flag, else
    /// `$FINETUNE_INIT_ADAPTER_DIR`, which the operator sets).
    pub init_adapter: Option<PathBuf>,
}

/// Why a run stopped early.
#[derive(Debug)]
enum Stop {
    Invalid {
        message: String,
        param: Option<String>,
    },
    Diverged(String),
    /// The retention probe fell below `minScore` with `action: fail`.
    Forgetting(String),
    Oom(String),
    Preempted,
    Error(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match &e {
            Error::Torch(_) if is_oom(&message) => Stop::Oom(message),
            Error::Torch(_) => Stop::Error(message),
            Error::Data { path, line, .. } => Stop::Invalid {
                param: Some(format!("{}:{line}", path.display())),
                message,
            },
            Error::Io { path, .. }
            | Error::Format { path, .. }
            | Error::Tensor { path, .. }
            | Error::Unsupported { path, .. } => Stop::Invalid {
                param: Some(path.display().to_string()),
                message,
            },
            _ => Stop::Invalid {
                message,
                param: None,
            },
        }
    }
}

fn is_oom(m: &str) -> bool {
    let m = m.to_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory")
}

fn invalid(message: impl Into<String>, param: &str) -> Stop {
    Stop::Invalid {
        message: message.into(),
        param: Some(param.to_string()),
    }
}

/// One optimizer step in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: i64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: i64,
    pub targets: i64,
    pub samples: usize,
    pub seconds: f64,
    /// DPO: rewards and accuracies of the step's pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
    /// The forgetting guard's term: KL to the base (self-distillation) or the L2 penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_loss: Option<f64>,
}

/// One evaluation in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: i64,
    pub eval_loss: f64,
    /// Targets (SFT) or pairs (DPO) evaluated.
    pub targets: i64,
    /// DPO: rewards and preference accuracies on the eval pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
}

/// Everything besides tensors that a checkpoint restores (`trainer_state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: i64,
    pub cursor: Cursor,
    pub config_digest: String,
    pub history: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<i64>,
    pub evals_without_improvement: i32,
    pub early_stopped: bool,
    pub trained_tokens: i64,
    pub retention_loss_before: Option<f64>,
    /// Eval loss before the first update.
    pub initial_eval_loss: Option<f64>,
    /// DPO: the eval pairs before the first update.
    #[serde(default)]
    pub preference_before: Option<PreferenceMetrics>,
    /// Generation eval before the first update.
    #[serde(default)]
    pub generation_before: Option<ProbeScore>,
    /// The base model's greedy answers to the retention questions (the probe's references).
    #[serde(default)]
    pub retention_references: Option<Vec<String>>,
    /// Retention probe results during training.
    #[serde(default)]
    pub retention_scores: Vec<RetentionRecord>,
    /// The newest step whose retention score met `minScore` (0 = before training).
    #[serde(default)]
    pub last_good_step: Option<i64>,
    /// Why training ended before its planned last step.
    #[serde(default)]
    pub stop_reason: Option<String>,
}

/// One retention probe during training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionRecord {
    pub step: i64,
    /// The headline score (knowledge kept, or verbatim kept without answer keys).
    pub score: f64,
    pub exact: f64,
    /// Share of answers identical to the base's after normalisation (absent in older state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbatim: Option<f64>,
}

/// Runs the job; returns the process exit status. Writes the termination message on every path.
pub fn run_job(opts: &RunOptions) -> i32 {
    let live = Live::new();
    let mut tm = TerminationMessage::default();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| train(opts, &live, &mut tm)));
    let (code, error) = match outcome {
        Ok(Ok(())) => (ExitCode::Success, None),
        Ok(Err(Stop::Preempted)) => (ExitCode::Preempted, None),
        Ok(Err(Stop::Invalid { message, param })) => (
            ExitCode::InvalidInput,
            Some(TrainerError {
                code: "invalid_input".into(),
                message,
                param,
            }),
        ),
        Ok(Err(Stop::Diverged(message))) => (
            ExitCode::Diverged,
            Some(TrainerError {
                code: "diverged".into(),
                message,
                param: None,
            }),
        ),
        Ok(Err(Stop::Forgetting(message))) => (
            ExitCode::RetentionBelowMinimum,
            Some(TrainerError {
                code: "retention_below_minimum".into(),
                message,
                param: Some("spec.evaluation.retention.minScore".into()),
            }),
        ),
        Ok(Err(Stop::Oom(message))) => (
            ExitCode::OutOfMemory,
            Some(TrainerError {
                code: "out_of_memory".into(),
                message,
                param: None,
            }),
        ),
        Ok(Err(Stop::Error(message))) => (
            ExitCode::Other(1),
            Some(TrainerError {
                code: "error".into(),
                message,
                param: None,
            }),
        ),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "internal error".into());
            if is_oom(&message) {
                (
                    ExitCode::OutOfMemory,
                    Some(TrainerError {
                        code: "out_of_memory".into(),
                        message,
                        param: None,
                    }),
                )
            } else {
                (
                    ExitCode::Other(101),
                    Some(TrainerError {
                        code: "internal_error".into(),
                        message,
                        param: None,
                    }),
                )
            }
        }
    };
    if let Some(e) = &error {
        match &e.param {
            Some(p) => eprintln!("error: {} ({})", e.message, p),
            None => eprintln!("error: {}", e.message),
        }
    }
    tm.error = error;
    if let Ok(path) = std::env::var(env::TERMINATION_LOG)
        && !path.is_empty()
        && let Err(e) = std::fs::write(&path, tm.to_bounded_json())
    {
        eprintln!("warning: cannot write the termination message to {path}: {e}");
    }
    code.code()
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn resolve(uri: &str, roots: &MountRoots, field: &str) -> Result<PathBuf, Stop> {
    let parsed =
        StorageUri::parse(uri).ok_or_else(|| invalid(format!("bad URI `{uri}`"), field))?;
    parsed.local_path(roots).ok_or_else(|| {
        invalid(
            format!("`{uri}`: hf:// models must be downloaded to the job's storage first (not supported by `run` yet)"),
            field,
        )
    })
}

fn pick_device(opts: &RunOptions, gpus: i32, precision: Precision) -> Result<(Device, Kind), Stop> {
    let name = if opts.device == "auto" && gpus == 0 {
        "cpu"
    } else {
        opts.device.as_str()
    };
    let (device, auto_kind) = crate::load::pick_device(name)?;
    let kind = match precision {
        Precision::Auto => auto_kind,
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    Ok((device, kind))
}

/// `output.merge` (LoRA: a Hugging Face model with the adapter folded in, under `merged/`) and
/// `output.gguf` (that model, or the full fine-tuned one, as `model-TYPE.gguf`). Returns the files
/// written, relative to `output_dir`.
fn export_merged(
    output: &finetune_crds::runtime::Output,
    output_dir: &Path,
    model: &CausalLm,
    is_lora: bool,
    source: &Path,
) -> Result<Vec<String>, Stop> {
    let mut files = Vec::new();
    // A full fine-tune's output directory already is the merged model.
    let merged = if is_lora {
        output_dir.join("merged")
    } else {
        output_dir.to_path_buf()
    };
    if is_lora && (output.merge || output.gguf.is_some()) {
        let t = Instant::now();
        let written = export::write_full_model(&merged, model, Some(source))?;
        eprintln!(
            "merged model: {} ({:.1}s)",
            merged.display(),
            t.elapsed().as_secs_f64()
        );
        files.extend(written.into_iter().map(|f| format!("merged/{f}")));
    }
    if let Some(ty) = output.gguf {
        let ty = export::gguf::GgufType::from(ty);
        let name = ty.name();
        let file = format!("model-{name}.gguf");
        let t = Instant::now();
        export::gguf::export_gguf(&merged, &output_dir.join(&file), ty)?;
        eprintln!("GGUF ({name}): {file} ({:.1}s)", t.elapsed().as_secs_f64());
        files.push(file);
    }
    Ok(files)
}

fn score_json(s: ProbeScore) -> serde_json::Value {
    json!({
        "exact_match": s.exact_match(),
        "normalized_match": s.normalized_match(),
        "exact": s.exact,
        "normalized": s.normalized,
        "samples": s.samples,
    })
}

fn digest_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// The trainable tensors as they are saved (PEFT names for LoRA, HF names for full), on the CPU.
///
/// Always copies: on the CPU, `to_device`/`contiguous` return the parameter's own storage, which
/// the optimizer keeps updating in place — a snapshot (best or last good weights) must not move.
fn trainable_tensors(model: &CausalLm, lora: bool) -> Vec<(String, Tensor)> {
    let live = if lora {
        export::peft_tensors(model)
    } else {
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu)))
            .collect()
    };
    live.into_iter().map(|(n, t)| (n, t.copy())).collect()
}

/// Copies saved tensors (as from [`trainable_tensors`]) into the model's parameters.
fn load_trainable(
    model: &CausalLm,
    lora: bool,
    mut saved: BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<(), Stop> {
    let params: Vec<(String, Tensor)> = if lora {
        model
            .lora_parameters()
            .into_iter()
            .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t))
            .collect()
    } else {
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.shallow_clone()))
            .collect()
    };
    for (name, mut p) in params {
        let src = saved
            .remove(&name)
            .ok_or_else(|| Stop::Error(format!("{}: missing tensor `{name}`", file.display())))?;
        if src.size() != p.size() {
            return Err(Stop::Error(format!(
                "{}: tensor `{name}` has the wrong shape",
                file.display()
            )));
        }
        tch::no_grad(|| p.copy_(&src));
    }
    Ok(())
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, Stop> {
    Tensor::read_safetensors(path)
        .map(|v| v.into_iter().collect())
        .map_err(|e| Stop::Error(format!("{}: {e}", path.display())))
}

/// Eval batches: samples in order, `batch_size` per batch, padded (no packing).
fn eval_batches(samples: &[Sample], batch_size: usize) -> Vec<Batch> {
    let rows: Vec<Vec<usize>> = (0..samples.len()).map(|i| vec![i]).collect();
    rows.chunks(batch_size.max(1))
        .map(|c| build_batch(samples, c))
        .collect()
}

fn evaluate(model: &mut CausalLm, batches: &[Batch]) -> (f64, i64) {
    model.set_training(false);
    let r = eval_loss(model, batches.iter().map(MicroBatch::from));
    model.set_training(true);
    r
}

fn retention_samples(
    tok: &crate::text::TextTokenizer,
    set: &RetentionSet,
) -> Result<Vec<Sample>, Stop> {
    let origin_path: Arc<Path> = Arc::from(Path::new(&set.source));
    set.texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ids = tok.encode(t, true)?;
            let sup = vec![true; ids.len()];
            Ok(Sample::new(
                ids,
                sup,
                Origin {
                    path: origin_path.clone(),
                    line: i + 1,
                },
            ))
        })
        .collect()
}

/// One SFT step with the forgetting guard's term added to the gradients (self-distillation or
/// L2 to init) before clipping; returns the term's value as well.
#[allow(clippy::too_many_arguments)]
fn guarded_step(
    model: &mut CausalLm,
    opt: &mut AdamW,
    mbs: &[MicroBatch],
    lr: f64,
    max_grad_norm: f64,
    seed: u64,
    step: i64,
    (distill, l2): (Option<&SelfDistillation>, Option<&L2ToInit>),
) -> Result<(StepStats, Option<f64>), StepStats> {
    if distill.is_none() && l2.is_none() {
        return train_step(model, opt, mbs, lr, max_grad_norm, seed, step).map(|s| (s, None));
    }
    let stats = accumulate_gradients(model, opt, mbs, seed, step)?;
    let term = match (distill, l2) {
        (Some(d), _) => d.accumulate(model, step),
        (None, Some(l)) => l.accumulate(),
        (None, None) => 0.0,
    };
    if !term.is_finite() {
        return Err(stats);
    }
    finish_step(opt, stats, lr, max_grad_norm).map(|s| (s, Some(term)))
}

/// The LoRA settings of the adapter a run starts from (`initAdapter`): its own
/// `adapter_config.json` decides rank, alpha, targets and rsLoRA, since its weights have those
/// shapes; settings also given in the spec must agree. The spec's dropout applies when given.
fn init_lora_config(
    dir: &Path,
    from_spec: LoraConfig,
    spec_given: bool,
) -> Result<LoraConfig, Stop> {
    let (saved, _) = export::read_peft_adapter(dir)?;
    if spec_given && saved.mismatch(&LoraExpectation::from(&from_spec)).is_some() {
        let mut a = saved.target_modules.clone();
        let mut b = from_spec.target_modules.clone();
        a.sort();
        b.sort();
        return Err(invalid(
            format!(
                "adapter.lora (rank {}, alpha {}, rslora {}, targets {:?}) disagrees with the initAdapter's adapter_config.json in {} (rank {}, alpha {}, rslora {}, targets {:?}); leave adapter.lora out to continue with the adapter's settings",
                from_spec.rank,
                from_spec.alpha,
                from_spec.rslora,
                b,
                dir.display(),
                saved.rank,
                saved.alpha,
                saved.rslora,
                a
            ),
            "spec.adapter.lora",
        ));
    }
    Ok(LoraConfig {
        dropout: if spec_given {
            from_spec.dropout
        } else {
            saved.dropout
        },
        ..saved
    })
}

#[allow(clippy::too_many_lines)]
fn train(opts: &RunOptions, live: &Arc<Live>, tm: &mut TerminationMessage) -> Result<(), Stop> {
    let started = Instant::now();
    let job: FinetuneJob = finetune_crds::read_manifest(&opts.job).map_err(|e| Stop::Invalid {
        param: e.first_field().map(str::to_string),
        message: e.to_string(),
    })?;
    let spec = &job.spec;
    let name = job
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "finetune".into());
    let hp = &spec.hyperparameters;
    let seed = hp.seed as u64;

    // What this trainer does not do (yet): refuse what would change the result, warn about the rest.
    let is_dpo = spec.method.kind == MethodType::Dpo;
    if is_dpo
        && spec
            .forgetting_guard
            .as_ref()
            .is_some_and(|g| g.self_replay.is_some())
    {
        return Err(invalid(
            "forgettingGuard.selfReplay mixes SFT samples into the training stream and does not apply to method.type dpo (DPO's reference model already anchors it)",
            "spec.forgettingGuard.selfReplay",
        ));
    }
    let init_adapter = match &spec.adapter.init_adapter {
        Some(name) => Some(
            opts.init_adapter
                .clone()
                .or_else(|| env_path(env::INIT_ADAPTER_DIR))
                .ok_or_else(|| {
                    invalid(
                        format!(
                            "adapter.initAdapter names Adapter `{name}` but no adapter directory was given (--init-adapter or ${})",
                            env::INIT_ADAPTER_DIR
                        ),
                        "spec.adapter.initAdapter",
                    )
                })?,
        ),
        None => None,
    };
    let ignored: Vec<&str> = Vec::new();
    if let Some(g) = &spec.forgetting_guard {
        let is_lora = spec.adapter.kind == AdapterType::Lora;
        if g.self_distillation.is_some() && (is_dpo || !is_lora) {
            return Err(invalid(
                "forgettingGuard.selfDistillation compares the model with its adapter switched off, so it needs SFT with adapter.type: lora (full fine-tuning has l2ToInit; DPO's reference already anchors it)",
                "spec.forgettingGuard.selfDistillation",
            ));
        }
        if g.l2_to_init.is_some() && (is_dpo || is_lora) {
            return Err(invalid(
                "forgettingGuard.l2ToInit pulls trained weights toward their start, so it needs SFT with adapter.type: full (a LoRA adapter starts at zero: use selfDistillation or selfReplay)",
                "spec.forgettingGuard.l2ToInit",
            ));
        }
    }
    let evaluation = spec.evaluation.clone().unwrap_or_default();
    for i in &ignored {
        eprintln!("warning: {i} is not implemented yet and is ignored");
    }

    // Paths.
    let roots = match env_path("FINETUNE_VOLUME_ROOT") {
        Some(base) => MountRoots::under(&base),
        None => MountRoots::in_pod(),
    };
    let model_path = resolve(&spec.base_model.uri, &roots, "spec.baseModel.uri")?;
    let train_path = resolve(&spec.dataset.train.uri, &roots, "spec.dataset.train.uri")?;
    let eval_path = match &spec.dataset.eval {
        Some(d) => Some(resolve(&d.uri, &roots, "spec.dataset.eval.uri")?),
        None => None,
    };
    let output_dir = opts
        .output
        .clone()
        .or_else(|| env_path(env::OUTPUT_DIR))
        .unwrap_or_else(|| PathBuf::from("finetune-output").join(&name));
    let ckpt_dir = opts
        .checkpoint_dir
        .clone()
        .or_else(|| env_path(env::CHECKPOINT_DIR))
        .unwrap_or_else(|| output_dir.join("checkpoints"));
    let attempt = std::env::var(env::ATTEMPT).unwrap_or_else(|_| "0".into());

    // Signals: a flag checked between steps.
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .map_err(|e| Stop::Error(format!("cannot install the signal handler: {e}")))?;
    }

    // Status server.
    let port = match std::env::var(env::STATUS_PORT) {
        Ok(p) if !p.is_empty() => p
            .parse::<u16>()
            .map_err(|_| invalid(format!("`{p}` is not a port"), env::STATUS_PORT))?,
        _ => contract::DEFAULT_STATUS_PORT,
    };
    let host = std::env::var(env::POD_IP)
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "0.0.0.0".into());
    match serve::serve(live.clone(), &format!("{host}:{port}")) {
        Ok(addr) => eprintln!("status server on http://{addr} (/status, /metrics)"),
        Err(e) => eprintln!("warning: status server not started on {host}:{port}: {e}"),
    }
    live.update(|s| s.phase = TrainerPhase::Loading);

    // Model and data.
    let (device, kind) = pick_device(opts, spec.resources.gpus, hp.precision)?;
    eprintln!(
        "job {name} (attempt {attempt}): model {}, {device:?} {kind:?}",
        model_path.display()
    );
    let t_load = Instant::now();
    let mut loaded = ModelSource::open(&model_path)?.load(kind, device)?;
    let rope_scaling = crate::train::long_context::apply(
        &mut loaded.model,
        spec.base_model.rope_scaling.as_ref(),
        hp.max_seq_length.into(),
        spec.output.gguf.is_some(),
    )
    .map_err(|e| invalid(e.message, e.field))?;
    // Before any text is encoded: the added tokens must be in the tokenizer.
    let vocab = match &spec.vocabulary {
        Some(v) => {
            let file = v
                .tokenizer
                .as_ref()
                .map(|d| resolve(&d.uri, &roots, "spec.vocabulary.tokenizer.uri"))
                .transpose()?;
            let lora = matches!(spec.adapter.kind, AdapterType::Lora);
            Some(
                vocab::expand(v, file.as_deref(), lora, &mut loaded, &model_path)
                    .map_err(|e| invalid(e.message, &e.field))?,
            )
        }
        None => None,
    };
    let format = DataFormat::from(spec.dataset.format);
    let max_seq = hp.max_seq_length as usize;
    let contamination = evaluation.contamination.clone();
    let data_cfg = DataConfig {
        format,
        load: LoadOptions {
            assistant_only_loss: spec
                .method
                .sft
                .as_ref()
                .is_none_or(|s| s.assistant_only_loss),
            ..LoadOptions::sft()
        },
        curate: CurateOptions {
            max_seq_length: max_seq,
            dedupe: spec.dataset.deduplicate,
        },
        eval_fraction: spec.dataset.eval_split,
        seed,
        contamination: match &contamination {
            Some(c) => ContaminationOptions {
                n: c.ngram as usize,
                threshold: c.threshold,
                ..ContaminationOptions::default()
            },
            None => ContaminationOptions::default(),
        },
    };
    let encoder = Encoder {
        tokenizer: &loaded.tokenizer,
        template: loaded.chat_template.as_ref(),
        options: data_cfg.load,
    };
    // DPO: the pairs themselves go to the objective; `prepared` holds their chosen sides, which
    // order the batches and feed the generation eval.
    let (mut prepared, mut pairs) = if is_dpo {
        let p = prepare_preference(&train_path, eval_path.as_deref(), &encoder, &data_cfg)?;
        (Prepared::chosen_sides(&p), Some(p))
    } else {
        (
            prepare_sft(&train_path, eval_path.as_deref(), &encoder, &data_cfg)?,
            None,
        )
    };
    if let Some(max) = spec.dataset.max_samples {
        prepared.train.truncate(max as usize);
        if let Some(p) = pairs.as_mut() {
            p.train.truncate(max as usize);
        }
    }
    eprintln!("train data: {}", prepared.train_stats.summary());
    if let Some(s) = &prepared.eval_stats {
        eprintln!("eval data: {}", s.summary());
    }
    if let Some(report) = &prepared.contamination
        && !report.flagged.is_empty()
    {
        match contamination.as_ref().map(|c| c.action) {
            Some(GuardAction::Fail) => {
                return Err(Stop::Invalid {
                    message: format!("eval data overlaps the training data: {}", report.summary()),
                    param: Some(
                        report
                            .flagged
                            .first()
                            .map(|c| c.origin.clone())
                            .unwrap_or_else(|| "spec.dataset.eval".into()),
                    ),
                });
            }
            _ => eprintln!("warning: contamination: {}", report.summary()),
        }
    }
    if prepared.train.is_empty() {
        return Err(invalid(
            "no training samples left after curation",
            "spec.dataset.train.uri",
        ));
    }
    tm.dataset_digest = Some(prepared.train_digest.clone());
    let retention = match &evaluation.retention {
        Some(r) => Some(match &r.data {
            Some(d) => RetentionSet::from_jsonl(&resolve(
                &d.uri,
                &roots,
                "spec.evaluation.retention.data.uri",
            )?)?,
            None => RetentionSet::builtin(),
        }),
        None => None,
    };
    let retention_set = match &retention {
        Some(r) => retention_samples(&loaded.tokenizer, r)?,
        None => Vec::new(),
    };
    let mut retention_probe = match &retention {
        Some(r) => Probe::from_questions(
            &r.questions,
            &loaded.tokenizer,
            loaded.chat_template.as_ref(),
        )?,
        None => Probe::default(),
    };
    let retention_keys: Vec<Vec<String>> = retention
        .as_ref()
        .map(|r| r.answer_keys.clone())
        .unwrap_or_default();
    let retention_floor = evaluation
        .retention
        .as_ref()
        .and_then(|r| r.min_score.map(|m| (m, r.action)));
    let generation_probe = match &evaluation.generation {
        Some(g) => {
            let p = Probe::from_samples(&prepared.eval, &loaded.tokenizer, g.max_samples as usize)?;
            if p.is_empty() {
                eprintln!(
                    "warning: evaluation.generation: no eval prompts (it needs chat or instruction eval data)"
                );
            }
            p
        }
        None => Probe::default(),
    };
    let generation_tokens = evaluation
        .generation
        .as_ref()
        .map_or(0, |g| g.max_new_tokens as usize);
    let tokenizer = &loaded.tokenizer;
    let eos_ids = loaded.eos_ids.clone();
    let base_model_name = spec.base_model.uri.clone();
    let model_source_dir = model_path.clone();
    let mut model = loaded.model;

    // Self-replay: the base model's own answers, recorded before any update, join every step.
    let mut replay: Option<Replay> = None;
    let lora_sft = !is_dpo && spec.adapter.kind == AdapterType::Lora;
    let (forgetting_guard, guard_source) = guard::effective(
        spec.forgetting_guard.as_ref(),
        lora_sft,
        encoder.template.is_some(),
    );
    if guard_source == GuardSource::Default {
        eprintln!(
            "forgetting guard: default selfReplay (ratio {}, answers up to {} tokens, weight {}); name a guard in spec.forgettingGuard, or set forgettingGuard.disabled: true to train without one",
            DEFAULT_REPLAY_RATIO,
            finetune_crds::training::default_replay_answer_tokens(),
            finetune_crds::training::default_replay_weight()
        );
    }
    if let Some(r) = &forgetting_guard.self_replay {
        let t = Instant::now();
        let mut samples = guard::replay_samples(
            &mut model,
            &encoder,
            &eos_ids,
            &guard::replay_cache_path(&ckpt_dir),
            r.answer_tokens as usize,
        )
        .map_err(|e| invalid(e.to_string(), "spec.forgettingGuard.selfReplay"))?;
        samples.retain(|s| s.len() <= max_seq);
        let per_step = hp.batch_size as usize * hp.gradient_accumulation_steps as usize;
        let r = Replay::new(samples, r.ratio, per_step, r.weight);
        eprintln!(
            "self-replay: {} base answers, {:.2} replayed per step at weight {} ({:.1}s)",
            r.len(),
            r.ratio_per_step(),
            r.weight,
            t.elapsed().as_secs_f64()
        );
        replay = Some(r);
    }

    // Self-distillation scores the base model's answers to the self-replay requests.
    let distill = match &forgetting_guard.self_distillation {
        Some(g) => {
            let t = Instant::now();
            let mut samples = guard::replay_samples(
                &mut model,
                &encoder,
                &eos_ids,
                &guard::distill_cache_path(&ckpt_dir),
                guard::DISTILL_TOKENS,
            )
            .map_err(|e| invalid(e.to_string(), "spec.forgettingGuard.selfDistillation"))?;
            samples.retain(|s| s.len() <= max_seq);
            if samples.is_empty() {
                return Err(invalid(
                    format!(
                        "the base model gave no usable answer to the general requests (all empty or longer than maxSeqLength; see {}), so selfDistillation has nothing to anchor",
                        guard::distill_cache_path(&ckpt_dir).display()
                    ),
                    "spec.forgettingGuard.selfDistillation",
                ));
            }
            eprintln!(
                "self-distillation: {} base answers, weight {} ({:.1}s)",
                samples.len(),
                g.weight,
                t.elapsed().as_secs_f64()
            );
            Some(SelfDistillation::new(samples, g.weight))
        }
        None => None,
    };

    // Trainable parameters.
    let lora_cfg = match spec.adapter.kind {
        AdapterType::Lora => {
            let from_spec = LoraConfig::from(&spec.adapter.lora.clone().unwrap_or_default());
            Some(match &init_adapter {
                Some(dir) => init_lora_config(dir, from_spec, spec.adapter.lora.is_some())?,
                None => from_spec,
            })
        }
        AdapterType::Full => None,
    };
    let is_lora = lora_cfg.is_some();
    tch::manual_seed(hp.seed);
    let params: Vec<(String, Tensor, f64)> = if let Some(c) = &lora_cfg {
        match &init_adapter {
            Some(dir) => {
                let n = export::apply_peft_adapter(&mut model, dir)?;
                model.set_lora_trainable();
                eprintln!("starting from adapter {} ({n} layers)", dir.display());
            }
            None => {
                model.add_lora(c).map_err(|e| Stop::Invalid {
                    message: e.to_string(),
                    param: Some("spec.adapter.lora.targetModules".into()),
                })?;
            }
        }
        model
            .lora_parameters()
            .into_iter()
            .map(|(n, t)| (n, t, hp.weight_decay))
            .collect()
    } else {
        model.unfreeze_all();
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| {
                let decay = if n.ends_with("norm.weight") || n.ends_with(".bias") {
                    0.0
                } else {
                    hp.weight_decay
                };
                (n, t.shallow_clone(), decay)
            })
            .collect()
    };
    // Before any update (and before a resume loads trained weights): the weights to pull toward.
    let l2 = forgetting_guard.l2_to_init.as_ref().map(|g| {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t, _)| t.shallow_clone()).collect();
        L2ToInit::new(&tensors, g.weight)
    });
    let mut opt = AdamW::new(params);
    model.set_training(true);

    // Batches and the schedule.
    let batch_size = hp.batch_size as usize;
    let eval_set = if is_dpo {
        Vec::new()
    } else {
        eval_batches(&prepared.eval, batch_size)
    };
    let retention_batches = eval_batches(&retention_set, batch_size);
    let train_samples = std::mem::take(&mut prepared.train);
    let n_train = train_samples.len();
    let mut batcher = Batcher::new(
        train_samples,
        BatchPlan {
            batch_size,
            max_seq_length: max_seq,
            packing: hp.packing,
            seed,
        },
    );
    let bpe = batcher.batches_per_epoch() as i64;
    let ga = hp.gradient_accumulation_steps as i64;
    let steps_per_epoch = (bpe + ga - 1) / ga;
    let total = match (hp.max_steps, hp.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e as i64 * steps_per_epoch,
        (None, None) => steps_per_epoch,
    };
    let warmup = warmup_steps(hp.warmup_steps, hp.warmup_ratio, total);
    let config_digest = digest_hex(
        serde_json::to_string(&json!({
            "baseModel": spec.base_model, "dataset": spec.dataset, "method": spec.method,
            "adapter": spec.adapter, "hyperparameters": spec.hyperparameters,
            "forgettingGuard": &forgetting_guard,
            "train": prepared.train_digest,
            "initAdapter": init_adapter,
        }))
        .expect("spec serializes")
        .as_bytes(),
    );
    let load_seconds = t_load.elapsed().as_secs_f64();
    eprintln!(
        "{n_train} train samples, {} eval samples; {bpe} batches/epoch, {total} steps ({steps_per_epoch}/epoch, warmup {warmup}); {} trainable parameters",
        prepared.eval.len(),
        opt.numel()
    );

    // DPO: the pairs and where their reference log-probs come from.
    let dpo = match pairs.take() {
        Some(p) => {
            let o = spec.method.dpo.clone().unwrap_or_default();
            let mut d = Dpo {
                cfg: DpoConfig {
                    beta: o.beta,
                    loss: o.loss,
                    label_smoothing: o.label_smoothing,
                },
                train: PairSet::new(&p.train),
                eval: PairSet::new(&p.eval),
                // Switching the adapter off gives the starting weights only for a fresh adapter.
                mode: if is_lora && init_adapter.is_none() {
                    ReferenceMode::AdapterOff
                } else {
                    ReferenceMode::Precomputed
                },
                batch_size,
            };
            if d.mode == ReferenceMode::Precomputed {
                let t = Instant::now();
                let cache = ckpt_dir.join(DPO_REFERENCE_FILE);
                let computed = d.precompute_reference(&mut model, &cache, &config_digest)?;
                eprintln!(
                    "dpo reference log-probs {} for {} + {} pairs ({:.1}s)",
                    if computed {
                        "computed"
                    } else {
                        "read from the cache"
                    },
                    d.train.len(),
                    d.eval.len(),
                    t.elapsed().as_secs_f64()
                );
            }
            Some(d)
        }
        None => None,
    };
    let has_eval = !eval_set.is_empty() || dpo.as_ref().is_some_and(|d| !d.eval.is_empty());

    // Resume.
    let mut st = TrainState {
        config_digest: config_digest.clone(),
        ..Default::default()
    };
    let mut best: Option<Vec<(String, Tensor)>> = None;
    // The weights of the newest step that passed the retention floor (`action: stop` only).
    let mut last_good: Option<Vec<(String, Tensor)>> = None;
    let mut last_ckpt: Option<(i64, PathBuf)> = None;
    if let Some((step, dir)) = checkpoint::latest_valid(&ckpt_dir) {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path)
            .map_err(|e| Stop::Error(format!("{}: {e}", state_path.display())))?;
        let saved: TrainState = serde_json::from_str(&text)
            .map_err(|e| Stop::Error(format!("{}: {e}", state_path.display())))?;
        if saved.config_digest != config_digest {
            return Err(invalid(
                format!(
                    "checkpoint {} belongs to a different configuration or data set; use a new checkpoint directory",
                    dir.display()
                ),
                "spec",
            ));
        }
        let wfile = dir.join(if is_lora {
            export::ADAPTER_WEIGHTS
        } else {
            "model.safetensors"
        });
        load_trainable(&model, is_lora, read_tensors(&wfile)?, &wfile)?;
        let ofile = dir.join("optimizer.safetensors");
        opt.load_state(read_tensors(&ofile)?, saved.step)
            .map_err(|e| Stop::Error(format!("{}: {e}", ofile.display())))?;
        let bfile = dir.join("best.safetensors");
        if bfile.exists() {
            best = Some(read_tensors(&bfile)?.into_iter().collect());
        }
        let gfile = dir.join(LAST_GOOD_FILE);
        if gfile.exists() {
            last_good = Some(read_tensors(&gfile)?.into_iter().collect());
        }
        batcher.restore(saved.cursor);
        st = saved;
        tm.resumed_from_step = Some(step);
        tm.checkpoint_step = Some(step);
        tm.checkpoint_path = Some(dir.display().to_string());
        eprintln!("resumed from {} (step {step})", dir.display());
        last_ckpt = Some((step, dir));
    }
    let resumed_from = tm.resumed_from_step;

    let mut timings = BTreeMap::<&str, f64>::new();
    if !retention_batches.is_empty() && st.retention_loss_before.is_none() {
        // Before any update: the adapter is zero (or the weights are the base weights).
        let t = Instant::now();
        st.retention_loss_before = Some(evaluate(&mut model, &retention_batches).0);
        *timings.entry("retention_seconds").or_default() += t.elapsed().as_secs_f64();
    }

    if !retention_probe.is_empty() {
        let t = Instant::now();
        let references = match st.retention_references.clone() {
            Some(r) => r,
            None => {
                // The base model's own answers: the adapter is still zero here.
                let r =
                    retention_probe.answer(&mut model, tokenizer, &eos_ids, RETENTION_TOKENS)?;
                st.retention_references = Some(r.clone());
                st.last_good_step = Some(0);
                r
            }
        };
        retention_probe = retention_probe.with_references(references);
        *timings.entry("retention_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    if !generation_probe.is_empty() && st.generation_before.is_none() {
        let t = Instant::now();
        let answers =
            generation_probe.answer(&mut model, tokenizer, &eos_ids, generation_tokens)?;
        let score = generation_probe.score(&answers);
        eprintln!(
            "generation eval before training: exact match {}/{} ({} normalized)",
            score.exact, score.samples, score.normalized
        );
        st.generation_before = Some(score);
        *timings.entry("generation_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    if matches!(retention_floor, Some((_, GuardAction::Stop))) && last_good.is_none() {
        // What a breach falls back to (the starting weights until a probe passes).
        last_good = Some(trainable_tensors(&model, is_lora));
    }

    if let Some(d) = &dpo
        && !d.eval.is_empty()
        && st.preference_before.is_none()
    {
        let t = Instant::now();
        let m = d.evaluate(&mut model);
        eprintln!(
            "eval before training: dpo loss {:.4} | reward accuracy {:.3} | logp accuracy {:.3} ({} pairs)",
            m.loss, m.reward_accuracy, m.logp_accuracy, m.pairs
        );
        st.initial_eval_loss = Some(m.loss);
        st.preference_before = Some(m);
        *timings.entry("initial_eval_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    if !eval_set.is_empty() && st.initial_eval_loss.is_none() {
        let t = Instant::now();
        let (loss, _) = evaluate(&mut model, &eval_set);
        eprintln!("eval loss before training: {loss:.4}");
        st.initial_eval_loss = Some(loss);
        *timings.entry("initial_eval_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    let every_eval = evaluation.every_steps;
    let early = evaluation.early_stopping.clone();
    let keep_last = spec.checkpoint.keep_last.max(1) as usize;
    live.total_steps.set(total as f64);
    live.update(|s| {
        s.phase = TrainerPhase::Training;
        s.total_steps = total;
        s.step = st.step;
        s.resumed_from_step = resumed_from;
        s.checkpoint_step = last_ckpt.as_ref().map(|c| c.0);
    });

    let write_checkpoint = |st: &TrainState,
                            model: &CausalLm,
                            opt: &AdamW,
                            best: &Option<Vec<(String, Tensor)>>,
                            last_good: &Option<Vec<(String, Tensor)>>,
                            batcher_cursor: Cursor|
     -> Result<(PathBuf, f64), Stop> {
        let t = Instant::now();
        let mut state = st.clone();
        state.cursor = batcher_cursor;
        let dir = checkpoint::write(&ckpt_dir, st.step, |tmp| {
            let mut names = Vec::new();
            if let Some(c) = &lora_cfg {
                names.extend(export::write_peft_adapter(tmp, model, c, &base_model_name)?);
            } else {
                export::write_safetensors(
                    &tmp.join("model.safetensors"),
                    &trainable_tensors(model, false),
                )?;
                names.push("model.safetensors".into());
            }
            let ostate: Vec<(String, Tensor)> = opt
                .state_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
                .collect();
            export::write_safetensors(&tmp.join("optimizer.safetensors"), &ostate)?;
            names.push("optimizer.safetensors".into());
            if let Some(b) = best {
                export::write_safetensors(&tmp.join("best.safetensors"), b)?;
                names.push("best.safetensors".into());
            }
            if let Some(g) = last_good {
                export::write_safetensors(&tmp.join(LAST_GOOD_FILE), g)?;
                names.push(LAST_GOOD_FILE.into());
            }
            export::write_json(
                &tmp.join("trainer_state.json"),
                &serde_json::to_value(&state).expect("state serializes"),
            )?;
            names.push("trainer_state.json".into());
            Ok(names)
        })?;
        checkpoint::prune(&ckpt_dir, keep_last, None);
        Ok((dir, t.elapsed().as_secs_f64()))
    };

    // The loop.
    let mut step_seconds = 0.0;
    let mut step_tokens = 0i64;
    let mut steps_this_attempt = 0i64;
    let train_started = Instant::now();
    let mut eval_seconds = 0.0;
    let mut ckpt_seconds = 0.0;
    while st.step < total && !st.early_stopped {
        if term.load(Ordering::SeqCst) {
            if last_ckpt.as_ref().map(|c| c.0) != Some(st.step) {
                live.update(|s| s.phase = TrainerPhase::Checkpointing);
                let (dir, secs) =
                    write_checkpoint(&st, &model, &opt, &best, &last_good, batcher.cursor())?;
                eprintln!("SIGTERM: checkpoint {} ({secs:.2}s)", dir.display());
                last_ckpt = Some((st.step, dir));
            }
            tm.step = Some(st.step);
            tm.checkpoint_step = last_ckpt.as_ref().map(|c| c.0);
            tm.checkpoint_path = last_ckpt.as_ref().map(|c| c.1.display().to_string());
            tm.metrics = Some(live.status().metrics);
            return Err(Stop::Preempted);
        }
        let cur = batcher.cursor();
        let n_micro = ga.min(bpe - cur.next_batch as i64).max(1);
        let lr = hp.learning_rate * lr_lambda(hp.scheduler, st.step, warmup, total);
        let t = Instant::now();
        let outcome = match &dpo {
            None => {
                let batches: Vec<Batch> = (0..n_micro).map(|_| batcher.next_batch()).collect();
                let replay_batch = replay.as_ref().and_then(|r| r.batch_for_step(st.step));
                let mut mbs: Vec<MicroBatch> = batches.iter().map(MicroBatch::from).collect();
                // Self-replay: the step's base conversations as one more, weighted micro-batch.
                if let (Some(b), Some(r)) = (&replay_batch, &replay) {
                    mbs.push(MicroBatch {
                        weight: r.weight,
                        ..MicroBatch::from(b)
                    });
                }
                let anchors = (distill.as_ref(), l2.as_ref());
                guarded_step(
                    &mut model,
                    &mut opt,
                    &mbs,
                    lr,
                    hp.max_grad_norm,
                    seed,
                    st.step,
                    anchors,
                )
                .map(|(s, g)| (s, None, g))
            }
            Some(d) => {
                // Each "row" of the batcher is one pair (its chosen side stands for it).
                let micro: Vec<Vec<usize>> =
                    (0..n_micro).map(|_| batcher.next_rows().concat()).collect();
                d.step(
                    &mut model,
                    &mut opt,
                    &micro,
                    lr,
                    hp.max_grad_norm,
                    seed,
                    st.step,
                )
                .map(|(s, m)| (s, Some(m), None))
            }
        };
        let (stats, preference, guard_loss) = outcome.map_err(|s| {
                Stop::Diverged(format!(
                    "loss {} (grad norm {}) at step {}: lower hyperparameters.learningRate or check the data",
                    s.loss,
                    s.grad_norm,
                    st.step + 1
                ))
            })?;
        let secs = t.elapsed().as_secs_f64();
        st.step += 1;
        steps_this_attempt += 1;
        step_seconds += secs;
        step_tokens += stats.tokens;
        st.trained_tokens += stats.tokens;
        let epoch = st.step as f64 / steps_per_epoch as f64;
        st.history.push(StepRecord {
            step: st.step,
            epoch,
            loss: stats.loss,
            learning_rate: lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            targets: stats.targets,
            samples: stats.samples,
            seconds: secs,
            preference,
            guard_loss,
        });
        let tps = stats.tokens as f64 / secs.max(1e-9);
        let eta = step_seconds / steps_this_attempt as f64 * (total - st.step) as f64;
        live.step.set(st.step as f64);
        live.epoch.set(epoch);
        live.train_loss.set(stats.loss);
        live.learning_rate.set(lr);
        live.grad_norm.set(stats.grad_norm);
        live.tokens_per_second.set(tps);
        live.samples_per_second
            .set(stats.samples as f64 / secs.max(1e-9));
        live.supervised_token_fraction
            .set(stats.targets as f64 / stats.tokens.max(1) as f64);
        live.eta_seconds.set(eta);
        live.update(|s| {
            s.step = st.step;
            s.epoch = epoch;
            s.eta_seconds = Some(eta);
            s.metrics.train_loss = Some(stats.loss);
            s.metrics.learning_rate = Some(lr);
            s.metrics.tokens_per_second = Some(tps);
            s.metrics.trained_tokens = Some(st.trained_tokens);
        });
        let guard_note = guard_loss.map_or_else(String::new, |g| format!(" | guard {g:.4}"));
        let rewards = preference.map_or_else(String::new, |m| {
            format!(
                " | reward margin {:.4} | reward accuracy {:.2}",
                m.reward_margin, m.reward_accuracy
            )
        });
        eprintln!(
            "step {}/{total} | epoch {epoch:.2} | loss {:.4}{guard_note}{rewards} | lr {lr:.3e} | grad norm {:.3} | {tps:.0} tok/s | eta {}",
            st.step,
            stats.loss,
            stats.grad_norm,
            fmt_secs(eta)
        );

        // Evaluation and early stopping.
        let eval_due =
            has_eval && (every_eval.is_some_and(|n| st.step % n == 0) || st.step == total);
        if eval_due {
            live.update(|s| s.phase = TrainerPhase::Evaluating);
            let t = Instant::now();
            let (loss, targets, preference) = match &dpo {
                None => {
                    let (loss, targets) = evaluate(&mut model, &eval_set);
                    (loss, targets, None)
                }
                Some(d) => {
                    let m = d.evaluate(&mut model);
                    (m.loss, m.pairs as i64, Some(m))
                }
            };
            eval_seconds += t.elapsed().as_secs_f64();
            st.evals.push(EvalRecord {
                step: st.step,
                eval_loss: loss,
                targets,
                preference,
            });
            let improved = match st.best_eval_loss {
                None => true,
                Some(b) => loss < b - early.as_ref().map_or(0.0, |e| e.min_delta),
            };
            if improved {
                st.best_eval_loss = Some(loss);
                st.best_step = Some(st.step);
                st.evals_without_improvement = 0;
                if early.is_some() {
                    best = Some(trainable_tensors(&model, is_lora));
                }
            } else {
                st.evals_without_improvement += 1;
            }
            eprintln!(
                "eval step {} | eval loss {loss:.4} | best {:.4} (step {})",
                st.step,
                st.best_eval_loss.unwrap_or(f64::NAN),
                st.best_step.unwrap_or(0)
            );
            if let Some(m) = preference {
                eprintln!(
                    "eval step {} | reward accuracy {:.3} | logp accuracy {:.3} | reward margin {:.4} (chosen {:.4}, rejected {:.4})",
                    st.step,
                    m.reward_accuracy,
                    m.logp_accuracy,
                    m.reward_margin,
                    m.chosen_reward,
                    m.rejected_reward
                );
                live.preference_accuracy.set(m.reward_accuracy);
                live.reward_margin.set(m.reward_margin);
            }
            live.eval_loss.set(loss);
            live.update(|s| {
                s.phase = TrainerPhase::Training;
                s.metrics.eval_loss = Some(loss);
                s.metrics.best_eval_loss = st.best_eval_loss;
                if let Some(m) = preference {
                    s.metrics.preference_accuracy = Some(m.reward_accuracy);
                    s.metrics.reward_margin = Some(m.reward_margin);
                }
            });
            if let Some(e) = &early
                && st.evals_without_improvement >= e.patience
            {
                eprintln!(
                    "early stopping: no improvement in {} evaluations; the result is step {}",
                    e.patience,
                    st.best_step.unwrap_or(0)
                );
                st.early_stopped = true;
                st.stop_reason = Some(format!(
                    "early stopping: no eval loss improvement in {} evaluations; the result is step {}",
                    e.patience,
                    st.best_step.unwrap_or(0)
                ));
            }
        }

        // The retention floor: probed on the evaluation cadence (and at the last step).
        let probe_due = retention_floor.is_some()
            && !retention_probe.is_empty()
            && (every_eval.is_some_and(|n| st.step % n == 0) || st.step == total);
        if let (true, Some((min, action))) = (probe_due, retention_floor) {
            live.update(|s| s.phase = TrainerPhase::Evaluating);
            let t = Instant::now();
            let answers =
                retention_probe.answer(&mut model, tokenizer, &eos_ids, RETENTION_TOKENS)?;
            let score =
                RetentionScore::measure(&answers, &retention_probe.references, &retention_keys);
            eval_seconds += t.elapsed().as_secs_f64();
            let value = score.score();
            st.retention_scores.push(RetentionRecord {
                step: st.step,
                score: value,
                exact: score.exact_share(),
                verbatim: Some(score.verbatim_share()),
            });
            live.retention_score.set(value);
            live.update(|s| {
                s.phase = TrainerPhase::Training;
                s.metrics.retention_score = Some(value);
            });
            eprintln!(
                "retention step {} | {} ({value:.3}, floor {min})",
                st.step,
                score.describe()
            );
            if value >= min {
                st.last_good_step = Some(st.step);
                if action == GuardAction::Stop {
                    last_good = Some(trainable_tensors(&model, is_lora));
                }
            } else {
                let message = format!(
                    "retention score {value:.3} ({}) fell below evaluation.retention.minScore {min} at step {}",
                    score.describe(),
                    st.step
                );
                match action {
                    GuardAction::Warn => eprintln!("warning: {message}"),
                    GuardAction::Stop => {
                        let good = st.last_good_step.unwrap_or(0);
                        eprintln!("stopping: {message}; the result is step {good}");
                        st.stop_reason = Some(format!("{message}; the result is step {good}"));
                        st.early_stopped = true;
                    }
                    GuardAction::Fail => {
                        tm.step = Some(st.step);
                        tm.metrics = Some(live.status().metrics);
                        return Err(Stop::Forgetting(message));
                    }
                }
            }
        }

        if st.step % spec.checkpoint.every_steps == 0 || st.early_stopped {
            live.update(|s| s.phase = TrainerPhase::Checkpointing);
            let (dir, secs) =
                write_checkpoint(&st, &model, &opt, &best, &last_good, batcher.cursor())?;
            ckpt_seconds += secs;
            live.checkpoint_duration_seconds.set(secs);
            *live
                .last_checkpoint
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            live.update(|s| {
                s.phase = TrainerPhase::Training;
                s.checkpoint_step = Some(st.step);
            });
            tm.checkpoint_step = Some(st.step);
            tm.checkpoint_path = Some(dir.display().to_string());
            last_ckpt = Some((st.step, dir));
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();

    // The result: the best evaluated weights under early stopping, else the last.
    live.update(|s| s.phase = TrainerPhase::Exporting);
    let stopped_by_retention = st
        .stop_reason
        .as_deref()
        .is_some_and(|r| r.starts_with("retention"));
    let fallback = if stopped_by_retention {
        last_good.take().map(|g| (g, "<last good>"))
    } else if early.is_some() {
        best.take().map(|b| (b, "<best>"))
    } else {
        None
    };
    if let Some((weights, what)) = fallback {
        load_trainable(
            &model,
            is_lora,
            weights.into_iter().collect(),
            Path::new(what),
        )?;
    }
    let mut retention_score = None;
    // Answers that changed, for a person to judge (the score alone says how many, not how).
    let mut retention_changed = Vec::new();
    if !retention_probe.is_empty() {
        let t = Instant::now();
        let answers = retention_probe.answer(&mut model, tokenizer, &eos_ids, RETENTION_TOKENS)?;
        let score = RetentionScore::measure(&answers, &retention_probe.references, &retention_keys);
        let questions = retention
            .as_ref()
            .map(|r| r.questions.as_slice())
            .unwrap_or_default();
        retention_changed = changed_answers(
            questions,
            &retention_probe.references,
            &answers,
            &retention_keys,
        );
        eprintln!("retention: {} ({:.3})", score.describe(), score.score());
        live.retention_score.set(score.score());
        retention_score = Some(score);
        *timings.entry("retention_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    let mut generation_after = None;
    let mut generation_examples = Vec::new();
    if !generation_probe.is_empty() {
        let t = Instant::now();
        let answers =
            generation_probe.answer(&mut model, tokenizer, &eos_ids, generation_tokens)?;
        let score = generation_probe.score(&answers);
        eprintln!(
            "generation eval after training: exact match {}/{} ({} normalized)",
            score.exact, score.samples, score.normalized
        );
        live.eval_exact_match.set(score.exact_match());
        generation_examples = answers
            .iter()
            .zip(&generation_probe.references)
            .take(5)
            .map(|(a, r)| json!({"reference": r, "answer": a}))
            .collect();
        generation_after = Some(score);
        *timings.entry("generation_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    let mut retention_after = None;
    if !retention_batches.is_empty() {
        let t = Instant::now();
        retention_after = Some(evaluate(&mut model, &retention_batches).0);
        *timings.entry("retention_seconds").or_default() += t.elapsed().as_secs_f64();
    }
    let retention_delta = st
        .retention_loss_before
        .zip(retention_after)
        .map(|(b, a)| a - b);
    let t_export = Instant::now();
    let mut files = match &lora_cfg {
        Some(c) => export::write_peft_adapter(&output_dir, &model, c, &base_model_name)?,
        None => export::write_full_model(&output_dir, &model, Some(&model_source_dir))?,
    };
    files.extend(export_merged(
        &spec.output,
        &output_dir,
        &model,
        is_lora,
        &model_source_dir,
    )?);
    let digests = checkpoint::digest_files(&output_dir, &files)?;
    let export_seconds = t_export.elapsed().as_secs_f64();

    let last = st.history.last();
    let preference_after = st.evals.iter().rev().find_map(|e| e.preference);
    let metrics = TrainingMetrics {
        train_loss: last.map(|r| r.loss),
        eval_loss: st.evals.last().map(|e| e.eval_loss),
        best_eval_loss: st.best_eval_loss,
        learning_rate: last.map(|r| r.learning_rate),
        tokens_per_second: (step_seconds > 0.0).then(|| step_tokens as f64 / step_seconds),
        trained_tokens: Some(st.trained_tokens),
        retention_loss_delta: retention_delta,
        retention_score: retention_score.map(|s| s.score()),
        eval_exact_match: generation_after.map(|s| s.exact_match()),
        preference_accuracy: preference_after.map(|m| m.reward_accuracy),
        reward_margin: preference_after.map(|m| m.reward_margin),
    };
    timings.insert("load_seconds", load_seconds);
    timings.insert("train_seconds", train_seconds);
    timings.insert("step_seconds", step_seconds);
    timings.insert("eval_seconds", eval_seconds);
    timings.insert("checkpoint_seconds", ckpt_seconds);
    timings.insert("export_seconds", export_seconds);
    timings.insert("total_seconds", started.elapsed().as_secs_f64());
    let summary = json!({
        "job": name,
        "attempt": attempt,
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
        "threads": tch::get_num_threads(),
        "adapter": if is_lora { "lora" } else { "full" },
        "trainable_parameters": opt.numel(),
        "vocabulary": vocab.as_ref().map(vocab::Expansion::summary_json),
        "steps": st.step,
        "total_steps": total,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup,
        "resumed_from_step": resumed_from,
        "forgetting_guard": forgetting_guard,
        "forgetting_guard_source": guard_source,
        "early_stopped": st.early_stopped,
        "stop_reason": st.stop_reason,
        "best_step": st.best_step,
        "best_eval_loss": st.best_eval_loss,
        "initial_eval_loss": st.initial_eval_loss,
        "metrics": metrics,
        "history": st.history,
        "evals": st.evals,
        "retention": {
            "texts": retention_set.len(),
            "loss_before": st.retention_loss_before,
            "loss_after": retention_after,
            "loss_delta": retention_delta,
            "source": retention.as_ref().map(|r| r.source.clone()),
            "questions": retention_probe.len(),
            "score": retention_score.map(|s| s.score()),
            "basis": retention_score.map(|s| s.basis()),
            "base_correct": retention_score.map(|s| s.base_correct),
            "kept": retention_score.map(|s| s.kept),
            "gained": retention_score.map(|s| s.gained),
            "verbatim": retention_score.map(|s| s.verbatim_share()),
            "exact": retention_score.map(|s| s.exact_share()),
            "min_score": retention_floor.map(|f| f.0),
            "scores": st.retention_scores,
            "last_good_step": st.last_good_step,
            "changed": retention_changed,
        },
        "preference": dpo.as_ref().map(|d| json!({
            "beta": d.cfg.beta,
            "loss": spec.method.dpo.clone().unwrap_or_default().loss,
            "label_smoothing": d.cfg.label_smoothing,
            "reference": d.mode,
            "train_pairs": d.train.len(),
            "eval_pairs": d.eval.len(),
            "before": st.preference_before,
            "after": preference_after,
        })),
        "generation": {
            "samples": generation_probe.len(),
            "max_new_tokens": generation_tokens,
            "before": st.generation_before.map(score_json),
            "after": generation_after.map(score_json),
            "examples": generation_examples,
        },
        "dataset": {
            "train": prepared.train_stats,
            "eval": prepared.eval_stats,
            "train_samples_used": n_train,
            "replayed_samples": replay.as_ref().map_or(0, |r| r.replayed_through(st.step)),
            "eval_samples": prepared.eval.len(),
            "train_digest": prepared.train_digest,
            "eval_digest": prepared.eval_digest,
            "contamination": prepared.contamination,
        },
        "timings": timings,
        "tokens_per_second": metrics.tokens_per_second,
        "peak_rss_bytes": serve::peak_rss_bytes(),
        "rope_scaling": rope_scaling,
        "ignored": ignored,
        "files": digests,
    });
    export::write_json(&output_dir.join("training_summary.json"), &summary)?;
    eprintln!(
        "done: {} steps, last loss {:.4}{}, adapter in {}",
        st.step,
        metrics.train_loss.unwrap_or(f64::NAN),
        st.best_eval_loss
            .map(|b| format!(", best eval loss {b:.4}"))
            .unwrap_or_default(),
        output_dir.display()
    );
    live.update(|s| {
        s.phase = TrainerPhase::Done;
        s.metrics = metrics.clone();
        s.eta_seconds = Some(0.0);
    });
    tm.step = Some(st.step);
    tm.metrics = Some(metrics);
    tm.stop_reason = st.stop_reason.clone();
    tm.adapter = Some(ProducedAdapter {
        path: output_dir.display().to_string(),
        files: digests,
    });
    Ok(())
}
