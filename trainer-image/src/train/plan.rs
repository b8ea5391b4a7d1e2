//! The pure first stage of `run`: the FinetuneJob and the process environment resolved into a
//! [`Plan`] — where to read and write, which device to ask for, the data and LoRA settings, the
//! refusals that need no model — and the arithmetic that follows once the data is known
//! ([`Schedule`], [`config_digest`]). Only [`Plan::new`] reads a file (the manifest);
//! [`Plan::from_manifest`] and the rest touch no file, model, tensor or socket, so they are
//! unit-tested on their own.

use std::path::{Path, PathBuf};

use finetune_crds::FinetuneJob;
use finetune_crds::contract::{self, env};
use finetune_crds::training::{AdapterType, ForgettingGuard, Hyperparameters, MethodType};
use finetune_crds::uri::{MountRoots, StorageUri};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::data::mixture::{MixSource, Share};
use crate::data::{ContaminationOptions, CurateOptions, DataConfig, LoadOptions};
use crate::export::BaseModelRef;
use crate::fetch::HubModel;
use crate::fetch::s3_model::S3Model;
use crate::model::LoraConfig;
use crate::train::schedule::warmup_steps;
use crate::train::stop::{Stop, invalid};

/// The Hugging Face Hub, when `HF_ENDPOINT` names no mirror.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

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

/// The environment variables `run` reads, taken once so that [`Plan::new`] stays pure.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `FINETUNE_VOLUME_ROOT`: PVCs and ConfigMaps under this directory instead of the pod's
    /// mount points (tests and local runs).
    pub volume_root: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    pub checkpoint_dir: Option<PathBuf>,
    pub init_adapter_dir: Option<PathBuf>,
    /// As set (an empty value stays empty); unset is attempt `0`.
    pub attempt: Option<String>,
    pub status_port: Option<String>,
    pub pod_ip: Option<String>,
    /// `FINETUNE_MODEL_CACHE_DIR`: where `hf://` models are downloaded.
    pub model_cache_dir: Option<PathBuf>,
    /// `HF_ENDPOINT`: the Hub or a mirror of its API.
    pub hf_endpoint: Option<String>,
    /// `$HOME`, for the model cache of a local run.
    pub home: Option<PathBuf>,
}

impl Environment {
    pub fn from_process() -> Self {
        Environment {
            volume_root: env_path("FINETUNE_VOLUME_ROOT"),
            output_dir: env_path(env::OUTPUT_DIR),
            checkpoint_dir: env_path(env::CHECKPOINT_DIR),
            init_adapter_dir: env_path(env::INIT_ADAPTER_DIR),
            attempt: std::env::var(env::ATTEMPT).ok(),
            status_port: std::env::var(env::STATUS_PORT).ok(),
            pod_ip: std::env::var(env::POD_IP).ok(),
            model_cache_dir: env_path(env::MODEL_CACHE_DIR),
            hf_endpoint: std::env::var(env::HF_ENDPOINT)
                .ok()
                .filter(|v| !v.is_empty()),
            home: env_path("HOME"),
        }
    }
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A run resolved before anything is loaded.
#[derive(Debug, Clone)]
pub struct Plan {
    pub job: FinetuneJob,
    /// `metadata.name` (`finetune` without one).
    pub name: String,
    pub attempt: String,
    pub seed: u64,
    pub is_dpo: bool,
    /// The directory of `spec.adapter.initAdapter`.
    pub init_adapter: Option<PathBuf>,
    pub evaluation: finetune_crds::training::Evaluation,
    /// Where URIs point on this machine. The vocabulary's tokenizer and the retention data are
    /// resolved where they are used (after the model and the data load), so that a run with
    /// several faults still reports the same one first.
    pub roots: MountRoots,
    /// The model to load. For an `hf://` or `s3://` base this is its directory in the model
    /// cache until `fetch` replaces it with the downloaded version (see [`Plan::remote_base`]).
    pub model_path: PathBuf,
    /// The `hf://` or `s3://` base to download before loading, if the base is one.
    pub remote_base: Option<RemoteBase>,
    /// What adapters name as their base: the URI, or once fetched the Hub repository and commit.
    pub base_ref: BaseModelRef,
    /// Where `hf://` models are cached (shared by jobs when the operator mounts a model cache).
    pub model_cache: PathBuf,
    /// The Hub's API base (`HF_ENDPOINT`, else the Hugging Face Hub).
    pub hf_endpoint: String,
    /// The training file, or the files of a mixture.
    pub train: TrainFiles,
    /// Dataset files on `s3://` or the Hub, to download before the data loads (their paths in
    /// `train` and `eval_path` are where they land).
    pub remote_inputs: Vec<RemoteInput>,
    /// `output.uri`: the `s3://` prefix results are uploaded to after training.
    pub output_uri: Option<(String, String)>,
    pub eval_path: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    /// `host:port` of the status server.
    pub status_addr: (String, u16),
    /// The device to ask `load::pick_device` for: `auto` means the CPU when the job asks for no GPU.
    pub device: String,
    pub data: DataConfig,
    /// `spec.adapter.lora` for a LoRA run (before an `initAdapter`'s own settings replace it).
    pub lora: Option<LoraConfig>,
}

impl Plan {
    /// Reads the manifest and resolves it; the first refusal wins, in this order: the manifest,
    /// self-replay with DPO, the `initAdapter` directory, a guard that needs an adapter, the
    /// URIs, the status port.
    pub fn new(opts: &RunOptions, environment: &Environment) -> Result<Plan, Stop> {
        let job: FinetuneJob =
            finetune_crds::read_manifest(&opts.job).map_err(|e| Stop::Invalid {
                param: e.first_field().map(str::to_string),
                message: e.to_string(),
            })?;
        Plan::from_manifest(job, opts, environment)
    }

    /// [`Plan::new`] for a manifest already read.
    pub fn from_manifest(
        job: FinetuneJob,
        opts: &RunOptions,
        environment: &Environment,
    ) -> Result<Plan, Stop> {
        let spec = &job.spec;
        let name = job
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "finetune".into());
        let is_dpo = spec.method.kind == MethodType::Dpo;
        refuse_replay_with_dpo(&job, is_dpo)?;
        refuse_merge_of_quantized_base(&job)?;
        let init_adapter = match &spec.adapter.init_adapter {
            Some(name) => Some(
                opts.init_adapter
                    .clone()
                    .or_else(|| environment.init_adapter_dir.clone())
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
        refuse_guard_for_adapter(&job, is_dpo)?;
        let evaluation = spec.evaluation.clone().unwrap_or_default();

        let roots = match &environment.volume_root {
            Some(base) => MountRoots::under(base),
            None => MountRoots::in_pod(),
        };
        let output_dir = opts
            .output
            .clone()
            .or_else(|| environment.output_dir.clone())
            .unwrap_or_else(|| PathBuf::from("finetune-output").join(&name));
        let checkpoint_dir = opts
            .checkpoint_dir
            .clone()
            .or_else(|| environment.checkpoint_dir.clone())
            .unwrap_or_else(|| output_dir.join("checkpoints"));
        let attempt = environment.attempt.clone().unwrap_or_else(|| "0".into());
        let model_cache = environment
            .model_cache_dir
            .clone()
            .or_else(|| {
                environment
                    .home
                    .as_ref()
                    .map(|h| h.join(".cache/finetune/models"))
            })
            .unwrap_or_else(|| output_dir.join("model-cache"));
        let (model_path, remote_base) = base_model(spec, &roots, &model_cache)?;
        let mut inputs = Inputs {
            roots: &roots,
            staging: checkpoint_dir.join("inputs"),
            remote: Vec::new(),
        };
        let train = train_files(spec, &mut inputs)?;
        let eval_path = match &spec.dataset.eval {
            Some(d) => Some(inputs.resolve(&d.uri, "spec.dataset.eval.uri")?),
            None => None,
        };
        let remote_inputs = inputs.remote;
        let output_uri = match spec.output.uri.as_deref().map(StorageUri::parse) {
            None => None,
            Some(Some(StorageUri::S3 { bucket, key })) => Some((bucket, key)),
            Some(_) => {
                return Err(invalid(
                    "output.uri must be s3://BUCKET/PREFIX",
                    "spec.output.uri",
                ));
            }
        };

        let port = match &environment.status_port {
            Some(p) if !p.is_empty() => p
                .parse::<u16>()
                .map_err(|_| invalid(format!("`{p}` is not a port"), env::STATUS_PORT))?,
            _ => contract::DEFAULT_STATUS_PORT,
        };
        let host = environment
            .pod_ip
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "0.0.0.0".into());
        let device = if opts.device == "auto" && spec.resources.gpus == 0 {
            "cpu".to_string()
        } else {
            opts.device.clone()
        };
        let seed = spec.hyperparameters.seed as u64;
        let data = data_config(&job, &evaluation, seed);
        let lora = match spec.adapter.kind {
            AdapterType::Lora => Some(LoraConfig::from(
                &spec.adapter.lora.clone().unwrap_or_default(),
            )),
            AdapterType::Full => None,
        };
        Ok(Plan {
            name,
            attempt,
            seed,
            is_dpo,
            init_adapter,
            evaluation,
            roots,
            model_path,
            remote_base,
            base_ref: BaseModelRef::named(&spec.base_model.uri),
            model_cache,
            hf_endpoint: environment
                .hf_endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_HF_ENDPOINT.into()),
            train,
            remote_inputs,
            output_uri,
            eval_path,
            output_dir,
            checkpoint_dir,
            status_addr: (host, port),
            device,
            data,
            lora,
            job,
        })
    }

    pub fn spec(&self) -> &finetune_crds::FinetuneJobSpec {
        &self.job.spec
    }

    pub fn hp(&self) -> &Hyperparameters {
        &self.job.spec.hyperparameters
    }

    /// `spec.adapter.type: lora` (whether or not it starts from an `initAdapter`).
    pub fn is_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// A URI of the spec as a local path, refused with `field` when it has none.
    pub fn resolve(&self, uri: &str, field: &str) -> Result<PathBuf, Stop> {
        resolve(uri, &self.roots, field)
    }
}

/// What this trainer refuses because it would change the result (checked before the
/// `initAdapter` lookup, as it always was, so the same fault of several is reported).
fn refuse_replay_with_dpo(job: &FinetuneJob, is_dpo: bool) -> Result<(), Stop> {
    if is_dpo
        && job
            .spec
            .forgetting_guard
            .as_ref()
            .is_some_and(|g| g.self_replay.is_some())
    {
        return Err(invalid(
            "forgettingGuard.selfReplay mixes SFT samples into the training stream and does not apply to method.type dpo (DPO's reference model already anchors it)",
            "spec.forgettingGuard.selfReplay",
        ));
    }
    Ok(())
}

/// A QLoRA run holds its base rounded to 4 or 8 bits: merging the adapter into that would bake the
/// rounding into the published model, and its full-precision base is not in memory to merge into.
fn refuse_merge_of_quantized_base(job: &FinetuneJob) -> Result<(), Stop> {
    let spec = &job.spec;
    let quantized = spec.adapter.kind == AdapterType::Lora
        && spec
            .adapter
            .lora
            .as_ref()
            .is_some_and(|l| l.base_quantization.is_some());
    if quantized && (spec.output.merge || spec.output.gguf.is_some()) {
        let field = if spec.output.merge {
            "spec.output.merge"
        } else {
            "spec.output.gguf"
        };
        return Err(invalid(
            "adapter.lora.baseQuantization keeps the base quantized while training, so the run exports \
             the adapter only: merge it into the full-precision base afterwards with \
             `finetune-trainer merge` (and `export-gguf`)",
            field,
        ));
    }
    Ok(())
}

/// Guards that only make sense for one kind of adapter (checked after the `initAdapter` lookup).
fn refuse_guard_for_adapter(job: &FinetuneJob, is_dpo: bool) -> Result<(), Stop> {
    let spec = &job.spec;
    if let Some(g) = &spec.forgetting_guard {
        let is_lora = spec.adapter.kind == AdapterType::Lora;
        if g.self_distillation.is_some() && (is_dpo || !is_lora) {
            return Err(invalid(
                "forgettingGuard.selfDistillation compares the model with its adapter switched off, so it needs SFT with adapter.type: lora (full fine-tuning has l2ToInit; DPO's reference already anchors it)",
                "spec.forgettingGuard.selfDistillation",
            ));
        }
        if g.layer_anchor.is_some() && (is_dpo || !is_lora) {
            return Err(invalid(
                "forgettingGuard.layerAnchor holds a LoRA adapter's change to each layer's output, so it needs SFT with adapter.type: lora (full fine-tuning has l2ToInit; DPO's reference already anchors it)",
                "spec.forgettingGuard.layerAnchor",
            ));
        }
        if g.l2_to_init.is_some() && (is_dpo || is_lora) {
            return Err(invalid(
                "forgettingGuard.l2ToInit pulls trained weights toward their start, so it needs SFT with adapter.type: full (a LoRA adapter starts at zero: use selfDistillation or selfReplay)",
                "spec.forgettingGuard.l2ToInit",
            ));
        }
    }
    Ok(())
}

/// A dataset file on `s3://` or the Hub and where it is downloaded to.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteInput {
    pub uri: String,
    /// The spec field naming it, for refusals.
    pub field: String,
    pub source: RemoteSource,
    /// Where the file lands: `dir` + the file's own path (a Hub file keeps its path in the
    /// repository, an object its last segment).
    pub dir: PathBuf,
    pub path: PathBuf,
}

/// Where a [`RemoteInput`] comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteSource {
    S3 {
        bucket: String,
        key: String,
    },
    Hub {
        repo: String,
        revision: String,
        path: String,
    },
}

/// Resolves dataset URIs: mounted ones to their paths, `s3://` and `hf://datasets/` ones to a
/// file in `staging` (noted in `remote` for the download before the data loads).
struct Inputs<'a> {
    roots: &'a MountRoots,
    staging: PathBuf,
    remote: Vec<RemoteInput>,
}

impl Inputs<'_> {
    fn resolve(&mut self, uri: &str, field: &str) -> Result<PathBuf, Stop> {
        let (source, name) = match StorageUri::parse(uri) {
            Some(StorageUri::S3 { bucket, key }) => {
                let name = key.rsplit('/').next().unwrap_or("data").to_string();
                (RemoteSource::S3 { bucket, key }, name)
            }
            Some(StorageUri::HuggingFaceFile {
                repo,
                revision,
                path,
            }) => {
                let revision = revision.unwrap_or_else(|| "main".into());
                let name = path.clone();
                (
                    RemoteSource::Hub {
                        repo,
                        revision,
                        path,
                    },
                    name,
                )
            }
            _ => return resolve(uri, self.roots, field),
        };
        // A directory named by the URI's digest, so that two sources ending in the same file
        // name differ and a retry finds the same path; the file keeps its name for people
        // reading messages.
        let dir = self.staging.join(&digest_hex(uri.as_bytes())[..16]);
        let path = dir.join(&name);
        self.remote.push(RemoteInput {
            uri: uri.to_string(),
            field: field.to_string(),
            source,
            dir,
            path: path.clone(),
        });
        Ok(path)
    }
}

fn resolve(uri: &str, roots: &MountRoots, field: &str) -> Result<PathBuf, Stop> {
    let parsed =
        StorageUri::parse(uri).ok_or_else(|| invalid(format!("bad URI `{uri}`"), field))?;
    parsed.local_path(roots).ok_or_else(|| {
        let why = match parsed {
            StorageUri::S3 { .. } => {
                "s3:// is read for dataset files and spec.baseModel.uri only; use pvc:// or file:// here"
            }
            StorageUri::HuggingFaceFile { .. } => {
                "hf://datasets/ files are read for dataset.train and dataset.eval only; use pvc:// or file:// here"
            }
            _ => "hf:// names a model repository; only spec.baseModel.uri takes one",
        };
        invalid(format!("`{uri}`: {why}"), field)
    })
}

/// Where the training data is.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainFiles {
    /// `dataset.train.uri`.
    One(PathBuf),
    /// `dataset.train.sources`.
    Mixture(Vec<MixSource>),
}

fn train_files(
    spec: &finetune_crds::FinetuneJobSpec,
    inputs: &mut Inputs,
) -> Result<TrainFiles, Stop> {
    let train = &spec.dataset.train;
    if let Some(uri) = &train.uri {
        return Ok(TrainFiles::One(
            inputs.resolve(uri, "spec.dataset.train.uri")?,
        ));
    }
    if train.sources.is_empty() {
        return Err(invalid(
            "dataset.train needs uri (one file) or sources (a mixture)",
            "spec.dataset.train",
        ));
    }
    let mut sources = Vec::with_capacity(train.sources.len());
    for (i, source) in train.sources.iter().enumerate() {
        let field = format!("spec.dataset.train.sources[{i}].uri");
        let share = match (source.weight, source.samples) {
            (_, Some(n)) => Share::Samples(n.max(1) as usize),
            (Some(w), None) => Share::Weight(w),
            (None, None) => Share::Weight(1.0),
        };
        sources.push(MixSource {
            path: inputs.resolve(&source.uri, &field)?,
            format: source.format.unwrap_or(spec.dataset.format).into(),
            share,
        });
    }
    Ok(TrainFiles::Mixture(sources))
}

/// A base model fetched into the model cache before loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteBase {
    Hub(HubModel),
    S3(S3Model),
}

/// The base model's path, and for `hf://` and `s3://` what to fetch into the model cache first.
fn base_model(
    spec: &finetune_crds::FinetuneJobSpec,
    roots: &MountRoots,
    model_cache: &Path,
) -> Result<(PathBuf, Option<RemoteBase>), Stop> {
    let uri = &spec.base_model.uri;
    let field = "spec.baseModel.uri";
    let format = spec.base_model.format;
    match StorageUri::parse(uri) {
        Some(StorageUri::HuggingFace { repo, revision }) => {
            let cache = model_cache.join("hf/models").join(&repo);
            let hub = HubModel {
                repo,
                revision: revision.unwrap_or_else(|| "main".into()),
                format,
            };
            Ok((cache, Some(RemoteBase::Hub(hub))))
        }
        Some(StorageUri::S3 { bucket, key }) => {
            let cache = model_cache.join("s3").join(&bucket).join(&key);
            Ok((
                cache,
                Some(RemoteBase::S3(S3Model {
                    bucket,
                    key,
                    format,
                })),
            ))
        }
        _ => Ok((resolve(uri, roots, field)?, None)),
    }
}

fn data_config(
    job: &FinetuneJob,
    evaluation: &finetune_crds::training::Evaluation,
    seed: u64,
) -> DataConfig {
    let spec = &job.spec;
    DataConfig {
        format: spec.dataset.format.into(),
        load: LoadOptions {
            assistant_only_loss: spec
                .method
                .sft
                .as_ref()
                .is_none_or(|s| s.assistant_only_loss),
            ..LoadOptions::sft()
        },
        curate: CurateOptions {
            max_seq_length: spec.hyperparameters.max_seq_length as usize,
            dedupe: spec.dataset.deduplicate,
        },
        eval_fraction: spec.dataset.eval_split,
        seed,
        contamination: match &evaluation.contamination {
            Some(c) => ContaminationOptions {
                n: c.ngram as usize,
                threshold: c.threshold,
                ..ContaminationOptions::default()
            },
            None => ContaminationOptions::default(),
        },
    }
}

/// Steps and warmup, once the batcher knows how many batches an epoch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Batches per epoch.
    pub batches_per_epoch: i64,
    /// Micro-batches per optimizer step (`gradientAccumulationSteps`).
    pub accumulation: i64,
    pub steps_per_epoch: i64,
    pub total: i64,
    pub warmup: i64,
}

impl Schedule {
    pub fn new(hp: &Hyperparameters, batches_per_epoch: i64) -> Self {
        let ga = hp.gradient_accumulation_steps as i64;
        let steps_per_epoch = (batches_per_epoch + ga - 1) / ga;
        let total = match (hp.max_steps, hp.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e as i64 * steps_per_epoch,
            (None, None) => steps_per_epoch,
        };
        Schedule {
            batches_per_epoch,
            accumulation: ga,
            steps_per_epoch,
            total,
            warmup: warmup_steps(hp.warmup_steps, hp.warmup_ratio, total),
        }
    }
}

/// What a checkpoint must have been written under to be resumed: the parts of the spec that
/// change the result, the effective forgetting guard, the training data and the starting adapter.
pub fn config_digest(
    job: &FinetuneJob,
    forgetting_guard: &ForgettingGuard,
    train_digest: &str,
    init_adapter: Option<&Path>,
) -> String {
    let spec = &job.spec;
    // Checkpointing and the micro-batch change memory and time, not the update: a run may resume
    // with them switched (the trainer halves the micro-batch itself after running out of memory).
    let hyperparameters = Hyperparameters {
        gradient_checkpointing: None,
        micro_batch_size: None,
        ..spec.hyperparameters.clone()
    };
    digest_hex(
        serde_json::to_string(&json!({
            "baseModel": spec.base_model, "dataset": spec.dataset, "method": spec.method,
            "adapter": spec.adapter, "hyperparameters": hyperparameters,
            "forgettingGuard": forgetting_guard,
            "train": train_digest,
            "initAdapter": init_adapter,
        }))
        .expect("spec serializes")
        .as_bytes(),
    )
}

fn digest_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> FinetuneJob {
        let yaml = format!(
            "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: planned}}
spec:
  baseModel: {{uri: \"pvc://models/base\"}}
  dataset:
    train: {{uri: \"pvc://data/train.jsonl\"}}
    format: text
  hyperparameters: {{maxSteps: 10, learningRate: 1.0e-3, batchSize: 2, maxSeqLength: 64, warmupRatio: 0.1}}
  resources: {{gpus: 0}}
{extra}"
        );
        finetune_crds::parse_manifest(&yaml, "job.yaml").unwrap()
    }

    fn opts() -> RunOptions {
        RunOptions {
            job: PathBuf::from("job.yaml"),
            output: None,
            checkpoint_dir: None,
            device: "auto".into(),
            init_adapter: None,
        }
    }

    fn refusal(extra: &str, environment: &Environment) -> String {
        refusal_of(job(extra), environment)
    }

    fn refusal_of(job: FinetuneJob, environment: &Environment) -> String {
        match Plan::from_manifest(job, &opts(), environment) {
            Err(Stop::Invalid { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn paths_device_and_port_come_from_flags_then_environment_then_defaults() {
        let environment = Environment {
            volume_root: Some(PathBuf::from("/vol")),
            ..Environment::default()
        };
        let plan = Plan::from_manifest(job(""), &opts(), &environment).unwrap();
        assert_eq!(plan.model_path, Path::new("/vol/pvc/models/base"));
        assert_eq!(
            plan.train,
            TrainFiles::One(PathBuf::from("/vol/pvc/data/train.jsonl"))
        );
        assert_eq!(plan.output_dir, Path::new("finetune-output/planned"));
        assert_eq!(
            plan.checkpoint_dir,
            Path::new("finetune-output/planned/checkpoints")
        );
        assert_eq!(plan.attempt, "0");
        assert_eq!(
            plan.status_addr,
            ("0.0.0.0".to_string(), contract::DEFAULT_STATUS_PORT)
        );
        assert_eq!(plan.device, "cpu", "auto without GPUs is the CPU");
        assert!(plan.is_lora(), "LoRA is the default adapter");
        let environment = Environment {
            output_dir: Some(PathBuf::from("/out")),
            checkpoint_dir: Some(PathBuf::from("/ckpt")),
            attempt: Some("3".into()),
            status_port: Some("9000".into()),
            pod_ip: Some("10.0.0.1".into()),
            ..Environment::default()
        };
        let plan = Plan::from_manifest(job(""), &opts(), &environment).unwrap();
        assert_eq!(plan.output_dir, Path::new("/out"));
        assert_eq!(plan.checkpoint_dir, Path::new("/ckpt"));
        assert_eq!(plan.attempt, "3");
        assert_eq!(plan.status_addr, ("10.0.0.1".to_string(), 9000));
        let flags = RunOptions {
            output: Some(PathBuf::from("/flag-out")),
            device: "cuda".into(),
            ..opts()
        };
        let plan = Plan::from_manifest(job(""), &flags, &environment).unwrap();
        assert_eq!(plan.output_dir, Path::new("/flag-out"));
        assert_eq!(plan.checkpoint_dir, Path::new("/ckpt"));
        assert_eq!(plan.device, "cuda");
    }

    #[test]
    fn an_hf_base_is_fetched_into_the_model_cache_from_the_endpoint() {
        let mut manifest = job("");
        manifest.spec.base_model.uri = "hf://org/model".into();
        let environment = Environment {
            model_cache_dir: Some("/cache".into()),
            hf_endpoint: Some("http://mirror:8090".into()),
            ..Environment::default()
        };
        let plan = Plan::from_manifest(manifest.clone(), &opts(), &environment).unwrap();
        let Some(RemoteBase::Hub(hub)) = plan.remote_base.as_ref() else {
            panic!("{:?}", plan.remote_base)
        };
        assert_eq!(
            (hub.repo.as_str(), hub.revision.as_str()),
            ("org/model", "main")
        );
        assert_eq!(plan.model_cache, PathBuf::from("/cache"));
        assert_eq!(plan.hf_endpoint, "http://mirror:8090");
        let local = Environment {
            home: Some("/home/u".into()),
            ..Environment::default()
        };
        let plan = Plan::from_manifest(manifest, &opts(), &local).unwrap();
        assert_eq!(
            plan.model_cache,
            PathBuf::from("/home/u/.cache/finetune/models")
        );
        assert_eq!(plan.hf_endpoint, DEFAULT_HF_ENDPOINT);
    }

    #[test]
    fn refusals_name_the_field() {
        let none = Environment::default();
        // The manifest's own rules would refuse a DPO job on text data first.
        let mut dpo = job("  forgettingGuard: {selfReplay: {ratio: 0.1}}");
        dpo.spec.method.kind = MethodType::Dpo;
        assert_eq!(refusal_of(dpo, &none), "spec.forgettingGuard.selfReplay");
        assert_eq!(
            refusal("  adapter: {type: lora, initAdapter: base-chat}", &none),
            "spec.adapter.initAdapter"
        );
        assert_eq!(
            refusal(
                "  adapter: {type: full}\n  forgettingGuard: {selfDistillation: {weight: 1.0}}",
                &none
            ),
            "spec.forgettingGuard.selfDistillation"
        );
        // The manifest's own rule refuses layerAnchor with full fine-tuning; DPO is the trainer's.
        let mut dpo = job("  forgettingGuard: {layerAnchor: {weight: 1.0}}");
        dpo.spec.method.kind = MethodType::Dpo;
        assert_eq!(refusal_of(dpo, &none), "spec.forgettingGuard.layerAnchor");
        let bad_port = Environment {
            status_port: Some("http".into()),
            ..Environment::default()
        };
        assert_eq!(refusal("", &bad_port), env::STATUS_PORT);
    }

    #[test]
    fn the_schedule_rounds_partial_accumulation_up() {
        let mut hp = job("").spec.hyperparameters;
        hp.max_steps = None;
        hp.epochs = Some(3);
        hp.gradient_accumulation_steps = 4;
        hp.warmup_ratio = Some(0.1);
        let s = Schedule::new(&hp, 10);
        assert_eq!((s.steps_per_epoch, s.total), (3, 9));
        assert_eq!(s.warmup, warmup_steps(None, Some(0.1), 9));
        hp.max_steps = Some(5);
        assert_eq!(Schedule::new(&hp, 10).total, 5);
    }

    #[test]
    fn the_config_digest_follows_the_data_and_the_starting_adapter() {
        let j = job("");
        let g = ForgettingGuard::default();
        let a = config_digest(&j, &g, "d1", None);
        assert_eq!(a.len(), 64);
        assert_eq!(a, config_digest(&j, &g, "d1", None));
        assert_ne!(a, config_digest(&j, &g, "d2", None));
        assert_ne!(a, config_digest(&j, &g, "d1", Some(Path::new("/a"))));
    }
}
