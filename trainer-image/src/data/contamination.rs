//! Train/eval contamination: which eval samples copy training samples, judged on the lines' own
//! words ([`Sample::text`]: the messages' contents, never the chat template around them).
//!
//! Words are the lowercase runs of letters and digits of a text. Two findings, reported apart:
//!
//! * **Copies.** An eval sample whose text equals a training sample's (`exact`), or has the same
//!   words in the same order once case, punctuation and spacing are ignored (`near-exact`). Each
//!   names the training line it copies. These are what a contamination check exists to catch, so
//!   they come first and are never hidden behind n-gram shares.
//! * **Overlap.** Of an eval sample's word n-grams (`n` words, default 8, as PaLM's
//!   contamination study), the share found in training text, counting only *specific* n-grams.
//!   An n-gram in more than `boilerplate_fraction` of the training samples (default 1%, and in at
//!   least 2) is a phrasing the data set repeats — a templated task's "Convert the date … to ISO
//!   format" — and says nothing about any one sample being copied; the words that make a sample
//!   its own do. Samples whose share of specific n-grams found in training is at least
//!   `threshold` are reported, highest share first, with the training line they share most with.
//!
//! Memory: one map entry per distinct training n-gram (16 bytes plus the map's overhead).

use std::collections::HashMap;

use serde::Serialize;

use super::Sample;
use super::rng::mix;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct ContaminationOptions {
    /// n-gram length in words (default 8).
    pub n: usize,
    /// Report eval samples whose overlapping share is at least this (default 0.5).
    pub threshold: f64,
    /// n-grams in more than this fraction of training samples, and in at least 2, are phrasing
    /// the data set repeats, not evidence of a copy (default 0.01).
    pub boilerplate_fraction: f64,
}

impl Default for ContaminationOptions {
    fn default() -> Self {
        ContaminationOptions {
            n: 8,
            threshold: 0.5,
            boilerplate_fraction: 0.01,
        }
    }
}

/// How closely an eval sample copies a training sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyKind {
    /// The same text, character for character.
    Exact,
    /// The same words in the same order; case, punctuation or spacing differ.
    NearExact,
}

/// An eval sample that copies a training sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CopiedSample {
    /// `file:line` of the eval sample.
    pub origin: String,
    /// `file:line` of the training sample it copies (the first, if several are the same).
    pub copies: String,
    pub kind: CopyKind,
}

/// An eval sample whose specific n-grams largely occur in training text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contaminated {
    /// `file:line` of the eval sample.
    pub origin: String,
    pub share: f64,
    /// Specific n-gram positions of the eval sample, and how many of them occur in train.
    pub ngrams: usize,
    pub overlapping: usize,
    /// `file:line` of the training sample that holds most of the overlapping n-grams.
    pub closest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContaminationReport {
    pub n: usize,
    pub threshold: f64,
    /// Eval samples checked.
    pub checked: usize,
    /// Distinct training n-grams ignored as repeated phrasing.
    pub boilerplate_ngrams: usize,
    /// Eval samples that copy a training sample, exact copies first, then in eval order.
    pub copies: Vec<CopiedSample>,
    /// Other eval samples at or above `threshold`, highest share first.
    pub flagged: Vec<Contaminated>,
}

/// How many findings [`ContaminationReport::summary`] names before "and N more".
const NAMED: usize = 5;

impl ContaminationReport {
    /// Eval samples found contaminated: copies plus overlapping samples.
    pub fn count(&self) -> usize {
        self.copies.len() + self.flagged.len()
    }

    /// The first eval line to name in an error: a copy, else the highest share.
    pub fn first_origin(&self) -> Option<&str> {
        let copy = self.copies.first().map(|c| c.origin.as_str());
        copy.or_else(|| self.flagged.first().map(|c| c.origin.as_str()))
    }

    /// One line for logs and errors: copies first, each with the training line it copies.
    pub fn summary(&self) -> String {
        let exact = self
            .copies
            .iter()
            .filter(|c| c.kind == CopyKind::Exact)
            .count();
        let mut s = format!(
            "contamination: {} of {} eval samples copy a training sample ({exact} exact, {} \
             near-exact)",
            self.copies.len(),
            self.checked,
            self.copies.len() - exact,
        );
        let copies = self
            .copies
            .iter()
            .map(|c| format!("{} = {}", c.origin, c.copies));
        push_named(&mut s, copies, self.copies.len());
        s.push_str(&format!(
            "; {} more share >= {:.0}% of their specific {}-word n-grams with training text",
            self.flagged.len(),
            self.threshold * 100.0,
            self.n
        ));
        let flagged = self.flagged.iter().map(|c| match &c.closest {
            Some(t) => format!("{} ({:.0}%, most with {t})", c.origin, c.share * 100.0),
            None => format!("{} ({:.0}%)", c.origin, c.share * 100.0),
        });
        push_named(&mut s, flagged, self.flagged.len());
        if self.count() > 0 {
            s.push_str(" (full list in training_summary.json)");
        }
        s
    }
}

fn push_named(s: &mut String, items: impl Iterator<Item = String>, total: usize) {
    let named: Vec<String> = items.take(NAMED).collect();
    if !named.is_empty() {
        s.push_str(": ");
        s.push_str(&named.join(", "));
    }
    if total > NAMED {
        s.push_str(&format!(" and {} more", total - NAMED));
    }
}

/// The lowercase runs of letters and digits of `text`.
pub fn words(text: &str) -> Vec<String> {
    crate::text::word_runs(text)
        .map(str::to_lowercase)
        .collect()
}

fn hash_words(words: &[String]) -> u64 {
    words.iter().fold(0x243F_6A88_85A3_08D3u64, |h, w| {
        w.bytes()
            .fold(mix(h).rotate_left(5), |h, b| mix(h ^ u64::from(b)))
    })
}

fn ngrams(words: &[String], n: usize) -> impl Iterator<Item = u64> + '_ {
    words.windows(n).map(hash_words)
}

/// Training n-grams: how many samples hold each, and the first one that does.
struct TrainNgrams {
    seen: HashMap<u64, (u32, u32)>,
    boilerplate_above: f64,
}

impl TrainNgrams {
    fn build(train_words: &[Vec<String>], opts: &ContaminationOptions) -> Self {
        let mut seen: HashMap<u64, (u32, u32)> = HashMap::new();
        for (i, w) in train_words.iter().enumerate() {
            let mut own: Vec<u64> = ngrams(w, opts.n).collect();
            own.sort_unstable();
            own.dedup();
            for g in own {
                seen.entry(g).or_insert((0, i as u32)).0 += 1;
            }
        }
        TrainNgrams {
            seen,
            boilerplate_above: opts.boilerplate_fraction * train_words.len() as f64,
        }
    }

    fn is_boilerplate(&self, count: u32) -> bool {
        count >= 2 && f64::from(count) > self.boilerplate_above
    }

    fn boilerplate_count(&self) -> usize {
        let seen = self.seen.values();
        seen.filter(|(c, _)| self.is_boilerplate(*c)).count()
    }

    /// (specific n-grams, how many occur in train, the train sample holding most of them).
    fn overlap(&self, words: &[String], n: usize) -> (usize, usize, Option<u32>) {
        let (mut total, mut hit) = (0, 0);
        let mut holders: HashMap<u32, usize> = HashMap::new();
        for g in ngrams(words, n) {
            match self.seen.get(&g) {
                Some((c, _)) if self.is_boilerplate(*c) => {}
                Some((_, first)) => {
                    total += 1;
                    hit += 1;
                    *holders.entry(*first).or_default() += 1;
                }
                None => total += 1,
            }
        }
        // Ties go to the earlier training line, so the report is deterministic.
        let closest = holders
            .into_iter()
            .max_by_key(|&(i, k)| (k, std::cmp::Reverse(i)))
            .map(|(i, _)| i);
        (total, hit, closest)
    }
}

/// Checks every eval sample against the training set: copies first, then n-gram overlap.
pub fn check_contamination(
    train: &[Sample],
    eval: &[Sample],
    opts: ContaminationOptions,
) -> ContaminationReport {
    let opts = ContaminationOptions {
        n: opts.n.max(1),
        ..opts
    };
    let train_words: Vec<Vec<String>> = train.iter().map(|s| words(&s.text)).collect();
    let mut exact: HashMap<&str, usize> = HashMap::new();
    let mut near: HashMap<String, usize> = HashMap::new();
    for (i, (s, w)) in train.iter().zip(&train_words).enumerate() {
        if !w.is_empty() {
            exact.entry(&s.text).or_insert(i);
            near.entry(w.join(" ")).or_insert(i);
        }
    }
    let index = TrainNgrams::build(&train_words, &opts);
    let mut copies = Vec::new();
    let mut flagged = Vec::new();
    for s in eval {
        let w = words(&s.text);
        if w.is_empty() {
            continue;
        }
        let copy = match exact.get(&*s.text) {
            Some(&i) => Some((i, CopyKind::Exact)),
            None => near.get(&w.join(" ")).map(|&i| (i, CopyKind::NearExact)),
        };
        if let Some((i, kind)) = copy {
            copies.push(CopiedSample {
                origin: s.origin.to_string(),
                copies: train[i].origin.to_string(),
                kind,
            });
            continue;
        }
        let (total, hit, closest) = index.overlap(&w, opts.n);
        let share = if total == 0 {
            0.0
        } else {
            hit as f64 / total as f64
        };
        if total > 0 && share >= opts.threshold {
            flagged.push(Contaminated {
                origin: s.origin.to_string(),
                share,
                ngrams: total,
                overlapping: hit,
                closest: closest.map(|i| train[i as usize].origin.to_string()),
            });
        }
    }
    // Stable sorts: exact before near-exact, higher share first; eval order within a rank.
    copies.sort_by_key(|c| c.kind);
    flagged.sort_by(|a, b| b.share.total_cmp(&a.share));
    ContaminationReport {
        n: opts.n,
        threshold: opts.threshold,
        checked: eval.len(),
        boilerplate_ngrams: index.boilerplate_count(),
        copies,
        flagged,
    }
}

#[cfg(test)]
#[path = "contamination_tests.rs"]
mod tests;
