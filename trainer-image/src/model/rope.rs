//! Rotary position embeddings with the `rope_scaling` variants Llama-family checkpoints use. The
//! inverse frequencies are computed with the same float32 tensor operations, in the same order, as
//! transformers' `modeling_rope_utils.py`, so logits agree to float32 rounding, not merely "closely".

use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// How the inverse frequencies are derived from `rope_theta` (`rope_type` in the config).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (applied to the frequencies instead, which is equivalent).
    Linear {
        factor: f64,
    },
    /// NTK-aware: the base grows with the sequence once it exceeds `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        /// Multiplies cos and sin; derived from `factor`/`mscale` when the config has none.
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: f64,
        truncate: bool,
    },
}

fn num(r: &Value, key: &str) -> Option<f64> {
    r.get(key).and_then(Value::as_f64)
}

impl RopeScaling {
    /// Reads `rope_parameters` (or legacy `rope_scaling`) `r`; `config` is the whole config, which
    /// may carry `original_max_position_embeddings` at top level (it then wins, as in transformers).
    pub fn from_json(r: &Value, config: &Value, max_pos: i64) -> Result<Self, String> {
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = || num(r, "factor").ok_or_else(|| format!("`{kind}` needs `factor`"));
        let original = || {
            num(config, "original_max_position_embeddings")
                .or_else(|| num(r, "original_max_position_embeddings"))
                .unwrap_or(max_pos as f64)
        };
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: num(r, "low_freq_factor").ok_or("llama3 needs low_freq_factor")?,
                high_freq_factor: num(r, "high_freq_factor")
                    .ok_or("llama3 needs high_freq_factor")?,
                original_max_position_embeddings: original(),
            },
            "yarn" => {
                let original = original();
                let factor = num(r, "factor").unwrap_or(max_pos as f64 / original);
                let get_mscale = |scale: f64, mscale: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * mscale * scale.ln() + 1.0
                    }
                };
                let mscale = num(r, "mscale").filter(|m| *m != 0.0);
                let mscale_all_dim = num(r, "mscale_all_dim").filter(|m| *m != 0.0);
                let attention_factor = match (num(r, "attention_factor"), mscale, mscale_all_dim) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) => get_mscale(factor, m) / get_mscale(factor, ma),
                    _ => get_mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    attention_factor,
                    // `or 32` / `or 1` in transformers: a zero also falls back to the default.
                    beta_fast: num(r, "beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: num(r, "beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                    original_max_position_embeddings: original,
                    truncate: r.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            other => return Err(format!("unsupported rope_type `{other}`")),
        })
    }
}

/// The rotary embedding of one model: inverse frequencies plus the cos/sin scale.
#[derive(Debug)]
pub struct Rope {
    scaling: RopeScaling,
    base: f64,
    dim: i64,
    max_position_embeddings: i64,
    /// float32, on the model's device.
    inv_freq: Tensor,
    attention_scaling: f64,
}

/// `1 / base^(arange(0, dim, 2) / dim)` in float32, like every `_compute_*` function.
fn default_inv_freq(base: &Tensor, dim: i64) -> Tensor {
    let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    base.pow(&exps).reciprocal()
}

fn scalar(v: f64) -> Tensor {
    Tensor::from(v as f32)
}

impl Rope {
    pub fn new(
        scaling: RopeScaling,
        base: f64,
        dim: i64,
        max_position_embeddings: i64,
        device: Device,
    ) -> Self {
        let (inv_freq, attention_scaling) =
            Self::compute(&scaling, base, dim, None, max_position_embeddings);
        Rope {
            scaling,
            base,
            dim,
            max_position_embeddings,
            inv_freq: inv_freq.to_device(device),
            attention_scaling,
        }
    }

    /// Inverse frequencies and attention scaling; `seq_len` only matters for dynamic NTK.
    fn compute(
        scaling: &RopeScaling,
        base: f64,
        dim: i64,
        seq_len: Option<i64>,
        max_pos: i64,
    ) -> (Tensor, f64) {
        match *scaling {
            RopeScaling::Default => (default_inv_freq(&scalar(base), dim), 1.0),
            RopeScaling::Linear { factor } => (default_inv_freq(&scalar(base), dim) / factor, 1.0),
            RopeScaling::Dynamic { factor } => match seq_len {
                Some(seq_len) if seq_len > max_pos => {
                    // transformers evaluates this on tensors (seq_len comes from position_ids), so in float32.
                    let seq = Tensor::from(seq_len);
                    let grown = (seq * factor / max_pos as f64) - (factor - 1.0);
                    let base = grown.pow_tensor_scalar(dim as f64 / (dim as f64 - 2.0)) * base;
                    (default_inv_freq(&base, dim), 1.0)
                }
                _ => (default_inv_freq(&scalar(base), dim), 1.0),
            },
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let inv_freq = default_inv_freq(&scalar(base), dim);
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let inv_llama =
                    inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
                let smooth = ((wavelen.reciprocal() * old_ctx) - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * &inv_llama / factor + &smooth * &inv_llama;
                let medium = wavelen
                    .ge(high_freq_wavelen)
                    .logical_and(&wavelen.le(low_freq_wavelen));
                (smoothed.where_self(&medium, &inv_llama), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings: orig,
                truncate,
            } => {
                let d = dim as f64;
                let correction_dim = |rot: f64| {
                    (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
                    .to_kind(Kind::Float)
                    / d;
                let pos_freqs = scalar(base).pow(&exps);
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (&pos_freqs * factor).reciprocal();
                let ramp = ((Tensor::arange(dim / 2, (Kind::Float, Device::Cpu)) - low)
                    / (high - low))
                    .clamp(0.0, 1.0);
                let extra_factor = ramp.ones_like() - ramp;
                let inv = interpolation * (extra_factor.ones_like() - &extra_factor)
                    + extrapolation * &extra_factor;
                (inv, attention_factor)
            }
        }
    }

    /// `(cos, sin)` of shape `[batch, seq, head_dim]` in `kind`, for integer `positions` `[batch, seq]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let dynamic_inv;
        let inv_freq = match self.scaling {
            RopeScaling::Dynamic { .. } => {
                // Recomputed per call from the longest position seen in this call. transformers keeps the
                // largest length ever seen as state; both agree for a single forward and for generation,
                // where positions only grow.
                let seq_len = positions.max().int64_value(&[]) + 1;
                let (inv, _) = Self::compute(
                    &self.scaling,
                    self.base,
                    self.dim,
                    Some(seq_len),
                    self.max_position_embeddings,
                );
                dynamic_inv = inv.to_device(positions.device());
                &dynamic_inv
            }
            _ => &self.inv_freq,
        };
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos() * self.attention_scaling;
        let sin = emb.sin() * self.attention_scaling;
        (cos.to_kind(kind), sin.to_kind(kind))
    }
}

/// `cat(-x2, x1)` over the last dimension: the rotation partner of each element.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// Applies the rotation to `x` `[batch, heads, seq, head_dim]` with `cos`/`sin` `[batch, seq, head_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let cos = cos.unsqueeze(1);
    let sin = sin.unsqueeze(1);
    x * cos + rotate_half(x) * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_attention_factor_follows_mscale() {
        let r = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let s = RopeScaling::from_json(&r, &serde_json::json!({}), 64).unwrap();
        match s {
            RopeScaling::Yarn {
                attention_factor, ..
            } => {
                assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12)
            }
            _ => panic!("not yarn"),
        }
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let r = serde_json::json!({"rope_type": "mystery", "factor": 4.0});
        assert!(RopeScaling::from_json(&r, &serde_json::json!({}), 64).is_err());
    }
}
