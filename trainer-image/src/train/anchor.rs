//! Forgetting guards that add a loss term pulling the model back toward where it started.
//!
//! **Self-distillation** (`forgettingGuard.selfDistillation`, LoRA): the base model's own answers
//! to general requests (the self-replay conversations, [`crate::train::guard`]) are scored by the
//! base once, before the first update (the same weights with the adapter switched off, so no
//! second model is held; its log-probabilities at the answer tokens are kept), and each step
//! `weight · KL(base ‖ tuned)` over the answer tokens of the next [`DISTILL_PER_STEP`]
//! conversation joins the loss. On one process the conversation rides in the forward of the
//! step's last task micro-batch ([`crate::train::step::Rider`]: the linear layers read their
//! weights once for both, each attends within itself); in a data-parallel group, or with
//! activation checkpointing, it gets a short forward/backward of its own. Unlike replaying the
//! answers as labels, the KL matches the base's whole next-token distribution, not just its
//! argmax.
//!
//! **L2 to init** (`forgettingGuard.l2ToInit`, full fine-tuning): `weight/2 · Σ‖θ − θ₀‖²`, whose
//! gradient `weight · (θ − θ₀)` is added to each parameter's gradient before clipping. θ₀ is a
//! copy of the starting weights (one more model's worth of memory).
//!
//! **Layer anchor** (`forgettingGuard.layerAnchor`, LoRA): before the first update, the inputs
//! each adapted layer receives on general conversations (the base model's answers to general
//! requests) are gathered as a random sketch `F` `[in, k]` with `F·Fᵀ ≈ Xᵀ·X`; each step adds
//! `weight · mean over layers of ‖ΔW·F‖² / ‖W·F‖²`, the share by which the adapter moves each
//! layer's output on general text. Rehearsal guards hold the answers to the prompts they replay;
//! this term holds every layer on the whole distribution of general inputs at once, for the price
//! of a few `[rank, k]` products per step, so the task is learned in the directions general text
//! does not use.

use std::sync::Mutex;

use tch::{Kind, Tensor};

use crate::data::{Batch, Sample, build_batch};
use crate::model::CausalLm;
use crate::model::linear::Linear;
use crate::train::step::{MicroBatch, kl_per_target, target_logits};

/// Conversations scored by the self-distillation term per optimizer step, each a request of its
/// own ([`crate::train::setup`] asks one per step the run takes). On the dates task one a step
/// kept 145 of 159 held-out answers at 1.26× the unguarded wall time; two a step (120 distinct)
/// kept 149 at 1.40×: more held-out answers, but not at the price of 1.3×.
pub const DISTILL_PER_STEP: usize = 1;

/// `[n, vocab]` float32 log-probabilities at the target positions of `batch` (row-major).
fn target_log_probs(model: &CausalLm, batch: &Batch) -> Tensor {
    match target_logits(model, &MicroBatch::from(batch)) {
        Some(t) => t.logits.log_softmax(-1, Kind::Float),
        None => Tensor::zeros([0, model.config.vocab_size], (Kind::Float, model.device)),
    }
}

/// `KL(teacher ‖ tuned)` per target token of `batch`, averaged over the targets, with gradients
/// for the adapter. `teacher`: the base's `[n, vocab]` log-probabilities at the same targets.
pub fn distillation_kl(model: &CausalLm, batch: &Batch, teacher: &Tensor) -> Tensor {
    kl_per_target(target_logits(model, &MicroBatch::from(batch)), teacher)
}

/// Most tokens of one forward of the base over general conversations: they are packed into one
/// row each forward (see [`packed`]).
const PACKED_TOKENS: usize = 512;

/// Answer tokens (targets) of `sample`: supervised positions after the first.
fn targets_of(sample: &Sample) -> i64 {
    sample.supervised.iter().skip(1).filter(|&&s| s).count() as i64
}

/// `samples`' indices in order, cut into rows of at most [`PACKED_TOKENS`] tokens (a longer
/// conversation gets a row of its own). A packed row attends within each conversation only, and
/// has no padding: the layer anchor's sketch sees only real text, and each forward is one wide
/// matrix product instead of many narrow ones.
fn packed(samples: &[Sample]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut tokens = 0;
    for (i, s) in samples.iter().enumerate() {
        match rows.last_mut() {
            Some(row) if tokens + s.len() <= PACKED_TOKENS => row.push(i),
            _ => {
                rows.push(vec![i]);
                tokens = 0;
            }
        }
        tokens += s.len();
    }
    rows
}

/// The base model's `[targets, vocab]` log-probabilities on each of `samples`, in host memory
/// (the device gets a step's share when it needs it), with the adapters off, in eval mode and
/// without gradients: one packed row a forward. The base does not change while the adapter
/// trains, so they are recorded once; scoring the base again every step (as the guard first did)
/// cost a third of the guard's time per step.
pub fn teacher_log_probs(model: &mut CausalLm, samples: &[Sample]) -> Vec<Tensor> {
    base_pass(model, samples, true)
}

/// Runs the base over `samples` (see [`teacher_log_probs`]); returns their log-probabilities
/// when `score`, else only runs the decoder layers (for what they record, such as a sketch).
fn base_pass(model: &mut CausalLm, samples: &[Sample], score: bool) -> Vec<Tensor> {
    let _no_grad = tch::no_grad_guard();
    model.set_adapters_enabled(false);
    model.set_training(false);
    let mut out = Vec::with_capacity(samples.len());
    for row in packed(samples) {
        let batch = build_batch(samples, std::slice::from_ref(&row));
        if !score {
            let device = model.device;
            let mask = batch.attention_mask.as_ref().map(|m| m.to_device(device));
            let _ = model.hidden_with(
                &batch.input_ids.to_device(device),
                &batch.position_ids.to_device(device),
                mask.as_ref(),
            );
            continue;
        }
        let lp = target_log_probs(model, &batch);
        let counts: Vec<i64> = row.iter().map(|&i| targets_of(&samples[i])).collect();
        // Targets are in row order: each conversation's are one contiguous block.
        out.extend(lp.to_device(tch::Device::Cpu).split_with_sizes(&counts, 0));
    }
    model.set_training(true);
    model.set_adapters_enabled(true);
    out
}

/// The self-distillation guard of a run.
#[derive(Debug)]
pub struct SelfDistillation {
    samples: Vec<Sample>,
    /// The base's log-probabilities at each conversation's answer tokens (see
    /// [`teacher_log_probs`]), in host memory: `targets × vocab` float32 each.
    teacher: Vec<Tensor>,
    pub weight: f64,
}

impl SelfDistillation {
    /// `samples`: the base model's answers as chat samples (answers supervised). The base's
    /// log-probabilities on them are recorded by [`SelfDistillation::with_teacher`] once the
    /// model is what the adapter trains on (quantized, if it will be).
    pub fn new(samples: Vec<Sample>, weight: f64) -> Self {
        Self {
            samples,
            teacher: Vec::new(),
            weight,
        }
    }

    /// Records the base's log-probabilities on the conversations: `teacher` when another guard's
    /// forwards already scored these same conversations (one tensor each), else from `model`
    /// (adapters off).
    pub fn with_teacher(mut self, model: &mut CausalLm, teacher: Option<Vec<Tensor>>) -> Self {
        self.teacher = teacher.unwrap_or_else(|| teacher_log_probs(model, &self.samples));
        debug_assert_eq!(self.teacher.len(), self.samples.len());
        self
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The base model's answers it scores.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Bytes the base's recorded log-probabilities hold.
    pub fn teacher_bytes(&self) -> u64 {
        self.teacher.iter().map(|t| t.numel() as u64 * 4).sum()
    }

    /// The conversations of optimizer step `step` (0-based): the next [`DISTILL_PER_STEP`] in
    /// turn, so a resumed run scores the same ones.
    fn conversations_for_step(&self, step: i64) -> Vec<usize> {
        let n = self.samples.len();
        (0..DISTILL_PER_STEP.min(n))
            .map(|k| (step as usize * DISTILL_PER_STEP + k) % n)
            .collect()
    }

    /// Step `step`'s conversations as one batch, with the base's log-probabilities at their
    /// targets (in host memory); `None` without conversations.
    pub fn for_step(&self, step: i64) -> Option<(Batch, Tensor)> {
        if self.samples.is_empty() {
            return None;
        }
        let picked = self.conversations_for_step(step);
        let rows: Vec<Vec<usize>> = picked.iter().map(|&i| vec![i]).collect();
        // `trainable` records the teacher before the first step (`with_teacher`).
        let teacher: Vec<&Tensor> = picked
            .iter()
            .map(|&i| {
                self.teacher
                    .get(i)
                    .expect("the base's log-probabilities are recorded")
            })
            .collect();
        Some((build_batch(&self.samples, &rows), Tensor::cat(&teacher, 0)))
    }

    /// Adds `weight · KL` of step `step`'s conversations to the gradients in a forward of their
    /// own; returns the KL. (A run on one process scores them in the task's forward instead:
    /// [`crate::train::step::Rider`].)
    pub fn accumulate(&self, model: &CausalLm, step: i64) -> f64 {
        let Some((batch, teacher)) = self.for_step(step) else {
            return 0.0;
        };
        let kl = distillation_kl(model, &batch, &teacher.to_device(model.device));
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

/// Columns of the random sketch of each adapted layer's general inputs: enough for the sketch's
/// `F·Fᵀ` to weigh the directions general text uses by their energy, at `in × k` floats a layer.
pub const ANCHOR_SKETCH_COLUMNS: i64 = 64;

/// One adapted layer's share of the layer-anchor term.
struct AnchoredLayer {
    a: Tensor,
    b: Tensor,
    /// `[in, k]`: the sketch of the general inputs, times `scaling / ‖W·F‖`, so that
    /// `‖B·(A·sketch)‖²` is the layer's relative output change.
    sketch: Tensor,
}

/// Makes `lin`'s adapter (if it has one) sketch its inputs from now on.
fn start_sketch(lin: &mut Linear) {
    let inp = lin.shape().1;
    if let Some(l) = &mut lin.lora {
        let zeros = Tensor::zeros([inp, ANCHOR_SKETCH_COLUMNS], (Kind::Float, l.a.device()));
        l.input_sketch = Some(Mutex::new(zeros));
    }
}

/// Stops `lin`'s sketching and turns the sketch into its anchor term; `None` without an adapter,
/// or when the layer's output on the sketched inputs is zero (nothing to be relative to).
fn finish_sketch(lin: &mut Linear) -> Option<AnchoredLayer> {
    let weight = lin.dense_weight();
    let l = lin.lora.as_mut()?;
    let sketch = l.input_sketch.take()?;
    let sketch = sketch.into_inner().unwrap_or_else(|e| e.into_inner());
    let energy = tch::no_grad(|| weight.mm(&sketch).square().sum(Kind::Float)).double_value(&[]);
    if energy <= 0.0 || !energy.is_finite() {
        return None;
    }
    Some(AnchoredLayer {
        a: l.a.shallow_clone(),
        b: l.b.shallow_clone(),
        sketch: sketch * (l.scaling / energy.sqrt()),
    })
}

/// Anchored layers whose adapter and sketch shapes agree (the same projection in every decoder
/// layer), so their terms are computed as one batched product: a few operations a step for the
/// whole group instead of a few per layer. On SmolLM2-135M with every projection adapted that is
/// 4 groups instead of 210 layers (the per-layer terms took about 0.08 s of a step there).
struct AnchorGroup {
    a: Vec<Tensor>,
    b: Vec<Tensor>,
    /// `[layers, in, k]`: the layers' scaled sketches, stacked once.
    sketch: Tensor,
}

impl AnchorGroup {
    /// `Σ ‖B·(A·sketch)‖²` over the group's layers, with its graph back to the adapters.
    fn drift_sum(&self) -> Tensor {
        let a = Tensor::stack(&self.a, 0);
        let b = Tensor::stack(&self.b, 0);
        b.bmm(&a.bmm(&self.sketch)).square().sum(Kind::Float)
    }
}

/// `layers` grouped by their `(A, B, sketch)` shapes, in order of first appearance.
fn grouped(layers: Vec<AnchoredLayer>) -> Vec<AnchorGroup> {
    type Shapes = (Vec<i64>, Vec<i64>, Vec<i64>);
    let mut groups: Vec<(Shapes, Vec<AnchoredLayer>)> = Vec::new();
    for l in layers {
        let shapes = (l.a.size(), l.b.size(), l.sketch.size());
        match groups.iter_mut().find(|(s, _)| *s == shapes) {
            Some((_, members)) => members.push(l),
            None => groups.push((shapes, vec![l])),
        }
    }
    groups
        .into_iter()
        .map(|(_, members)| {
            let sketches: Vec<&Tensor> = members.iter().map(|l| &l.sketch).collect();
            AnchorGroup {
                sketch: Tensor::stack(&sketches, 0),
                a: members.iter().map(|l| l.a.shallow_clone()).collect(),
                b: members.iter().map(|l| l.b.shallow_clone()).collect(),
            }
        })
        .collect()
}

/// The layer-anchor guard of a LoRA run.
pub struct LayerAnchor {
    groups: Vec<AnchorGroup>,
    pub weight: f64,
}

impl std::fmt::Debug for LayerAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerAnchor")
            .field("layers", &self.len())
            .field("groups", &self.groups.len())
            .field("weight", &self.weight)
            .finish()
    }
}

impl LayerAnchor {
    /// Sketches what `samples` feed each adapted layer of the base (adapters off, no gradients).
    /// Call after the adapters are attached and libtorch's generator is seeded: the sketch is
    /// drawn from it, so a resumed run gathers the same one.
    pub fn gather(model: &mut CausalLm, samples: &[Sample], weight: f64) -> Self {
        Self::gather_scoring(model, samples, weight, false).0
    }

    /// [`LayerAnchor::gather`], also returning (with `score`) the base's log-probabilities at
    /// each conversation's targets from the same forwards, for self-distillation on the same
    /// conversations ([`SelfDistillation::with_teacher`]).
    pub fn gather_scoring(
        model: &mut CausalLm,
        samples: &[Sample],
        weight: f64,
        score: bool,
    ) -> (Self, Vec<Tensor>) {
        for (_, lin) in model.linears_mut() {
            start_sketch(lin);
        }
        let teacher = base_pass(model, samples, score);
        let layers = model
            .linears_mut()
            .into_iter()
            .filter_map(|(_, lin)| finish_sketch(lin))
            .collect();
        (Self::from_layers(layers, weight), teacher)
    }

    fn from_layers(layers: Vec<AnchoredLayer>, weight: f64) -> Self {
        Self {
            groups: grouped(layers),
            weight,
        }
    }

    /// Anchored layers in all groups: the drift is their mean.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.a.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The mean relative output change `‖ΔW·F‖² / ‖W·F‖²` over the anchored layers, with its
    /// graph back to the adapters.
    pub fn drift(&self) -> Tensor {
        let mut sums = self.groups.iter().map(AnchorGroup::drift_sum);
        let Some(first) = sums.next() else {
            return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        };
        sums.fold(first, |total, s| total + s) / self.len() as f64
    }

    /// Adds `weight · drift` to the adapters' gradients; returns the drift.
    pub fn accumulate(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        let drift = self.drift();
        (&drift * self.weight).backward();
        drift.double_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::linear::Lora;

    /// A 4 → 3 layer with a rank-4 adapter (scaling 2) whose sketch has seen inputs that use only
    /// the first two input directions.
    fn sketched_layer(w: &Tensor, a: Tensor, b: Tensor) -> Option<AnchoredLayer> {
        let mut lin = Linear::new(w.copy(), None);
        lin.lora = Some(Lora {
            a,
            b,
            scaling: 2.0,
            dropout: 0.0,
            enabled: false,
            training: false,
            input_sketch: None,
        });
        start_sketch(&mut lin);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let x = Tensor::cat(&[Tensor::randn([5, 2], cpu), Tensor::zeros([5, 2], cpu)], 1);
        let _ = lin.forward(&x.unsqueeze(0));
        finish_sketch(&mut lin)
    }

    fn drift_of(layer: AnchoredLayer) -> f64 {
        LayerAnchor::from_layers(vec![layer], 1.0)
            .drift()
            .double_value(&[])
    }

    #[test]
    fn grouped_layers_drift_as_they_would_one_by_one() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        tch::manual_seed(11);
        // Two shapes, interleaved as the projections of successive decoder layers are.
        let layer = |out: i64| {
            let w = Tensor::randn([out, 4], cpu);
            let (a, b) = (Tensor::randn([2, 4], cpu), Tensor::randn([out, 2], cpu));
            sketched_layer(&w, a, b).expect("an adapter")
        };
        let layers: Vec<AnchoredLayer> = [3, 5, 3, 5, 3].into_iter().map(layer).collect();
        let one_by_one: f64 = layers
            .iter()
            .map(|l| {
                let copy = AnchoredLayer {
                    a: l.a.shallow_clone(),
                    b: l.b.shallow_clone(),
                    sketch: l.sketch.shallow_clone(),
                };
                drift_of(copy)
            })
            .sum::<f64>()
            / 5.0;
        let anchor = LayerAnchor::from_layers(layers, 1.0);
        assert_eq!((anchor.len(), anchor.groups.len()), (5, 2));
        let grouped = anchor.drift().double_value(&[]);
        assert!(
            (grouped - one_by_one).abs() <= 1e-6 * one_by_one,
            "{grouped} vs {one_by_one}"
        );
    }

    #[test]
    fn the_anchor_measures_the_output_change_on_the_inputs_general_text_gave() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        tch::manual_seed(7);
        let w = Tensor::randn([3, 4], cpu);
        // ΔW = 2·B·A = 0.5·W: on every input the output moves by half, so the drift is 0.25
        // whatever the random sketch drew.
        let layer = sketched_layer(&w, Tensor::eye(4, cpu), &w * 0.25).expect("an adapter");
        assert!((drift_of(layer) - 0.25).abs() < 1e-5);
        // An update that only reads the input directions general text never used moves nothing
        // the anchor saw.
        let a = Tensor::cat(&[Tensor::zeros([4, 2], cpu), Tensor::ones([4, 2], cpu)], 1);
        let layer = sketched_layer(&w, a, Tensor::ones([3, 4], cpu)).expect("an adapter");
        assert!(drift_of(layer).abs() < 1e-9);
        // A fresh adapter (B = 0) has not moved at all.
        let layer = sketched_layer(&w, Tensor::ones([4, 4], cpu), Tensor::zeros([3, 4], cpu));
        assert_eq!(drift_of(layer.expect("an adapter")), 0.0);
    }

    #[test]
    fn a_layer_without_an_adapter_is_not_anchored() {
        let mut lin = Linear::new(Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu)), None);
        start_sketch(&mut lin);
        let _ = lin.forward(&Tensor::ones([1, 2, 4], (Kind::Float, tch::Device::Cpu)));
        assert!(finish_sketch(&mut lin).is_none());
    }

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
