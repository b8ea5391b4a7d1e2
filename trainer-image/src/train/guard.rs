//! Forgetting guards that change what the model trains on.
//!
//! **Self-replay** (`forgettingGuard.selfReplay`): before the first update the base model answers
//! a built-in set of general requests greedily; those conversations are mixed into the training
//! stream (`ratio` replayed samples per training sample), so every epoch also rehearses the base
//! model's own general behaviour. No external data is needed, and the replayed answers are in the
//! model's own style, so they pull only toward what it already did.
//!
//! The replay requests are the `replay` part of the general question set
//! ([`crate::train::general`]), disjoint from the retention probe's questions and from the
//! held-out audit set: the probe and the audit measure transfer, not recall of rehearsed answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use finetune_crds::training::ForgettingGuard;
use serde::{Deserialize, Serialize};

use crate::data::{Batch, Encoder, Origin, Sample, build_batch};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::train::probe::Probe;

/// Where a run's guards came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardSource {
    /// `spec.forgettingGuard` names its guards.
    Spec,
    /// The spec names none; LoRA SFT of a chat model gets [`ForgettingGuard::default_guard`].
    Default,
    /// `forgettingGuard.disabled: true`, or a run the default does not fit (DPO, full
    /// fine-tuning, a model without a chat template).
    Off,
}

/// The guards a run uses: the spec's when it names any, otherwise the default for LoRA SFT of a
/// model with a chat template (the base's answers it scores are chats). Full fine-tuning gets no
/// default: its guard, `l2ToInit`, holds a second copy of the weights, a cost the user chooses.
pub fn effective(
    spec: Option<&ForgettingGuard>,
    lora_sft: bool,
    has_chat_template: bool,
) -> (ForgettingGuard, GuardSource) {
    match spec {
        Some(g) if g.disabled => (ForgettingGuard::default(), GuardSource::Off),
        Some(g) => (g.clone(), GuardSource::Spec),
        None if lora_sft && has_chat_template => {
            (ForgettingGuard::default_guard(), GuardSource::Default)
        }
        None => (ForgettingGuard::default(), GuardSource::Off),
    }
}

/// Longest base answer self-distillation scores, in tokens: as long as self-replay's default.
/// On the reviews task 16 kept more held-out answers than 48 (0.93 against 0.91) for a third of
/// the generation and shorter conversations each step; on dates one answer fewer (0.89, 0.90).
pub const DISTILL_TOKENS: usize = 16;

/// The base model's answers, kept beside the checkpoints so a resumed run (whose weights are no
/// longer the base) replays exactly the same conversations.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ReplayCache {
    prompts: Vec<String>,
    /// The answer length they were generated with (absent in caches written before it existed).
    #[serde(default)]
    max_tokens: Option<usize>,
    answers: Vec<String>,
    /// Which answers the model ended itself (absent in caches written before it was recorded,
    /// which are then regenerated).
    #[serde(default)]
    ended: Option<Vec<bool>>,
}

pub fn replay_cache_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("self_replay.json")
}

/// The layer anchor's own answers, asked only when the run does not replay.
pub fn anchor_cache_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("layer_anchor.json")
}

/// Self-distillation's answers are longer than replay's by default, so they are cached apart.
pub fn distill_cache_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("self_distillation.json")
}

/// The base model's greedy answers to `prompts` as chat samples (loss on the answers).
/// `model` must still be the base (call before any update); answers are read from `cache` when a
/// previous attempt wrote it. Prompts the model answers with nothing are dropped.
///
/// An answer cut off at `max_tokens` keeps no end-of-turn token (see [`cut_before_end`]):
/// replaying it with one would teach the model to stop mid-sentence after `max_tokens` tokens,
/// losing the very facts that come later in its answers.
pub fn replay_samples(
    model: &mut CausalLm,
    encoder: &Encoder,
    eos_ids: &[i64],
    cache: &Path,
    prompts: Vec<String>,
    max_tokens: usize,
) -> Result<Vec<Sample>> {
    let template = encoder.template.ok_or_else(|| {
        Error::Usage(
            "forgettingGuard.selfReplay needs a model with a chat template (the replayed conversations are chats)".into(),
        )
    })?;
    let cached = std::fs::read_to_string(cache)
        .ok()
        .and_then(|t| serde_json::from_str::<ReplayCache>(&t).ok())
        .filter(|c| {
            c.prompts == prompts
                && c.max_tokens == Some(max_tokens)
                && c.ended.as_ref().is_some_and(|e| e.len() == c.answers.len())
        });
    let (answers, ended) = match cached {
        Some(c) => (c.answers, c.ended.unwrap_or_default()),
        None => {
            let probe = Probe::from_questions(&prompts, encoder.tokenizer, Some(template))?;
            let generated =
                probe.answer_with_ends(model, encoder.tokenizer, eos_ids, max_tokens)?;
            let (answers, ended) = generated.into_iter().map(|a| (a.text, a.ended)).unzip();
            if let Some(dir) = cache.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let c = ReplayCache {
                prompts: prompts.clone(),
                max_tokens: Some(max_tokens),
                answers,
                ended: Some(ended),
            };
            let text = serde_json::to_string_pretty(&c).expect("cache serializes");
            std::fs::write(cache, text).map_err(|e| Error::io(cache, e))?;
            (c.answers, c.ended.unwrap_or_default())
        }
    };
    let source: Arc<Path> = Arc::from(Path::new("<self-replay>"));
    let mut samples = Vec::new();
    for (i, ((q, a), &ended)) in prompts.iter().zip(&answers).zip(&ended).enumerate() {
        if a.trim().is_empty() {
            continue;
        }
        let messages = [
            serde_json::json!({"role": "user", "content": q}),
            serde_json::json!({"role": "assistant", "content": a.trim()}),
        ];
        let origin = Origin {
            path: source.clone(),
            line: i + 1,
        };
        let sample = encoder.chat(&messages, &origin)?;
        samples.push(if ended {
            sample
        } else {
            cut_before_end(sample, eos_ids)
        });
    }
    Ok(samples)
}

/// `sample` ending just before the end-of-turn token that closes its last supervised span, so a
/// cut-off answer is replayed as an unfinished one. Unchanged when the span has no end token.
pub fn cut_before_end(mut sample: Sample, eos_ids: &[i64]) -> Sample {
    let Some(last) = sample.supervised.iter().rposition(|&s| s) else {
        return sample;
    };
    let start = sample.supervised[..last]
        .iter()
        .rposition(|&s| !s)
        .map_or(0, |i| i + 1);
    if let Some(end) = (start..=last).find(|&i| eos_ids.contains(&sample.ids[i])) {
        sample.ids.truncate(end);
        sample.supervised.truncate(end);
    }
    sample
}

/// The self-replay guard of a run: every optimizer step also trains on the next base-model
/// conversations in turn, `ratio` of them per training sample of the step.
///
/// They join the step as one more micro-batch, their tokens weighted by `weight` in the step's
/// token-weighted mean loss, so each update weighs the task against the model's general answers.
/// Mixed into the data stream instead, the length-grouped batcher put them in batches of their
/// own: updates that alternated between the task and replay. On the forgetting benchmark (16-token
/// answers) one conversation per step at weight 4 kept 16 of the base's 17 correct answers; at
/// weight 1 or 2, two per step, or mixed into the stream, 14–15, for as much or more time. The
/// conversations of a step follow from its index alone, so a resumed run replays the same.
#[derive(Debug)]
pub struct Replay {
    samples: Vec<Sample>,
    /// Conversations per optimizer step (fractional: spread over the steps).
    per_step: f64,
    /// Weight of a replayed token in the step's loss (`selfReplay.weight`).
    pub weight: f64,
}

impl Replay {
    /// `samples_per_step`: training samples in one optimizer step (batch size × accumulation).
    pub fn new(samples: Vec<Sample>, ratio: f64, samples_per_step: usize, weight: f64) -> Self {
        Self {
            samples,
            per_step: ratio * samples_per_step as f64,
            weight,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The base model's conversations, in turn order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Conversations per optimizer step, on average.
    pub fn ratio_per_step(&self) -> f64 {
        self.per_step
    }

    /// Indices (into the conversations) of step `step`'s replay: the k-th replayed conversation
    /// overall is `k mod len`, and step `s` takes those with `⌊s·per_step⌋ ≤ k < ⌊(s+1)·per_step⌋`.
    pub fn conversations_for_step(&self, step: i64) -> Vec<usize> {
        if self.samples.is_empty() {
            return Vec::new();
        }
        let from = (step as f64 * self.per_step).floor() as usize;
        let to = ((step + 1) as f64 * self.per_step).floor() as usize;
        (from..to).map(|k| k % self.samples.len()).collect()
    }

    /// Step `step`'s conversations as one batch (`None` when it has none).
    pub fn batch_for_step(&self, step: i64) -> Option<Batch> {
        let rows: Vec<Vec<usize>> = self
            .conversations_for_step(step)
            .into_iter()
            .map(|i| vec![i])
            .collect();
        (!rows.is_empty()).then(|| build_batch(&self.samples, &rows))
    }

    /// How many conversations steps `0..steps` replayed.
    pub fn replayed_through(&self, steps: i64) -> usize {
        if self.samples.is_empty() {
            0
        } else {
            (steps as f64 * self.per_step).floor() as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_answer_loses_its_end_of_turn_and_what_follows() {
        let origin = Origin {
            path: Arc::from(Path::new("x")),
            line: 1,
        };
        // prompt 1 2 | answer 7 8 | end 99 | newline 5 (supervised like the end token)
        let ids = vec![1, 2, 7, 8, 99, 5];
        let sup = vec![false, false, true, true, true, true];
        let cut = cut_before_end(Sample::new(ids.clone(), sup.clone(), origin.clone()), &[99]);
        assert_eq!(cut.ids, vec![1, 2, 7, 8]);
        assert_eq!(cut.supervised, vec![false, false, true, true]);
        // An end id inside the prompt is not the answer's end; no end in the span: unchanged.
        let s = Sample::new(
            vec![99, 2, 7, 8],
            vec![false, false, true, true],
            origin.clone(),
        );
        assert_eq!(cut_before_end(s, &[99]).ids, vec![99, 2, 7, 8]);
        let none = Sample::new(vec![1, 2], vec![false, false], origin);
        assert_eq!(cut_before_end(none, &[99]).ids, vec![1, 2]);
    }

    #[test]
    fn each_step_replays_its_share_in_turn() {
        let origin = Origin {
            path: Arc::from(Path::new("x")),
            line: 1,
        };
        let s = |id: i64| Sample::new(vec![0, id, id], vec![false, true, true], origin.clone());
        // 0.25 of 8 samples: 2 conversations a step, cycling through the 3.
        let r = Replay::new(vec![s(1), s(2), s(3)], 0.25, 8, 1.0);
        assert_eq!(r.conversations_for_step(0), vec![0, 1]);
        assert_eq!(r.conversations_for_step(1), vec![2, 0]);
        assert_eq!(r.replayed_through(10), 20);
        let b = r.batch_for_step(1).expect("two conversations");
        assert_eq!(b.samples, 2);
        // 0.1 of 8 = 0.8 a step: steps without one, and exactly 8 over 10 steps.
        let r = Replay::new(vec![s(1), s(2), s(3)], 0.1, 8, 1.0);
        let total: usize = (0..10).map(|st| r.conversations_for_step(st).len()).sum();
        assert_eq!(total, 8);
        assert_eq!(r.replayed_through(10), 8);
        assert!(r.batch_for_step(0).is_none());
        assert!(
            Replay::new(Vec::new(), 0.5, 8, 1.0)
                .batch_for_step(3)
                .is_none()
        );
    }

    #[test]
    fn lora_sft_of_a_chat_model_gets_the_default_unless_the_spec_says_otherwise() {
        let (g, src) = effective(None, true, true);
        assert_eq!(src, GuardSource::Default);
        assert_eq!(g.self_replay, None);
        assert_eq!(
            g.self_distillation.map(|d| d.weight),
            Some(finetune_crds::training::DEFAULT_DISTILL_WEIGHT)
        );
        assert_eq!(
            g.layer_anchor.map(|a| a.weight),
            Some(finetune_crds::training::DEFAULT_ANCHOR_WEIGHT)
        );
        assert_eq!(effective(None, true, false).1, GuardSource::Off);
        assert_eq!(effective(None, false, true).1, GuardSource::Off);
        let off = ForgettingGuard {
            disabled: true,
            ..Default::default()
        };
        let (g, src) = effective(Some(&off), true, true);
        assert_eq!((g.self_replay, src), (None, GuardSource::Off));
        let named = ForgettingGuard {
            self_distillation: Some(finetune_crds::training::WeightedGuard { weight: 1.0 }),
            ..Default::default()
        };
        let (g, src) = effective(Some(&named), true, true);
        assert_eq!((g.self_replay, src), (None, GuardSource::Spec));
    }
}
