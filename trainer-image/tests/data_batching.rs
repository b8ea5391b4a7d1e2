//! Batching: exact cursor restore, epoch coverage, length grouping, and the packed-batch tensor
//! conventions (block-diagonal mask, restarting positions, no label across a sample boundary).
//!
//! `packed_loss_equals_unpacked` runs a small attention "model" (`toy_forward`) that honours
//! `position_ids` and the mask exactly as the real model must. Once `CausalLm::forward_with(ids,
//! positions, mask)` exists, call [`per_sample_losses`] with it instead of `toy_forward` to check
//! the real model.

use std::path::Path;
use std::sync::Arc;

use finetune_trainer::data::{Batch, BatchPlan, Batcher, Cursor, Origin, Sample, build_batch};
use tch::{Kind, Reduction, Tensor};

/// `n` samples with seeded lengths in `min..=max`, ids in 1..100, a random supervision mask.
fn samples(n: usize, min: usize, max: usize, seed: u64) -> Vec<Sample> {
    let mut g = finetune_trainer::data::rng::SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let len = min + g.below((max - min + 1) as u64) as usize;
            let ids: Vec<i64> = (0..len).map(|_| 1 + g.below(99) as i64).collect();
            let mut sup: Vec<bool> = (0..len).map(|_| g.below(3) != 0).collect();
            sup[len - 1] = true;
            Sample::new(
                ids,
                sup,
                Origin {
                    path: Arc::from(Path::new("train.jsonl")),
                    line: i + 1,
                },
            )
        })
        .collect()
}

fn plan(packing: bool) -> BatchPlan {
    BatchPlan {
        batch_size: 4,
        max_seq_length: 32,
        packing,
        seed: 1234,
    }
}

fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

fn batches_equal(a: &Batch, b: &Batch) -> bool {
    tensors_equal(&a.input_ids, &b.input_ids)
        && tensors_equal(&a.labels, &b.labels)
        && tensors_equal(&a.position_ids, &b.position_ids)
        && match (&a.attention_mask, &b.attention_mask) {
            (None, None) => true,
            (Some(x), Some(y)) => tensors_equal(x, y),
            _ => false,
        }
        && (a.supervised_tokens, a.tokens, a.samples) == (b.supervised_tokens, b.tokens, b.samples)
}

#[test]
fn cursor_restore_replays_batches_bit_for_bit() {
    for packing in [false, true] {
        let data = samples(37, 3, 20, 5);
        let mut a = Batcher::new(data.clone(), plan(packing));
        let per = a.batches_per_epoch();
        assert!(per >= 3, "{per}");
        // Run the reference stream for 2.5 epochs and remember every batch and cursor.
        let mut stream = Vec::new();
        for _ in 0..(per * 5 / 2) {
            let c = a.cursor();
            stream.push((c, a.next_batch()));
        }
        assert_eq!(a.cursor().epoch, 2);
        // Restore at arbitrary points (including just before and at an epoch boundary) into a
        // fresh batcher whose cursor JSON went through serde.
        for start in [0, 1, per - 1, per, per + 2, 2 * per - 1] {
            let (cursor, _) = &stream[start as usize];
            let json = serde_json::to_string(cursor).unwrap();
            let restored: Cursor = serde_json::from_str(&json).unwrap();
            let mut b = Batcher::new(data.clone(), plan(packing));
            b.next_batch(); // some unrelated progress before the restore
            b.restore(restored);
            assert_eq!(b.cursor(), *cursor);
            for (c, want) in &stream[start as usize..] {
                assert_eq!(b.cursor(), *c);
                let got = b.next_batch();
                assert!(
                    batches_equal(&got, want),
                    "packing={packing} diverged at {c:?}"
                );
            }
        }
        // Epochs differ in order (new shuffle per epoch).
        assert!(!batches_equal(&stream[0].1, &stream[per as usize].1));
    }
}

#[test]
fn every_sample_once_per_epoch() {
    for packing in [false, true] {
        let data = samples(53, 2, 30, 9);
        let total_sup: i64 = data.iter().map(|s| s.supervised_count() as i64).sum();
        let total_tok: i64 = data.iter().map(|s| s.len() as i64).sum();
        let mut b = Batcher::new(data.clone(), plan(packing));
        for epoch in 0..3 {
            let mut seen = vec![0usize; data.len()];
            let (mut sup, mut tok, mut n) = (0, 0, 0);
            for i in 0..b.batches_per_epoch() {
                for row in b.batch_samples(Cursor {
                    epoch,
                    next_batch: i,
                }) {
                    assert!(row.iter().map(|&s| data[s].len()).sum::<usize>() <= 32);
                    for s in row {
                        seen[s] += 1;
                    }
                }
                let batch = b.next_batch();
                sup += batch.supervised_tokens;
                tok += batch.tokens;
                n += batch.samples;
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "packing={packing} epoch {epoch}: {seen:?}"
            );
            assert_eq!((sup, tok, n), (total_sup, total_tok, data.len()));
            assert_eq!(
                b.cursor(),
                Cursor {
                    epoch: epoch + 1,
                    next_batch: 0
                }
            );
        }
    }
}

#[test]
fn length_grouping_cuts_padding() {
    let data = samples(400, 2, 32, 3);
    let real: i64 = data.iter().map(|s| s.len() as i64).sum();
    let mut b = Batcher::new(data, plan(false));
    let mut padded = 0i64;
    for _ in 0..b.batches_per_epoch() {
        padded += b.next_batch().input_ids.numel() as i64;
    }
    // Random batches of 4 from U[2, 32] pad to ~80% efficiency; grouped batches are near 100%.
    let efficiency = real as f64 / padded as f64;
    assert!(efficiency > 0.95, "efficiency {efficiency}");
}

/// Checks the tensor conventions of one batch against its rows of samples.
fn check_structure(batch: &Batch, rows: &[Vec<usize>], data: &[Sample]) {
    let [bsz, t] = batch.input_ids.size()[..] else {
        panic!("input_ids must be 2-D")
    };
    assert_eq!(bsz as usize, rows.len());
    let ids = Vec::<i64>::try_from(batch.input_ids.flatten(0, -1)).unwrap();
    let labels = Vec::<i64>::try_from(batch.labels.flatten(0, -1)).unwrap();
    let pos = Vec::<i64>::try_from(batch.position_ids.flatten(0, -1)).unwrap();
    let mask = batch
        .attention_mask
        .as_ref()
        .map(|m| Vec::<bool>::try_from(m.flatten(0, -1)).unwrap());
    let t = t as usize;
    let mut supervised = 0;
    for (b, row) in rows.iter().enumerate() {
        // segment of each position: Some(k) for sample k of the row, None for padding
        let mut seg = Vec::new();
        let mut at = b * t;
        for (k, &s) in row.iter().enumerate() {
            let smp = &data[s];
            for j in 0..smp.len() {
                assert_eq!(ids[at], smp.ids[j]);
                assert_eq!(pos[at], j as i64, "positions restart at every sample");
                let want = if j > 0 && smp.supervised[j] {
                    smp.ids[j]
                } else {
                    -100
                };
                assert_eq!(labels[at], want);
                if j == 0 {
                    assert_eq!(
                        labels[at], -100,
                        "first token of a sample is never a target"
                    );
                }
                supervised += i64::from(want != -100);
                seg.push(Some(k));
                at += 1;
            }
        }
        while seg.len() < t {
            assert_eq!((ids[at], labels[at]), (0, -100), "padding");
            seg.push(None);
            at += 1;
        }
        match &mask {
            None => assert!(row.len() == 1 && data[row[0]].len() == t),
            Some(m) => {
                for q in 0..t {
                    for k in 0..t {
                        let want = match (seg[q], seg[k]) {
                            (Some(a), Some(c)) => a == c && k <= q,
                            (None, _) => q == k,
                            (Some(_), None) => false,
                        };
                        assert_eq!(m[(b * t + q) * t + k], want, "mask[{b}, {q}, {k}]");
                    }
                }
            }
        }
    }
    assert_eq!(batch.supervised_tokens, supervised);
    let used = batch
        .labels
        .narrow(1, 1, t as i64 - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert_eq!(batch.supervised_tokens, used);
}

#[test]
fn packed_batch_structure() {
    let data = samples(40, 2, 14, 11);
    let mut b = Batcher::new(data.clone(), plan(true));
    assert!(
        b.rows().iter().any(|r| r.len() >= 3),
        "rows hold several samples"
    );
    for i in 0..b.batches_per_epoch() {
        let rows = b.batch_samples(Cursor {
            epoch: 0,
            next_batch: i,
        });
        let batch = b.next_batch();
        assert!(batch.attention_mask.is_some());
        check_structure(&batch, &rows, &data);
    }
    // Unpacked, padded rows: causal and not padding.
    let mut u = Batcher::new(data.clone(), plan(false));
    let rows = u.batch_samples(Cursor::default());
    check_structure(&u.next_batch(), &rows, &data);
    // Equal lengths, one sample per row: no mask at all.
    let same = samples(4, 6, 6, 1);
    let batch = build_batch(&same, &[vec![0], vec![1], vec![2], vec![3]]);
    assert!(batch.attention_mask.is_none());
    check_structure(&batch, &[vec![0], vec![1], vec![2], vec![3]], &same);
}

/// A one-layer attention LM over random weights that uses `position_ids` (learned position
/// embeddings) and the mask (`None` = causal) the way the real model must.
fn toy_forward(ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>) -> Tensor {
    tch::manual_seed(0);
    let opts = (Kind::Double, tch::Device::Cpu);
    let (vocab, dim) = (100, 16);
    let emb = Tensor::randn([vocab, dim], opts);
    let pemb = Tensor::randn([64, dim], opts);
    let wq = Tensor::randn([dim, dim], opts) / 4.0;
    let h = emb
        .index_select(0, &ids.flatten(0, -1))
        .view([ids.size()[0], ids.size()[1], dim])
        + pemb
            .index_select(0, &positions.flatten(0, -1))
            .view([ids.size()[0], ids.size()[1], dim]);
    let t = ids.size()[1];
    let allowed = match mask {
        Some(m) => m.squeeze_dim(1),
        None => Tensor::ones([t, t], (Kind::Bool, tch::Device::Cpu))
            .tril(0)
            .unsqueeze(0),
    };
    let scores = h.matmul(&wq).matmul(&h.transpose(1, 2)) / (dim as f64).sqrt();
    let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let out = scores.softmax(-1, Kind::Double).matmul(&h);
    out.matmul(&emb.tr())
}

/// Summed loss and target count per sample of a batch, in row order; samples are delimited by
/// `position_ids == 0` and padding by `labels`/`tokens`. `forward(ids, positions, mask)` → logits.
fn per_sample_losses(
    batch: &Batch,
    forward: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    row_lengths: &[Vec<usize>],
) -> Vec<(f64, i64)> {
    let logits = forward(
        &batch.input_ids,
        &batch.position_ids,
        batch.attention_mask.as_ref(),
    );
    let [bsz, t, v] = logits.size()[..] else {
        panic!()
    };
    let pred = logits.narrow(1, 0, t - 1).reshape([-1, v]);
    let target = batch.labels.narrow(1, 1, t - 1).reshape([-1]);
    let nll = pred
        .log_softmax(-1, Kind::Double)
        .cross_entropy_loss::<Tensor>(&target, None, Reduction::None, -100, 0.0)
        .view([bsz, t - 1]);
    let nll = Vec::<f64>::try_from(nll.flatten(0, -1)).unwrap();
    let labels = Vec::<i64>::try_from(batch.labels.flatten(0, -1)).unwrap();
    let t = t as usize;
    let mut out = Vec::new();
    for (b, lens) in row_lengths.iter().enumerate() {
        let mut start = 0;
        for &len in lens {
            let (mut sum, mut n) = (0.0, 0);
            // target at position p (1 ≤ p < len) is predicted by position p - 1
            for p in start + 1..start + len {
                if labels[b * t + p] != -100 {
                    sum += nll[b * (t - 1) + p - 1];
                    n += 1;
                }
            }
            out.push((sum, n));
            start += len;
        }
    }
    out
}

#[test]
fn packed_loss_equals_unpacked() {
    let data = samples(30, 2, 14, 21);
    let mut b = Batcher::new(data.clone(), plan(true));
    for _ in 0..b.batches_per_epoch() {
        let rows = b.batch_samples(b.cursor());
        let batch = b.next_batch();
        let lens: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| r.iter().map(|&s| data[s].len()).collect())
            .collect();
        let packed = per_sample_losses(&batch, toy_forward, &lens);
        let singles: Vec<usize> = rows.iter().flatten().copied().collect();
        for (&s, (loss, n)) in singles.iter().zip(&packed) {
            let alone = build_batch(&data, &[vec![s]]);
            assert!(alone.attention_mask.is_none());
            let (want, wn) = per_sample_losses(&alone, toy_forward, &[vec![data[s].len()]])[0];
            assert_eq!(*n, wn);
            assert!(
                (loss - want).abs() < 1e-9 * want.abs().max(1.0),
                "sample {s}: {loss} vs {want}"
            );
        }
    }
}
