//! Evaluation beyond loss: greedy answers to prompts, compared with reference answers.
//!
//! Two uses share this module:
//! * **generation eval** (`evaluation.generation`): prompts and references come from the eval
//!   set — the prompt is everything before a sample's last supervised span (the final assistant
//!   turn, or an instruction's output) and the reference is that span's text;
//! * **retention probe** (`evaluation.retention`): general questions whose references are the
//!   *base model's own* greedy answers, recorded before the first update, so the score is the share
//!   of answers training left intact.
//!
//! Answers are compared after decoding with special tokens skipped: `exact` after trimming
//! surrounding whitespace, `normalized` after lowercasing, collapsing whitespace and dropping
//! trailing punctuation (so "Paris." and "paris" agree).

use serde::{Deserialize, Serialize};

use crate::data::Sample;
use crate::error::Result;
use crate::generate::{generate_greedy_batch, generate_greedy_batch_until};
use crate::model::CausalLm;
use crate::text::{ChatTemplate, TextTokenizer};
use crate::train::retention::settled_correct;

/// Prompts (token ids) with the answers they are expected to get.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub prompts: Vec<Vec<i64>>,
    pub references: Vec<String>,
}

/// One greedy answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Decoded without special tokens.
    pub text: String,
    /// The model emitted an end token; `false` when the answer was cut off at the token limit.
    pub ended: bool,
}

/// How many answers matched their reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeScore {
    pub samples: usize,
    pub exact: usize,
    pub normalized: usize,
}

impl ProbeScore {
    /// Share of exact matches, in [0, 1] (0 for an empty probe).
    pub fn exact_match(&self) -> f64 {
        ratio(self.exact, self.samples)
    }

    /// Share of normalized matches, in [0, 1]: the headline score.
    pub fn normalized_match(&self) -> f64 {
        ratio(self.normalized, self.samples)
    }
}

/// `n / d`, or 0 for an empty probe.
pub(crate) fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

impl Probe {
    /// Prompt/reference pairs from eval samples: the prompt is the sample up to its last supervised
    /// span, the reference that span decoded. Samples without a prompt before the span (raw text,
    /// where every token is supervised) are skipped; at most `max` pairs are kept, in order.
    pub fn from_samples(samples: &[Sample], tokenizer: &TextTokenizer, max: usize) -> Result<Self> {
        let mut probe = Probe::default();
        for s in samples {
            if probe.prompts.len() >= max {
                break;
            }
            let Some((start, end)) = last_supervised_span(&s.supervised) else {
                continue;
            };
            if start <= 1 {
                continue;
            }
            probe.prompts.push(s.ids[..start].to_vec());
            probe
                .references
                .push(tokenizer.decode(&s.ids[start..end], true)?);
        }
        Ok(probe)
    }

    /// Questions rendered as single user turns with the chat template (with the generation
    /// prompt), or as `question\n` for models without one. References are left empty: the base
    /// model's answers become the references (see [`Probe::with_references`]).
    pub fn from_questions(
        questions: &[String],
        tokenizer: &TextTokenizer,
        template: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let mut prompts = Vec::with_capacity(questions.len());
        for q in questions {
            let ids = match template {
                Some(t) => {
                    let messages = serde_json::json!([{"role": "user", "content": q}]);
                    tokenizer.encode(&t.render(&messages, true)?, false)?
                }
                None => tokenizer.encode(&format!("{q}\n"), true)?,
            };
            prompts.push(ids);
        }
        Ok(Probe {
            prompts,
            references: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The same prompts with `references` (e.g. the base model's answers).
    pub fn with_references(mut self, references: Vec<String>) -> Self {
        assert_eq!(references.len(), self.prompts.len());
        self.references = references;
        self
    }

    /// Greedy answers of `model` in eval mode (no dropout), decoded without special tokens. The
    /// model is left in training mode, as the trainer keeps it between evaluations.
    pub fn answer(
        &self,
        model: &mut CausalLm,
        tokenizer: &TextTokenizer,
        eos_ids: &[i64],
        max_new_tokens: usize,
    ) -> Result<Vec<String>> {
        let answers = self.answer_with_ends(model, tokenizer, eos_ids, max_new_tokens)?;
        Ok(answers.into_iter().map(|a| a.text).collect())
    }

    /// Like [`Probe::answer`], also telling which answers the model ended itself (an end token
    /// within `max_new_tokens`) and which were cut off at the limit.
    pub fn answer_with_ends(
        &self,
        model: &mut CausalLm,
        tokenizer: &TextTokenizer,
        eos_ids: &[i64],
        max_new_tokens: usize,
    ) -> Result<Vec<Answer>> {
        model.set_training(false);
        let answers = generate_greedy_batch(model, &self.prompts, max_new_tokens, eos_ids);
        model.set_training(true);
        let mut out = Vec::with_capacity(answers.len());
        for ids in &answers {
            out.push(Answer {
                text: tokenizer.decode(ids, true)?,
                ended: ids.last().is_some_and(|t| eos_ids.contains(t)),
            });
        }
        Ok(out)
    }

    /// [`Probe::answer`] for questions with answer keys (`keys[i]` for prompt `i`): an answer
    /// stops as soon as its finished words hold a key ([`settled_correct`]), since whatever
    /// followed could not make it wrong. Prompts without keys are answered in full. A model that
    /// answers in sentences ("The capital of France is Paris, a city…") then pays for its answer,
    /// not for the sentence around it.
    pub fn answer_until_correct(
        &self,
        model: &mut CausalLm,
        tokenizer: &TextTokenizer,
        eos_ids: &[i64],
        max_new_tokens: usize,
        keys: &[Vec<String>],
    ) -> Result<Vec<String>> {
        let mut settled = |i: usize, ids: &[i64]| match keys.get(i) {
            Some(k) if !k.is_empty() => tokenizer
                .decode(ids, true)
                .is_ok_and(|text| settled_correct(&text, k)),
            _ => false,
        };
        model.set_training(false);
        let answers = generate_greedy_batch_until(
            model,
            &self.prompts,
            max_new_tokens,
            eos_ids,
            &mut settled,
        );
        model.set_training(true);
        answers
            .iter()
            .map(|ids| tokenizer.decode(ids, true))
            .collect()
    }

    /// Compares `answers` with the references.
    pub fn score(&self, answers: &[String]) -> ProbeScore {
        score(answers, &self.references)
    }

    /// The generation eval: answers every prompt, scores them against the references and logs
    /// the exact match, saying `when` (before or after training) it ran.
    pub fn generation_eval(
        &self,
        model: &mut CausalLm,
        tokenizer: &TextTokenizer,
        eos_ids: &[i64],
        max_new_tokens: usize,
        when: &str,
    ) -> Result<(Vec<String>, ProbeScore)> {
        let answers = self.answer(model, tokenizer, eos_ids, max_new_tokens)?;
        let score = self.score(&answers);
        eprintln!(
            "generation eval {when} training: exact match {}/{} ({} normalized)",
            score.exact, score.samples, score.normalized
        );
        Ok((answers, score))
    }
}

/// The `[start, end)` token range of the last run of supervised positions.
fn last_supervised_span(supervised: &[bool]) -> Option<(usize, usize)> {
    let end = supervised.iter().rposition(|&s| s)? + 1;
    let start = supervised[..end]
        .iter()
        .rposition(|&s| !s)
        .map_or(0, |i| i + 1);
    Some((start, end))
}

/// Lowercase, whitespace runs collapsed to one space, surrounding whitespace and trailing
/// sentence punctuation removed.
pub fn normalize(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_end_matches(['.', '!', '?', ',', ';', ':'])
        .trim()
        .to_lowercase()
}

pub fn score(answers: &[String], references: &[String]) -> ProbeScore {
    let mut s = ProbeScore {
        samples: answers.len().min(references.len()),
        ..Default::default()
    };
    for (a, r) in answers.iter().zip(references) {
        if a.trim() == r.trim() {
            s.exact += 1;
        }
        if normalize(a) == normalize(r) {
            s.normalized += 1;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Origin;
    use std::path::Path;
    use std::sync::Arc;

    #[test]
    fn last_span_is_the_final_supervised_run() {
        let f = |v: &[u8]| v.iter().map(|&b| b == 1).collect::<Vec<_>>();
        assert_eq!(
            last_supervised_span(&f(&[0, 0, 1, 1, 0, 1, 1, 1])),
            Some((5, 8))
        );
        assert_eq!(last_supervised_span(&f(&[0, 1, 1, 0, 0])), Some((1, 3)));
        assert_eq!(last_supervised_span(&f(&[1, 1, 1])), Some((0, 3)));
        assert_eq!(last_supervised_span(&f(&[0, 0])), None);
    }

    #[test]
    fn normalization_forgives_case_spacing_and_final_punctuation() {
        assert_eq!(
            normalize("  The  capital is\nParis. "),
            "the capital is paris"
        );
        assert_eq!(
            normalize("kubectl get pods -n web"),
            "kubectl get pods -n web"
        );
        let s = score(
            &["Paris.".into(), " 4".into(), "no".into()],
            &["paris".into(), "4".into(), "yes".into()],
        );
        assert_eq!((s.samples, s.exact, s.normalized), (3, 1, 2));
        assert!((s.normalized_match() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(ProbeScore::default().exact_match(), 0.0);
    }

    #[test]
    fn raw_text_samples_give_no_prompts() {
        let origin = Origin {
            path: Arc::from(Path::new("t.jsonl")),
            line: 1,
        };
        // Sample::new clears the first flag: the span starts at 1, leaving no prompt worth asking.
        let text = Sample::new(vec![1, 2, 3], vec![true; 3], origin);
        assert_eq!(last_supervised_span(&text.supervised), Some((1, 3)));
    }
}
