//! `spec.adapter.initAdapter` names an Adapter in the job's namespace; the trainer needs the
//! directory of its files. This module turns the Adapter (and, for `source.fromJob`, the job that
//! produced it) into a storage URI, and says plainly why it cannot when it cannot. The controller
//! fetches the objects; the pod builder mounts the URI (see `build::trainer_pod`).

use finetune_crds::adapter::AdapterPhase;
use finetune_crds::{Adapter, FinetuneJob, JobPhase};
use kube::ResourceExt;

use super::names;

/// The storage URI of `adapter`'s files. `producer` is the FinetuneJob named by
/// `source.fromJob`, looked up by the caller (`None` when it does not exist). Only a Ready
/// Adapter is used, and one from a job only while that very job (its UID in the lineage) exists:
/// a job re-created under the same name writes other files to the same place.
pub fn adapter_uri(adapter: &Adapter, producer: Option<&FinetuneJob>) -> Result<String, String> {
    let name = adapter.name_any();
    let source = &adapter.spec.source;
    let status = adapter.status.as_ref();
    let phase = status.and_then(|s| s.phase).unwrap_or_default();
    if phase == AdapterPhase::Failed {
        let why = status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Verified"))
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default();
        return Err(format!("Adapter {name} failed verification ({why})"));
    }
    if phase != AdapterPhase::Ready {
        return Err(format!(
            "Adapter {name} is {phase:?}, not Ready: it is used once verified"
        ));
    }
    if let Some(uri) = &source.uri {
        if uri.starts_with("s3://") {
            return Err(format!(
                "Adapter {name} is on s3:// ({uri}); initAdapter reads an adapter from a volume \
                 (pvc:// or file://, or a job's own output), not from object storage yet"
            ));
        }
        return Ok(uri.clone());
    }
    let Some(job_name) = &source.from_job else {
        return Err(format!(
            "Adapter {name} has neither source.uri nor source.fromJob"
        ));
    };
    let Some(job) = producer else {
        return Err(format!(
            "Adapter {name} comes from FinetuneJob {job_name}, which does not exist"
        ));
    };
    let recorded = status
        .and_then(|s| s.lineage.as_ref())
        .and_then(|l| l.job_uid.as_deref());
    if recorded.is_none() || recorded != job.metadata.uid.as_deref() {
        return Err(format!(
            "Adapter {name} was produced by FinetuneJob {job_name} with UID {}, and the job of \
             that name now has UID {}: its files are not this adapter's",
            recorded.unwrap_or("(none recorded)"),
            job.metadata.uid.as_deref().unwrap_or("(none)")
        ));
    }
    let phase = job.status.as_ref().and_then(|s| s.phase);
    if phase != Some(JobPhase::Succeeded) {
        let phase = phase.map_or_else(|| "not started".to_string(), |p| format!("{p:?}"));
        return Err(format!(
            "Adapter {name} comes from FinetuneJob {job_name}, which has not succeeded yet (phase {phase})"
        ));
    }
    // The producer wrote its output to `<its name>/output` on its storage claim.
    let claim = job
        .spec
        .storage
        .claim_name
        .clone()
        .unwrap_or_else(|| names::storage_claim(job_name));
    Ok(format!("pvc://{claim}/{job_name}/output"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::adapter::{AdapterSource, AdapterSpec};
    use finetune_crds::{FinetuneJobStatus, parse_manifest};

    fn adapter(source: AdapterSource) -> Adapter {
        let mut a = Adapter::new(
            "sft",
            AdapterSpec {
                base_model: serde_json::from_value(
                    serde_json::json!({"uri": "pvc://models/m.gguf"}),
                )
                .unwrap(),
                source,
                lora: None,
                expected_sha256: Default::default(),
                s3: None,
            },
        );
        a.metadata.namespace = Some("team".into());
        a.status = Some(
            serde_json::from_value(serde_json::json!({
                "phase": "Ready", "lineage": {"jobUid": "uid-producer"}
            }))
            .unwrap(),
        );
        a
    }

    fn job(phase: Option<JobPhase>) -> FinetuneJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/sft-lora-smollm2.yaml"
        ))
        .unwrap();
        let mut job: FinetuneJob = parse_manifest(&text, "sft-lora-smollm2.yaml").unwrap();
        job.status = Some(FinetuneJobStatus {
            phase,
            ..Default::default()
        });
        job.metadata.uid = Some("uid-producer".into());
        job
    }

    #[test]
    fn an_s3_source_is_refused_with_what_initadapter_reads() {
        let a = adapter(AdapterSource {
            uri: Some("s3://results/runs/one".into()),
            from_job: None,
        });
        let why = adapter_uri(&a, None).unwrap_err();
        assert!(
            why.contains("s3://results/runs/one") && why.contains("pvc://"),
            "{why}"
        );
    }

    #[test]
    fn a_uri_source_is_used_as_is() {
        let a = adapter(AdapterSource {
            uri: Some("pvc://adapters/sft".into()),
            from_job: None,
        });
        assert_eq!(adapter_uri(&a, None).unwrap(), "pvc://adapters/sft");
    }

    #[test]
    fn an_adapter_that_failed_verification_is_refused_with_the_reason() {
        let mut a = adapter(AdapterSource {
            uri: Some("pvc://adapters/sft".into()),
            from_job: None,
        });
        a.status = Some(serde_json::from_value(serde_json::json!({
            "phase": "Failed",
            "conditions": [{"type": "Verified", "status": "False", "reason": "BaseModelMismatch",
                "message": "adapter for another base model", "lastTransitionTime": "2026-11-27T00:00:00Z"}]
        })).unwrap());
        let why = adapter_uri(&a, None).unwrap_err();
        assert_eq!(
            why,
            "Adapter sft failed verification (BaseModelMismatch: adapter for another base model)"
        );
    }

    #[test]
    fn a_job_source_points_at_that_jobs_output_once_it_succeeded() {
        let a = adapter(AdapterSource {
            uri: None,
            from_job: Some("smollm2-kubectl".into()),
        });
        let done = job(Some(JobPhase::Succeeded));
        assert_eq!(
            adapter_uri(&a, Some(&done)).unwrap(),
            "pvc://smollm2-kubectl-storage/smollm2-kubectl/output"
        );
        let running = adapter_uri(&a, Some(&job(Some(JobPhase::Running)))).unwrap_err();
        assert!(
            running.contains("has not succeeded yet (phase Running)"),
            "{running}"
        );
        let missing = adapter_uri(&a, None).unwrap_err();
        assert!(missing.contains("does not exist"), "{missing}");
    }

    #[test]
    fn only_a_ready_adapter_of_the_same_job_uid_is_used() {
        let mut a = adapter(AdapterSource {
            uri: Some("pvc://adapters/sft".into()),
            from_job: None,
        });
        a.status.as_mut().unwrap().phase = Some(AdapterPhase::Pending);
        let pending = adapter_uri(&a, None).unwrap_err();
        assert!(pending.contains("is Pending, not Ready"), "{pending}");
        let a = adapter(AdapterSource {
            uri: None,
            from_job: Some("smollm2-kubectl".into()),
        });
        let mut recreated = job(Some(JobPhase::Succeeded));
        recreated.metadata.uid = Some("uid-new".into());
        let why = adapter_uri(&a, Some(&recreated)).unwrap_err();
        assert!(
            why.contains("UID uid-producer") && why.contains("now has UID uid-new"),
            "{why}"
        );
    }
}
