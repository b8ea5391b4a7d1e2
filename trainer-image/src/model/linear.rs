//! The one dense layer every projection uses, with an optional LoRA adapter: the adapter adds
//! `B·A·dropout(x)·scaling` to the frozen layer's output without the attention or MLP code changing.

use tch::{Device, Kind, Tensor};

use finetune_crds::training::BaseQuantization;

use super::quantized::QuantizedWeight;

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
    /// While set, every forward adds a random sketch of its input to it (`xᵀ·S`, `S` Gaussian
    /// `[tokens, k]`): [`crate::train::anchor::LayerAnchor`] gathers what general text feeds this
    /// layer. `None` outside that one pass.
    pub input_sketch: Option<std::sync::Mutex<Tensor>>,
}

impl Lora {
    /// Adds `xᵀ·S` to [`Lora::input_sketch`] when it is set: `x` `[..., in]` flattened to token
    /// rows, `S` drawn from libtorch's generator.
    fn record_input(&self, x: &Tensor) {
        let Some(sketch) = &self.input_sketch else {
            return;
        };
        let mut sketch = sketch.lock().unwrap_or_else(|e| e.into_inner());
        let (inp, k) = sketch.size2().expect("input sketch is [in, k]");
        let rows = x.reshape([-1, inp]).to_kind(Kind::Float);
        let s = Tensor::randn([rows.size()[0], k], (Kind::Float, x.device()));
        *sketch += rows.transpose(0, 1).mm(&s);
    }

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
///
/// QLoRA ([`Linear::quantize_base`], or a GGUF base loaded with its blocks kept): the frozen
/// weight is held quantized (NF4 about 0.52 byte per parameter, int8 about 1, a GGUF Q4_1 0.625)
/// and dequantized on every forward in the input's dtype, so only one layer's full-precision
/// weight exists at a time; `weight` is then empty and the adapter stays float32.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    pub quantized: Option<QuantizedWeight>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
            quantized: None,
        }
    }

    /// A layer whose frozen weight is already quantized (a GGUF base's blocks).
    pub fn from_quantized(
        weight: QuantizedWeight,
        bias: Option<Tensor>,
        kind: Kind,
        device: Device,
    ) -> Self {
        Linear {
            weight: Tensor::empty([0], (kind, device)),
            bias,
            lora: None,
            quantized: Some(weight),
        }
    }

    /// Replaces the frozen weight by its quantization and frees the full-precision copy (the
    /// loaders do this as they read a QLoRA base: [`crate::load::store`]). A layer already
    /// quantized is left as it is; `Gguf` quantizes nothing ([`QuantizedWeight::quantize`]).
    pub fn quantize_base(&mut self, how: BaseQuantization) {
        if self.quantized.is_some() {
            return;
        }
        if let Some(q) = QuantizedWeight::quantize(how, &self.weight) {
            self.quantized = Some(q);
            self.weight = Tensor::empty([0], (self.weight.kind(), self.weight.device()));
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = match &self.quantized {
            Some(q) => x.linear(&q.dequantize(x.kind()), self.bias.as_ref()),
            None => x.linear(&self.weight, self.bias.as_ref()),
        };
        match &self.lora {
            Some(l) => {
                l.record_input(x);
                if l.enabled { y + l.delta(x) } else { y }
            }
            None => y,
        }
    }

    /// The frozen weight `[out, in]` in float32, dequantized when it is held quantized.
    pub fn dense_weight(&self) -> Tensor {
        match &self.quantized {
            Some(q) => q.dequantize(Kind::Float),
            None => self.weight.to_kind(Kind::Float),
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
        let s = match &self.quantized {
            Some(q) => q.shape(),
            None => self.weight.size(),
        };
        (s[0], s[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nf4_linear_computes_with_its_dequantized_weight_plus_the_adapter() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([24, 128], opts) * 0.05;
        let bias = Tensor::randn([24], opts);
        let x = Tensor::randn([3, 128], opts);
        let mut layer = Linear::new(w.copy(), Some(bias.shallow_clone()));
        layer.quantize_base(BaseQuantization::Nf4);
        assert_eq!(layer.shape(), (24, 128));
        assert_eq!(layer.weight.numel(), 0, "the full-precision copy is freed");
        layer.lora = Some(Lora {
            a: Tensor::randn([4, 128], opts),
            b: Tensor::randn([24, 4], opts),
            scaling: 2.0,
            dropout: 0.1,
            enabled: true,
            training: false,
            input_sketch: None,
        });
        let w_q = layer.quantized.as_ref().unwrap().dequantize(Kind::Float);
        let l = layer.lora.as_ref().unwrap();
        let expected = x.matmul(&w_q.tr()) + &bias + x.matmul(&l.a.tr()).matmul(&l.b.tr()) * 2.0;
        let y = layer.forward(&x);
        assert!(y.allclose(&expected, 1e-5, 1e-5, false));
        // The base is the quantized weight, not the original.
        let exact = x.linear(&w, Some(&bias));
        let off = (layer.forward(&x) - l.delta(&x) - exact)
            .abs()
            .max()
            .double_value(&[]);
        assert!(off > 1e-3, "{off}");
    }
}
