//! Activation checkpointing (`hyperparameters.gradientCheckpointing`), per decoder layer.
//!
//! A plain backward needs every tensor each layer's autograd graph saved in the forward pass:
//! norms, projections, attention, SwiGLU, dozens of `[batch, seq, ·]` tensors per layer. Here the
//! forward pass runs without a graph and keeps only each layer's input. Backward then walks the
//! layers from the top: it recomputes one layer with a graph from its saved input and feeds the
//! gradient arriving from above into it, so at most one layer's graph is alive at a time.
//!
//! tch has no `autograd.Function`, so the upstream gradient `g` enters through a surrogate scalar:
//! `sum(y · g)` with `g` constant has `∂/∂y = g` exactly (the backward of `sum` is ones and of the
//! product is `1 · g`), so backward of the surrogate is backward of `y` with gradient `g`, in plain
//! Rust against the autograd tch already binds — no C++ extension to build against the wheel's
//! headers. The gradient for the layer below is the recomputed input's `.grad`.
//!
//! Dropout draws the same masks in the recompute as in the first pass because every layer
//! re-seeds the generator from the pass's layer seeds before it runs (also in the plain forward),
//! so the gradients equal the plain run's and the step-seeded resume stays exact.

use tch::Tensor;

use crate::model::CausalLm;
use crate::model::llama::{seed_layer, training_mask};

impl CausalLm {
    /// Forward and backward of `head(hidden)` with activation checkpointing, where `hidden` is
    /// the last decoder layer's output for training inputs as [`CausalLm::hidden_with`] takes
    /// them, and `head` returns the scalar to differentiate (its gradients accumulate into the
    /// parameters).
    pub fn backward_checkpointed(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        head: impl FnOnce(&Tensor) -> Tensor,
    ) {
        let mask = attention_mask.map(training_mask);
        let (cos, sin) = self.rope.cos_sin(position_ids, self.kind);
        let seeds = self.layer_seeds();
        let (inputs, top) = tch::no_grad(|| {
            let mut x = self.embed(input_ids);
            let mut inputs = Vec::with_capacity(self.layers.len());
            for (i, layer) in self.layers.iter().enumerate() {
                seed_layer(seeds, i);
                let y = layer.forward(&x, (&cos, &sin), mask.as_ref(), None);
                inputs.push(x);
                x = y;
            }
            (inputs, x)
        });
        let top = top.set_requires_grad(true);
        let value = head(&top);
        if !value.requires_grad() {
            return;
        }
        value.backward();
        let mut grad = top.grad();
        drop(top);
        for (i, (layer, x)) in self.layers.iter().zip(inputs).enumerate().rev() {
            let x = x.set_requires_grad(true);
            seed_layer(seeds, i);
            let y = layer.forward(&x, (&cos, &sin), mask.as_ref(), None);
            (y * &grad).sum(grad.kind()).backward();
            grad = x.grad();
        }
        let embedding = self.embedding_weight();
        if embedding.requires_grad() {
            let e = Tensor::embedding(&embedding, input_ids, -1, false, false);
            (e * &grad).sum(grad.kind()).backward();
        }
    }
}
