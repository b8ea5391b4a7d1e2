//! The SFT/DPO data pipeline: JSONL formats → tokenized, masked [`Sample`]s → curation (dedupe,
//! truncation, eval split, statistics, digest) → contamination check → deterministic batches with
//! a resumable [`Cursor`]. Everything here is pure (no model) and deterministic; bad data is an
//! [`Error::Data`](crate::Error::Data) naming `file:line` (exit code 2).
//!
//! * [`format`] — formats, validation, chat-template rendering and assistant masks.
//! * [`curate`] — duplicates, truncation, drops, eval split, [`DataStats`], [`dataset_digest`].
//! * [`contamination`] — n-gram overlap of eval samples against train.
//! * [`mixture`] — several training files drawn into one set by weight or count, seeded.
//! * [`batch`] — [`BatchPlan`], [`Batcher`], [`Batch`], [`Cursor`].
//!
//! [`prepare_sft`] runs the whole pipeline for a training run.

pub mod batch;
pub mod contamination;
pub mod curate;
pub mod format;
pub mod mixture;
pub mod rng;
#[doc(hidden)]
pub mod testing;

/// Preference pairs loaded, curated and split like [`prepare_sft`] does for samples.
#[derive(Debug)]
pub struct PreparedPairs {
    pub train: Vec<PreferencePair>,
    pub eval: Vec<PreferencePair>,
    pub train_stats: DataStats,
    pub eval_stats: Option<DataStats>,
    /// Eval prompts and replies checked against train (on the chosen sides).
    pub contamination: Option<ContaminationReport>,
    /// [`pairs_digest`] of `train` and of `eval`.
    pub train_digest: String,
    pub eval_digest: String,
}

impl Prepared {
    /// The chosen sides of preference pairs as samples, with the pairs' statistics and digests:
    /// what batching, the generation eval and the run's digest use for a DPO run.
    pub fn chosen_sides(p: &PreparedPairs) -> Self {
        let chosen = |v: &[PreferencePair]| v.iter().map(|p| p.chosen.clone()).collect();
        Prepared {
            train: chosen(&p.train),
            eval: chosen(&p.eval),
            train_stats: p.train_stats.clone(),
            eval_stats: p.eval_stats.clone(),
            contamination: p.contamination.clone(),
            train_digest: p.train_digest.clone(),
            eval_digest: p.eval_digest.clone(),
        }
    }
}

/// Loads, curates and splits preference data: train file, optional eval file (otherwise
/// `eval_fraction` of train), then checks eval against train for contamination.
pub fn prepare_preference(
    train_path: &Path,
    eval_path: Option<&Path>,
    encoder: &Encoder,
    cfg: &DataConfig,
) -> Result<PreparedPairs> {
    let enc = Encoder {
        options: cfg.load,
        ..*encoder
    };
    let (train, mut train_stats) = curate_pairs(load_preference(train_path, &enc)?, cfg.curate);
    let (train, eval, eval_stats) = match (eval_path, cfg.eval_fraction) {
        (Some(p), _) => {
            let (eval, stats) = curate_pairs(load_preference(p, &enc)?, cfg.curate);
            (train, eval, Some(stats))
        }
        (None, Some(f)) if f > 0.0 => {
            let (train, eval) = split_eval(train, f, cfg.seed);
            train_stats.held_out = eval.len();
            train_stats.recount_pairs(&train);
            let mut stats = DataStats {
                lines: eval.len(),
                ..Default::default()
            };
            stats.recount_pairs(&eval);
            (train, eval, Some(stats))
        }
        (None, _) => (train, Vec::new(), None),
    };
    let chosen = |p: &[PreferencePair]| p.iter().map(|p| p.chosen.clone()).collect::<Vec<_>>();
    let contamination = (!eval.is_empty())
        .then(|| check_contamination(&chosen(&train), &chosen(&eval), cfg.contamination));
    Ok(PreparedPairs {
        train_digest: pairs_digest(&train),
        eval_digest: pairs_digest(&eval),
        train,
        eval,
        train_stats,
        eval_stats,
        contamination,
    })
}

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

pub use batch::{Batch, BatchPlan, Batcher, Cursor, build_batch};
pub use contamination::{
    ContaminationOptions, ContaminationReport, CopiedSample, CopyKind, check_contamination,
};
pub use curate::{
    CurateOptions, DataStats, curate, curate_pairs, dataset_digest, pairs_digest, split_eval,
};
pub use format::{
    DataFormat, Encoder, LoadOptions, PreferencePair, load_preference, load_samples, read_jsonl,
};

use crate::error::Result;

/// Where a sample comes from: file and 1-based line. Displays as `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub path: Arc<Path>,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// One tokenized training sequence. `supervised[t]` says whether token `t` is a target (predicted
/// from `ids[..t]`); `supervised[0]` is always false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub ids: Vec<i64>,
    pub supervised: Vec<bool>,
    pub origin: Origin,
    /// The line's own words: its messages' contents (or its `text`) joined by newlines, without
    /// the chat template. What the contamination check compares, so that template scaffolding
    /// never counts as overlap. Empty for sequences that no data line wrote (e.g. replay).
    pub text: Arc<str>,
}

impl Sample {
    /// Builds a sample; clears the first token's flag (nothing predicts it).
    pub fn new(ids: Vec<i64>, mut supervised: Vec<bool>, origin: Origin) -> Self {
        assert_eq!(
            ids.len(),
            supervised.len(),
            "ids and flags differ in length"
        );
        if let Some(first) = supervised.first_mut() {
            *first = false;
        }
        Sample {
            ids,
            supervised,
            origin,
            text: Arc::from(""),
        }
    }

    /// The same sample with its line's own words (see [`Sample::text`]).
    pub fn with_text(mut self, text: impl Into<Arc<str>>) -> Self {
        self.text = text.into();
        self
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of targets (flags set after the first token).
    pub fn supervised_count(&self) -> usize {
        self.supervised.iter().skip(1).filter(|&&f| f).count()
    }
}

/// Settings of [`prepare_sft`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct DataConfig {
    pub format: DataFormat,
    pub load: LoadOptions,
    pub curate: CurateOptions,
    /// Hold out this fraction of the training file as eval data when no eval file is given.
    pub eval_fraction: Option<f64>,
    pub seed: u64,
    pub contamination: ContaminationOptions,
}

/// The training run's data, curated and checked.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    /// Statistics of the training file; with `eval_fraction` its `samples`/tokens/lengths describe
    /// `train` after the split and `held_out` counts the samples moved to `eval`.
    pub train_stats: DataStats,
    /// Statistics of the eval file, or of the held-out part (then `lines` = its sample count).
    /// None without eval data.
    pub eval_stats: Option<DataStats>,
    /// None when there is no eval data.
    pub contamination: Option<ContaminationReport>,
    /// [`dataset_digest`] of `train` and of `eval`.
    pub train_digest: String,
    pub eval_digest: String,
}

/// Loads, curates and splits SFT data (chat, instruction or text): train file, optional eval file
/// (otherwise `eval_fraction` of train), then checks eval against train for contamination.
/// Duplicates are removed before the split, so no line is in both parts.
pub fn prepare_sft(
    train_path: &Path,
    eval_path: Option<&Path>,
    encoder: &Encoder,
    cfg: &DataConfig,
) -> Result<Prepared> {
    let enc = Encoder {
        options: cfg.load,
        ..*encoder
    };
    let (train, mut train_stats) = curate(load_samples(train_path, cfg.format, &enc)?, cfg.curate);
    let (train, eval, eval_stats) = match (eval_path, cfg.eval_fraction) {
        (Some(p), _) => {
            let (eval, stats) = curate(load_samples(p, cfg.format, &enc)?, cfg.curate);
            (train, eval, Some(stats))
        }
        (None, Some(f)) if f > 0.0 => {
            let (train, eval) = split_eval(train, f, cfg.seed);
            train_stats.held_out = eval.len();
            train_stats.recount(&train);
            let mut stats = DataStats {
                lines: eval.len(),
                ..Default::default()
            };
            stats.recount(&eval);
            (train, eval, Some(stats))
        }
        (None, _) => (train, Vec::new(), None),
    };
    Ok(Prepared::checked(train, eval, train_stats, eval_stats, cfg))
}

impl Prepared {
    /// The training and eval sets with their digests and, when there is eval data, the
    /// contamination check of eval against train.
    pub fn checked(
        train: Vec<Sample>,
        eval: Vec<Sample>,
        train_stats: DataStats,
        eval_stats: Option<DataStats>,
        cfg: &DataConfig,
    ) -> Self {
        let contamination =
            (!eval.is_empty()).then(|| check_contamination(&train, &eval, cfg.contamination));
        Prepared {
            train_digest: dataset_digest(&train),
            eval_digest: dataset_digest(&eval),
            train,
            eval,
            train_stats,
            eval_stats,
            contamination,
        }
    }
}
