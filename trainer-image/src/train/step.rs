//! One optimizer step: forward/backward over the step's micro-batches with the loss normalised by
//! the supervised tokens of all of them together (transformers PR #34191), global-norm clipping,
//! then AdamW.
//!
//! Randomness (LoRA dropout) is re-seeded from `(seed, step, micro-batch)` before each forward, so
//! no generator state has to be checkpointed and a resumed run draws the same masks.

use tch::{Kind, Reduction, Tensor};

use crate::data::Batch;
use crate::error::contain_panic;
use crate::model::CausalLm;
use crate::model::attention::SideBatch;
use crate::train::group::Group;
use crate::train::optim::AdamW;
use crate::train::stop::{Stop, is_oom};

/// The tensors of one micro-batch (see [`crate::data::batch`] for the conventions).
pub struct MicroBatch<'a> {
    pub input_ids: &'a Tensor,
    pub labels: &'a Tensor,
    pub position_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub tokens: i64,
    pub samples: usize,
    /// Weight of this micro-batch's tokens in the step's loss (1 for training data).
    pub weight: f64,
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
            weight: 1.0,
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

/// The target positions of a micro-batch (labels in `labels[:, 1:]` other than −100, row-major)
/// with the logits that predict them.
pub struct Targets {
    /// `[n, vocab]` float32.
    pub logits: Tensor,
    /// `[n]` the target token ids.
    pub labels: Tensor,
    /// `[n]` the batch row each target is in.
    pub rows: Tensor,
}

/// The logits at the target positions of `mb` only (`None` for sequences shorter than 2).
///
/// Only the rows that have a target go through the final norm and the LM head: the hidden states
/// at target positions are gathered first. Both act on each position on its own, so this equals
/// projecting every position onto the vocabulary and dropping the −100 rows, without the
/// `[batch·seq, vocab]` logits (and their gradient) for prompt and padding tokens. The SFT loss,
/// DPO's sequence log-probs and the self-distillation KL all start here.
pub fn target_logits(model: &CausalLm, mb: &MicroBatch) -> Option<Targets> {
    let (ids, pos, mask) = device_inputs(model, mb)?;
    let hidden = model.hidden_with(&ids, &pos, mask.as_ref());
    Some(targets_at(model, mb, &hidden))
}

/// `mb`'s input ids, positions and mask on the model's device; `None` for sequences shorter
/// than 2 (nothing to predict).
fn device_inputs(model: &CausalLm, mb: &MicroBatch) -> Option<(Tensor, Tensor, Option<Tensor>)> {
    let device = model.device;
    let ids = mb.input_ids.to_device(device);
    if ids.size()[1] < 2 {
        return None;
    }
    let pos = mb.position_ids.to_device(device);
    let mask = mb.attention_mask.map(|m| m.to_device(device));
    Some((ids, pos, mask))
}

/// [`target_logits`] from the last decoder layer's output `hidden` `[batch, seq, hidden]`.
fn targets_at(model: &CausalLm, mb: &MicroBatch, hidden: &Tensor) -> Targets {
    let device = model.device;
    let (b, t, h) = hidden
        .size3()
        .expect("hidden states are [batch, seq, hidden]");
    let labels = mb
        .labels
        .to_device(device)
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)]);
    // Flat index r = row·(t−1) + col of a target in `labels[:, 1:]` is predicted by position
    // row·t + col = r + row of `hidden`.
    let flat = labels.ne(-100).nonzero().squeeze_dim(1);
    let rows = flat.divide_scalar_mode(t - 1, "floor");
    let at = &flat + &rows;
    let selected = hidden.reshape([b * t, h]).index_select(0, &at);
    Targets {
        logits: model.logits(&selected).to_kind(Kind::Float),
        labels: labels.index_select(0, &flat),
        rows,
    }
}

/// Forward and backward of one micro-batch's loss: `loss` turns the micro-batch's [`Targets`]
/// (`None` for sequences shorter than 2) into the value to report, and `value / divisor` is
/// differentiated (gradients accumulate into the parameters). With the model's activation
/// checkpointing on, the decoder layers are recomputed in backward
/// ([`CausalLm::backward_checkpointed`]); the gradients are the same either way. Returns the value,
/// detached.
pub fn backward_on_targets(
    model: &CausalLm,
    mb: &MicroBatch,
    divisor: f64,
    loss: impl FnOnce(Option<Targets>) -> Tensor,
) -> Tensor {
    match device_inputs(model, mb) {
        Some((ids, pos, mask)) if model.checkpoint_layers => {
            let mut value = None;
            model.backward_checkpointed(&ids, &pos, mask.as_ref(), |hidden| {
                let v = loss(Some(targets_at(model, mb, hidden)));
                value = Some(v.detach());
                v / divisor
            });
            value.expect("the head ran")
        }
        inputs => {
            // The inputs already on the device: moving them again would copy them twice.
            let targets = inputs.map(|(ids, pos, mask)| {
                targets_at(model, mb, &model.hidden_with(&ids, &pos, mask.as_ref()))
            });
            let v = loss(targets);
            if v.requires_grad() {
                (&v / divisor).backward();
            }
            v.detach()
        }
    }
}

/// A conversation scored in the same forward as a micro-batch (self-distillation's, beside the
/// task's): its batch, the base's `[targets, vocab]` log-probabilities at its targets (see
/// [`crate::train::anchor::teacher_log_probs`]), and its weight in the loss.
pub struct Rider<'a> {
    pub batch: &'a Batch,
    pub teacher: &'a Tensor,
    pub weight: f64,
}

/// `KL(teacher ‖ student)` per target, averaged over the targets: the student's log-probabilities
/// from its target logits, `teacher` the base's at the same targets (0 without targets).
pub fn kl_per_target(student: Option<Targets>, teacher: &Tensor) -> Tensor {
    let Some(student) = student else {
        return Tensor::zeros([], (Kind::Float, teacher.device()));
    };
    let student = student.logits.log_softmax(-1, Kind::Float);
    let n = teacher.size()[0].max(1);
    // Σ_v p_t (log p_t − log p_s), summed over positions, then / positions.
    (teacher.exp() * (teacher - &student)).sum(Kind::Float) / n as f64
}

/// [`backward_on_targets`] of `mb`'s cross-entropy (times `mb.weight`, over `divisor`) and of
/// `rider`'s `weight · KL` in one forward ([`CausalLm::hidden_side`]). Returns the cross-entropy
/// (detached) and the KL; `None` when either is too short to predict anything, and nothing ran.
fn backward_with_rider(
    model: &CausalLm,
    mb: &MicroBatch,
    divisor: f64,
    rider: &Rider,
) -> Option<(Tensor, f64)> {
    let rider_mb = MicroBatch::from(rider.batch);
    let (ids, pos, mask) = device_inputs(model, mb)?;
    let (r_ids, r_pos, r_mask) = device_inputs(model, &rider_mb)?;
    let (b, t) = ids.size2().expect("input_ids is [batch, seq]");
    let (rb, rt) = r_ids.size2().expect("input_ids is [batch, seq]");
    let side = |a: &Tensor, r: &Tensor| Tensor::cat(&[a.reshape([1, -1]), r.reshape([1, -1])], 1);
    let batches = [
        SideBatch {
            batch: b,
            seq: t,
            mask,
        },
        SideBatch {
            batch: rb,
            seq: rt,
            mask: r_mask,
        },
    ];
    let hidden = model.hidden_side(&side(&ids, &r_ids), &side(&pos, &r_pos), &batches);
    let h = hidden.size()[2];
    let own = hidden.narrow(1, 0, b * t).reshape([b, t, h]);
    let riding = hidden.narrow(1, b * t, rb * rt).reshape([rb, rt, h]);
    let ce = cross_entropy_sum(Some(targets_at(model, mb, &own)), model.device) * mb.weight;
    let teacher = rider.teacher.to_device(model.device);
    let kl = kl_per_target(Some(targets_at(model, &rider_mb, &riding)), &teacher);
    (&ce / divisor + &kl * rider.weight).backward();
    Some((ce.detach(), kl.double_value(&[])))
}

/// Summed cross-entropy (float32) of the target logits against their labels (0 without targets).
pub fn cross_entropy_sum(targets: Option<Targets>, device: tch::Device) -> Tensor {
    match targets {
        Some(t) => {
            t.logits
                .cross_entropy_loss::<Tensor>(&t.labels, None, Reduction::Sum, -100, 0.0)
        }
        None => Tensor::zeros([], (Kind::Float, device)),
    }
}

/// Summed cross-entropy (float32) of `logits[:, :-1]` against `labels[:, 1:]`, −100 ignored,
/// computed at the target positions only ([`target_logits`]).
pub fn loss_sum(model: &CausalLm, mb: &MicroBatch) -> Tensor {
    cross_entropy_sum(target_logits(model, mb), model.device)
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
    /// The KL of the [`Rider`] scored beside the micro-batches, when it was.
    pub rider_kl: Option<f64>,
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
    let stats = accumulate_gradients(model, opt, micro_batches, seed, step)?;
    if stats.targets == 0 {
        // Nothing supervised: no gradient; the step still counts so the schedule stays aligned.
        return Ok(stats);
    }
    finish_step(opt, stats, lr, max_grad_norm)
}

/// The first half of [`train_step`]: zeroes the gradients, then forward + backward over
/// `micro_batches` with the loss normalised by all their targets. A guard can add its own term's
/// gradients before [`finish_step`].
pub fn accumulate_gradients(
    model: &CausalLm,
    opt: &mut AdamW,
    micro_batches: &[MicroBatch],
    seed: u64,
    step: i64,
) -> Result<StepStats, StepStats> {
    accumulate_gradients_in(
        &Group::single(),
        model,
        opt,
        micro_batches,
        None,
        seed,
        step,
    )
    .expect("one process has no collective to fail")
}

/// [`accumulate_gradients`] as one rank of `group`: `micro_batches` is the whole step's list on
/// every rank; this rank runs its share ([`Group::runs`]) and the gradients and the loss are
/// summed over the ranks, so every rank ends with the gradients of the whole step. A `rider`
/// (one process only) is scored in the forward of the last micro-batch; `rider_kl` says whether
/// it was. `Err(Stop)` when a collective fails.
pub fn accumulate_gradients_in(
    group: &Group,
    model: &CausalLm,
    opt: &mut AdamW,
    micro_batches: &[MicroBatch],
    rider: Option<&Rider>,
    seed: u64,
    step: i64,
) -> Result<Result<StepStats, StepStats>, Stop> {
    debug_assert!(
        rider.is_none() || group.world() == 1,
        "a rider needs one process"
    );
    let counts: Vec<i64> = micro_batches
        .iter()
        .map(|m| count_targets(m.labels))
        .collect();
    let targets: i64 = counts.iter().sum();
    // The token-weighted mean: Σ w·loss_sum / Σ w·targets (every w is 1 unless a guard's
    // micro-batch is weighted).
    let weighted_targets: f64 = micro_batches
        .iter()
        .zip(&counts)
        .map(|(m, &n)| m.weight * n as f64)
        .sum();
    let mut stats = StepStats {
        targets,
        tokens: micro_batches.iter().map(|m| m.tokens).sum(),
        samples: micro_batches.iter().map(|m| m.samples).sum(),
        ..Default::default()
    };
    opt.zero_grad();
    if targets == 0 {
        return Ok(Ok(stats));
    }
    // This rank's share, with an allocation failure caught: in a group every rank must learn of
    // it before the next collective, so that all of them retry the step with the same smaller
    // micro-batches (a rank that halved alone would run other rows than its peers expect).
    let last = micro_batches.len() - 1;
    let mut rider_kl = None;
    let local = contain_panic(|| {
        let mut sum = 0.0;
        for (i, mb) in micro_batches.iter().enumerate() {
            if !group.runs(i) {
                continue;
            }
            tch::manual_seed(dropout_seed(seed, step, i));
            let with_rider = rider
                .filter(|_| i == last)
                .and_then(|r| backward_with_rider(model, mb, weighted_targets, r));
            let s = match with_rider {
                Some((s, kl)) => {
                    rider_kl = Some(kl);
                    s
                }
                None => backward_on_targets(model, mb, weighted_targets, |t| {
                    cross_entropy_sum(t, model.device) * mb.weight
                }),
            };
            sum += s.double_value(&[]);
        }
        sum
    });
    stats.rider_kl = rider_kl;
    let mut sum = [agree_on_memory(group, local)?];
    group.sum_values(&mut sum)?;
    group.sum_gradients(opt)?;
    stats.loss = sum[0] / weighted_targets;
    if !stats.loss.is_finite() {
        return Ok(Err(stats));
    }
    Ok(Ok(stats))
}

/// This rank's loss sum, or — when any rank of `group` ran out of memory in its share — the
/// out-of-memory panic on every rank, which [`crate::train::micro::fit`] answers by halving the
/// micro-batch. Other panics go on unwinding here (the other ranks then fail at their next
/// collective).
pub fn agree_on_memory(group: &Group, local: Result<f64, String>) -> Result<f64, Stop> {
    let oom_here = match &local {
        Err(message) if !is_oom(message) => std::panic::resume_unwind(Box::new(message.clone())),
        Err(_) => true,
        Ok(_) => false,
    };
    if group.any(oom_here)? {
        let message = match local {
            Err(message) => message,
            Ok(_) => "out of memory on another rank of the group".to_string(),
        };
        std::panic::resume_unwind(Box::new(message));
    }
    Ok(local.unwrap_or_default())
}

/// The second half of [`train_step`]: global-norm clipping and the AdamW update; `Err` (weights
/// untouched) when the gradient norm is not finite.
pub fn finish_step(
    opt: &mut AdamW,
    mut stats: StepStats,
    lr: f64,
    max_grad_norm: f64,
) -> Result<StepStats, StepStats> {
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
