//! `finetune-trainer audit`: retention of an adapter measured on a part of the general question
//! set that its run never saw — by default the held-out `audit` part (see
//! [`crate::train::general`]). The base answers with the adapter switched off and the tuned model
//! with it on, greedily, in batches as large as a KV-cache budget allows (one on SmolLM2-135M),
//! each answer stopping once it holds a key; the score is the share of the questions the base
//! answered correctly that the tuned model still answers correctly, with its 95 % interval and a
//! breakdown by category.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::load::LoadedModel;
use crate::train::general::{self, Split};
use crate::train::probe::Probe;
use crate::train::retention::{RetentionScore, answer_is_correct, wilson_95};

/// Kept / base-correct counts of one category.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct CategoryCount {
    pub base_correct: usize,
    pub kept: usize,
}

/// A question the base answered correctly and the tuned model no longer does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lost {
    pub question: String,
    pub category: String,
    pub base: String,
    pub tuned: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    pub split: String,
    pub questions: usize,
    pub base_correct: usize,
    pub kept: usize,
    pub gained: usize,
    /// kept / base_correct.
    pub score: f64,
    pub interval_95: (f64, f64),
    pub by_category: BTreeMap<String, CategoryCount>,
    pub lost: Vec<Lost>,
    pub seconds: f64,
}

/// Audits the adapter loaded into `m` on `part`, answering with up to `max_new_tokens` tokens.
pub fn audit(m: &mut LoadedModel, part: Split, max_new_tokens: usize) -> Result<AuditReport> {
    let started = Instant::now();
    let questions = general::split(part);
    let prompts: Vec<String> = questions.iter().map(|q| q.prompt.clone()).collect();
    let keys: Vec<Vec<String>> = questions.iter().map(|q| q.answers.clone()).collect();
    let probe = Probe::from_questions(&prompts, &m.tokenizer, m.chat_template.as_ref())?;
    m.model.set_adapters_enabled(false);
    let (tok, eos) = (&m.tokenizer, &m.eos_ids);
    let base = probe.answer_until_correct(&mut m.model, tok, eos, max_new_tokens, &keys)?;
    m.model.set_adapters_enabled(true);
    let tuned = probe.answer_until_correct(&mut m.model, tok, eos, max_new_tokens, &keys)?;
    let score = RetentionScore::measure(&tuned, &base, &keys);
    let mut by_category: BTreeMap<String, CategoryCount> = BTreeMap::new();
    let mut lost = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        if !answer_is_correct(&base[i], &keys[i]) {
            continue;
        }
        let count = by_category.entry(q.category.clone()).or_default();
        count.base_correct += 1;
        if answer_is_correct(&tuned[i], &keys[i]) {
            count.kept += 1;
        } else {
            lost.push(Lost {
                question: q.prompt.clone(),
                category: q.category.clone(),
                base: base[i].clone(),
                tuned: tuned[i].clone(),
            });
        }
    }
    Ok(AuditReport {
        split: format!("{part:?}").to_lowercase(),
        questions: questions.len(),
        base_correct: score.base_correct,
        kept: score.kept,
        gained: score.gained,
        score: score.kept as f64 / score.base_correct.max(1) as f64,
        interval_95: wilson_95(score.kept, score.base_correct),
        by_category,
        lost,
        seconds: started.elapsed().as_secs_f64(),
    })
}
