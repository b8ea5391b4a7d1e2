//! Curation: exact-duplicate removal, truncation, dropping samples left without supervision, the
//! seeded eval split, statistics and the dataset digest. Every sample removed or shortened is
//! counted in [`DataStats`].

use std::collections::HashSet;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Sample;
use super::format::PreferencePair;
use super::rng::{SplitMix64, stream};

/// What happened to a data set on its way to the trainer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataStats {
    /// Non-blank JSONL lines read (one sample or pair each).
    pub lines: usize,
    /// Samples (or pairs) kept (for training: after `held_out` went to the eval split).
    pub samples: usize,
    /// Samples moved to the eval split (`eval_fraction`); 0 with an eval file.
    pub held_out: usize,
    /// Exact duplicates removed (same token ids and supervision flags as an earlier line).
    pub duplicates: usize,
    /// Samples cut to `max_seq_length` (kept, possibly with fewer supervised tokens).
    pub truncated: usize,
    /// Supervised tokens lost to truncation, over kept and dropped samples.
    pub truncated_supervised_tokens: u64,
    /// Samples dropped because no supervised token survived truncation.
    pub dropped: usize,
    /// Tokens of the kept samples.
    pub tokens: u64,
    /// Supervised tokens (targets) of the kept samples.
    pub supervised_tokens: u64,
    pub mean_length: f64,
    pub max_length: usize,
}

impl DataStats {
    /// One line for logs, e.g. `120 lines -> 117 samples (2 duplicates, 1 dropped, 3 truncated
    /// losing 40 supervised tokens); 9000 tokens, 2100 supervised; length mean 76.9 max 256`.
    pub fn summary(&self) -> String {
        let held = if self.held_out > 0 {
            format!(" + {} held out for eval", self.held_out)
        } else {
            String::new()
        };
        format!(
            "{} lines -> {} samples{held} ({} duplicates, {} dropped, {} truncated losing {} supervised tokens); \
             {} tokens, {} supervised; length mean {:.1} max {}",
            self.lines,
            self.samples,
            self.duplicates,
            self.dropped,
            self.truncated,
            self.truncated_supervised_tokens,
            self.tokens,
            self.supervised_tokens,
            self.mean_length,
            self.max_length
        )
    }

    /// Recomputes the sample-derived fields (samples, tokens, lengths) for `samples`.
    pub fn recount(&mut self, samples: &[Sample]) {
        self.finish(samples.iter().map(|s| (s.len(), s.supervised_count())));
    }

    /// [`Self::recount`] for preference pairs (a pair's length is both sides together).
    pub fn recount_pairs(&mut self, pairs: &[PreferencePair]) {
        self.finish(pairs.iter().map(|p| {
            (
                p.chosen.len() + p.rejected.len(),
                p.chosen.supervised_count() + p.rejected.supervised_count(),
            )
        }));
    }

    fn finish(&mut self, lengths: impl Iterator<Item = (usize, usize)>) {
        let (mut n, mut tokens, mut sup, mut max) = (0usize, 0u64, 0u64, 0usize);
        for (len, s) in lengths {
            n += 1;
            tokens += len as u64;
            sup += s as u64;
            max = max.max(len);
        }
        self.samples = n;
        self.tokens = tokens;
        self.supervised_tokens = sup;
        self.max_length = max;
        self.mean_length = if n > 0 { tokens as f64 / n as f64 } else { 0.0 };
    }
}

/// Curation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CurateOptions {
    pub max_seq_length: usize,
    /// Remove exact duplicates (default true; the `eval` command keeps every line).
    pub dedupe: bool,
}

/// Cuts `s` to `max` tokens; returns the number of supervised tokens lost (None if not cut).
pub fn truncate(s: &mut Sample, max: usize) -> Option<u64> {
    if s.ids.len() <= max {
        return None;
    }
    let lost = s.supervised[max..].iter().filter(|&&f| f).count() as u64;
    s.ids.truncate(max);
    s.supervised.truncate(max);
    Some(lost)
}

/// Dedupe (on the full, untruncated tokens), truncate, drop samples without supervision.
/// Keeps file order.
pub fn curate(samples: Vec<Sample>, opts: CurateOptions) -> (Vec<Sample>, DataStats) {
    let mut stats = DataStats {
        lines: samples.len(),
        ..Default::default()
    };
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut out = Vec::with_capacity(samples.len());
    for mut s in samples {
        if opts.dedupe && !seen.insert(hash_sample(&s)) {
            stats.duplicates += 1;
            continue;
        }
        if let Some(lost) = truncate(&mut s, opts.max_seq_length) {
            stats.truncated += 1;
            stats.truncated_supervised_tokens += lost;
        }
        if s.supervised_count() == 0 {
            stats.dropped += 1;
            continue;
        }
        out.push(s);
    }
    stats.finish(out.iter().map(|s| (s.len(), s.supervised_count())));
    (out, stats)
}

/// [`curate`] for preference pairs: a pair is a duplicate when both sides are; it is truncated
/// when either side is, and dropped when either side has no supervised reply token left.
pub fn curate_pairs(
    pairs: Vec<PreferencePair>,
    opts: CurateOptions,
) -> (Vec<PreferencePair>, DataStats) {
    let mut stats = DataStats {
        lines: pairs.len(),
        ..Default::default()
    };
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut out = Vec::with_capacity(pairs.len());
    for mut p in pairs {
        let mut h = Sha256::new();
        h.update(hash_sample(&p.chosen));
        h.update(hash_sample(&p.rejected));
        if opts.dedupe && !seen.insert(h.finalize().into()) {
            stats.duplicates += 1;
            continue;
        }
        let a = truncate(&mut p.chosen, opts.max_seq_length);
        let b = truncate(&mut p.rejected, opts.max_seq_length);
        if a.is_some() || b.is_some() {
            stats.truncated += 1;
            stats.truncated_supervised_tokens += a.unwrap_or(0) + b.unwrap_or(0);
            p.prompt.truncate(opts.max_seq_length);
        }
        if p.chosen.supervised_count() == 0 || p.rejected.supervised_count() == 0 {
            stats.dropped += 1;
            continue;
        }
        out.push(p);
    }
    stats.recount_pairs(&out);
    (out, stats)
}

/// Splits off `round(fraction · n)` samples (at least 1 when `fraction > 0` and `n ≥ 2`, and never
/// all of them) chosen by a seeded shuffle; both parts keep file order. Returns `(train, eval)`.
pub fn split_eval<T>(items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    let mut k = (fraction.clamp(0.0, 1.0) * n as f64).round() as usize;
    if fraction > 0.0 && n >= 2 {
        k = k.clamp(1, n - 1);
    } else if n < 2 {
        k = 0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::derive(seed, stream::EVAL_SPLIT, 0).shuffle(&mut order);
    let mut is_eval = vec![false; n];
    for &i in &order[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (item, e) in items.into_iter().zip(is_eval) {
        if e { eval.push(item) } else { train.push(item) }
    }
    (train, eval)
}

fn feed(h: &mut Sha256, s: &Sample) {
    h.update((s.ids.len() as u64).to_le_bytes());
    for id in &s.ids {
        h.update(id.to_le_bytes());
    }
    let flags: Vec<u8> = s.supervised.iter().map(|&f| u8::from(f)).collect();
    h.update(&flags);
}

fn hash_sample(s: &Sample) -> [u8; 32] {
    let mut h = Sha256::new();
    feed(&mut h, s);
    h.finalize().into()
}

/// sha256 (hex) over the final token sequences and supervision masks, in order: for each sample
/// its length (u64 LE), its ids (i64 LE) and its flags (one byte each), after the tag
/// `finetune-data-v1`. Origins do not enter: moving lines between files keeps the digest.
pub fn dataset_digest(samples: &[Sample]) -> String {
    let mut h = Sha256::new();
    h.update(b"finetune-data-v1");
    for s in samples {
        feed(&mut h, s);
    }
    hex(&h.finalize())
}

/// [`dataset_digest`] of preference pairs (chosen then rejected of each pair).
pub fn pairs_digest(pairs: &[PreferencePair]) -> String {
    let mut h = Sha256::new();
    h.update(b"finetune-pref-v1");
    for p in pairs {
        feed(&mut h, &p.chosen);
        feed(&mut h, &p.rejected);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
