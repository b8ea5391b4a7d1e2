//! One optimizer step: forward/backward over the step's micro-batches with the loss normalised by
//! the supervised tokens of all of them together (transformers PR #34191), global-norm clipping,
//! then AdamW.
//!
//! Randomness (LoRA dropout) is re-seeded from `(seed, step, micro-batch)` before each forward, so
//! no generator state has to be checkpointed and a resumed run draws the same masks.

use tch::{Kind, Reduction, Tensor};

use crate::data::Batch;
use crate::model::CausalLm;
use crate::train::optim::AdamW;

/// The tensors of one micro-batch (see [`crate::data::batch`] for the conventions).
pub struct MicroBatch<'a> {
    pub input_ids: &'a Tensor,
    pub labels: &'a Tensor,
    pub position_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub tokens: i64,
    pub samples: usize,
}

impl<'a> From<&'a Batch> for MicroBatch<'a> {
    fn from(b: &'a Batch) -> Self {
        MicroBatch {
            input_ids: &b.input_ids,
            labels: &b.labels,
            position_ids: &b.position_ids,
            attention_mask: b.attention_mask.as_ref(),
            tokens: b.tokens,
            samples: b.samples,
        }
    }
}

/// Number of targets: labels other than −100 in `labels[:, 1:]`.
pub fn count_targets(labels: &Tensor) -> i64 {
    let t = labels.size()[1];
    if t < 2 {
        return 0;
    }
    labels
        .narrow(1, 1, t - 1)
        .ne(-100)
        .sum(Kind::Int64)
        .int64_value(&[])
}

/// Summed cross-entropy (float32) of `logits[:, :-1]` against `labels[:, 1:]`, −100 ignored.
pub fn loss_sum(model: &CausalLm, mb: &MicroBatch) -> Tensor {
    let device = model.device;
    let ids = mb.input_ids.to_device(device);
    let pos = mb.position_ids.to_device(device);
    let mask = mb.attention_mask.map(|m| m.to_device(device));
    let logits = model.forward_with(&ids, &pos, mask.as_ref());
    let (b, t, v) = logits.size3().expect("logits are 3-d");
    if t < 2 {
        return Tensor::zeros([], (Kind::Float, device));
    }
    let logits = logits
        .narrow(1, 0, t - 1)
        .to_kind(Kind::Float)
        .reshape([b * (t - 1), v]);
    let labels = mb
        .labels
        .to_device(device)
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)]);
    logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0)
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean token loss over the step (sum over micro-batches / all targets).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub targets: i64,
    pub tokens: i64,
    pub samples: usize,
}

/// Seed for the dropout masks of micro-batch `micro` of step `step`.
pub fn dropout_seed(seed: u64, step: i64, micro: usize) -> i64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64) << 48;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// Forward + backward over `micro_batches`, clip, AdamW with `lr`. `step` is the 0-based index of
/// this optimizer step (for dropout seeds). Returns `Err(stats)` without updating the weights when
/// the loss or the gradient norm is not finite.
pub fn train_step(
    model: &CausalLm,
    opt: &mut AdamW,
    micro_batches: &[MicroBatch],
    lr: f64,
    max_grad_norm: f64,
    seed: u64,
    step: i64,
) -> Result<StepStats, StepStats> {
    let targets: i64 = micro_batches.iter().map(|m| count_targets(m.labels)).sum();
    let mut stats = StepStats {
        targets,
        tokens: micro_batches.iter().map(|m| m.tokens).sum(),
        samples: micro_batches.iter().map(|m| m.samples).sum(),
        ..Default::default()
    };
    opt.zero_grad();
    if targets == 0 {
        // Nothing supervised: no gradient; the step still counts so the schedule stays aligned.
        return Ok(stats);
    }
    let mut sum = 0.0;
    for (i, mb) in micro_batches.iter().enumerate() {
        tch::manual_seed(dropout_seed(seed, step, i));
        let s = loss_sum(model, mb);
        sum += s.double_value(&[]);
        (s / targets as f64).backward();
    }
    stats.loss = sum / targets as f64;
    if !stats.loss.is_finite() {
        return Err(stats);
    }
    stats.grad_norm = opt.clip_grad_norm(max_grad_norm);
    if !stats.grad_norm.is_finite() {
        return Err(stats);
    }
    opt.step(lr);
    Ok(stats)
}

/// Token-weighted mean loss over `batches` without gradients or dropout: `(loss, targets)`.
pub fn eval_loss<'a>(
    model: &CausalLm,
    batches: impl IntoIterator<Item = MicroBatch<'a>>,
) -> (f64, i64) {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut n) = (0.0, 0i64);
    for mb in batches {
        n += count_targets(mb.labels);
        sum += loss_sum(model, &mb).double_value(&[]);
    }
    (if n > 0 { sum / n as f64 } else { f64::NAN }, n)
}
