//! The frozen base weight of a QLoRA layer, in whichever storage `adapter.lora.baseQuantization`
//! chose: NF4 (bitsandbytes' 4-bit), row-wise int8 (bitsandbytes' LLM.int8 storage) or the GGUF
//! file's own Q8_0/Q4_0/Q4_1 blocks. Each is dequantized on every forward into the compute dtype.

use finetune_crds::training::BaseQuantization;
use tch::{Kind, Tensor};

use super::ggml::GgmlBlocks;
use super::int8::Int8Rows;
use super::nf4::Nf4;

#[derive(Debug)]
pub enum QuantizedWeight {
    Nf4(Nf4),
    Int8(Int8Rows),
    Ggml(GgmlBlocks),
}

impl QuantizedWeight {
    /// Quantizes a float weight as `how` asks; `None` for `Gguf`, whose blocks only a GGUF file
    /// provides (the loader keeps them).
    pub fn quantize(how: BaseQuantization, weight: &Tensor) -> Option<Self> {
        match how {
            BaseQuantization::Nf4 => Some(QuantizedWeight::Nf4(Nf4::quantize(weight))),
            BaseQuantization::Int8 => Some(QuantizedWeight::Int8(Int8Rows::quantize(weight))),
            BaseQuantization::Gguf => None,
        }
    }

    pub fn dequantize(&self, kind: Kind) -> Tensor {
        match self {
            QuantizedWeight::Nf4(q) => q.dequantize(kind),
            QuantizedWeight::Int8(q) => q.dequantize(kind),
            QuantizedWeight::Ggml(q) => q.dequantize(kind),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> Vec<i64> {
        match self {
            QuantizedWeight::Nf4(q) => q.shape.clone(),
            QuantizedWeight::Int8(q) => q.shape(),
            QuantizedWeight::Ggml(q) => q.shape.clone(),
        }
    }

    pub fn bytes(&self) -> i64 {
        match self {
            QuantizedWeight::Nf4(q) => q.bytes(),
            QuantizedWeight::Int8(q) => q.bytes(),
            QuantizedWeight::Ggml(q) => q.bytes(),
        }
    }

    /// A short name for logs: `Nf4`, `Int8`, `Q4_1`…
    pub fn label(&self) -> String {
        match self {
            QuantizedWeight::Nf4(_) => "Nf4".into(),
            QuantizedWeight::Int8(_) => "Int8".into(),
            QuantizedWeight::Ggml(q) => format!("{:?}", q.ty),
        }
    }
}
