//! Self-distillation's conversation scored in the task's forward ([`Rider`]): the linear layers
//! see both batches' tokens at once and each batch attends within itself, so the gradients, the
//! task loss and the KL are those of the two forwards run apart (fp32 CPU, ≤ 1e-5), with the
//! task's micro-batch padded, packed or plain.

mod train_support;

use finetune_crds::training::LLAMA_LINEAR_MODULES;
use finetune_trainer::data::{Origin, Sample, build_batch};
use finetune_trainer::model::LoraConfig;
use finetune_trainer::train::anchor::distillation_kl;
use finetune_trainer::train::group::Group;
use finetune_trainer::train::optim::AdamW;
use finetune_trainer::train::step::{
    MicroBatch, Rider, accumulate_gradients, accumulate_gradients_in,
};
use std::sync::Arc;
use tch::{Kind, Tensor};

fn sample(n: usize, k: usize, supervised_from: usize) -> Sample {
    let origin = Origin {
        path: Arc::from(std::path::Path::new("mem")),
        line: k + 1,
    };
    let ids: Vec<i64> = (0..n).map(|j| 3 + ((j * 11 + k * 7) % 29) as i64).collect();
    let sup: Vec<bool> = (0..n).map(|j| j >= supervised_from).collect();
    Sample::new(ids, sup, origin)
}

/// The tiny model with LoRA on every projection, no dropout (the two paths would draw different
/// masks), B non-zero so that A has gradients too.
fn lora_model(dir: &std::path::Path) -> (finetune_trainer::model::CausalLm, AdamW) {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: LLAMA_LINEAR_MODULES.map(String::from).to_vec(),
        rslora: false,
    };
    train_support::lora_model(dir, 5, &cfg)
}

fn max_grad_diff(a: &AdamW, b: &AdamW) -> f64 {
    let mut worst = 0f64;
    for (x, y) in a.params.iter().zip(&b.params) {
        let (gx, gy) = (x.param.grad(), y.param.grad());
        assert!(gx.defined() && gy.defined(), "{} has no gradient", x.name);
        worst = worst.max((gx - gy).abs().max().double_value(&[]));
    }
    worst
}

#[test]
fn a_conversation_riding_in_the_task_forward_gets_the_gradients_of_its_own_forward() {
    let tmp = tempfile::tempdir().unwrap();
    train_support::write_tiny_model(tmp.path(), 23);
    let task: Vec<Sample> = [11usize, 6, 14, 9]
        .iter()
        .enumerate()
        .map(|(k, &n)| sample(n, k, n / 3))
        .collect();
    let padded = build_batch(&task, &[vec![0], vec![1], vec![2]]);
    let packed = build_batch(&task, &[vec![0, 1], vec![2, 3]]);
    let plain = build_batch(&task, &[vec![2]]);
    assert!(padded.attention_mask.is_some() && plain.attention_mask.is_none());
    let conversation = [sample(17, 9, 8)];
    let riding = build_batch(&conversation, &[vec![0]]);
    for (name, mbs) in [
        (
            "padded + packed",
            vec![MicroBatch::from(&padded), MicroBatch::from(&packed)],
        ),
        ("plain", vec![MicroBatch::from(&plain)]),
    ] {
        let (apart, mut apart_opt) = lora_model(tmp.path());
        let vocab = apart.config.vocab_size;
        tch::manual_seed(3);
        let teacher =
            Tensor::randn([9, vocab], (Kind::Float, tch::Device::Cpu)).log_softmax(-1, Kind::Float);
        let weight = 0.7;
        let a = accumulate_gradients(&apart, &mut apart_opt, &mbs, 1, 0).unwrap();
        let kl = distillation_kl(&apart, &riding, &teacher);
        (&kl * weight).backward();
        let (merged, mut merged_opt) = lora_model(tmp.path());
        let rider = Rider {
            batch: &riding,
            teacher: &teacher,
            weight,
        };
        let m = accumulate_gradients_in(
            &Group::single(),
            &merged,
            &mut merged_opt,
            &mbs,
            Some(&rider),
            1,
            0,
        )
        .unwrap()
        .unwrap();
        let rider_kl = m.rider_kl.expect("the conversation rode along");
        assert!(kl.double_value(&[]) > 0.0);
        assert!(
            (rider_kl - kl.double_value(&[])).abs() <= 1e-5,
            "{name}: KL {rider_kl} vs {kl}"
        );
        assert!(
            (a.loss - m.loss).abs() <= 1e-5,
            "{name}: loss {} vs {}",
            a.loss,
            m.loss
        );
        let worst = max_grad_diff(&apart_opt, &merged_opt);
        assert!(worst <= 1e-5, "{name}: gradients differ by {worst:e}");
        eprintln!("{name}: riding vs apart, max abs gradient diff {worst:e}");
    }
}
