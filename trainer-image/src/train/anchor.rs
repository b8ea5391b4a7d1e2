//! Forgetting guards that add a loss term pulling the model back toward where it started.
//!
//! **Self-distillation** (`forgettingGuard.selfDistillation`, LoRA): the base model's own answers
//! to general requests (the self-replay conversations, [`crate::train::guard`]) are scored by the
//! tuned model and by the base — the same weights with the adapter switched off, so no second
//! model is held — and `weight · KL(base ‖ tuned)` over the answer tokens joins each step's loss.
//! Unlike replaying the answers as labels, the KL matches the base's whole next-token
//! distribution, not just its argmax. Each step scores [`DISTILL_PER_STEP`] conversations in
//! turn, which keeps the cost to one short no-grad forward and one short forward/backward.
//!
//! **L2 to init** (`forgettingGuard.l2ToInit`, full fine-tuning): `weight/2 · Σ‖θ − θ₀‖²`, whose
//! gradient `weight · (θ − θ₀)` is added to each parameter's gradient before clipping. θ₀ is a
//! copy of the starting weights (one more model's worth of memory).

use tch::{Kind, Tensor};

use crate::data::{Batch, Sample, build_batch};
use crate::model::CausalLm;
use crate::train::step::{MicroBatch, target_logits};

/// Conversations scored by the self-distillation term per optimizer step.
pub const DISTILL_PER_STEP: usize = 2;

/// `[n, vocab]` float32 log-probabilities at the target positions of `batch` (row-major).
fn target_log_probs(model: &CausalLm, batch: &Batch) -> Tensor {
    match target_logits(model, &MicroBatch::from(batch)) {
        Some(t) => t.logits.log_softmax(-1, Kind::Float),
        None => Tensor::zeros([0, model.config.vocab_size], (Kind::Float, model.device)),
    }
}

/// `KL(base ‖ tuned)` per target token of `batch`, averaged over the targets, with gradients for
/// the adapter. The base is `model` with its adapters switched off.
pub fn distillation_kl(model: &mut CausalLm, batch: &Batch) -> Tensor {
    let teacher = {
        let _guard = tch::no_grad_guard();
        model.set_adapters_enabled(false);
        let lp = target_log_probs(model, batch);
        model.set_adapters_enabled(true);
        lp
    };
    let student = target_log_probs(model, batch);
    let n = teacher.size()[0].max(1);
    // Σ_v p_t (log p_t − log p_s), summed over positions, then / positions.
    (teacher.exp() * (&teacher - &student)).sum(Kind::Float) / n as f64
}

/// The self-distillation guard of a run.
#[derive(Debug)]
pub struct SelfDistillation {
    samples: Vec<Sample>,
    pub weight: f64,
}

impl SelfDistillation {
    /// `samples`: the base model's answers as chat samples (answers supervised).
    pub fn new(samples: Vec<Sample>, weight: f64) -> Self {
        Self { samples, weight }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The conversations of optimizer step `step` (0-based): the next [`DISTILL_PER_STEP`] in
    /// turn, so a resumed run scores the same ones.
    pub fn batch_for_step(&self, step: i64) -> Batch {
        let n = self.samples.len();
        let rows: Vec<Vec<usize>> = (0..DISTILL_PER_STEP.min(n))
            .map(|k| vec![(step as usize * DISTILL_PER_STEP + k) % n])
            .collect();
        build_batch(&self.samples, &rows)
    }

    /// Adds `weight · KL` of step `step`'s conversations to the gradients; returns the KL.
    pub fn accumulate(&self, model: &mut CausalLm, step: i64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let kl = distillation_kl(model, &self.batch_for_step(step));
        (&kl * self.weight).backward();
        kl.double_value(&[])
    }
}

/// The L2-to-init guard of a full fine-tuning run.
pub struct L2ToInit {
    initial: Vec<(Tensor, Tensor)>,
    pub weight: f64,
}

impl std::fmt::Debug for L2ToInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2ToInit")
            .field("tensors", &self.initial.len())
            .field("weight", &self.weight)
            .finish()
    }
}

impl L2ToInit {
    /// Remembers the current value of every parameter in `params` (call before any update).
    pub fn new(params: &[Tensor], weight: f64) -> Self {
        let initial = params
            .iter()
            .map(|p| (p.shallow_clone(), p.detach().copy()))
            .collect();
        Self { initial, weight }
    }

    /// Adds `weight · (θ − θ₀)` to each gradient (by backpropagating the penalty); returns the
    /// penalty `weight/2 · Σ‖θ − θ₀‖²`.
    pub fn accumulate(&self) -> f64 {
        let Some((first, _)) = self.initial.first() else {
            return 0.0;
        };
        let mut total = Tensor::zeros([], (Kind::Float, first.device()));
        for (p, p0) in &self.initial {
            total += (p - p0).square().sum(Kind::Float);
        }
        let penalty = total * (self.weight / 2.0);
        penalty.backward();
        penalty.double_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_adds_the_pull_toward_the_start_to_the_gradient() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let l2 = L2ToInit::new(std::slice::from_ref(&p), 0.5);
        tch::no_grad(|| {
            let _ = p
                .shallow_clone()
                .f_add_(&Tensor::from_slice(&[1.0f32, -2.0]))
                .unwrap();
        });
        (&p * 3.0).sum(Kind::Float).backward();
        let penalty = l2.accumulate();
        // θ − θ₀ = (1, −2): penalty 0.5/2 · 5; gradient 3 + 0.5 · (1, −2).
        assert!((penalty - 1.25).abs() < 1e-9);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert_eq!(g, vec![3.5, 2.0]);
    }
}
