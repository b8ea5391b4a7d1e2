//! What a run remembers across attempts: [`TrainState`] (`trainer_state.json` in every
//! checkpoint) and its step, eval and retention records, which the summary reports as they are.

use finetune_crds::contract::StopKind;
use serde::{Deserialize, Serialize};

use crate::data::Cursor;
use crate::train::dpo::PreferenceMetrics;
use crate::train::probe::ProbeScore;

/// One optimizer step in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: i64,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: i64,
    pub targets: i64,
    pub samples: usize,
    pub seconds: f64,
    /// DPO: rewards and accuracies of the step's pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
    /// The forgetting guard's term: KL to the base (self-distillation) or the L2 penalty, plus
    /// the layer anchor's weighted drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_loss: Option<f64>,
}

/// One evaluation in the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: i64,
    pub eval_loss: f64,
    /// Targets (SFT) or pairs (DPO) evaluated.
    pub targets: i64,
    /// DPO: rewards and preference accuracies on the eval pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
}

/// Everything besides tensors that a checkpoint restores (`trainer_state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: i64,
    pub cursor: Cursor,
    pub config_digest: String,
    pub history: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<i64>,
    pub evals_without_improvement: i32,
    pub early_stopped: bool,
    pub trained_tokens: i64,
    pub retention_loss_before: Option<f64>,
    /// Eval loss before the first update.
    pub initial_eval_loss: Option<f64>,
    /// DPO: the eval pairs before the first update.
    #[serde(default)]
    pub preference_before: Option<PreferenceMetrics>,
    /// Generation eval before the first update.
    #[serde(default)]
    pub generation_before: Option<ProbeScore>,
    /// The base model's greedy answers to the retention questions (the probe's references).
    #[serde(default)]
    pub retention_references: Option<Vec<String>>,
    /// The references end where each answer held its key ([`crate::train::probe::Probe::answer_until_correct`]);
    /// false in a checkpoint of a trainer that recorded whole answers, whose resumed run then
    /// answers in full too, so that verbatim compares like with like.
    #[serde(default)]
    pub retention_references_settled: bool,
    /// Retention probe results during training.
    #[serde(default)]
    pub retention_scores: Vec<RetentionRecord>,
    /// The newest step whose retention score met `minScore` (0 = before training).
    #[serde(default)]
    pub last_good_step: Option<i64>,
    /// Sequences per forward pass after an out-of-memory error halved it; a resumed run goes on
    /// with it instead of running out of memory again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<i64>,
    /// Why training ended before its planned last step.
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// Which rule set `stop_reason`. Not written to `trainer_state.json` (its bytes stay those of
    /// earlier trainers); [`TrainState::recover_stop_kind`] derives it again on resume.
    #[serde(skip)]
    pub stop_kind: Option<StopKind>,
}

impl TrainState {
    /// Ends training early for `kind`, with `reason` as the text people read.
    pub fn stop(&mut self, kind: StopKind, reason: String) {
        self.early_stopped = true;
        self.stop_reason = Some(reason);
        self.stop_kind = Some(kind);
    }

    /// After reading `trainer_state.json`: the kind of a stop recorded there. The file keeps
    /// only the text, whose first word this trainer itself wrote ([`TrainState::stop`]'s callers
    /// in `trainer`), so this is the one place that reads it back.
    pub fn recover_stop_kind(&mut self) {
        self.stop_kind = self.stop_reason.as_deref().map(|r| {
            if r.starts_with("retention") {
                StopKind::RetentionFloor
            } else {
                StopKind::EarlyStopping
            }
        });
    }
}

/// One retention probe during training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionRecord {
    pub step: i64,
    /// The headline score (knowledge kept, or verbatim kept without answer keys).
    pub score: f64,
    pub exact: f64,
    /// Share of answers identical to the base's after normalisation (absent in older state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbatim: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_kind_is_not_written_and_comes_back_from_the_text() {
        let mut st = TrainState::default();
        st.stop(
            StopKind::RetentionFloor,
            "retention score 0.100 (x) fell below evaluation.retention.minScore 0.5 at step 3; the result is step 2".into(),
        );
        let text = serde_json::to_string(&st).unwrap();
        assert!(!text.contains("stop_kind"), "{text}");
        let mut back: TrainState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.stop_kind, None);
        back.recover_stop_kind();
        assert_eq!(back.stop_kind, Some(StopKind::RetentionFloor));
        st.stop(
            StopKind::EarlyStopping,
            "early stopping: no eval loss improvement in 2 evaluations; the result is step 4"
                .into(),
        );
        let mut back: TrainState =
            serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        back.recover_stop_kind();
        assert_eq!(back.stop_kind, Some(StopKind::EarlyStopping));
        let mut none = TrainState::default();
        none.recover_stop_kind();
        assert_eq!(none.stop_kind, None);
    }
}
