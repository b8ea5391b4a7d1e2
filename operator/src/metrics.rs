//! The operator's Prometheus metrics.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use finetune_crds::JobPhase;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the operator exports, in its own registry.
pub struct Metrics {
    registry: Registry,
    reconciliations: IntCounterVec,
    errors: IntCounterVec,
    reconcile_duration: HistogramVec,
    jobs_by_phase: IntGaugeVec,
    queue_wait: HistogramVec,
    time_to_first_step: HistogramVec,
    leader: IntGauge,
    job_failures: IntCounterVec,
    job_retries: IntCounterVec,
    phases: Mutex<HashMap<String, JobPhase>>,
    /// Per job, the newest attempt already counted as a retry: a reconcile that runs again
    /// before the new pod reaches the cache derives the same retry and must not count it twice.
    retried: Mutex<HashMap<String, i32>>,
    /// Namespaces whose failure counters exist at 0 for every failure reason.
    namespaces: Mutex<HashSet<String>>,
}

/// Every reason a job can fail with: validation, the trainer's non-retryable exit codes, and
/// retryable failures past `runPolicy.backoffLimit`. Their counters start at 0 in a namespace
/// the operator sees, so `increase()` also counts a namespace's first failure.
pub const FAILURE_REASONS: [&str; 5] = [
    "InvalidSpec",
    "InvalidInput",
    "Diverged",
    "RetentionBelowMinimum",
    "BackoffLimitExceeded",
];

impl Metrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "finetune_operator_reconciliations_total",
                "Reconciles run, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "finetune_operator_reconcile_errors_total",
                "Failed reconciles, by kind and reason",
            ),
            &["kind", "reason"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "finetune_operator_reconcile_duration_seconds",
                "Time spent in one reconcile",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["kind"],
        )
        .expect("valid metric");
        let jobs_by_phase = IntGaugeVec::new(
            Opts::new(
                "finetune_operator_jobs",
                "FinetuneJobs seen by the operator, by phase",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let waits = vec![
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
        ];
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "finetune_operator_queue_wait_seconds",
                "From job creation to its trainer running",
            )
            .buckets(waits.clone()),
            &["namespace"],
        )
        .expect("valid metric");
        let time_to_first_step = HistogramVec::new(
            HistogramOpts::new(
                "finetune_operator_time_to_first_step_seconds",
                "From job creation to the first optimizer step reported (for a job that ended before its progress was read: to its end)",
            )
            .buckets(waits),
            &["namespace"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "finetune_operator_leader",
            "1 while this replica holds the leader lease and reconciles, 0 while it stands by",
        )
        .expect("valid metric");
        let job_failures = IntCounterVec::new(
            Opts::new(
                "finetune_operator_job_failures_total",
                "FinetuneJobs that reached phase Failed, by namespace and the Failed condition's reason",
            ),
            &["namespace", "reason"],
        )
        .expect("valid metric");
        let job_retries = IntCounterVec::new(
            Opts::new(
                "finetune_operator_job_retries_total",
                "Trainer attempts started because the previous attempt ended (Preempted, \
                 OutOfMemory, Error), by namespace and that attempt's reason",
            ),
            &["namespace", "reason"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(jobs_by_phase.clone()),
            Box::new(queue_wait.clone()),
            Box::new(time_to_first_step.clone()),
            Box::new(leader.clone()),
            Box::new(job_failures.clone()),
            Box::new(job_retries.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for phase in JobPhase::ALL {
            jobs_by_phase
                .with_label_values(&[phase_label(phase)])
                .set(0);
        }
        Self {
            registry,
            reconciliations,
            errors,
            reconcile_duration,
            jobs_by_phase,
            queue_wait,
            time_to_first_step,
            leader,
            job_failures,
            job_retries,
            phases: Mutex::new(HashMap::new()),
            retried: Mutex::new(HashMap::new()),
            namespaces: Mutex::new(HashSet::new()),
        }
    }

    /// Starts timing a reconcile; the time is recorded when the guard drops.
    pub fn reconcile_started(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciliations.with_label_values(&[kind]).inc();
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &str, reason: &str) {
        self.errors.with_label_values(&[kind, reason]).inc();
    }

    /// Starts the failure counters of `namespace` at 0 for every reason, once.
    pub fn namespace_seen(&self, namespace: &str) {
        let mut namespaces = self
            .namespaces
            .lock()
            .expect("metrics lock is never poisoned");
        if namespaces.insert(namespace.to_string()) {
            for reason in FAILURE_REASONS {
                self.job_failures.with_label_values(&[namespace, reason]);
            }
        }
    }

    /// Counts a job that reached phase Failed (called once, on the transition).
    pub fn job_failed(&self, namespace: &str, reason: &str) {
        self.namespace_seen(namespace);
        self.job_failures
            .with_label_values(&[namespace, reason])
            .inc();
    }

    /// Counts the retry that starts `attempt` of `job` (`namespace/name`), once per attempt.
    pub fn job_retried(&self, job: &str, attempt: i32, reason: &str) {
        let mut retried = self.retried.lock().expect("metrics lock is never poisoned");
        if retried.get(job).is_some_and(|counted| *counted >= attempt) {
            return;
        }
        retried.insert(job.to_string(), attempt);
        let namespace = job.split_once('/').map_or("", |(namespace, _)| namespace);
        self.job_retries
            .with_label_values(&[namespace, reason])
            .inc();
    }

    /// Records a job's current phase (`None` once deleted) and refreshes the per-phase gauge.
    pub fn set_phase(&self, job: &str, phase: Option<JobPhase>) {
        if phase.is_none() {
            self.retried
                .lock()
                .expect("metrics lock is never poisoned")
                .remove(job);
        }
        let mut phases = self.phases.lock().expect("metrics lock is never poisoned");
        match phase {
            Some(phase) => phases.insert(job.to_string(), phase),
            None => phases.remove(job),
        };
        for candidate in JobPhase::ALL {
            let count = phases.values().filter(|p| **p == candidate).count();
            self.jobs_by_phase
                .with_label_values(&[phase_label(candidate)])
                .set(count as i64);
        }
    }

    /// Records whether this replica leads (and so reconciles).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records how long a job waited before its trainer ran.
    pub fn observe_queue_wait(&self, namespace: &str, seconds: f64) {
        self.queue_wait
            .with_label_values(&[namespace])
            .observe(seconds);
    }

    /// Records how long a job took to its first optimizer step.
    pub fn observe_first_step(&self, namespace: &str, seconds: f64) {
        self.time_to_first_step
            .with_label_values(&[namespace])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn phase_label(phase: JobPhase) -> &'static str {
    match phase {
        JobPhase::Pending => "Pending",
        JobPhase::Queued => "Queued",
        JobPhase::Running => "Running",
        JobPhase::Succeeded => "Succeeded",
        JobPhase::Failed => "Failed",
        JobPhase::Suspended => "Suspended",
    }
}

/// Records a reconcile's duration when dropped, so early returns are timed too.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics
            .reconcile_duration
            .with_label_values(&[self.kind])
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_per_job() {
        let metrics = Metrics::new();
        metrics.set_phase("a/one", Some(JobPhase::Running));
        metrics.set_phase("a/two", Some(JobPhase::Running));
        metrics.set_phase("a/two", Some(JobPhase::Succeeded));
        metrics.set_phase("a/three", Some(JobPhase::Queued));
        metrics.set_phase("a/three", None);
        drop(metrics.reconcile_started("FinetuneJob"));
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(
            text.contains("finetune_operator_jobs{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("finetune_operator_jobs{phase=\"Succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("finetune_operator_jobs{phase=\"Queued\"} 0"),
            "{text}"
        );
        assert!(text.contains("finetune_operator_leader 1"), "{text}");
        assert!(
            text.contains(
                "finetune_operator_reconcile_duration_seconds_count{kind=\"FinetuneJob\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn failures_count_by_namespace_and_reason_from_zero() {
        let metrics = Metrics::new();
        metrics.namespace_seen("team-a");
        let text = metrics.render();
        for reason in FAILURE_REASONS {
            assert!(
                text.contains(&format!(
                    "finetune_operator_job_failures_total{{namespace=\"team-a\",reason=\"{reason}\"}} 0"
                )),
                "{text}"
            );
        }
        metrics.job_failed("team-a", "RetentionBelowMinimum");
        metrics.job_failed("team-b", "InvalidInput");
        let text = metrics.render();
        assert!(
            text.contains(
                "finetune_operator_job_failures_total{namespace=\"team-a\",reason=\"RetentionBelowMinimum\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "finetune_operator_job_failures_total{namespace=\"team-b\",reason=\"InvalidInput\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn each_retry_counts_once() {
        let metrics = Metrics::new();
        metrics.job_retried("team-a/j", 1, "Preempted");
        metrics.job_retried("team-a/j", 1, "Preempted");
        metrics.job_retried("team-a/j", 2, "OutOfMemory");
        // A deleted job's name may come back as a new job with new attempts.
        metrics.set_phase("team-a/j", None);
        metrics.job_retried("team-a/j", 1, "Preempted");
        let text = metrics.render();
        assert!(
            text.contains(
                "finetune_operator_job_retries_total{namespace=\"team-a\",reason=\"Preempted\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "finetune_operator_job_retries_total{namespace=\"team-a\",reason=\"OutOfMemory\"} 1"
            ),
            "{text}"
        );
    }
}
