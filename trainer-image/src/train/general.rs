//! The general question set: several hundred short questions across everyday knowledge,
//! arithmetic, language and instruction following, written for this project (redistributable
//! with it), each with the words a correct answer contains. It is split three ways, and the parts
//! never share a question:
//!
//! * `replay` — what the self-replay and self-distillation guards ask the base model before the
//!   first update and then rehearse;
//! * `probe` — the built-in retention probe of every run (`evaluation.retention` without `data`),
//!   which `minScore` acts on;
//! * `audit` — held out from both: no run trains on it or stops on it. `finetune-trainer audit`
//!   measures retention on it, so a guard tuned against the probe is judged on questions it has
//!   never seen (`make bench-forgetting`, `tests/reference/test_forgetting.py`).
//!
//! The file is `trainer-image/assets/general-questions.jsonl`, one
//! `{"prompt", "answers", "category", "split"}` object a line, compiled into the binary.

use std::sync::OnceLock;

use serde::Deserialize;

const GENERAL_JSONL: &str = include_str!("../../assets/general-questions.jsonl");

/// Which part of the set a question belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Replay,
    Probe,
    Audit,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GeneralQuestion {
    pub prompt: String,
    /// Words a correct answer contains (see [`crate::train::retention::answer_is_correct`]).
    #[serde(default)]
    pub answers: Vec<String>,
    /// `knowledge`, `arithmetic`, `language` or `instructions`.
    pub category: String,
    pub split: Split,
}

/// Every question of the set, in file order.
pub fn questions() -> &'static [GeneralQuestion] {
    static SET: OnceLock<Vec<GeneralQuestion>> = OnceLock::new();
    SET.get_or_init(|| {
        // The file is part of the source; `the_set_parses_and_its_parts_are_disjoint` reads it.
        GENERAL_JSONL
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("assets/general-questions.jsonl parses"))
            .collect()
    })
}

/// The questions of one part, in file order.
pub fn split(part: Split) -> Vec<&'static GeneralQuestion> {
    questions().iter().filter(|q| q.split == part).collect()
}

/// `count` prompts of the replay part (all of them when it holds fewer), a different selection
/// for each `seed`: a run rehearses as many distinct requests as it has replay turns, instead of
/// cycling through a few.
pub fn replay_prompts(count: usize, seed: u64) -> Vec<String> {
    let mut prompts: Vec<String> = split(Split::Replay)
        .into_iter()
        .map(|q| q.prompt.clone())
        .collect();
    let mut rng = crate::data::rng::SplitMix64::new(seed);
    // Fisher-Yates: the first `count` of a seeded permutation.
    for i in (1..prompts.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        prompts.swap(i, j);
    }
    prompts.truncate(count);
    prompts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn normalised(s: &str) -> String {
        crate::data::contamination::words(s).join(" ")
    }

    #[test]
    fn the_set_parses_and_its_parts_are_disjoint() {
        let all = questions();
        let mut seen = HashMap::new();
        for q in all {
            if let Some(other) = seen.insert(normalised(&q.prompt), q.split) {
                panic!("{:?} is in {other:?} and {:?}", q.prompt, q.split);
            }
        }
        let (replay, probe, audit) = (
            split(Split::Replay),
            split(Split::Probe),
            split(Split::Audit),
        );
        assert_eq!(replay.len() + probe.len() + audit.len(), all.len());
        assert!(replay.len() >= 150, "{} replay prompts", replay.len());
        assert!(probe.len() >= 80, "{} probe questions", probe.len());
        assert!(audit.len() >= 150, "{} audit questions", audit.len());
    }

    #[test]
    fn probe_and_audit_questions_have_keys_and_every_part_spans_every_category() {
        for part in [Split::Replay, Split::Probe, Split::Audit] {
            let questions = split(part);
            let categories: HashSet<&str> = questions.iter().map(|q| q.category.as_str()).collect();
            for c in ["knowledge", "arithmetic", "language", "instructions"] {
                assert!(categories.contains(c), "{part:?} has no {c} question");
            }
            if part != Split::Replay {
                let keyless: Vec<&str> = questions
                    .iter()
                    .filter(|q| q.answers.is_empty())
                    .map(|q| q.prompt.as_str())
                    .collect();
                assert!(keyless.is_empty(), "{part:?} without keys: {keyless:?}");
            }
        }
    }

    #[test]
    fn replay_selections_are_seeded_distinct_and_bounded() {
        let a = replay_prompts(60, 1);
        assert_eq!(a, replay_prompts(60, 1));
        assert_ne!(a, replay_prompts(60, 2));
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 60);
        let pool = split(Split::Replay).len();
        assert_eq!(replay_prompts(100_000, 1).len(), pool);
    }
}
