//! The pure middle of a job's reconcile: from what `dereference` read to the writes that bring
//! the job's children and status in line, and when to look again. No apiserver here, so every
//! reconcile outcome, the races included, is a unit test.

use std::sync::Arc;
use std::time::Duration;

use finetune_crds::contract::{StatusReport, TerminationMessage};
use finetune_crds::{FinetuneJob, FinetuneJobStatus, JobPhase};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;

use crate::api::stamp_hash;
use crate::conditions::Transition;
use crate::finetunejob::status::{self, Action, Outcome};
use crate::finetunejob::{attempts, build};
use crate::gate::Priority;
use crate::pods::{BuildError, BuildSettings};

/// What a reconcile read about one job.
pub struct Observed {
    /// The job, with our last status write if the cache has not caught up with it.
    pub job: Arc<FinetuneJob>,
    /// Its trainer pods: cached, created by us but not yet watched, or confirmed by a GET.
    pub pods: Vec<Pod>,
    /// The running trainer's latest `/status` report.
    pub report: Option<StatusReport>,
    /// The applied-hash of the manifest ConfigMap as cached (or as we last applied it).
    pub manifest_hash: Option<String>,
    /// The applied-hash of the storage claim as cached (or as we last applied it).
    pub claim_hash: Option<String>,
    /// Where the files of `spec.adapter.initAdapter` are, or why they cannot be used yet; looked
    /// up only when this reconcile creates a pod (see [`starting_adapter_needed`]).
    pub init_adapter: Option<Result<String, String>>,
    /// Why Kueue has not admitted the latest attempt's gated gang (its Workload's reason and
    /// message), when read.
    pub admission: Option<String>,
    /// The time the plan is made for.
    pub now: Timestamp,
}

/// A storage child to apply: its cached copy is missing or was applied from other content.
#[derive(Clone, Debug, PartialEq)]
pub enum StaleStorage {
    /// The manifest ConfigMap.
    Map(Box<ConfigMap>),
    /// The storage claim.
    Claim(Box<PersistentVolumeClaim>),
}

/// What happens to the trainer pods.
#[derive(Clone, Debug, PartialEq)]
pub enum PodChange {
    /// Nothing.
    None,
    /// Create pods of this attempt: its only pod, a gang's rank 0, or a gang's other ranks.
    Create {
        /// The attempt's index.
        attempt: i32,
        /// The pods, with the starting adapter mounted.
        pods: Vec<Pod>,
    },
    /// The attempt's pod is due but its starting adapter cannot be used yet (why): say so on
    /// the job and retry with backoff.
    InitAdapterUnavailable(String),
    /// Delete these pods with the termination grace (suspend, deadline, the rest of an ended
    /// gang): the trainer checkpoints on SIGTERM.
    Delete(Vec<String>),
}

/// When to reconcile again, unless something changes first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Only when something changes.
    OnChange,
    /// After this long.
    After(Duration),
    /// At `time`, and not sooner than `at_least` from when the writes are done.
    At {
        /// When.
        time: Timestamp,
        /// The least wait.
        at_least: Duration,
    },
}

/// The writes of one reconcile, in the order `apply` makes them, and its bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Storage children to apply (beside the pod change: neither waits for the other).
    pub storage: Vec<StaleStorage>,
    /// The trainer pod change.
    pub pod: PodChange,
    /// The status to write, when it differs from the job's.
    pub status: Option<FinetuneJobStatus>,
    /// Failed pods to delete, once their attempts are in the status written.
    pub prune: Vec<String>,
    /// The succeeded trainer's report, to register the Adapter it produced.
    pub register: Option<TerminationMessage>,
    /// `ttlSecondsAfterFinished` has passed: delete the job.
    pub delete_job: bool,
    /// Events to publish, one per transition.
    pub transitions: Vec<Transition>,
    /// A failure or a retry to count.
    pub outcome: Option<Outcome>,
    /// The job's phase, for the phase gauge.
    pub phase: Option<JobPhase>,
    /// When to look again.
    pub requeue: Requeue,
}

impl Plan {
    /// Whether the plan writes nothing to the apiserver (Events aside: they are queued): such a
    /// reconcile needs no write slot.
    pub fn is_empty(&self) -> bool {
        self.storage.is_empty()
            && self.pod == PodChange::None
            && self.status.is_none()
            && self.prune.is_empty()
            && self.register.is_none()
            && !self.delete_job
    }

    /// The slot class of the writes: a job's pod is what users wait for.
    pub fn priority(&self) -> Priority {
        match self.pod {
            PodChange::Create { .. } | PodChange::InitAdapterUnavailable(_) => Priority::Urgent,
            _ => Priority::Routine,
        }
    }
}

/// Pod names of the attempts on record that have not ended and whose pods `cached` lacks: just
/// created and not yet watched, or really gone. `dereference` asks the apiserver for each
/// before `plan` may count it as gone (a preemption): after a failover the caches start empty.
pub fn pods_to_confirm(job: &FinetuneJob, cached: &[Pod]) -> Vec<String> {
    let mut names: Vec<String> = attempts::unended_attempts_without_pods(job, cached)
        .into_iter()
        .map(|record| record.pod_name.clone())
        .collect();
    for member in attempts::unended_members_without_pods(job, cached) {
        if !names.contains(&member) {
            names.push(member);
        }
    }
    names
}

/// The Adapter named by `spec.adapter.initAdapter` when this reconcile will create a trainer
/// pod, so `dereference` looks it up then and only then.
pub fn starting_adapter_needed<'a>(
    job: &'a FinetuneJob,
    pods: &[Pod],
    report: Option<&StatusReport>,
    now: Timestamp,
) -> Option<&'a str> {
    let adapter = job.spec.adapter.init_adapter.as_deref()?;
    let derived = status::derive(job, pods, report, now);
    let creates = matches!(
        derived.action,
        Action::CreatePod(_) | Action::CreateMembers { .. }
    );
    creates.then_some(adapter)
}

/// The writes that bring `observed` in line with its job's spec, and when to look again.
pub fn plan(
    observed: &Observed,
    settings: &BuildSettings,
    failed_pods_to_keep: usize,
) -> Result<Plan, BuildError> {
    let job = observed.job.as_ref();
    let now = observed.now;
    let phase_before = job.status.as_ref().and_then(|s| s.phase);
    let derived = status::derive_queued(
        job,
        &observed.pods,
        observed.report.as_ref(),
        observed.admission.as_deref(),
        now,
    );
    // A finished job's storage is left as it is: its output is read from there.
    let storage = if matches!(phase_before, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        Vec::new()
    } else {
        stale_storage(observed, settings)?
    };
    let create = |attempt: i32, ranks: std::ops::Range<i32>, master: Option<&str>| match &observed
        .init_adapter
    {
        Some(Err(why)) => Ok(PodChange::InitAdapterUnavailable(why.clone())),
        resolved => {
            let init = resolved.as_ref().and_then(|uri| uri.as_deref().ok());
            let pods = ranks
                .map(|rank| {
                    let member = build::Member {
                        attempt,
                        rank,
                        master_addr: master,
                    };
                    build::member_pod(job, &member, settings, init)
                })
                .collect::<Result<_, _>>()?;
            Ok::<_, BuildError>(PodChange::Create { attempt, pods })
        }
    };
    let pod = match &derived.action {
        Action::CreatePod(attempt) => create(*attempt, 0..1, None)?,
        Action::CreateMembers {
            attempt,
            master_addr,
        } => create(*attempt, 1..job.spec.resources.nodes, Some(master_addr))?,
        Action::DeletePods(names) => PodChange::Delete(names.clone()),
        Action::PollProgress(_) | Action::Wait => PodChange::None,
    };
    let phase = derived.status.phase;
    let register = (phase == Some(JobPhase::Succeeded))
        .then(|| attempts::succeeded_termination(&observed.pods))
        .flatten();
    let prune =
        attempts::failed_pods_to_prune(&observed.pods, &derived.status, failed_pods_to_keep);
    let ttl_expiry = status::ttl_expiry(job, &derived.status);
    let delete_job = ttl_expiry.is_some_and(|at| at <= now);
    let requeue = match (ttl_expiry, &derived.status.next_retry_time) {
        (Some(_), _) if delete_job => Requeue::OnChange,
        (Some(expiry), _) => Requeue::At {
            time: expiry,
            at_least: Duration::ZERO,
        },
        // Backing off: come back when the next attempt is due.
        (None, Some(at)) => Requeue::At {
            time: at.0,
            at_least: Duration::from_millis(100),
        },
        (None, None) => match phase {
            Some(JobPhase::Running) => Requeue::After(Duration::from_secs(10)),
            Some(JobPhase::Pending | JobPhase::Queued) => Requeue::After(Duration::from_secs(30)),
            _ => Requeue::OnChange,
        },
    };
    Ok(Plan {
        storage,
        pod,
        status: (job.status.as_ref() != Some(&derived.status)).then(|| derived.status.clone()),
        prune,
        register,
        delete_job,
        outcome: status::outcome(phase_before, &derived),
        transitions: derived.transitions,
        phase,
        requeue,
    })
}

/// The manifest ConfigMap and the storage claim whose applied copy is missing or was applied
/// from different content. Applying them is self-healing, never duplicates, and nothing when
/// nothing changed.
fn stale_storage(
    observed: &Observed,
    settings: &BuildSettings,
) -> Result<Vec<StaleStorage>, BuildError> {
    let job = observed.job.as_ref();
    let mut stale = Vec::new();
    let mut map = build::manifest_config_map(job)?;
    if Some(stamp_hash(&mut map)) != observed.manifest_hash {
        stale.push(StaleStorage::Map(Box::new(map)));
    }
    if let Some(mut claim) = build::storage_claim(job, settings)?
        && Some(stamp_hash(&mut claim)) != observed.claim_hash
    {
        stale.push(StaleStorage::Claim(Box::new(claim)));
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::contract::env;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use crate::api::APPLIED_HASH_ANNOTATION;
    use crate::finetunejob::attempts::fixtures::{self, now};

    fn job(example: &str) -> FinetuneJob {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(example);
        let text = std::fs::read_to_string(path).unwrap();
        let mut job: FinetuneJob = finetune_crds::parse_manifest(&text, example).unwrap();
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("0b5c7a4e-1111-2222-3333-444455556666".into());
        job.metadata.generation = Some(1);
        job
    }

    fn pod(job: &FinetuneJob, attempt: i32, phase: &str) -> Pod {
        fixtures::named_pod(job.metadata.name.as_deref().unwrap(), attempt, phase)
    }

    fn exited(pod: Pod, code: i32, at: Timestamp) -> Pod {
        fixtures::finished(fixtures::exited(pod, code, "Error", None), at)
    }

    fn observed(job: &FinetuneJob, pods: Vec<Pod>) -> Observed {
        Observed {
            job: Arc::new(job.clone()),
            pods,
            report: None,
            manifest_hash: None,
            claim_hash: None,
            init_adapter: None,
            admission: None,
            now: now(),
        }
    }

    fn plan_for(observed: &Observed) -> Plan {
        plan(observed, &BuildSettings::default(), 1).unwrap()
    }

    fn applied_hashes(storage: &[StaleStorage]) -> (Option<String>, Option<String>) {
        let hash = |meta: &ObjectMeta| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(APPLIED_HASH_ANNOTATION).cloned())
        };
        let mut hashes = (None, None);
        for child in storage {
            match child {
                StaleStorage::Map(map) => hashes.0 = hash(&map.metadata),
                StaleStorage::Claim(claim) => hashes.1 = hash(&claim.metadata),
            }
        }
        hashes
    }

    #[test]
    fn a_new_job_gets_its_storage_and_attempt_zero_in_an_urgent_slot() {
        let job = job("sft-lora-smollm2.yaml");
        let plan = plan_for(&observed(&job, Vec::new()));
        assert_eq!(plan.storage.len(), 2, "manifest ConfigMap and claim");
        let PodChange::Create { attempt, pods } = &plan.pod else {
            panic!("{:?}", plan.pod);
        };
        assert_eq!(*attempt, 0);
        assert_eq!(
            pods,
            &[build::trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap()]
        );
        assert_eq!(plan.status.as_ref().unwrap().phase, Some(JobPhase::Pending));
        assert_eq!(plan.priority(), Priority::Urgent);
        assert_eq!(plan.requeue, Requeue::After(Duration::from_secs(30)));
        assert!(!plan.is_empty());
    }

    #[test]
    fn a_reconcile_that_finds_its_writes_in_place_writes_nothing() {
        let mut job = job("sft-lora-smollm2.yaml");
        let created = plan_for(&observed(&job, Vec::new()));
        let (manifest_hash, claim_hash) = applied_hashes(&created.storage);
        job.status = created.status;
        let running = vec![pod(&job, 0, "Running")];
        let started = plan_for(&observed(&job, running.clone()));
        job.status = started.status;
        let mut steady = observed(&job, running);
        steady.manifest_hash = manifest_hash;
        steady.claim_hash = claim_hash;
        let plan = plan_for(&steady);
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan.priority(), Priority::Routine);
        assert!(plan.transitions.is_empty() && plan.outcome.is_none());
        assert_eq!(plan.requeue, Requeue::After(Duration::from_secs(10)));
        // A storage child someone replaced (its hash gone) is applied again, alone.
        steady.claim_hash = None;
        let plan = plan_for(&steady);
        assert!(matches!(plan.storage[..], [StaleStorage::Claim(_)]));
        assert_eq!((plan.pod, plan.status), (PodChange::None, None));
    }

    #[test]
    fn a_pod_evicted_before_it_was_first_seen_is_a_preemption_not_attempt_zero_again() {
        let mut job = job("sft-lora-smollm2.yaml");
        job.status = plan_for(&observed(&job, Vec::new())).status;
        // dereference asks the apiserver for the pod the cache lacks before it counts as gone.
        assert_eq!(
            pods_to_confirm(&job, &[]),
            ["smollm2-kubectl-sft-attempt-0"]
        );
        // The GET found nothing: evicted before the watch ever delivered it.
        let plan = plan_for(&observed(&job, Vec::new()));
        assert!(
            matches!(plan.pod, PodChange::Create { attempt: 1, .. }),
            "{:?}",
            plan.pod
        );
        assert_eq!(
            plan.outcome,
            Some(Outcome::Retried {
                attempt: 1,
                reason: "Preempted".into()
            })
        );
        let status = plan.status.unwrap();
        assert_eq!((status.preemptions, status.failed_attempts), (1, 0));
    }

    #[test]
    fn after_a_failover_an_unended_attempt_missing_from_the_empty_cache_is_confirmed_first() {
        let mut job = job("sft-lora-smollm2.yaml");
        job.status = plan_for(&observed(&job, Vec::new())).status;
        let running = pod(&job, 0, "Running");
        job.status = plan_for(&observed(&job, vec![running.clone()])).status;
        // The new leader's caches are empty: the running attempt is asked for, not recreated.
        assert_eq!(
            pods_to_confirm(&job, &[]),
            ["smollm2-kubectl-sft-attempt-0"]
        );
        assert!(pods_to_confirm(&job, std::slice::from_ref(&running)).is_empty());
        let mut confirmed = observed(&job, vec![running]);
        let (map, claim) = applied_hashes(&plan_for(&confirmed).storage);
        (confirmed.manifest_hash, confirmed.claim_hash) = (map, claim);
        let plan = plan_for(&confirmed);
        assert_eq!(plan.pod, PodChange::None);
        assert!(plan.is_empty() && plan.outcome.is_none(), "{plan:?}");
    }

    #[test]
    fn a_suspended_jobs_pod_gets_sigterm_and_its_exit_starts_no_new_attempt() {
        let mut job = job("sft-lora-smollm2.yaml");
        job.spec.run_policy.suspend = true;
        let running = pod(&job, 0, "Running");
        let plan = plan_for(&observed(&job, vec![running.clone()]));
        assert_eq!(
            plan.pod,
            PodChange::Delete(vec!["smollm2-kubectl-sft-attempt-0".into()])
        );
        assert_eq!(plan.priority(), Priority::Routine);
        job.status = plan.status;
        let stopped = exited(pod(&job, 0, "Failed"), 143, now());
        let plan = plan_for(&observed(&job, vec![stopped]));
        assert_eq!(plan.pod, PodChange::None);
        assert_eq!(plan.outcome, None);
        assert_eq!(plan.phase, Some(JobPhase::Suspended));
    }

    #[test]
    fn the_starting_adapter_is_looked_up_for_a_new_pod_only_and_mounted_or_reported() {
        let job = job("dpo-smollm2.yaml");
        assert_eq!(
            starting_adapter_needed(&job, &[], None, now()),
            Some("smollm2-kubectl")
        );
        let running = pod(&job, 0, "Running");
        let mut started = job.clone();
        started.status = plan_for(&observed(&job, vec![running.clone()])).status;
        assert_eq!(
            starting_adapter_needed(&started, &[running], None, now()),
            None
        );
        let without = self::job("sft-lora-smollm2.yaml");
        assert_eq!(starting_adapter_needed(&without, &[], None, now()), None);

        let mut found = observed(&job, Vec::new());
        found.init_adapter = Some(Ok("pvc://adapters/team/sft".into()));
        let PodChange::Create { mut pods, .. } = plan_for(&found).pod else {
            panic!("a pod is created");
        };
        let dir = pods.remove(0).spec.unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == env::INIT_ADAPTER_DIR)
            .and_then(|e| e.value.clone());
        assert_eq!(dir.as_deref(), Some("/mnt/pvc/adapters/team/sft"));

        let mut missing = observed(&job, Vec::new());
        missing.init_adapter = Some(Err("Adapter smollm2-kubectl does not exist".into()));
        let plan = plan_for(&missing);
        assert_eq!(
            plan.pod,
            PodChange::InitAdapterUnavailable("Adapter smollm2-kubectl does not exist".into())
        );
        assert_eq!(plan.priority(), Priority::Urgent);
    }

    #[test]
    fn a_finished_job_is_deleted_once_its_ttl_has_passed_and_woken_for_it_before() {
        let mut job = job("sft-lora-smollm2.yaml");
        job.spec.run_policy.ttl_seconds_after_finished = Some(30);
        let finished_at = |ago: u64| FinetuneJobStatus {
            phase: Some(JobPhase::Succeeded),
            completion_time: Some(Time(now().checked_sub(Duration::from_secs(ago)).unwrap())),
            observed_generation: Some(1),
            ..FinetuneJobStatus::default()
        };
        job.status = Some(finished_at(31));
        let plan = plan_for(&observed(&job, Vec::new()));
        assert!(plan.delete_job && plan.storage.is_empty());
        assert_eq!(plan.requeue, Requeue::OnChange);
        job.status = Some(finished_at(10));
        let plan = plan_for(&observed(&job, Vec::new()));
        assert!(!plan.delete_job);
        assert_eq!(
            plan.requeue,
            Requeue::At {
                time: now().checked_add(Duration::from_secs(20)).unwrap(),
                at_least: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_crashed_attempt_backs_off_and_is_woken_when_its_retry_is_due() {
        let mut job = job("sft-lora-smollm2.yaml");
        job.spec.run_policy.backoff_limit = 3;
        let ended = now().checked_sub(Duration::from_secs(4)).unwrap();
        let crashed = exited(pod(&job, 0, "Failed"), 1, ended);
        let plan = plan_for(&observed(&job, vec![crashed]));
        assert_eq!(plan.pod, PodChange::None);
        let due = plan
            .status
            .as_ref()
            .unwrap()
            .next_retry_time
            .clone()
            .unwrap();
        assert_eq!(
            plan.requeue,
            Requeue::At {
                time: due.0,
                at_least: Duration::from_millis(100)
            }
        );
    }
}
