//! Int8 weights as bitsandbytes' `Linear8bitLt` (LLM.int8) stores a frozen base: each row scaled
//! by its absolute maximum to [-127, 127] and rounded (`int8_vectorwise_quant` with no outlier
//! threshold), one float32 absmax per row.
//!
//! The ops, their order and dtypes are those of bitsandbytes 0.50.2's default backend, on the
//! weight first cast to float16 as `Int8Params` does, so codes and row statistics are
//! bit-identical to it (tests/reference/test_nf4.py). The forward dequantizes the weight into the
//! compute dtype; bitsandbytes instead multiplies int8 activations, a different rounding.

use tch::{Kind, Tensor};

/// bitsandbytes' `1/127` as it writes it in `int8_vectorwise_dequant`.
const INV_127: f64 = 7.874015718698502e-3;

/// A 2-D tensor held as row-wise int8.
#[derive(Debug)]
pub struct Int8Rows {
    /// `[rows, cols]` int8 codes.
    pub codes: Tensor,
    /// `[rows]` float32 absmax of each row (bnb's `SCB`).
    pub row_absmax: Tensor,
}

impl Int8Rows {
    /// Quantizes a float `[rows, cols]` tensor. A row of zeros keeps codes of zero (bitsandbytes
    /// would divide by zero there).
    pub fn quantize(w: &Tensor) -> Int8Rows {
        let a = w.to_kind(Kind::Half);
        let row_absmax = a.abs().amax([1], false).to_kind(Kind::Float);
        // `127.0 / row_stats` in Python is `reciprocal() * 127`; written the same way here
        // because true division rounds differently for some rows.
        let scale = (row_absmax.reciprocal() * 127.0).unsqueeze(-1);
        let scaled = (a * scale).round().nan_to_num(0.0, None, None);
        Int8Rows {
            codes: scaled.to_kind(Kind::Int8),
            row_absmax,
        }
    }

    /// The tensor in `kind`: code × absmax / 127 in float32, then cast.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        (self.codes.to_kind(Kind::Float) * self.row_absmax.view([-1, 1]) * INV_127).to_kind(kind)
    }

    pub fn shape(&self) -> Vec<i64> {
        self.codes.size()
    }

    /// Bytes held: one per weight and four per row.
    pub fn bytes(&self) -> i64 {
        self.codes.numel() as i64 + 4 * self.row_absmax.numel() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rows_round_trip_within_half_a_step_of_their_absmax() {
        tch::manual_seed(0);
        let w = Tensor::randn([40, 96], (Kind::Float, Device::Cpu)) * 0.05;
        let _ = w.get(3).zero_();
        let q = Int8Rows::quantize(&w);
        assert_eq!(q.codes.kind(), Kind::Int8);
        assert_eq!(q.bytes(), 40 * 96 + 4 * 40);
        let back = q.dequantize(Kind::Float);
        let step = q.row_absmax.view([-1, 1]) / 127.0;
        // float16 rounding of the input adds up to 2^-11 of the value on top of half a step.
        let err = (&back - &w).abs() - &step * 0.5 - w.abs() * 1e-3;
        assert!(err.max().double_value(&[]) <= 1e-7);
        // Each row's largest value is exactly ±127.
        let top = q.codes.to_kind(Kind::Float).abs().amax([1], false);
        assert_eq!(top.double_value(&[0]), 127.0);
        assert_eq!(top.double_value(&[3]), 0.0, "a zero row stays zero");
        assert_eq!(back.get(3).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
