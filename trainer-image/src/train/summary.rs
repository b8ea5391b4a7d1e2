//! `training_summary.json`, typed: [`TrainingSummary`] names every key the file has always had,
//! in the order they were written. It is serialised through `serde_json::Value` (whose objects
//! sort their keys, as the `json!` literal it replaces did), so the file is byte-identical.

use std::collections::BTreeMap;

use finetune_crds::adapter::FileDigest;
use finetune_crds::finetunejob::TrainingMetrics;
use finetune_crds::training::{DpoLoss, ForgettingGuard};
use serde::Serialize;
use serde_json::Value;

use crate::data::{ContaminationReport, DataStats};
use crate::train::dpo::{PreferenceMetrics, ReferenceMode};
use crate::train::guard::GuardSource;
use crate::train::probe::ProbeScore;
use crate::train::retention::ScoreBasis;
use crate::train::state::{EvalRecord, RetentionRecord, StepRecord};
use crate::train::trainer::{Finished, Trainer};
use crate::train::vocab;

#[derive(Debug, Serialize)]
pub struct TrainingSummary<'a> {
    pub job: &'a str,
    pub attempt: &'a str,
    pub device: String,
    pub dtype: String,
    pub threads: i32,
    /// Data-parallel ranks (1 for one process); the figures below are the whole group's.
    pub ranks: usize,
    /// Whether AdamW's state was sharded over the ranks (ZeRO stage 1, full fine-tuning).
    pub optimizer_sharded: bool,
    /// `lora` or `full`.
    pub adapter: &'static str,
    pub trainable_parameters: i64,
    pub vocabulary: Option<Value>,
    pub steps: i64,
    pub total_steps: i64,
    pub steps_per_epoch: i64,
    pub warmup_steps: i64,
    pub resumed_from_step: Option<i64>,
    pub forgetting_guard: &'a ForgettingGuard,
    pub forgetting_guard_source: GuardSource,
    pub early_stopped: bool,
    pub stop_reason: &'a Option<String>,
    pub best_step: Option<i64>,
    pub best_eval_loss: Option<f64>,
    pub initial_eval_loss: Option<f64>,
    pub metrics: &'a TrainingMetrics,
    pub history: &'a [StepRecord],
    pub evals: &'a [EvalRecord],
    pub retention: RetentionSummary<'a>,
    pub preference: Option<PreferenceSummary>,
    pub generation: GenerationSummary<'a>,
    pub dataset: DatasetSummary<'a>,
    pub timings: &'a BTreeMap<&'static str, f64>,
    pub tokens_per_second: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory once the model, optimizer and data were ready, before the first step.
    pub rss_before_training_bytes: Option<u64>,
    /// Peak resident memory from the first step on (loading excluded); minus
    /// `rss_before_training_bytes` it is what training added: activations, gradients, workspace.
    pub peak_rss_training_bytes: Option<u64>,
    /// Peak virtual memory of the process (what an address-space limit counts).
    pub peak_virtual_bytes: Option<u64>,
    /// The decoder layers were recomputed in backward (activation checkpointing).
    pub gradient_checkpointing: bool,
    pub rope_scaling: &'a Value,
    /// Spec fields this trainer accepts but does not implement. None are left, so it is always
    /// empty; the key stays because readers of the file (tests/reference) look it up.
    pub ignored: [&'static str; 0],
    pub files: &'a [FileDigest],
}

#[derive(Debug, Serialize)]
pub struct RetentionSummary<'a> {
    pub texts: usize,
    pub loss_before: Option<f64>,
    pub loss_after: Option<f64>,
    pub loss_delta: Option<f64>,
    pub source: Option<&'a str>,
    pub questions: usize,
    pub score: Option<f64>,
    /// 95 % Wilson score interval of `score`.
    pub interval_95: Option<(f64, f64)>,
    pub basis: Option<ScoreBasis>,
    pub base_correct: Option<usize>,
    pub kept: Option<usize>,
    pub gained: Option<usize>,
    pub verbatim: Option<f64>,
    pub exact: Option<f64>,
    pub min_score: Option<f64>,
    pub scores: &'a [RetentionRecord],
    pub last_good_step: Option<i64>,
    pub changed: &'a [Value],
}

#[derive(Debug, Serialize)]
pub struct PreferenceSummary {
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
    pub reference: ReferenceMode,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub before: Option<PreferenceMetrics>,
    pub after: Option<PreferenceMetrics>,
}

#[derive(Debug, Serialize)]
pub struct GenerationSummary<'a> {
    pub samples: usize,
    pub max_new_tokens: usize,
    pub before: Option<ScoreSummary>,
    pub after: Option<ScoreSummary>,
    pub examples: Vec<Example<'a>>,
}

/// A [`ProbeScore`] with its shares.
#[derive(Debug, Serialize)]
pub struct ScoreSummary {
    pub exact_match: f64,
    pub normalized_match: f64,
    pub exact: usize,
    pub normalized: usize,
    pub samples: usize,
}

impl From<ProbeScore> for ScoreSummary {
    fn from(s: ProbeScore) -> Self {
        ScoreSummary {
            exact_match: s.exact_match(),
            normalized_match: s.normalized_match(),
            exact: s.exact,
            normalized: s.normalized,
            samples: s.samples,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Example<'a> {
    pub reference: &'a str,
    pub answer: &'a str,
}

#[derive(Debug, Serialize)]
pub struct DatasetSummary<'a> {
    pub train: &'a DataStats,
    pub eval: &'a Option<DataStats>,
    pub train_samples_used: usize,
    pub replayed_samples: usize,
    pub eval_samples: usize,
    pub train_digest: &'a str,
    pub eval_digest: &'a str,
    pub contamination: &'a Option<ContaminationReport>,
}

/// What the summary reports besides the trainer's own state.
pub struct Outcome<'a> {
    pub finished: &'a Finished,
    pub metrics: &'a TrainingMetrics,
    pub resumed_from: Option<i64>,
    pub memory: MemoryMarks,
    pub timings: &'a BTreeMap<&'static str, f64>,
    pub files: &'a [FileDigest],
}

/// Resident memory around the training phase, so that its own peak can be told from loading's.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryMarks {
    pub before_training: Option<u64>,
    pub loading_peak: Option<u64>,
    /// The peak counter was restarted when training began.
    pub reset: bool,
}

impl MemoryMarks {
    /// Marks the start of training and restarts the kernel's peak counter.
    pub fn start_training() -> Self {
        MemoryMarks {
            before_training: crate::serve::rss_bytes(),
            loading_peak: crate::serve::peak_rss_bytes(),
            reset: crate::serve::reset_peak_rss(),
        }
    }

    /// The whole process's peak.
    pub fn peak(&self) -> Option<u64> {
        let now = crate::serve::peak_rss_bytes();
        now.max(self.loading_peak)
    }

    /// The peak since training began, where the counter could be restarted.
    pub fn training_peak(&self) -> Option<u64> {
        if self.reset {
            crate::serve::peak_rss_bytes()
        } else {
            None
        }
    }
}

impl<'a> TrainingSummary<'a> {
    pub fn new(t: &'a Trainer, o: Outcome<'a>) -> Self {
        let st = &t.st;
        let schedule = &t.batches.schedule;
        let f = o.finished;
        TrainingSummary {
            job: &t.plan.name,
            attempt: &t.plan.attempt,
            device: format!("{:?}", t.loaded.device),
            dtype: format!("{:?}", t.loaded.kind),
            threads: tch::get_num_threads(),
            ranks: t.group.world(),
            optimizer_sharded: t.opt.shard_rank.is_some(),
            adapter: if t.is_lora() { "lora" } else { "full" },
            trainable_parameters: t.opt.numel(),
            vocabulary: t.loaded.vocab.as_ref().map(vocab::Expansion::summary_json),
            steps: st.step,
            total_steps: schedule.total,
            steps_per_epoch: schedule.steps_per_epoch,
            warmup_steps: schedule.warmup,
            resumed_from_step: o.resumed_from,
            forgetting_guard: &t.guards.effective,
            forgetting_guard_source: t.guards.source,
            early_stopped: st.early_stopped,
            stop_reason: &st.stop_reason,
            best_step: st.best_step,
            best_eval_loss: st.best_eval_loss,
            initial_eval_loss: st.initial_eval_loss,
            metrics: o.metrics,
            history: &st.history,
            evals: &st.evals,
            retention: retention(t, f),
            preference: t.dpo.as_ref().map(|d| PreferenceSummary {
                beta: d.cfg.beta,
                loss: d.cfg.loss,
                label_smoothing: d.cfg.label_smoothing,
                reference: d.mode,
                train_pairs: d.train.len(),
                eval_pairs: d.eval.len(),
                before: st.preference_before,
                after: preference_after(st),
            }),
            generation: GenerationSummary {
                samples: t.probes.generation_probe.len(),
                max_new_tokens: t.probes.generation_tokens,
                before: st.generation_before.map(ScoreSummary::from),
                after: f.generation_after.map(ScoreSummary::from),
                examples: f
                    .generation_examples
                    .iter()
                    .map(|(reference, answer)| Example { reference, answer })
                    .collect(),
            },
            dataset: DatasetSummary {
                train: &t.prepared.train_stats,
                eval: &t.prepared.eval_stats,
                train_samples_used: t.batches.n_train,
                replayed_samples: t
                    .guards
                    .replay
                    .as_ref()
                    .map_or(0, |r| r.replayed_through(st.step)),
                eval_samples: t.prepared.eval.len(),
                train_digest: &t.prepared.train_digest,
                eval_digest: &t.prepared.eval_digest,
                contamination: &t.prepared.contamination,
            },
            timings: o.timings,
            tokens_per_second: o.metrics.tokens_per_second,
            peak_rss_bytes: o.memory.peak(),
            rss_before_training_bytes: o.memory.before_training,
            peak_rss_training_bytes: o.memory.training_peak(),
            peak_virtual_bytes: crate::serve::peak_virtual_bytes(),
            gradient_checkpointing: t.loaded.model.checkpoint_layers,
            rope_scaling: &t.loaded.rope_scaling,
            ignored: [],
            files: o.files,
        }
    }

    /// As `training_summary.json` holds it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("the summary serializes")
    }
}

/// DPO: the newest eval's preference metrics.
pub fn preference_after(st: &crate::train::state::TrainState) -> Option<PreferenceMetrics> {
    st.evals.iter().rev().find_map(|e| e.preference)
}

fn retention<'a>(t: &'a Trainer, f: &'a Finished) -> RetentionSummary<'a> {
    let st = &t.st;
    let score = f.retention_score;
    RetentionSummary {
        texts: t.probes.retention_set.len(),
        loss_before: st.retention_loss_before,
        loss_after: f.retention_after,
        loss_delta: retention_delta(st, f),
        source: t.probes.retention.as_ref().map(|r| r.source.as_str()),
        questions: t.probes.retention_probe.len(),
        score: score.map(|s| s.score()),
        interval_95: score.map(|s| s.interval_95()),
        basis: score.map(|s| s.basis()),
        base_correct: score.map(|s| s.base_correct),
        kept: score.map(|s| s.kept),
        gained: score.map(|s| s.gained),
        verbatim: score.map(|s| s.verbatim_share()),
        exact: score.map(|s| s.exact_share()),
        min_score: t.probes.retention_floor.map(|f| f.0),
        scores: &st.retention_scores,
        last_good_step: st.last_good_step,
        changed: &f.retention_changed,
    }
}

/// Retention loss after training minus before.
pub fn retention_delta(st: &crate::train::state::TrainState, f: &Finished) -> Option<f64> {
    st.retention_loss_before
        .zip(f.retention_after)
        .map(|(b, a)| a - b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed pieces serialise to what the `json!` literal wrote.
    #[test]
    fn typed_parts_serialise_like_the_literal() {
        let s = ProbeScore {
            samples: 4,
            exact: 1,
            normalized: 2,
        };
        assert_eq!(
            serde_json::to_value(ScoreSummary::from(s)).unwrap(),
            serde_json::json!({
                "exact_match": s.exact_match(),
                "normalized_match": s.normalized_match(),
                "exact": s.exact,
                "normalized": s.normalized,
                "samples": s.samples,
            })
        );
        let e = Example {
            reference: "r",
            answer: "a",
        };
        assert_eq!(
            serde_json::to_value(e).unwrap(),
            serde_json::json!({"reference": "r", "answer": "a"})
        );
        let ignored: [&str; 0] = [];
        assert_eq!(
            serde_json::to_string(&serde_json::json!({ "ignored": ignored })).unwrap(),
            serde_json::to_string(&serde_json::json!({ "ignored": Vec::<&str>::new() })).unwrap()
        );
    }
}
