//! Train/eval contamination: token n-gram overlap of each eval sample against the training set.
//!
//! Definition. Every window of `n` consecutive token ids of a sample is an n-gram (a sample shorter
//! than `n` has none). An n-gram that occurs in more than `boilerplate_fraction` of the training
//! samples, and in at least 2 of them, is boilerplate (chat-template scaffolding, a shared system
//! prompt) and ignored on both sides. The `share` of an eval sample is (its non-boilerplate n-gram
//! positions whose n-gram occurs in some training sample) / (its non-boilerplate n-gram positions);
//! samples with `share >= threshold` are reported with their `file:line`.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::Sample;
use super::rng::mix;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct ContaminationOptions {
    /// n-gram length in tokens (default 13, as in the GPT-3 paper).
    pub n: usize,
    /// Report eval samples whose overlapping share is at least this (default 0.5).
    pub threshold: f64,
    /// n-grams in more than this fraction of training samples are boilerplate (default 0.5).
    pub boilerplate_fraction: f64,
}

impl Default for ContaminationOptions {
    fn default() -> Self {
        ContaminationOptions {
            n: 13,
            threshold: 0.5,
            boilerplate_fraction: 0.5,
        }
    }
}

/// One reported eval sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contaminated {
    /// `file:line` of the eval sample.
    pub origin: String,
    pub share: f64,
    /// Non-boilerplate n-gram positions of the eval sample, and how many of them occur in train.
    pub ngrams: usize,
    pub overlapping: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContaminationReport {
    pub n: usize,
    pub threshold: f64,
    /// Eval samples checked.
    pub checked: usize,
    /// Distinct training n-grams ignored as boilerplate.
    pub boilerplate_ngrams: usize,
    /// Reported samples, in eval order.
    pub flagged: Vec<Contaminated>,
}

impl ContaminationReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "contamination ({}-grams, share >= {}): {} of {} eval samples flagged",
            self.n,
            self.threshold,
            self.flagged.len(),
            self.checked
        );
        for c in self.flagged.iter().take(5) {
            s.push_str(&format!("; {} ({:.0}%)", c.origin, c.share * 100.0));
        }
        if self.flagged.len() > 5 {
            s.push_str("; ...");
        }
        s
    }
}

fn ngrams(ids: &[i64], n: usize) -> impl Iterator<Item = u64> + '_ {
    ids.windows(n.max(1)).map(|w| {
        w.iter().fold(0x243F_6A88_85A3_08D3u64, |h, &t| {
            mix(h ^ t as u64).rotate_left(5)
        })
    })
}

/// Checks every eval sample against the training set.
pub fn check_contamination(
    train: &[Sample],
    eval: &[Sample],
    opts: ContaminationOptions,
) -> ContaminationReport {
    let n = opts.n.max(1);
    // n-gram -> number of training samples containing it.
    let mut counts: HashMap<u64, u32> = HashMap::new();
    let mut own = HashSet::new();
    for s in train {
        own.clear();
        own.extend(ngrams(&s.ids, n));
        for &g in &own {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    let limit = opts.boilerplate_fraction * train.len() as f64;
    let boilerplate = |c: u32| c >= 2 && f64::from(c) > limit;
    let boilerplate_ngrams = counts.values().filter(|&&c| boilerplate(c)).count();
    let mut flagged = Vec::new();
    for s in eval {
        let (mut total, mut hit) = (0usize, 0usize);
        for g in ngrams(&s.ids, n) {
            match counts.get(&g) {
                Some(&c) if boilerplate(c) => {}
                Some(_) => {
                    total += 1;
                    hit += 1;
                }
                None => total += 1,
            }
        }
        if total == 0 {
            continue;
        }
        let share = hit as f64 / total as f64;
        if share >= opts.threshold {
            flagged.push(Contaminated {
                origin: s.origin.to_string(),
                share,
                ngrams: total,
                overlapping: hit,
            });
        }
    }
    ContaminationReport {
        n,
        threshold: opts.threshold,
        checked: eval.len(),
        boilerplate_ngrams,
        flagged,
    }
}
