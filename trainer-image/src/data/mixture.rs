//! Training mixtures (`dataset.train.sources`): several files, each loaded in its own format and
//! curated on its own, then drawn into one training set by share — a weight relative to the
//! other weighted sources, or a fixed sample count. The draw is seeded, so a resumed run
//! rebuilds the very same set (its digest is part of the checkpoint's config digest), and each
//! source's digest is reported for the Adapter's lineage.

use std::path::{Path, PathBuf};

use crate::data::rng::SplitMix64;
use crate::data::{
    DataConfig, DataFormat, DataStats, Encoder, Prepared, Sample, curate, dataset_digest,
    load_samples, split_eval,
};
use crate::error::{Error, Result};

/// Stream of the seeded generator used for mixtures (distinct from the batcher's).
const MIXTURE_STREAM: u64 = 0x6d69_7874_7572_6500;

/// How much of an epoch a source fills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Share {
    /// Relative to the other weighted sources; together they fill as many samples as they hold.
    Weight(f64),
    /// Exactly this many samples per epoch.
    Samples(usize),
}

/// One file of a mixture.
#[derive(Debug, Clone, PartialEq)]
pub struct MixSource {
    pub path: PathBuf,
    pub format: DataFormat,
    pub share: Share,
}

/// What one source gave the mixture.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    pub path: PathBuf,
    /// [`dataset_digest`] of its curated training samples (before the draw).
    pub digest: String,
    /// Its curated training samples.
    pub available: usize,
    /// How many of the mixture's samples came from it.
    pub drawn: usize,
}

/// Loads, curates and mixes the sources; the eval data is `eval_path` (in `cfg.format`) or
/// `cfg.eval_fraction` of each source, held out before the draw so no eval sample is trained on.
pub fn prepare_mixture(
    sources: &[MixSource],
    eval_path: Option<&Path>,
    encoder: &Encoder,
    cfg: &DataConfig,
) -> Result<(Prepared, Vec<SourceReport>)> {
    let enc = Encoder {
        options: cfg.load,
        ..*encoder
    };
    let mut parts = Vec::with_capacity(sources.len());
    let mut held_out = Vec::new();
    let mut train_stats = DataStats::default();
    for (i, source) in sources.iter().enumerate() {
        let (samples, stats) = curate(load_samples(&source.path, source.format, &enc)?, cfg.curate);
        let samples = match (eval_path, cfg.eval_fraction) {
            (None, Some(f)) if f > 0.0 => {
                let (train, eval) = split_eval(samples, f, cfg.seed ^ (i as u64));
                held_out.extend(eval);
                train
            }
            _ => samples,
        };
        if samples.is_empty() {
            return Err(Error::Data {
                path: source.path.clone(),
                line: 0,
                message: "no training samples left after curation for this mixture source".into(),
            });
        }
        add_stats(&mut train_stats, &stats);
        parts.push(samples);
    }
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    let shares: Vec<Share> = sources.iter().map(|s| s.share).collect();
    let counts = mixture_counts(&sizes, &shares);
    let mut train = Vec::with_capacity(counts.iter().sum());
    let mut reports = Vec::with_capacity(sources.len());
    for (i, (part, &count)) in parts.iter().zip(&counts).enumerate() {
        reports.push(SourceReport {
            path: sources[i].path.clone(),
            digest: dataset_digest(part),
            available: part.len(),
            drawn: count,
        });
        train.extend(draw(part, count, cfg.seed, i as u64));
    }
    // One order for the whole set, so `maxSamples` keeps the shares.
    SplitMix64::derive(cfg.seed, MIXTURE_STREAM, u64::MAX).shuffle(&mut train);
    let (eval, eval_stats) = match eval_path {
        Some(p) => {
            let (eval, stats) = curate(load_samples(p, cfg.format, &enc)?, cfg.curate);
            (eval, Some(stats))
        }
        None if !held_out.is_empty() => {
            let mut stats = DataStats {
                lines: held_out.len(),
                ..Default::default()
            };
            stats.recount(&held_out);
            train_stats.held_out = held_out.len();
            (held_out, Some(stats))
        }
        None => (Vec::new(), None),
    };
    train_stats.recount(&train);
    let prepared = Prepared::checked(train, eval, train_stats, eval_stats, cfg);
    Ok((prepared, reports))
}

/// The counts of curation (lines read, duplicates, truncations, drops) summed over sources;
/// the sample and token counts are taken from the mixed set afterwards.
fn add_stats(total: &mut DataStats, part: &DataStats) {
    total.lines += part.lines;
    total.duplicates += part.duplicates;
    total.truncated += part.truncated;
    total.truncated_supervised_tokens += part.truncated_supervised_tokens;
    total.dropped += part.dropped;
}

/// Samples per epoch from each source: `Samples(n)` gives n; the weighted sources share the
/// samples they hold between them in proportion to their weights (largest remainders, so the
/// counts add up exactly).
pub fn mixture_counts(sizes: &[usize], shares: &[Share]) -> Vec<usize> {
    let pool: usize = sizes
        .iter()
        .zip(shares)
        .filter(|(_, s)| matches!(s, Share::Weight(_)))
        .map(|(n, _)| n)
        .sum();
    let total_weight: f64 = shares
        .iter()
        .map(|s| match s {
            Share::Weight(w) => *w,
            Share::Samples(_) => 0.0,
        })
        .sum();
    let mut counts = vec![0usize; sizes.len()];
    let mut remainders = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        match share {
            Share::Samples(n) => counts[i] = *n,
            Share::Weight(w) => {
                let exact = pool as f64 * w / total_weight;
                counts[i] = exact.floor() as usize;
                remainders.push((exact - exact.floor(), i));
            }
        }
    }
    let assigned: usize = remainders.iter().map(|&(_, i)| counts[i]).sum();
    remainders.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(pool.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// `count` samples of `part`: whole passes over it, then a seeded subset for the rest.
fn draw(part: &[Sample], count: usize, seed: u64, source: u64) -> Vec<Sample> {
    let n = part.len();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count / n {
        out.extend_from_slice(part);
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::derive(seed, MIXTURE_STREAM, source).shuffle(&mut order);
    out.extend(order[..count % n].iter().map(|&i| part[i].clone()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_share_the_pool_and_counts_are_exact() {
        let w = |x| Share::Weight(x);
        assert_eq!(
            mixture_counts(&[100, 100], &[w(3.0), w(1.0)]),
            vec![150, 50]
        );
        // A small source with a large weight is repeated; the pool stays the sum of sizes.
        assert_eq!(mixture_counts(&[10, 90], &[w(1.0), w(1.0)]), vec![50, 50]);
        let c = mixture_counts(&[7, 7, 7], &[w(1.0), w(1.0), w(1.0)]);
        assert_eq!(c.iter().sum::<usize>(), 21);
        assert_eq!(
            mixture_counts(&[1000, 40], &[Share::Samples(200), w(1.0)]),
            vec![200, 40]
        );
    }

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let origin = crate::data::Origin {
                    path: Path::new("part.jsonl").into(),
                    line: i + 1,
                };
                Sample::new(vec![1, i as i64 + 2], vec![false, true], origin)
            })
            .collect()
    }

    #[test]
    fn a_draw_repeats_whole_passes_then_a_seeded_subset() {
        let part = samples(5);
        let drawn = draw(&part, 12, 42, 0);
        assert_eq!(drawn.len(), 12);
        for s in &part {
            let n = drawn.iter().filter(|d| d.ids == s.ids).count();
            assert!(
                (2..=3).contains(&n),
                "each sample twice, two of them three times"
            );
        }
        let ids = |v: &[Sample]| v.iter().map(|s| s.ids.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&draw(&part, 12, 42, 0)), ids(&drawn), "seeded");
        assert_ne!(ids(&draw(&part, 3, 43, 0)), ids(&draw(&part, 3, 42, 0)));
    }
}
