//! The operator's Prometheus metrics.

use std::collections::HashMap;
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
    phases: Mutex<HashMap<String, JobPhase>>,
}

const PHASES: [JobPhase; 6] = [
    JobPhase::Pending,
    JobPhase::Queued,
    JobPhase::Running,
    JobPhase::Succeeded,
    JobPhase::Failed,
    JobPhase::Suspended,
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
                "From job creation to the first optimizer step reported",
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
        for collector in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(jobs_by_phase.clone()),
            Box::new(queue_wait.clone()),
            Box::new(time_to_first_step.clone()),
            Box::new(leader.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for phase in PHASES {
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
            phases: Mutex::new(HashMap::new()),
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

    /// Records a job's current phase (`None` once deleted) and refreshes the per-phase gauge.
    pub fn set_phase(&self, job: &str, phase: Option<JobPhase>) {
        let mut phases = self.phases.lock().expect("metrics lock is never poisoned");
        match phase {
            Some(phase) => phases.insert(job.to_string(), phase),
            None => phases.remove(job),
        };
        for candidate in PHASES {
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
}
