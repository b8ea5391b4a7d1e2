//! The contract between the operator and the trainer, defined once so both sides agree.
//!
//! The operator mounts the FinetuneJob manifest into the pod and passes the paths it decides
//! through the environment; the trainer reports live state on `/status` and `/metrics`, and its
//! outcome through the exit code and the termination message.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterLora, FileDigest};
use crate::finetunejob::TrainingMetrics;

/// Environment variables the operator sets on the trainer container.
pub mod env {
    /// Path of the mounted FinetuneJob manifest.
    pub const JOB_FILE: &str = "FINETUNE_JOB_FILE";
    /// Directory for checkpoints (on the job's storage, kept across attempts).
    pub const CHECKPOINT_DIR: &str = "FINETUNE_CHECKPOINT_DIR";
    /// Directory for the final adapter and exports.
    pub const OUTPUT_DIR: &str = "FINETUNE_OUTPUT_DIR";
    /// 0-based attempt number.
    pub const ATTEMPT: &str = "FINETUNE_ATTEMPT";
    /// The PEFT adapter directory `spec.adapter.initAdapter` resolves to (mounted read-only).
    pub const INIT_ADAPTER_DIR: &str = "FINETUNE_INIT_ADAPTER_DIR";
    /// Port of the `/status` and `/metrics` server.
    pub const STATUS_PORT: &str = "FINETUNE_STATUS_PORT";
    /// Address the status server binds (the pod IP).
    pub const POD_IP: &str = "FINETUNE_POD_IP";
    /// Where to write the termination message.
    pub const TERMINATION_LOG: &str = "FINETUNE_TERMINATION_LOG";
    /// Hugging Face token from `baseModel.tokenSecretRef` (never logged).
    pub const HF_TOKEN: &str = "HF_TOKEN";
    /// Hugging Face token from `dataset.tokenSecretRef`, for `hf://datasets/...` files (never
    /// logged).
    pub const HF_DATASET_TOKEN: &str = "FINETUNE_HF_DATASET_TOKEN";
    /// Base URL of the Hugging Face Hub or a mirror of its API (`https://huggingface.co` unset),
    /// the variable `huggingface_hub` itself reads.
    pub const HF_ENDPOINT: &str = "HF_ENDPOINT";
    /// Directory of downloaded `hf://` and `s3://` models, keyed by repository and commit (or
    /// bucket, key and the objects' ETags): the shared model cache when the operator has one,
    /// else a directory on the job's storage.
    pub const MODEL_CACHE_DIR: &str = "FINETUNE_MODEL_CACHE_DIR";
    /// `s3.endpoint`, in the variable the AWS SDKs read.
    pub const S3_ENDPOINT: &str = "AWS_ENDPOINT_URL";
    /// `s3.region`, in the variable the AWS SDKs read.
    pub const S3_REGION: &str = "AWS_REGION";
    /// The name of `s3.credentialsSecretRef`, so that refusals can name the Secret to fix (its
    /// keys arrive as `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    pub const S3_CREDENTIALS_SECRET: &str = "FINETUNE_S3_CREDENTIALS_SECRET";
}

/// Where the operator mounts things inside the trainer pod.
pub mod paths {
    /// Mount point of the ConfigMap holding the manifest.
    pub const JOB_DIR: &str = "/etc/finetune";
    /// File name of the manifest within [`JOB_DIR`].
    pub const JOB_FILE_NAME: &str = "job.yaml";
    /// Mount point of the job's storage.
    pub const STORAGE_DIR: &str = "/var/lib/finetune";
    /// Mount point of the shared model cache, when the operator has one.
    pub const MODEL_CACHE_DIR: &str = "/var/cache/finetune-models";
    /// The kubelet's default termination-message path.
    pub const TERMINATION_LOG: &str = "/dev/termination-log";
}

/// Default port of the trainer's status server.
pub const DEFAULT_STATUS_PORT: u16 = 8080;

/// Kubernetes truncates termination messages beyond this many bytes.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The trainer's exit codes and what the operator does with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Training finished; the result is in the output directory.
    Success,
    /// The manifest or the data is invalid: retrying cannot help.
    InvalidInput,
    /// The loss became NaN or infinite: retrying the same run diverges again.
    Diverged,
    /// Out of GPU or host memory.
    OutOfMemory,
    /// The retention probe fell below `evaluation.retention.minScore` with `action: fail`: the
    /// run forgets too much, and a retry would forget the same.
    RetentionBelowMinimum,
    /// Stopped by SIGTERM after writing a checkpoint (preemption, eviction or suspend).
    Preempted,
    /// Anything else: counted against `runPolicy.backoffLimit`.
    Other(i32),
}

impl ExitCode {
    /// The process exit status for this outcome.
    pub fn code(self) -> i32 {
        match self {
            Self::Success => 0,
            Self::InvalidInput => 2,
            Self::Diverged => 3,
            Self::OutOfMemory => 4,
            Self::RetentionBelowMinimum => 5,
            Self::Preempted => 143,
            Self::Other(code) => code,
        }
    }

    /// The outcome a process exit status stands for.
    pub fn from_code(code: i32) -> Self {
        match code {
            0 => Self::Success,
            2 => Self::InvalidInput,
            3 => Self::Diverged,
            4 => Self::OutOfMemory,
            5 => Self::RetentionBelowMinimum,
            143 => Self::Preempted,
            other => Self::Other(other),
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(
            self,
            Self::Success | Self::InvalidInput | Self::Diverged | Self::RetentionBelowMinimum
        )
    }

    /// Whether the attempt counts against `runPolicy.backoffLimit`.
    pub fn counts_against_backoff(self) -> bool {
        matches!(self, Self::OutOfMemory | Self::Other(_))
    }

    /// The condition reason reported for this outcome.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Success => "Completed",
            Self::InvalidInput => "InvalidInput",
            Self::Diverged => "Diverged",
            Self::OutOfMemory => "OutOfMemory",
            Self::RetentionBelowMinimum => "RetentionBelowMinimum",
            Self::Preempted => "Preempted",
            Self::Other(_) => "Error",
        }
    }
}

/// The JSON the trainer writes to the termination-message file when it exits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    /// The last optimizer step done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// Final metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrainingMetrics>,
    /// The newest checkpoint written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<i64>,
    /// Path of the checkpoint on the job's storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_path: Option<String>,
    /// The checkpoint step this attempt resumed from (absent when it started fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<i64>,
    /// The produced adapter (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<ProducedAdapter>,
    /// sha256 over the formatted training data, for the Adapter's lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<String>,
    /// The commit an `hf://` base model's revision resolved to, for status and the lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_commit: Option<String>,
    /// For a mixture, each source's digest and share, in `dataset.train.sources` order (the
    /// operator adds the URIs for the lineage).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dataset_sources: Vec<crate::adapter::SourceDigest>,
    /// Why training ended before its planned last step although it succeeded (early stopping,
    /// a retention floor with `action: stop`), naming the step whose weights are the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Which rule ended training early, typed so the operator matches on it instead of parsing
    /// `stop_reason`; absent when training ran to its last step. A kind this version does not
    /// know reads as absent, so a newer trainer's message still delivers its checkpoint and files.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "known_stop_kind"
    )]
    pub stop_kind: Option<StopKind>,
    /// What went wrong (on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TrainerError>,
}

/// Why a successful run ended before its planned last step. The names are the `EarlyStopped`
/// condition's reasons, so both sides use the same words.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// The eval loss did not improve within `evaluation.earlyStopping.patience`.
    EarlyStopping,
    /// The retention probe fell below `evaluation.retention.minScore` with `action: stop`.
    RetentionFloor,
}

impl StopKind {
    /// The `EarlyStopped` condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::EarlyStopping => "EarlyStopping",
            Self::RetentionFloor => "RetentionFloor",
        }
    }
}

fn known_stop_kind<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<StopKind>, D::Error> {
    let kind = Option::<String>::deserialize(deserializer)?;
    Ok(kind.and_then(|k| serde_json::from_value(serde_json::Value::String(k)).ok()))
}

/// The adapter a successful run produced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProducedAdapter {
    /// Directory on the job's storage.
    pub path: String,
    /// Its files.
    #[serde(default)]
    pub files: Vec<FileDigest>,
}

/// A failure, in the shape of OpenAI's fine-tuning errors: a code, a message and the offending
/// parameter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerError {
    /// Machine-readable code, e.g. `invalid_data`, `diverged`, `out_of_memory`.
    pub code: String,
    /// What happened, for people.
    pub message: String,
    /// The field, file or line at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl TerminationMessage {
    /// Serialises the message within Kubernetes' 4 KiB limit. A long error text is shortened
    /// first, then the file list, and metrics are dropped last: the checkpoint step is what the
    /// operator needs to resume, so it always stays.
    pub fn to_bounded_json(&self) -> String {
        let mut message = self.clone();
        loop {
            let json = serde_json::to_string(&message).expect("termination message serializes");
            if json.len() <= TERMINATION_MESSAGE_LIMIT {
                return json;
            }
            if let Some(error) = message.error.as_mut().filter(|e| e.message.len() > 256) {
                let keep = error.message.len() / 2;
                let cut = (0..=keep)
                    .rev()
                    .find(|&i| error.message.is_char_boundary(i));
                error.message.truncate(cut.unwrap_or(0));
                error.message.push('…');
            } else if let Some(adapter) = message.adapter.as_mut().filter(|a| !a.files.is_empty()) {
                adapter.files.pop();
            } else if !message.dataset_sources.is_empty() {
                message.dataset_sources.pop();
            } else {
                message.metrics = None;
            }
        }
    }
}

/// What the operator asks `finetune-trainer verify-adapter` to check, from the Adapter's spec
/// (passed as JSON in `--expect`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdapterExpectations {
    /// LoRA settings `adapter_config.json` must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<AdapterLora>,
    /// sha256 each named file must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected_sha256: BTreeMap<String, String>,
}

/// Why an adapter was or was not verified; the operator uses it as the condition reason.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerificationReason {
    /// Every check passed.
    Verified,
    /// The adapter directory, `adapter_config.json`, the weights or a file named in
    /// `expectedSha256` is not there.
    FileMissing,
    /// The files are there but are not a PEFT LoRA adapter this trainer can read.
    InvalidAdapter,
    /// A file's sha256 differs from `expectedSha256`.
    DigestMismatch,
    /// `adapter_config.json` disagrees with `spec.lora`.
    LoraMismatch,
    /// The base model cannot be read.
    BaseModelUnavailable,
    /// The adapter's layers or shapes do not fit the base model: made for another model.
    BaseModelMismatch,
}

/// The termination message of `verify-adapter` (exit 0 when verified, 2 when not).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdapterVerification {
    /// Whether every check passed.
    pub verified: bool,
    /// The outcome, as a condition reason.
    pub reason: VerificationReason,
    /// What was found, for people: names the file, field or tensor at fault.
    pub message: String,
    /// The adapter directory's files with their sha256 (those hashed before a failure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileDigest>,
}

impl AdapterVerification {
    /// Serialises the report within Kubernetes' 4 KiB limit: a long message is shortened first,
    /// then files are dropped from the end of the list (the message says how many).
    pub fn to_bounded_json(&self) -> String {
        let mut report = self.clone();
        let mut dropped = 0usize;
        loop {
            let mut shown = report.clone();
            if dropped > 0 {
                shown.message = format!("{} ({dropped} more file(s) not listed)", shown.message);
            }
            let json = serde_json::to_string(&shown).expect("verification report serializes");
            if json.len() <= TERMINATION_MESSAGE_LIMIT {
                return json;
            }
            // Above the cut plus the ellipsis, so a shortened message is not shortened again.
            if report.message.len() > 512 + '…'.len_utf8() {
                let cut = (0..=512)
                    .rev()
                    .find(|&i| report.message.is_char_boundary(i))
                    .unwrap_or(0);
                report.message.truncate(cut);
                report.message.push('…');
            } else if report.files.pop().is_some() {
                dropped += 1;
            } else {
                return json;
            }
        }
    }
}

/// What the trainer is doing right now, served as JSON on `/status`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum TrainerPhase {
    /// Downloading the base model (`hf://`) into the model cache, or waiting for another job
    /// that is downloading the same one.
    Downloading,
    /// Loading the model and data.
    #[default]
    Loading,
    /// Running optimizer steps.
    Training,
    /// Running an evaluation.
    Evaluating,
    /// Writing a checkpoint.
    Checkpointing,
    /// Writing the final adapter and exports.
    Exporting,
    /// Finished.
    Done,
}

/// The trainer's `/status` document, polled by the operator for `status.progress`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// What the trainer is doing.
    pub phase: TrainerPhase,
    /// Optimizer steps done.
    pub step: i64,
    /// Optimizer steps planned.
    pub total_steps: i64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Estimated seconds until training ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Latest metrics.
    #[serde(default)]
    pub metrics: TrainingMetrics,
    /// The newest checkpoint step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<i64>,
    /// The step training resumed from in this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<i64>,
    /// Bytes of the base model fetched so far, while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadProgress>,
    /// The commit an `hf://` base model resolved to, once fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_commit: Option<String>,
    /// Data-parallel ranks training together, when more than one: rank 0 serves this document
    /// for the whole group (its step, loss and tokens/s are the group's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<i64>,
}

/// How far the download of an `hf://` base model has come.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadProgress {
    /// Bytes of the needed files in the cache (verified or being written).
    pub bytes_done: i64,
    /// Bytes of all the files the model's format needs.
    pub bytes_total: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_kind_from_a_newer_trainer_loses_nothing_else() {
        let json =
            r#"{"step":20,"checkpointStep":20,"stopReason":"why","stopKind":"SomethingNew"}"#;
        let message: TerminationMessage = serde_json::from_str(json).unwrap();
        assert_eq!(message.checkpoint_step, Some(20));
        assert_eq!(message.stop_kind, None);
        let known = r#"{"stopReason":"why","stopKind":"RetentionFloor"}"#;
        let message: TerminationMessage = serde_json::from_str(known).unwrap();
        assert_eq!(message.stop_kind, Some(StopKind::RetentionFloor));
        assert_eq!(serde_json::to_string(&message).unwrap(), known);
    }

    #[test]
    fn exit_codes_round_trip_and_classify() {
        for code in [0, 1, 2, 3, 4, 137, 143] {
            assert_eq!(ExitCode::from_code(code).code(), code);
        }
        assert!(!ExitCode::InvalidInput.is_retryable());
        assert!(!ExitCode::Diverged.is_retryable());
        assert!(ExitCode::Preempted.is_retryable());
        assert!(!ExitCode::Preempted.counts_against_backoff());
        assert!(ExitCode::Other(137).counts_against_backoff());
        assert!(ExitCode::OutOfMemory.counts_against_backoff());
    }

    #[test]
    fn termination_message_stays_within_the_kubelet_limit() {
        let files = (0..200)
            .map(|i| FileDigest {
                name: format!("shard-{i:05}.safetensors"),
                sha256: "a".repeat(64),
                size: i,
            })
            .collect();
        let message = TerminationMessage {
            step: Some(1200),
            checkpoint_step: Some(1200),
            adapter: Some(ProducedAdapter {
                path: "/var/lib/finetune/out".into(),
                files,
            }),
            error: Some(TrainerError {
                code: "x".into(),
                message: "é".repeat(5000),
                param: None,
            }),
            ..Default::default()
        };
        let json = message.to_bounded_json();
        assert!(
            json.len() <= TERMINATION_MESSAGE_LIMIT,
            "{} bytes",
            json.len()
        );
        let back: TerminationMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back.checkpoint_step, Some(1200));
        assert!(!back.adapter.unwrap().files.is_empty());
    }

    #[test]
    fn a_verification_report_stays_within_the_limit_and_says_what_it_left_out() {
        let report = AdapterVerification {
            verified: false,
            reason: VerificationReason::DigestMismatch,
            message: "é".repeat(3000),
            files: (0..100)
                .map(|i| FileDigest {
                    name: format!("file-{i:03}.bin"),
                    sha256: "b".repeat(64),
                    size: i,
                })
                .collect(),
        };
        let json = report.to_bounded_json();
        assert!(
            json.len() <= TERMINATION_MESSAGE_LIMIT,
            "{} bytes",
            json.len()
        );
        let back: AdapterVerification = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reason, VerificationReason::DigestMismatch);
        assert!(!back.files.is_empty() && back.files.len() < 100);
        assert!(
            back.message.ends_with(&format!(
                "({} more file(s) not listed)",
                100 - back.files.len()
            )),
            "{}",
            back.message
        );
        // A small report goes out whole.
        let small = AdapterVerification {
            message: "ok".into(),
            files: report.files[..2].to_vec(),
            ..report
        };
        assert_eq!(
            serde_json::from_str::<AdapterVerification>(&small.to_bounded_json()).unwrap(),
            small
        );
    }
}
