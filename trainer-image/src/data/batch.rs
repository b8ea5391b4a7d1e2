//! Batching with an exact, serialisable cursor.
//!
//! Layout of an epoch (a pure function of the samples, the plan and the epoch number):
//! * rows — without packing every sample is its own row; with packing the samples, in the order of
//!   a seeded shuffle (stream `PACKING`, computed once), are placed first-fit into rows of at most
//!   `max_seq_length` tokens. Rows are fixed for the run, so `batches_per_epoch` is constant.
//! * epoch order — the rows are shuffled by `SplitMix64::derive(seed, EPOCH, epoch)`. Without packing
//!   they are then length-grouped: cut into mega-chunks of `50 × batch_size` rows, each sorted by
//!   length (longest first, ties by shuffled position), cut into batches, and the batches shuffled
//!   (stream `BATCH_ORDER`) so long batches do not all come first. With packing the shuffled rows
//!   are cut into batches directly. One batch per epoch may be smaller (the shortest rows without
//!   packing, the last batch with packing).
//!
//! Tensors (CPU; `T` = the longest row of the batch, right padding with id 0):
//! `labels[b, t] = input_ids[b, t]` where supervised and not the first token of its sample, else
//! −100 (HF convention, not shifted: the loss compares `logits[:, :-1]` with `labels[:, 1:]`, so no
//! token predicts across a packed sample boundary); `position_ids` restart at 0 for every sample (0
//! on padding); `attention_mask[b, 0, q, k]` = `k ≤ q` and `q`, `k` in the same sample — a padding
//! position attends only to itself, so no softmax row is empty (no NaN) and no real token sees
//! padding. The mask is `None` when every row is a single sample of length `T`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Sample;
use super::rng::{SplitMix64, stream};

/// How samples are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// Rows per batch.
    pub batch_size: usize,
    /// Row capacity with packing; every sample must already be at most this long.
    pub max_seq_length: usize,
    pub packing: bool,
    pub seed: u64,
}

/// One training batch; see the module docs for the exact tensor conventions.
#[derive(Debug)]
pub struct Batch {
    /// [B, T] Int64.
    pub input_ids: Tensor,
    /// [B, T] Int64, −100 where not a target.
    pub labels: Tensor,
    /// [B, T] Int64.
    pub position_ids: Tensor,
    /// [B, 1, T, T] Bool, true = may attend; `None` means plain causal attention.
    pub attention_mask: Option<Tensor>,
    /// Labels != −100 in `labels[:, 1:]` (= all targets; `labels[:, 0]` is always −100).
    pub supervised_tokens: i64,
    /// Non-padding tokens.
    pub tokens: i64,
    pub samples: usize,
}

/// Position in the stream of batches: the next batch to return is batch `next_batch` of `epoch`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub next_batch: u64,
}

/// Deterministic batch stream over a fixed set of samples.
pub struct Batcher {
    samples: Vec<Sample>,
    plan: BatchPlan,
    /// Sample indices per row (fixed for the run).
    rows: Vec<Vec<usize>>,
    cursor: Cursor,
    /// The current epoch's batches (row indices), computed on demand.
    layout: Option<(u64, Vec<Vec<usize>>)>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("samples", &self.samples.len())
            .field("rows", &self.rows.len())
            .field("plan", &self.plan)
            .field("cursor", &self.cursor)
            .finish()
    }
}

/// First-fit bin packing in the given order; a max segment tree over the rows' free space finds the
/// first row with room in O(log n). Returns the rows (indices into `lengths`, in placement order).
pub fn first_fit(order: &[usize], lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let n = order.len().max(1);
    let size = n.next_power_of_two();
    let mut tree = vec![0usize; 2 * size]; // free space; unopened rows have 0
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &i in order {
        let len = lengths[i];
        let leaf = if tree[1] >= len && len > 0 {
            let mut node = 1;
            while node < size {
                node = if tree[2 * node] >= len {
                    2 * node
                } else {
                    2 * node + 1
                };
            }
            node
        } else {
            rows.push(Vec::new());
            tree[size + rows.len() - 1] = capacity;
            size + rows.len() - 1
        };
        rows[leaf - size].push(i);
        tree[leaf] -= len.min(tree[leaf]);
        let mut node = leaf / 2;
        while node >= 1 {
            tree[node] = tree[2 * node].max(tree[2 * node + 1]);
            node /= 2;
        }
    }
    rows
}

impl Batcher {
    /// Panics when `batch_size` is 0 or a sample is longer than `max_seq_length` (curate first).
    pub fn new(samples: Vec<Sample>, plan: BatchPlan) -> Self {
        assert!(plan.batch_size > 0, "batch_size must be positive");
        if let Some(s) = samples.iter().find(|s| s.len() > plan.max_seq_length) {
            panic!(
                "{}: sample of {} tokens is longer than max_seq_length {} (run curate first)",
                s.origin,
                s.len(),
                plan.max_seq_length
            );
        }
        let rows = if plan.packing {
            let mut order: Vec<usize> = (0..samples.len()).collect();
            SplitMix64::derive(plan.seed, stream::PACKING, 0).shuffle(&mut order);
            let lengths: Vec<usize> = samples.iter().map(Sample::len).collect();
            first_fit(&order, &lengths, plan.max_seq_length)
        } else {
            (0..samples.len()).map(|i| vec![i]).collect()
        };
        Batcher {
            samples,
            plan,
            rows,
            cursor: Cursor::default(),
            layout: None,
        }
    }

    pub fn plan(&self) -> &BatchPlan {
        &self.plan
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Sample indices of every row (fixed for the run; one sample per row without packing).
    pub fn rows(&self) -> &[Vec<usize>] {
        &self.rows
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.rows.len().div_ceil(self.plan.batch_size) as u64
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues exactly where `cursor` was taken (a cursor past the end of an epoch is normalised).
    pub fn restore(&mut self, cursor: Cursor) {
        let per = self.batches_per_epoch().max(1);
        self.cursor = Cursor {
            epoch: cursor.epoch + cursor.next_batch / per,
            next_batch: cursor.next_batch % per,
        };
    }

    fn row_len(&self, r: usize) -> usize {
        self.rows[r].iter().map(|&i| self.samples[i].len()).sum()
    }

    /// The batches of `epoch` as lists of row indices (see the module docs).
    pub fn epoch_layout(&self, epoch: u64) -> Vec<Vec<usize>> {
        let b = self.plan.batch_size;
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        SplitMix64::derive(self.plan.seed, stream::EPOCH, epoch).shuffle(&mut order);
        if self.plan.packing {
            return order.chunks(b).map(<[usize]>::to_vec).collect();
        }
        let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(b));
        for chunk in order.chunks(50 * b) {
            let mut chunk = chunk.to_vec();
            chunk.sort_by_key(|&r| std::cmp::Reverse(self.row_len(r)));
            batches.extend(chunk.chunks(b).map(<[usize]>::to_vec));
        }
        SplitMix64::derive(self.plan.seed, stream::BATCH_ORDER, epoch).shuffle(&mut batches);
        batches
    }

    /// Sample indices of each row of the batch at `cursor`, without advancing.
    pub fn batch_samples(&mut self, cursor: Cursor) -> Vec<Vec<usize>> {
        if self.layout.as_ref().map(|l| l.0) != Some(cursor.epoch) {
            self.layout = Some((cursor.epoch, self.epoch_layout(cursor.epoch)));
        }
        let (_, batches) = self.layout.as_ref().expect("layout computed above");
        batches[cursor.next_batch as usize]
            .iter()
            .map(|&r| self.rows[r].clone())
            .collect()
    }

    /// The batch at the cursor; advances it, wrapping to the next epoch. Panics without samples.
    pub fn next_batch(&mut self) -> Batch {
        let rows = self.next_rows();
        self.build(&rows)
    }

    /// Sample indices of each row of the batch at the cursor (for callers that build their own
    /// tensors, e.g. DPO pairs); advances the cursor like [`Self::next_batch`].
    pub fn next_rows(&mut self) -> Vec<Vec<usize>> {
        assert!(!self.samples.is_empty(), "Batcher has no samples");
        let rows = self.batch_samples(self.cursor);
        self.cursor.next_batch += 1;
        if self.cursor.next_batch >= self.batches_per_epoch() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                next_batch: 0,
            };
        }
        rows
    }

    /// Tensors for rows of sample indices.
    pub fn build(&self, rows: &[Vec<usize>]) -> Batch {
        build_batch(&self.samples, rows)
    }
}

/// Builds a [`Batch`] from rows of indices into `samples` (each row concatenated, right-padded).
pub fn build_batch(samples: &[Sample], rows: &[Vec<usize>]) -> Batch {
    let bsz = rows.len();
    let lens: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().map(|&i| samples[i].len()).sum())
        .collect();
    let t = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; bsz * t];
    let mut labels = vec![-100i64; bsz * t];
    let mut pos = vec![0i64; bsz * t];
    let mut seg = vec![0i64; bsz * t];
    let (mut supervised, mut tokens, mut count) = (0i64, 0i64, 0usize);
    for (b, row) in rows.iter().enumerate() {
        let mut at = b * t;
        for (k, &i) in row.iter().enumerate() {
            let s = &samples[i];
            for (j, (&id, &sup)) in s.ids.iter().zip(&s.supervised).enumerate() {
                ids[at] = id;
                if j > 0 && sup {
                    labels[at] = id;
                    supervised += 1;
                }
                pos[at] = j as i64;
                seg[at] = k as i64 + 1;
                at += 1;
            }
            tokens += s.len() as i64;
            count += 1;
        }
    }
    let shape = [bsz as i64, t as i64];
    let simple = rows.iter().zip(&lens).all(|(r, &l)| r.len() == 1 && l == t);
    let attention_mask = (!simple).then(|| {
        let seg = Tensor::from_slice(&seg).view(shape);
        let q = seg.unsqueeze(2);
        let k = seg.unsqueeze(1);
        let same = q.eq_tensor(&k).logical_and(&q.ne(0));
        let eye = Tensor::eye(t as i64, (Kind::Bool, tch::Device::Cpu));
        let causal = Tensor::ones([t as i64, t as i64], (Kind::Bool, tch::Device::Cpu)).tril(0);
        same.logical_or(&eye).logical_and(&causal).unsqueeze(1)
    });
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        labels: Tensor::from_slice(&labels).view(shape),
        position_ids: Tensor::from_slice(&pos).view(shape),
        attention_mask,
        supervised_tokens: supervised,
        tokens,
        samples: count,
    }
}
