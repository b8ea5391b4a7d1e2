//! Gradient accumulation: 4 micro-batches of 1 sample give the same update as one batch of 4
//! (loss normalised by the supervised tokens of the whole step), and `forward_with` without a mask
//! equals the inference `forward`.

mod train_support;

use finetune_trainer::data::{Origin, Sample, build_batch};
use finetune_trainer::model::{CausalLm, LoraConfig};
use finetune_trainer::train::optim::AdamW;
use finetune_trainer::train::step::{MicroBatch, train_step};
use std::sync::Arc;
use tch::{Kind, Tensor};

fn samples() -> Vec<Sample> {
    let origin = Origin {
        path: Arc::from(std::path::Path::new("mem")),
        line: 1,
    };
    let lens = [9usize, 5, 12, 7];
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|j| 3 + ((j * 7 + k * 5) % 30) as i64).collect();
            // Supervise the second half only, so per-sample target counts differ.
            let sup: Vec<bool> = (0..n).map(|j| j >= n / 2).collect();
            Sample::new(ids, sup, origin.clone())
        })
        .collect()
}

fn lora_model(dir: &std::path::Path) -> (CausalLm, AdamW) {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        rslora: false,
    };
    train_support::lora_model(dir, 11, &cfg)
}

#[test]
fn accumulating_four_micro_batches_equals_one_batch_of_four() {
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 5);
    let s = samples();
    let (m1, mut o1) = lora_model(tmp.path());
    let (m4, mut o4) = lora_model(tmp.path());
    let big = build_batch(&s, &[vec![0], vec![1], vec![2], vec![3]]);
    assert!(big.attention_mask.is_some(), "padding needs a mask");
    let singles: Vec<_> = (0..4).map(|i| build_batch(&s, &[vec![i]])).collect();
    let mut worst = 0f64;
    for step in 0..3 {
        let a = train_step(&m1, &mut o1, &[MicroBatch::from(&big)], 1e-2, 1.0, 0, step).unwrap();
        let mbs: Vec<MicroBatch> = singles.iter().map(MicroBatch::from).collect();
        let b = train_step(&m4, &mut o4, &mbs, 1e-2, 1.0, 0, step).unwrap();
        assert_eq!(a.targets, b.targets);
        assert!(
            (a.loss - b.loss).abs() < 1e-5,
            "loss {} vs {}",
            a.loss,
            b.loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm.max(1.0));
        for ((n, x), (_, y)) in m1.lora_parameters().iter().zip(m4.lora_parameters().iter()) {
            let d = (x - y).abs().max().double_value(&[]);
            worst = worst.max(d);
            assert!(d < 1e-5, "{n}: max abs diff {d:e} after step {step}");
        }
    }
    eprintln!("accumulation 4x1 vs 1x4: max abs parameter diff {worst:e} after 3 steps");
}

#[test]
fn forward_with_plain_positions_equals_forward_and_packed_equals_separate() {
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 9);
    let m = train_support::load_tiny(tmp.path());
    let _g = tch::no_grad_guard();
    let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8, 9, 10]).view([1, 8]);
    let pos = Tensor::arange(8, (Kind::Int64, tch::Device::Cpu)).view([1, 8]);
    let a = m.forward(&ids, None, None);
    let b = m.forward_with(&ids, &pos, None);
    let d = (&a - &b).abs().max().double_value(&[]);
    assert_eq!(d, 0.0, "forward_with differs from forward by {d:e}");
    // Two samples packed into one row: each part's logits equal the sample's own.
    let s = samples();
    let packed = build_batch(&s, &[vec![0, 1]]);
    let lp = m.forward_with(
        &packed.input_ids,
        &packed.position_ids,
        packed.attention_mask.as_ref(),
    );
    let mut off = 0;
    for i in [0usize, 1] {
        let n = s[i].ids.len() as i64;
        let own = m.forward(&Tensor::from_slice(&s[i].ids).view([1, n]), None, None);
        let d = (lp.narrow(1, off, n) - own).abs().max().double_value(&[]);
        assert!(d < 1e-5, "packed sample {i}: {d:e}");
        off += n;
    }
}
