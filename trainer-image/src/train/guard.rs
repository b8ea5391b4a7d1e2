//! Forgetting guards that change what the model trains on.
//!
//! **Self-replay** (`forgettingGuard.selfReplay`): before the first update the base model answers
//! a built-in set of general requests greedily; those conversations are mixed into the training
//! stream (`ratio` replayed samples per training sample), so every epoch also rehearses the base
//! model's own general behaviour. No external data is needed, and the replayed answers are in the
//! model's own style, so they pull only toward what it already did.
//!
//! The replay requests are deliberately disjoint from the retention probe's questions
//! ([`crate::train::retention::BUILTIN_QUESTIONS`]): the probe measures transfer, not recall of
//! rehearsed answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use finetune_crds::training::{ForgettingGuard, ReplayGuard};
use serde::{Deserialize, Serialize};

use crate::data::{Encoder, Origin, Sample};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::train::probe::Probe;

/// Where a run's guards came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardSource {
    /// `spec.forgettingGuard` names its guards.
    Spec,
    /// The spec names none; LoRA SFT of a chat model gets [`ReplayGuard::default_guard`].
    Default,
    /// `forgettingGuard.disabled: true`, or a run the default does not fit (DPO, full
    /// fine-tuning, a model without a chat template).
    Off,
}

/// The guards a run uses: the spec's when it names any, otherwise the default for LoRA SFT of a
/// model with a chat template (the replayed conversations are chats). Full fine-tuning gets no
/// default: its guard, `l2ToInit`, holds a second copy of the weights, a cost the user chooses.
pub fn effective(
    spec: Option<&ForgettingGuard>,
    lora_sft: bool,
    has_chat_template: bool,
) -> (ForgettingGuard, GuardSource) {
    match spec {
        Some(g) if g.disabled => (ForgettingGuard::default(), GuardSource::Off),
        Some(g) => (g.clone(), GuardSource::Spec),
        None if lora_sft && has_chat_template => (
            ForgettingGuard {
                self_replay: Some(ReplayGuard::default_guard()),
                ..Default::default()
            },
            GuardSource::Default,
        ),
        None => (ForgettingGuard::default(), GuardSource::Off),
    }
}

/// General requests of many kinds: facts, how-to, writing, arithmetic, definitions, lists.
pub const REPLAY_PROMPTS: [&str; 40] = [
    "What is the tallest animal in the world?",
    "Explain in one sentence what a noun is.",
    "How many minutes are in an hour?",
    "Suggest a name for a pet goldfish.",
    "What is the main ingredient of guacamole?",
    "Write a short greeting for a birthday card.",
    "What is 9 times 6?",
    "Which planet is known as the Red Planet?",
    "Give one tip for sleeping better.",
    "What does a thermometer measure?",
    "Name three primary colours.",
    "What is the capital of Japan?",
    "How do you say 'good morning' in Spanish?",
    "What is the opposite of early?",
    "Describe the taste of a lemon in a few words.",
    "Who was the first president of the United States?",
    "How many wheels does a bicycle have?",
    "What is H2O commonly called?",
    "List two things you can do on a rainy day.",
    "What is the largest desert in the world?",
    "Why do we need to drink water?",
    "Finish the phrase: practice makes ...",
    "What is 100 minus 37?",
    "What instrument has black and white keys?",
    "Give an example of a mammal that can fly.",
    "What do caterpillars turn into?",
    "Write a one-line thank-you note to a teacher.",
    "What is the smallest prime number?",
    "Which organ pumps blood through the body?",
    "What shape has four equal sides?",
    "Recommend a healthy breakfast.",
    "What is the capital of Italy?",
    "How many strings does a standard guitar have?",
    "What is the past tense of 'run'?",
    "Name a fruit that is yellow.",
    "What season comes after winter?",
    "What do you call a baby cat?",
    "Explain what a calendar is used for.",
    "How many months have 31 days?",
    "What is the chemical symbol for oxygen?",
];

/// Longest base answer self-distillation scores, in tokens.
pub const DISTILL_TOKENS: usize = 48;

/// The base model's answers, kept beside the checkpoints so a resumed run (whose weights are no
/// longer the base) replays exactly the same conversations.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ReplayCache {
    prompts: Vec<String>,
    /// The answer length they were generated with (absent in caches written before it existed).
    #[serde(default)]
    max_tokens: Option<usize>,
    answers: Vec<String>,
}

pub fn replay_cache_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("self_replay.json")
}

/// Self-distillation's answers are longer than replay's by default, so they are cached apart.
pub fn distill_cache_path(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join("self_distillation.json")
}

/// The base model's greedy answers to [`REPLAY_PROMPTS`] as chat samples (loss on the answers).
/// `model` must still be the base (call before any update); answers are read from `cache` when a
/// previous attempt wrote it. Prompts the model answers with nothing are dropped.
pub fn replay_samples(
    model: &mut CausalLm,
    encoder: &Encoder,
    eos_ids: &[i64],
    cache: &Path,
    max_tokens: usize,
) -> Result<Vec<Sample>> {
    let template = encoder.template.ok_or_else(|| {
        Error::Usage(
            "forgettingGuard.selfReplay needs a model with a chat template (the replayed conversations are chats)".into(),
        )
    })?;
    let prompts: Vec<String> = REPLAY_PROMPTS.iter().map(|p| p.to_string()).collect();
    let cached = std::fs::read_to_string(cache)
        .ok()
        .and_then(|t| serde_json::from_str::<ReplayCache>(&t).ok())
        .filter(|c| c.prompts == prompts && c.max_tokens == Some(max_tokens));
    let answers = match cached {
        Some(c) => c.answers,
        None => {
            let probe = Probe::from_questions(&prompts, encoder.tokenizer, Some(template))?;
            let answers = probe.answer(model, encoder.tokenizer, eos_ids, max_tokens)?;
            if let Some(dir) = cache.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let c = ReplayCache {
                prompts,
                max_tokens: Some(max_tokens),
                answers,
            };
            let text = serde_json::to_string_pretty(&c).expect("cache serializes");
            std::fs::write(cache, text).map_err(|e| Error::io(cache, e))?;
            c.answers
        }
    };
    let source: Arc<Path> = Arc::from(Path::new("<self-replay>"));
    let mut samples = Vec::new();
    for (i, (q, a)) in REPLAY_PROMPTS.iter().zip(&answers).enumerate() {
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
        samples.push(encoder.chat(&messages, &origin)?);
    }
    Ok(samples)
}

/// Appends `round(ratio · train.len())` replay samples (cycling through `replay` in order) to
/// `train`; the batcher's seeded shuffle spreads them through each epoch. Returns how many.
pub fn mix_in(train: &mut Vec<Sample>, replay: &[Sample], ratio: f64) -> usize {
    if replay.is_empty() {
        return 0;
    }
    let n = (ratio * train.len() as f64).round() as usize;
    train.extend(replay.iter().cycle().take(n).cloned());
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::retention::BUILTIN_QUESTIONS;

    #[test]
    fn replay_prompts_are_disjoint_from_the_probe() {
        for p in REPLAY_PROMPTS {
            assert!(
                !BUILTIN_QUESTIONS.iter().any(|(q, _)| *q == p),
                "{p} is also a probe question"
            );
        }
    }

    #[test]
    fn mixing_adds_the_ratio_cycling_through_replay() {
        let origin = Origin {
            path: Arc::from(Path::new("x")),
            line: 1,
        };
        let s = |id: i64| Sample::new(vec![0, id], vec![false, true], origin.clone());
        let mut train: Vec<Sample> = (0..10).map(s).collect();
        let replay = vec![s(100), s(101)];
        assert_eq!(mix_in(&mut train, &replay, 0.3), 3);
        let tail: Vec<i64> = train[10..].iter().map(|x| x.ids[1]).collect();
        assert_eq!(tail, vec![100, 101, 100]);
        assert_eq!(mix_in(&mut train, &[], 0.5), 0);
    }

    #[test]
    fn lora_sft_of_a_chat_model_gets_the_default_unless_the_spec_says_otherwise() {
        let (g, src) = effective(None, true, true);
        assert_eq!(src, GuardSource::Default);
        assert_eq!(g.self_replay, Some(ReplayGuard::default_guard()));
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
