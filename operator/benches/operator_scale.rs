//! `make bench-operator`: many FinetuneJobs against many kwok GPU nodes on the real control plane.
//!
//! Measures, for the operator as a separate process: latency from each job's creation (as the
//! client saw its create return) to its trainer pod's creation, read from the operator's log
//! (when its create call returned, sub-second, on the same machine's clock), p50/p99/max; the
//! same latency as the bench's own pod watch sees it and on the apiserver's clock (whole
//! seconds of creationTimestamp); the job's first status; the create calls' own latency; the
//! time until every job is placed (pod bound to a node) or reported Queued; the operator's peak
//! RSS and CPU seconds from /proc; lost or duplicated pods; and, to say where the machine's
//! cores went, the CPU of each control-plane process and the apiserver's requests by verb and
//! resource. Prints a table and writes JSON.
//!
//! Needs a running cluster with the nodes already created (the Makefile target does both) and
//! env: KUBECONFIG, FINETUNE_OPERATOR_BIN; optional BENCH_JOBS (1000), BENCH_OUT, BENCH_RATE
//! (jobs/s: creates are paced, job i sent i/rate seconds after the first; unset = a burst).
//!
//! Two scenarios, because they answer different questions. Paced creation at a rate far above
//! any real submission rate measures the operator's own latency. A burst of 1000 measures the
//! backlog: on one small machine the apiserver and etcd take a bounded number of writes per
//! second, shared by the bench's creates, the operator's manifest ConfigMaps, pods, status
//! writes and Events, the scheduler's bindings and kwok's pod status updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finetune_crds::{FinetuneJob, JobPhase};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

mod support;

use k8s_openapi::jiff::Timestamp;
use support::{
    NAMESPACE, apiserver_requests, control_plane_cpu, counter_increase, cpu_seconds, job_template,
    operator_log_path, peak_rss_from_status, pods_created_at, prepare_namespace, rss_kib,
    start_operator,
};

#[tokio::main]
async fn main() {
    let jobs_wanted: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let operator_bin = std::env::var("FINETUNE_OPERATOR_BIN").expect("set FINETUNE_OPERATOR_BIN");
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| "operator-bench.json".into());
    // Jobs per second; unset or 0 = a burst (as fast as the apiserver takes creates).
    let rate: f64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r: &f64| *r > 0.0)
        .unwrap_or(0.0);
    let scenario = if rate > 0.0 {
        format!("paced at {rate} jobs/s")
    } else {
        "burst".to_string()
    };
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points at the bench cluster");
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let gpu_capacity: i64 = nodes
        .items
        .iter()
        .filter_map(|n| {
            n.status
                .as_ref()?
                .allocatable
                .as_ref()?
                .get("nvidia.com/gpu")?
                .0
                .parse::<i64>()
                .ok()
        })
        .sum();
    eprintln!(
        "bench: {} nodes with {gpu_capacity} GPUs; {jobs_wanted} jobs of 1 GPU, {scenario}",
        nodes.items.len()
    );
    prepare_namespace(&client).await;

    let operator_log = operator_log_path(&out);
    let mut operator = start_operator(&operator_bin, &operator_log);
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_seconds(pid);
    let control_plane_cpu_before = control_plane_cpu();
    let bench_cpu_before = cpu_seconds(std::process::id());
    let requests_before = apiserver_requests(&client).await;

    // Watch pods from before the first create, recording when each is first seen.
    let first_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pods_per_job: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    {
        let (first_seen, pods_per_job) = (first_seen.clone(), pods_per_job.clone());
        let pods_meta: Api<kube::api::PartialObjectMeta<Pod>> =
            Api::namespaced(client.clone(), NAMESPACE);
        // Metadata only: the apiserver sends, and the bench parses, a fraction of each pod, so
        // the watch keeps up with the pods' status churn and "first seen" is not the bench's lag.
        let stream = watcher(pods_meta, watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                let job = pod
                    .labels()
                    .get("finetune.dev/job")
                    .cloned()
                    .unwrap_or_default();
                if first_seen
                    .lock()
                    .unwrap()
                    .insert(pod.name_any(), Instant::now())
                    .is_none()
                {
                    *pods_per_job.lock().unwrap().entry(job).or_default() += 1;
                }
            }
        });
    }
    // Watch jobs too: the first status the operator writes marks when it acted on a job, which
    // splits create → pod into "operator picked it up" and the rest.
    let first_status: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let first_status = first_status.clone();
        let jobs_api: Api<FinetuneJob> = Api::namespaced(client.clone(), NAMESPACE);
        let stream = watcher(jobs_api, watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Ok(Some(job)) = stream.try_next().await {
                if job.status.is_some() {
                    first_status
                        .lock()
                        .unwrap()
                        .entry(job.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let template = job_template();
    let jobs_api: Api<FinetuneJob> = Api::namespaced(client.clone(), NAMESPACE);
    let start = Instant::now();
    let created: Vec<(String, Instant, f64, Timestamp)> = stream::iter(0..jobs_wanted)
        .map(|i| {
            let (api, mut job) = (jobs_api.clone(), template.clone());
            let name = format!("bench-{i:04}");
            job.metadata.name = Some(name.clone());
            async move {
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = Instant::now();
                api.create(&PostParams::default(), &job)
                    .await
                    .expect("job created");
                (
                    name,
                    Instant::now(),
                    sent.elapsed().as_secs_f64(),
                    Timestamp::now(),
                )
            }
        })
        // Enough requests in flight that the creation rate is the apiserver's, not the
        // bench's: each create waits on etcd, so 16 at a time left the apiserver idle between.
        .buffer_unordered(64)
        .collect()
        .await;
    let create_seconds = start.elapsed().as_secs_f64();
    eprintln!("bench: {jobs_wanted} jobs created in {create_seconds:.1}s");

    // Settled: every job's pod is bound to a node or the job reports Queued.
    let mut peak_rss_kib = 0;
    let settle_deadline = Instant::now() + Duration::from_secs(600);
    let (placed, queued) = loop {
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid));
        let cached = ListParams::default().match_any();
        let pods = pods_api.list(&cached).await.unwrap();
        let bound: std::collections::HashSet<String> = pods
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .filter_map(|p| p.labels().get("finetune.dev/job").cloned())
            .collect();
        let jobs = jobs_api.list(&cached).await.unwrap();
        let queued = jobs
            .items
            .iter()
            .filter(|j| {
                j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Queued)
                    && !bound.contains(&j.name_any())
            })
            .count();
        eprint!(
            "\rbench: {:>5.1}s  placed {:>4}  queued {:>4}  of {jobs_wanted}",
            start.elapsed().as_secs_f64(),
            bound.len(),
            queued
        );
        if bound.len() + queued >= jobs_wanted {
            eprintln!();
            break (bound.len(), queued);
        }
        assert!(
            Instant::now() < settle_deadline,
            "jobs did not settle within 10 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let settle_seconds = start.elapsed().as_secs_f64();
    // The same latency on the apiserver's clock: pod creationTimestamp − job creationTimestamp.
    // Whole seconds only, but free of the bench's own watch lag (a watch delivers late when the
    // apiserver is busy with the pods' status churn).
    let mut server_side: Vec<f64> = {
        let created_at = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            meta.creation_timestamp.as_ref().map(|t| t.0.as_second())
        };
        let pods = pods_api.list(&ListParams::default()).await.unwrap().items;
        let jobs = jobs_api.list(&ListParams::default()).await.unwrap().items;
        let job_created: HashMap<String, i64> = jobs
            .iter()
            .filter_map(|j| Some((j.name_any(), created_at(&j.metadata)?)))
            .collect();
        pods.iter()
            .filter(|p| p.name_any().ends_with("-attempt-0"))
            .filter_map(|p| {
                let job = p.labels().get("finetune.dev/job")?;
                Some((created_at(&p.metadata)? - job_created.get(job)?) as f64)
            })
            .collect()
    };
    server_side.sort_by(f64::total_cmp);
    peak_rss_kib = peak_rss_kib.max(peak_rss_from_status(pid));
    let cpu = cpu_seconds(pid) - cpu_before;
    let bench_cpu = cpu_seconds(std::process::id()) - bench_cpu_before;
    let control_plane_cpu_used: Vec<(String, f64)> =
        counter_increase(&control_plane_cpu_before, &control_plane_cpu());
    let requests = counter_increase(&requests_before, &apiserver_requests(&client).await);
    let _ = operator.kill();
    let _ = operator.wait();

    // Create → pod on one clock with sub-second precision: the create call's return (bench) to
    // the operator's pod create call returning (its log), both on this machine's clock.
    let pod_created = pods_created_at(&operator_log);
    let mut precise: Vec<f64> = created
        .iter()
        .filter_map(|(job, _, _, returned)| {
            let pod = pod_created.get(&format!("{job}-attempt-0"))?;
            Some(pod.duration_since(*returned).as_secs_f64().max(0.0))
        })
        .collect();
    precise.sort_by(f64::total_cmp);

    let seen = first_seen.lock().unwrap().clone();
    let mut latencies: Vec<f64> = created
        .iter()
        .filter_map(|(job, at, _, _)| {
            seen.get(&format!("{job}-attempt-0"))
                .map(|pod| pod.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let statuses = first_status.lock().unwrap().clone();
    let mut to_status: Vec<f64> = created
        .iter()
        .filter_map(|(job, at, _, _)| {
            statuses
                .get(job)
                .map(|seen| seen.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    to_status.sort_by(f64::total_cmp);
    let mut create_calls: Vec<f64> = created.iter().map(|(_, _, took, _)| *took).collect();
    create_calls.sort_by(f64::total_cmp);
    let quantile = |sorted: &[f64], p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let lost = jobs_wanted - latencies.len().max(precise.len());
    let duplicated = pods_per_job
        .lock()
        .unwrap()
        .values()
        .filter(|&&n| n > 1)
        .count();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let result = json!({
        "scenario": scenario, "rate_jobs_per_second": if rate > 0.0 { Some(rate) } else { None },
        "achieved_create_rate_jobs_per_second": jobs_wanted as f64 / create_seconds,
        "jobs": jobs_wanted, "nodes": nodes.items.len(), "gpus": gpu_capacity,
        "create_seconds": create_seconds,
        "create_to_pod_p50_seconds": quantile(&precise, 0.5),
        "create_to_pod_p99_seconds": quantile(&precise, 0.99),
        "create_to_pod_max_seconds": precise.last().copied().unwrap_or(f64::NAN),
        "pods_created_by_the_operator": precise.len(),
        "create_to_pod_watched_p50_seconds": percentile(0.5),
        "create_to_pod_watched_p99_seconds": percentile(0.99),
        "create_to_pod_watched_max_seconds": latencies.last().copied().unwrap_or(f64::NAN),
        "create_to_first_status_p50_seconds": quantile(&to_status, 0.5),
        "create_to_first_status_p99_seconds": quantile(&to_status, 0.99),
        "create_call_p50_seconds": quantile(&create_calls, 0.5),
        "create_call_p99_seconds": quantile(&create_calls, 0.99),
        "all_placed_or_queued_seconds": settle_seconds, "placed": placed, "queued": queued,
        "operator_peak_rss_mib": peak_rss_kib as f64 / 1024.0, "operator_cpu_seconds": cpu,
        "lost_pods": lost, "duplicated_pods": duplicated,
        "server_create_to_pod_p50_seconds": quantile(&server_side, 0.5),
        "server_create_to_pod_p99_seconds": quantile(&server_side, 0.99),
        "server_create_to_pod_max_seconds": server_side.last().copied().unwrap_or(f64::NAN),
        "bench_cpu_seconds": bench_cpu,
        "control_plane_cpu_seconds": control_plane_cpu_used.iter().cloned().collect::<BTreeMap<_, _>>(),
        "apiserver_requests": requests.iter().cloned().collect::<BTreeMap<_, _>>(),
        "targets": {"create_to_pod_p99_seconds": 1.0, "operator_peak_rss_mib": 64.0, "lost_pods": 0, "duplicated_pods": 0},
    });
    println!("\n{scenario}\n\n| metric | value | target |\n|---|---|---|");
    println!(
        "| jobs / nodes / GPUs | {jobs_wanted} / {} / {gpu_capacity} | |",
        nodes.items.len()
    );
    println!(
        "| creates: {jobs_wanted} in {create_seconds:.1} s | {:.0} jobs/s | |",
        jobs_wanted as f64 / create_seconds
    );
    println!(
        "| create → pod created (operator's create call returned) p50 | {:.3} s | |",
        quantile(&precise, 0.5)
    );
    println!(
        "| create → pod created p99 / max | {:.3} s / {:.3} s | < 1 s |",
        quantile(&precise, 0.99),
        precise.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| create → pod seen by the bench's watch p50 / p99 | {:.3} s / {:.3} s | |",
        percentile(0.5),
        percentile(0.99)
    );
    println!(
        "| create → pod on the apiserver's clock (whole s) p50 / p99 / max | {:.0} / {:.0} / {:.0} s | |",
        quantile(&server_side, 0.5),
        quantile(&server_side, 0.99),
        server_side.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| create → first status p50 / p99 | {:.3} s / {:.3} s | |",
        quantile(&to_status, 0.5),
        quantile(&to_status, 0.99)
    );
    println!(
        "| create call p50 / p99 | {:.3} s / {:.3} s | |",
        quantile(&create_calls, 0.5),
        quantile(&create_calls, 0.99)
    );
    println!(
        "| all placed ({placed}) or Queued ({queued}) | {settle_seconds:.1} s after the first create | |"
    );
    println!(
        "| operator peak RSS | {:.1} MiB | < 64 MiB |",
        peak_rss_kib as f64 / 1024.0
    );
    println!("| operator CPU | {cpu:.1} s | |");
    println!("| lost / duplicated pods | {lost} / {duplicated} | 0 / 0 |");
    let others: Vec<String> = control_plane_cpu_used
        .iter()
        .map(|(name, seconds)| format!("{name} {seconds:.1}"))
        .collect();
    println!(
        "| CPU s of the rest (same 2 cores) | {}, bench {bench_cpu:.1} | |",
        others.join(", ")
    );
    println!("\napiserver requests during the run (top 12):\n");
    for (request, count) in requests.iter().take(12) {
        println!("  {count:>7.0}  {request}");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap()).expect("JSON written");
    println!("\nwrote {out}");
}
