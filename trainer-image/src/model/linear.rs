//! The one dense layer every projection uses. It is a struct of its own (rather than a bare
//! `matmul`) so a later LoRA adapter can wrap it: the adapter adds `B·A·x` to `forward`'s output
//! without the attention or MLP code changing.

use tch::Tensor;

/// `y = x·Wᵀ + b`, with `weight` `[out, in]` exactly as Hugging Face stores it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// `(name suffix, tensor)` pairs, e.g. `("weight", W)`, for saving under Hugging Face names.
    pub fn named_parameters(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            out.push(("bias", b));
        }
        out
    }
}
