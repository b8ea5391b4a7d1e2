//! `make bench-operator`, churn scenario: many FinetuneJobs run to the end on kwok GPU nodes
//! while 10 % of first attempts fail (exit 1, charged to `backoffLimit`, retried after the 10 s
//! backoff) or are evicted through the Eviction API (a preemption: retried at once, not
//! charged). The bench plays kubelet: each pod runs for `BENCH_RUN_SECONDS` and then exits as
//! planned. Every job must reach a terminal phase.
//!
//! Reports the time to drain (first create → every job Succeeded or Failed), the retries the
//! operator made against those it should have made, failed attempts and preemptions as the jobs'
//! status counts them, pods beyond the expected one per attempt, and the operator's peak RSS and
//! CPU seconds. Prints a table and writes JSON.
//!
//! Needs a running cluster with the nodes already created and env: KUBECONFIG,
//! FINETUNE_OPERATOR_BIN; optional BENCH_JOBS (1000), BENCH_RATE (jobs/s, 20), BENCH_OUT,
//! BENCH_RUN_SECONDS (3).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finetune_crds::{FinetuneJob, JobPhase};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::{
    NAMESPACE, cpu_seconds, job_template, operator_log_path, peak_rss_from_status,
    prepare_namespace, rss_kib, start_operator,
};

/// One job in this many has its first attempt fail with exit 1; as many others are evicted.
const DISRUPT_ONE_IN: usize = 20;

/// What the bench does to a job's first attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Succeed,
    Fail,
    Evict,
}

fn fate(job_index: usize, attempt: i32) -> Fate {
    match (attempt, job_index % DISRUPT_ONE_IN) {
        (0, 0) => Fate::Fail,
        (0, 10) => Fate::Evict,
        _ => Fate::Succeed,
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let jobs_wanted: usize = env_or("BENCH_JOBS", 1000);
    let rate: f64 = env_or("BENCH_RATE", 20.0);
    let run_for = Duration::from_secs_f64(env_or("BENCH_RUN_SECONDS", 3.0));
    let operator_bin = std::env::var("FINETUNE_OPERATOR_BIN").expect("set FINETUNE_OPERATOR_BIN");
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "operator-churn.json".into());
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points at the bench cluster");
    prepare_namespace(&client).await;
    let mut operator = start_operator(&operator_bin, &operator_log_path(&out));
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(pid);

    // The kubelet's part: every pod that starts running ends `run_for` later as planned.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pods_seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let injected: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    {
        let (pods_api, pods_seen, injected) =
            (pods_api.clone(), pods_seen.clone(), injected.clone());
        let stream = watcher(pods_api.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut handled = HashSet::new();
            let mut stream = stream.boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                let name = pod.name_any();
                // By UID: a pod deleted and created again under its name is a second pod.
                let uid = pod.uid().unwrap_or_default();
                pods_seen.lock().unwrap().insert(uid.clone());
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if !running || pod.metadata.deletion_timestamp.is_some() || !handled.insert(uid) {
                    continue;
                }
                let Some((index, attempt)) = job_and_attempt(&pod) else {
                    continue;
                };
                let (pods_api, injected) = (pods_api.clone(), injected.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(run_for).await;
                    let fate = fate(index, attempt);
                    let label = match fate {
                        Fate::Succeed => "succeeded",
                        Fate::Fail => "failed",
                        Fate::Evict => "evicted",
                    };
                    let done = match fate {
                        Fate::Evict => pods_api
                            .evict(&name, &EvictParams::default())
                            .await
                            .map(|_| ()),
                        Fate::Succeed | Fate::Fail => pods_api
                            .patch_status(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(exited(fate == Fate::Fail)),
                            )
                            .await
                            .map(|_| ()),
                    };
                    match done {
                        Ok(()) => *injected.lock().unwrap().entry(label).or_default() += 1,
                        Err(error) => eprintln!("\nbench: {label} {name}: {error}"),
                    }
                });
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let template = job_template();
    let jobs_api: Api<FinetuneJob> = Api::namespaced(client.clone(), NAMESPACE);
    let start = Instant::now();
    stream::iter(0..jobs_wanted)
        .map(|i| {
            let (api, mut job) = (jobs_api.clone(), template.clone());
            job.metadata.name = Some(format!("churn-{i:04}"));
            async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into())
                    .await;
                api.create(&PostParams::default(), &job)
                    .await
                    .expect("job created");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let create_seconds = start.elapsed().as_secs_f64();
    eprintln!("bench: {jobs_wanted} jobs created in {create_seconds:.1}s at {rate} jobs/s");

    // Drained: every job is Succeeded or Failed.
    let mut peak_rss_kib = 0;
    let deadline = Instant::now() + Duration::from_secs(1200);
    let jobs = loop {
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid));
        let jobs = jobs_api
            .list(&ListParams::default().match_any())
            .await
            .unwrap()
            .items;
        let terminal = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.status.as_ref().and_then(|s| s.phase),
                    Some(JobPhase::Succeeded | JobPhase::Failed)
                )
            })
            .count();
        let running = pods_seen.lock().unwrap().len();
        eprint!(
            "\rbench: {:>6.1}s  terminal {terminal:>4} of {jobs_wanted}  pods seen {running:>4}",
            start.elapsed().as_secs_f64()
        );
        if terminal >= jobs_wanted {
            eprintln!();
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not drain within 20 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let drain_seconds = start.elapsed().as_secs_f64();
    peak_rss_kib = peak_rss_kib.max(peak_rss_from_status(pid));
    let cpu = cpu_seconds(pid) - cpu_before;
    let _ = operator.kill();
    let _ = operator.wait();

    let count = |phase| {
        jobs.iter()
            .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(phase))
            .count()
    };
    let (succeeded, failed) = (count(JobPhase::Succeeded), count(JobPhase::Failed));
    let status_sum = |f: fn(&finetune_crds::FinetuneJobStatus) -> i64| -> i64 {
        jobs.iter().filter_map(|j| j.status.as_ref()).map(f).sum()
    };
    let retries = status_sum(|s| s.attempts.len().saturating_sub(1) as i64);
    let failed_attempts = status_sum(|s| i64::from(s.failed_attempts));
    let preemptions = status_sum(|s| i64::from(s.preemptions));
    // Jobs whose counters differ from what was done to them.
    let miscounted = jobs
        .iter()
        .filter(|j| {
            let index = j
                .name_any()
                .trim_start_matches("churn-")
                .parse::<usize>()
                .unwrap_or(0);
            let status = j.status.clone().unwrap_or_default();
            let (want_failed, want_preempted) = match fate(index, 0) {
                Fate::Fail => (1, 0),
                Fate::Evict => (0, 1),
                Fate::Succeed => (0, 0),
            };
            (status.failed_attempts, status.preemptions) != (want_failed, want_preempted)
        })
        .count();
    let disrupted = (0..jobs_wanted)
        .filter(|&i| fate(i, 0) != Fate::Succeed)
        .count();
    let pods_created = pods_seen.lock().unwrap().len();
    let extra_pods = pods_created.saturating_sub(jobs_wanted + disrupted);
    let injected = injected.lock().unwrap().clone();

    let result = json!({
        "scenario": format!(
            "churn: {rate} jobs/s, {}% of first attempts fail or are evicted",
            2 * 100 / DISRUPT_ONE_IN
        ),
        "jobs": jobs_wanted, "create_seconds": create_seconds,
        "pod_run_seconds": run_for.as_secs_f64(),
        "drain_seconds": drain_seconds, "succeeded": succeeded, "failed": failed,
        "injected": injected, "retries": retries, "expected_retries": disrupted,
        "failed_attempts": failed_attempts, "preemptions": preemptions,
        "jobs_with_wrong_counters": miscounted,
        "pods_created": pods_created, "extra_pods": extra_pods,
        "operator_peak_rss_mib": peak_rss_kib as f64 / 1024.0, "operator_cpu_seconds": cpu,
        "targets": {"terminal_jobs": jobs_wanted, "extra_pods": 0, "operator_peak_rss_mib": 64.0},
    });
    println!(
        "\nchurn: {jobs_wanted} jobs at {rate} jobs/s, pods run {:.0} s, 1 in {} first attempts fails (exit 1) and 1 in {} is evicted\n",
        run_for.as_secs_f64(),
        DISRUPT_ONE_IN,
        DISRUPT_ONE_IN
    );
    println!("| metric | value | target |\n|---|---|---|");
    println!(
        "| terminal jobs (Succeeded / Failed) | {} ({succeeded} / {failed}) | {jobs_wanted} |",
        succeeded + failed
    );
    println!("| time to drain | {drain_seconds:.1} s after the first create | |");
    println!(
        "| injected: succeeded / failed / evicted | {} / {} / {} | |",
        injected.get("succeeded").unwrap_or(&0),
        injected.get("failed").unwrap_or(&0),
        injected.get("evicted").unwrap_or(&0)
    );
    println!("| retries (attempts after the first) | {retries} | {disrupted} |");
    println!(
        "| failed attempts / preemptions in status | {failed_attempts} / {preemptions} | {} / {} |",
        disrupted / 2,
        disrupted - disrupted / 2
    );
    println!("| jobs with wrong counters | {miscounted} | 0 |");
    println!(
        "| pods created / beyond one per attempt | {pods_created} / {extra_pods} | {} / 0 |",
        jobs_wanted + disrupted
    );
    println!(
        "| operator peak RSS | {:.1} MiB | < 64 MiB |",
        peak_rss_kib as f64 / 1024.0
    );
    println!("| operator CPU | {cpu:.1} s | |");
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap()).expect("JSON written");
    println!("\nwrote {out}");
}

/// The bench job's index and the pod's attempt, from its labels.
fn job_and_attempt(pod: &Pod) -> Option<(usize, i32)> {
    let labels = pod.metadata.labels.as_ref()?;
    let index = labels
        .get("finetune.dev/job")?
        .strip_prefix("churn-")?
        .parse()
        .ok()?;
    let attempt = labels.get("finetune.dev/attempt")?.parse().ok()?;
    Some((index, attempt))
}

/// The status a kubelet writes when the trainer exits (0, or 1 for a charged failure).
fn exited(failed: bool) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let (phase, code, reason) = if failed {
        ("Failed", 1, "Error")
    } else {
        ("Succeeded", 0, "Completed")
    };
    json!({"status": {"phase": phase, "containerStatuses": [{
        "name": "trainer", "image": "trainer", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": {
            "exitCode": code, "reason": reason, "startedAt": now, "finishedAt": now}}}]}})
}
