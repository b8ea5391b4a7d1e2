//! The Adapter a successful FinetuneJob registers (named by `spec.output.adapterName`, default the
//! job's name). Its spec points back at the job (`source.fromJob`) and its status carries the
//! lineage and the sha256 of every file as the trainer reported them in its termination message.
//!
//! The Adapter *references* the job (label `finetune.dev/job`, `lineage.jobUid`) rather than being
//! owned by it: deleting or expiring the job must not erase the record of what it produced, nor
//! break a later job that starts from it (`initAdapter`).

use finetune_crds::adapter::{
    AdapterLora, AdapterPhase, AdapterSource, AdapterSpec, Lineage, SourceDigest,
};
use finetune_crds::contract::TerminationMessage;
use finetune_crds::training::AdapterType;
use finetune_crds::{Adapter, AdapterStatus, FinetuneJob};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{names, status};

/// The Adapter (metadata and spec) that `job` registers.
pub fn adapter(job: &FinetuneJob, termination: &TerminationMessage) -> Adapter {
    let name = job.name_any();
    let lora = match job.spec.adapter.kind {
        AdapterType::Lora => {
            let l = job.spec.adapter.lora.clone().unwrap_or_default();
            Some(AdapterLora {
                rank: l.rank,
                alpha: l.alpha,
                target_modules: l.target_modules,
                rslora: l.rslora,
            })
        }
        AdapterType::Full => None,
    };
    let files = termination
        .adapter
        .as_ref()
        .map(|a| a.files.as_slice())
        .unwrap_or_default();
    let mut adapter = Adapter::new(
        &status::adapter_name(job),
        AdapterSpec {
            base_model: job.spec.base_model.clone(),
            source: AdapterSource {
                uri: None,
                from_job: Some(name.clone()),
            },
            lora,
            expected_sha256: files
                .iter()
                .map(|f| (f.name.clone(), f.sha256.clone()))
                .collect(),
            // Verified by its job, not by a pod that would read the files.
            s3: None,
        },
    );
    adapter.metadata.namespace = job.namespace();
    adapter.metadata.labels = Some([(names::JOB_LABEL.to_string(), name)].into());
    adapter
}

/// The registered Adapter's status: Ready, its files and its lineage.
pub fn adapter_status(
    job: &FinetuneJob,
    termination: &TerminationMessage,
    now: Timestamp,
) -> AdapterStatus {
    let files = termination
        .adapter
        .as_ref()
        .map(|a| a.files.clone())
        .unwrap_or_default();
    let condition = |type_: &str| Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: "ReportedByTrainer".into(),
        message: format!(
            "{} file(s) with sha256 reported by the trainer of FinetuneJob {}",
            files.len(),
            job.name_any()
        ),
        observed_generation: None,
        last_transition_time: Time(now),
    };
    AdapterStatus {
        phase: Some(AdapterPhase::Ready),
        // Ready as for user-registered Adapters, so `kubectl wait --for=condition=Ready` serves both.
        conditions: vec![condition("Verified"), condition("Ready")],
        files,
        lineage: Some(Lineage {
            job: Some(job.name_any()),
            job_uid: job.uid(),
            base_model: Some(job.spec.base_model.uri.clone()),
            dataset_digest: termination.dataset_digest.clone(),
            base_model_commit: termination.base_model_commit.clone(),
            dataset_sources: lineage_sources(job, &termination.dataset_sources),
            hyperparameters: Some(job.spec.hyperparameters.clone()),
            metrics: termination.metrics.clone(),
            checkpoint_step: termination.checkpoint_step.or(termination.step),
        }),
        verified_time: Some(Time(now)),
        observed_generation: None,
    }
}

/// The trainer's per-source digests with the URIs of `dataset.train.sources` (same order).
fn lineage_sources(job: &FinetuneJob, reported: &[SourceDigest]) -> Vec<SourceDigest> {
    let specs = &job.spec.dataset.train.sources;
    reported
        .iter()
        .enumerate()
        .map(|(i, r)| SourceDigest {
            uri: specs.get(i).map(|s| s.uri.clone()),
            ..r.clone()
        })
        .collect()
}

/// Whether an existing Adapter of that name may be (re)written for `job`: it is this job's (same
/// `source.fromJob`, and no lineage from another job UID). Somebody else's Adapter of the same
/// name, or the one an earlier job of the same name produced, is left alone.
pub fn belongs_to(existing: &Adapter, job: &FinetuneJob) -> bool {
    let producer = existing
        .status
        .as_ref()
        .and_then(|s| s.lineage.as_ref())
        .and_then(|l| l.job_uid.as_ref());
    existing.spec.source.from_job.as_deref() == Some(job.name_any().as_str())
        && producer.is_none_or(|uid| job.uid().as_ref() == Some(uid))
}

/// Whether `existing` already records this very job (same UID): nothing to write.
pub fn is_registered(existing: &Adapter, job: &FinetuneJob) -> bool {
    existing
        .status
        .as_ref()
        .and_then(|s| s.lineage.as_ref())
        .and_then(|l| l.job_uid.as_ref())
        == job.uid().as_ref()
        && job.uid().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::adapter::FileDigest;
    use finetune_crds::contract::ProducedAdapter;
    use finetune_crds::parse_manifest;

    fn job() -> FinetuneJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/sft-lora-smollm2.yaml"
        ))
        .unwrap();
        let mut job: FinetuneJob = parse_manifest(&text, "sft").unwrap();
        job.metadata.namespace = Some("team".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn termination() -> TerminationMessage {
        TerminationMessage {
            step: Some(20),
            checkpoint_step: Some(20),
            dataset_digest: Some("sha256:abc".into()),
            adapter: Some(ProducedAdapter {
                path: "/var/lib/finetune/smollm2-kubectl-sft/output".into(),
                files: vec![FileDigest {
                    name: "adapter_model.safetensors".into(),
                    sha256: "f00d".into(),
                    size: 3,
                }],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_adapter_points_at_its_job_and_carries_its_lineage() {
        let (job, term) = (job(), termination());
        let a = adapter(&job, &term);
        assert_eq!(a.name_any(), "smollm2-kubectl");
        assert_eq!(a.namespace().as_deref(), Some("team"));
        assert_eq!(
            a.spec.source.from_job.as_deref(),
            Some("smollm2-kubectl-sft")
        );
        assert_eq!(a.spec.expected_sha256["adapter_model.safetensors"], "f00d");
        assert!(
            a.metadata.owner_references.is_none(),
            "referenced, not owned"
        );
        assert_eq!(
            a.spec.lora.as_ref().unwrap().rank,
            job.spec.adapter.lora.as_ref().unwrap().rank
        );
        let s = adapter_status(&job, &term, Timestamp::now());
        assert_eq!(s.phase, Some(AdapterPhase::Ready));
        let lineage = s.lineage.unwrap();
        assert_eq!(lineage.job_uid.as_deref(), Some("uid-1"));
        assert_eq!(lineage.dataset_digest.as_deref(), Some("sha256:abc"));
        assert_eq!(lineage.checkpoint_step, Some(20));
        assert_eq!(s.files.len(), 1);
    }

    #[test]
    fn another_jobs_adapter_of_the_same_name_is_not_taken_over() {
        let (job, term) = (job(), termination());
        let mut other = adapter(&job, &term);
        assert!(belongs_to(&other, &job));
        other.spec.source.from_job = Some("someone-else".into());
        assert!(!belongs_to(&other, &job));
        let mut mine = adapter(&job, &term);
        assert!(!is_registered(&mine, &job));
        mine.status = Some(adapter_status(&job, &term, Timestamp::now()));
        assert!(is_registered(&mine, &job));
        // A job re-created under the same name has a new UID: the first one's Adapter stays.
        let mut recreated = job.clone();
        recreated.metadata.uid = Some("uid-2".into());
        assert!(belongs_to(&mine, &job));
        assert!(!belongs_to(&mine, &recreated));
    }
}
