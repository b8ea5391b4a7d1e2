//! The one dense layer every projection uses, with an optional LoRA adapter: the adapter adds
//! `B·A·dropout(x)·scaling` to the frozen layer's output without the attention or MLP code changing.

use tch::{Kind, Tensor};

/// A low-rank update `ΔW = B·A·scaling` on one [`Linear`], laid out as PEFT's `lora_A`/`lora_B`.
#[derive(Debug)]
pub struct Lora {
    /// `lora_A.weight`, `[rank, in]`, float32, trainable.
    pub a: Tensor,
    /// `lora_B.weight`, `[out, rank]`, float32, trainable.
    pub b: Tensor,
    /// `alpha / rank` (`alpha / √rank` with rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter's input (only while training).
    pub dropout: f64,
    /// When false the layer is the base layer (DPO reference, self-distillation teacher).
    pub enabled: bool,
    /// Dropout active.
    pub training: bool,
}

impl Lora {
    /// The adapter's contribution for `x` `[..., in]`, computed in `x`'s dtype in the same order as
    /// PEFT: `lora_B(lora_A(dropout(x))) * scaling`.
    pub fn delta(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = if self.training && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let (a, b) = if kind == Kind::Float {
            (self.a.shallow_clone(), self.b.shallow_clone())
        } else {
            (self.a.to_kind(kind), self.b.to_kind(kind))
        };
        h.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * self.scaling
    }
}

/// `y = x·Wᵀ + b (+ LoRA)`, with `weight` `[out, in]` exactly as Hugging Face stores it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(l) if l.enabled => y + l.delta(x),
            _ => y,
        }
    }

    /// `(name suffix, tensor)` pairs, e.g. `("weight", W)`, for saving under Hugging Face names.
    pub fn named_parameters(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            out.push(("bias", b));
        }
        out
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[0], s[1])
    }
}
