//! Every read of a job's reconcile: the child caches with our writes they have not delivered,
//! a GET for each pod on record the cache lacks, the trainer's progress report, and the
//! Adapter a new pod starts from. What is read here, `plan` decides on without a server.

use std::sync::Arc;

use finetune_crds::contract::DEFAULT_STATUS_PORT;
use finetune_crds::{Adapter, FinetuneJob};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, ResourceExt};

use super::context::Context;
use super::plan::{self, Observed};
use crate::api::applied_hash;
use crate::error::Error;
use crate::finetunejob::{attempts, gang, gang_pod, init_adapter, names};

/// Reads what `plan` needs about `job` (the freshest copy of it).
pub(super) async fn dereference(ctx: &Context, job: Arc<FinetuneJob>) -> Result<Observed, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let key = format!("{namespace}/{name}");
    let mut pods = cached_pods(ctx, &job, &namespace);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for pod_name in plan::pods_to_confirm(&job, &pods) {
        if let Some(pod) = pods_api.get_opt(&pod_name).await?
            && owned_by(&pod, &job)
        {
            pods.push(pod);
        }
    }
    let report = match running_trainer_address(&pods) {
        Some(address) => ctx.progress.report(&key, &address),
        None => None,
    };
    let admission = kueue_admission(ctx, &namespace, &pods).await;
    let now = Timestamp::now();
    let init_adapter = match plan::starting_adapter_needed(&job, &pods, report.as_ref(), now) {
        Some(adapter) => Some(init_adapter_uri(ctx, &namespace, adapter).await?),
        None => None,
    };
    let caches = &ctx.caches;
    let manifest_hash = applied_hash(
        &caches.maps,
        &caches.maps_written,
        &names::manifest_config_map(&name),
        &namespace,
    );
    let claim_hash = applied_hash(
        &caches.claims,
        &caches.claims_written,
        &names::storage_claim(&name),
        &namespace,
    );
    Ok(Observed {
        job,
        pods,
        report,
        manifest_hash,
        claim_hash,
        init_adapter,
        admission,
        now,
    })
}

/// Why Kueue has not admitted the newest attempt, when its rank 0 is held by scheduling gates
/// and belongs to a Kueue pod group: the reason and message of the group's Workload (one GET,
/// only while gated). `None` when there is nothing to read or it cannot be read (Kueue not
/// installed, no permission): the job then says only that its pods are gated.
async fn kueue_admission(ctx: &Context, namespace: &str, pods: &[Pod]) -> Option<String> {
    let newest = newest_rank_zero(pods)?;
    let group = newest.labels().get(gang_pod::KUEUE_GROUP_LABEL)?;
    if !attempts::gated(newest) {
        return None;
    }
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", "Workload"),
        "workloads",
    );
    let workloads: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &resource);
    match workloads.get_opt(group).await {
        Ok(Some(workload)) => Some(gang::admission_message(&workload.data)),
        Ok(None) => Some(format!(
            "Kueue has not made Workload {group} yet (it does so once the group's first pod exists)"
        )),
        Err(error) => {
            tracing::debug!(%error, group, "cannot read Kueue's Workload");
            None
        }
    }
}

fn owned_by(pod: &Pod, job: &FinetuneJob) -> bool {
    let uid = job.uid();
    pod.owner_references()
        .iter()
        .any(|owner| Some(&owner.uid) == uid.as_ref())
}

/// The job's trainer pods in the cache, and those we created that the watch has not delivered.
fn cached_pods(ctx: &Context, job: &FinetuneJob, namespace: &str) -> Vec<Pod> {
    let name = job.name_any();
    let of_this_job = |pod: &Pod| {
        pod.namespace().as_deref() == Some(namespace)
            && pod.labels().get(names::JOB_LABEL) == Some(&name)
            && owned_by(pod, job)
    };
    let mut pods: Vec<Pod> = ctx
        .caches
        .pods
        .state_filter(of_this_job)
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    for created in ctx.caches.pods_written.matching(of_this_job) {
        if !pods.iter().any(|pod| pod.name_any() == created.name_any()) {
            pods.push(Arc::unwrap_or_clone(created));
        }
    }
    pods
}

/// The storage URI of the Adapter a job starts from, or why there is none yet.
async fn init_adapter_uri(
    ctx: &Context,
    namespace: &str,
    adapter: &str,
) -> Result<Result<String, String>, Error> {
    let adapters: Api<Adapter> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(found) = adapters.get_opt(adapter).await? else {
        return Ok(Err(format!(
            "Adapter {adapter} does not exist in namespace {namespace}"
        )));
    };
    let producer = match &found.spec.source.from_job {
        Some(job) => {
            let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), namespace);
            jobs.get_opt(job).await?
        }
        None => None,
    };
    Ok(init_adapter::adapter_uri(&found, producer.as_ref()))
}

/// The newest attempt's first pod (a gang's rank 0): the one that reports and the one Kueue
/// admits first.
fn newest_rank_zero(pods: &[Pod]) -> Option<&Pod> {
    pods.iter().max_by_key(|pod| {
        let attempt = attempts::attempt_of(pod).unwrap_or(-1);
        (attempt, std::cmp::Reverse(attempts::rank_of(pod)))
    })
}

/// `ip:port` (`[ip]:port` for IPv6) of the newest trainer pod when it is running: a gang's
/// rank 0, which reports the group (every step ends in an all-reduce that no rank leaves
/// before all have reached it, so its step is the slowest rank's).
fn running_trainer_address(pods: &[Pod]) -> Option<String> {
    let newest = newest_rank_zero(pods)?;
    let status = newest.status.as_ref()?;
    (status.phase.as_deref() == Some("Running")).then_some(())?;
    let ip: std::net::IpAddr = status.pod_ip.as_ref()?.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, DEFAULT_STATUS_PORT).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(attempt: i32, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("j-attempt-{attempt}"),
                         "labels": {names::ATTEMPT_LABEL: attempt.to_string()}},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    #[test]
    fn the_newest_running_trainers_address_is_ipv4_or_bracketed_ipv6() {
        assert_eq!(
            running_trainer_address(&[running(0, "10.0.0.1"), running(1, "10.0.0.2")]).as_deref(),
            Some("10.0.0.2:8080")
        );
        assert_eq!(
            running_trainer_address(&[running(0, "fd00::2a")]).as_deref(),
            Some("[fd00::2a]:8080")
        );
        assert_eq!(running_trainer_address(&[running(0, "not-an-ip")]), None);
    }
}
