//! Activation checkpointing (`hyperparameters.gradientCheckpointing`): recomputing each decoder
//! layer in backward gives the gradients of the plain backward (fp32 CPU, max abs diff ≤ 1e-6),
//! with LoRA dropout on (the recompute draws the same masks), under padding and packing masks, for
//! full fine-tuning (embeddings included); and a few steps give the same adapter.

mod train_support;

use finetune_trainer::data::{Origin, Sample, build_batch};
use finetune_trainer::model::{CausalLm, LoraConfig};
use finetune_trainer::train::optim::AdamW;
use finetune_trainer::train::step::{MicroBatch, accumulate_gradients, train_step};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::Tensor;

/// Dropout draws from libtorch's one global generator: tests that seed it run one at a time.
static GENERATOR: Mutex<()> = Mutex::new(());

fn generator() -> MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

fn samples() -> Vec<Sample> {
    let origin = Origin {
        path: Arc::from(std::path::Path::new("mem")),
        line: 1,
    };
    [11usize, 6, 14, 9]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|j| 3 + ((j * 11 + k * 7) % 29) as i64).collect();
            let sup: Vec<bool> = (0..n).map(|j| j >= n / 3).collect();
            Sample::new(ids, sup, origin.clone())
        })
        .collect()
}

/// The tiny model with LoRA (dropout 0.2) on every projection but down_proj, B non-zero so A has
/// gradients.
fn lora_model(dir: &std::path::Path, checkpoint: bool) -> (CausalLm, AdamW) {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.2,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
        ]
        .map(String::from)
        .to_vec(),
        rslora: false,
    };
    let (mut m, opt) = train_support::lora_model(dir, 5, &cfg);
    m.checkpoint_layers = checkpoint;
    (m, opt)
}

/// Every trainable parameter of the full fine-tuning model, with its gradient enabled.
fn full_model(dir: &std::path::Path, checkpoint: bool) -> (CausalLm, AdamW) {
    let mut m = train_support::load_tiny(dir);
    m.unfreeze_all();
    m.set_training(true);
    m.checkpoint_layers = checkpoint;
    let params = m
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.shallow_clone(), 0.0))
        .collect();
    (m, AdamW::new(params))
}

fn named_grads(opt: &AdamW) -> Vec<(String, Tensor)> {
    opt.params
        .iter()
        .map(|p| (p.name.clone(), p.param.grad()))
        .collect()
}

fn max_grad_diff(a: &AdamW, b: &AdamW) -> f64 {
    let mut worst = 0f64;
    for ((n, x), (_, y)) in named_grads(a).iter().zip(named_grads(b).iter()) {
        assert!(x.defined() && y.defined(), "{n} has no gradient");
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d <= 1e-6, "{n}: gradients differ by {d:e}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn checkpointed_lora_gradients_equal_the_plain_ones_with_dropout_padding_and_packing() {
    let _g = generator();
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 21);
    let s = samples();
    let padded = build_batch(&s, &[vec![0], vec![1], vec![2]]);
    let packed = build_batch(&s, &[vec![0, 1], vec![2, 3]]);
    assert!(padded.attention_mask.is_some() && packed.attention_mask.is_some());
    let (plain, mut po) = lora_model(tmp.path(), false);
    let (ckpt, mut co) = lora_model(tmp.path(), true);
    let mbs = [MicroBatch::from(&padded), MicroBatch::from(&packed)];
    let a = accumulate_gradients(&plain, &mut po, &mbs, 7, 3).unwrap();
    let b = accumulate_gradients(&ckpt, &mut co, &mbs, 7, 3).unwrap();
    assert!(
        (a.loss - b.loss).abs() <= 1e-6,
        "loss {} vs {}",
        a.loss,
        b.loss
    );
    let worst = max_grad_diff(&po, &co);
    // Dropout really is on: another step's seed draws other masks and other gradients.
    let (other, mut oo) = lora_model(tmp.path(), false);
    accumulate_gradients(&other, &mut oo, &mbs, 7, 4).unwrap();
    let (_, g) = &named_grads(&po)[0];
    let (_, h) = &named_grads(&oo)[0];
    assert!(
        (g - h).abs().max().double_value(&[]) > 1e-4,
        "dropout had no effect"
    );
    eprintln!("checkpointed vs plain LoRA gradients: max abs diff {worst:e}");
}

#[test]
fn checkpointed_full_fine_tuning_gradients_equal_the_plain_ones_embeddings_included() {
    let _g = generator();
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 22);
    let s = samples();
    let batch = build_batch(&s, &[vec![0, 1], vec![3]]);
    let (plain, mut po) = full_model(tmp.path(), false);
    let (ckpt, mut co) = full_model(tmp.path(), true);
    let mbs = [MicroBatch::from(&batch)];
    accumulate_gradients(&plain, &mut po, &mbs, 1, 0).unwrap();
    accumulate_gradients(&ckpt, &mut co, &mbs, 1, 0).unwrap();
    let names: Vec<String> = named_grads(&co).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "model.embed_tokens.weight"));
    let worst = max_grad_diff(&po, &co);
    eprintln!("checkpointed vs plain full fine-tuning gradients: max abs diff {worst:e}");
}

#[test]
fn checkpointed_training_produces_the_same_adapter() {
    let _g = generator();
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 23);
    let s = samples();
    let batches = [
        build_batch(&s, &[vec![0, 1], vec![2]]),
        build_batch(&s, &[vec![3], vec![1]]),
    ];
    let (plain, mut po) = lora_model(tmp.path(), false);
    let (ckpt, mut co) = lora_model(tmp.path(), true);
    for step in 0..4 {
        let mbs: Vec<MicroBatch> = batches.iter().map(MicroBatch::from).collect();
        let a = train_step(&plain, &mut po, &mbs, 1e-2, 1.0, 9, step).unwrap();
        let b = train_step(&ckpt, &mut co, &mbs, 1e-2, 1.0, 9, step).unwrap();
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "step {step}: {} vs {}",
            a.loss,
            b.loss
        );
    }
    let mut worst = 0f64;
    for ((n, x), (_, y)) in plain.lora_parameters().iter().zip(&ckpt.lora_parameters()) {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d <= 1e-6, "{n}: adapters differ by {d:e}");
        worst = worst.max(d);
    }
    eprintln!("checkpointed vs plain adapter after 4 steps: max abs diff {worst:e}");
}
