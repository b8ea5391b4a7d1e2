//! AdamW written out in tensor operations (tch exposes no optimizer state to save), step for step
//! the single-tensor path of `torch.optim.AdamW`:
//!
//! ```text
//! p ← p·(1 − lr·wd)
//! m ← lerp(m, g, 1 − β1);  v ← v·β2 + (1 − β2)·g²
//! p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! State (`m`, `v` in float32 and the step count) saves to and loads from safetensors, so a resumed
//! run continues bit for bit. Parameters kept in a lower precision are updated through a float32 copy.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

/// One trainable tensor and its moments.
#[derive(Debug)]
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub weight_decay: f64,
    pub m: Tensor,
    pub v: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimizer steps taken.
    pub step: i64,
    pub params: Vec<ParamState>,
}

impl AdamW {
    /// `params`: `(name, tensor, weight decay)`; tensors must require grad.
    pub fn new(params: Vec<(String, Tensor, f64)>) -> Self {
        let params = params
            .into_iter()
            .map(|(name, param, weight_decay)| {
                let m = Tensor::zeros(param.size(), (Kind::Float, param.device()));
                let v = m.zeros_like();
                ParamState {
                    name,
                    param,
                    weight_decay,
                    m,
                    v,
                }
            })
            .collect();
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            params,
        }
    }

    /// Clears gradients (keeps the buffers, zeroed).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
        }
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.param.numel() as i64).sum()
    }

    /// Global L2 norm of all gradients, then scales them by `min(1, max_norm / (norm + 1e-6))`
    /// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping (NaN/inf propagate).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.param.grad())
                .filter(Tensor::defined)
                .map(|g| g.to_kind(Kind::Float).norm())
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            let total = Tensor::stack(&norms, 0).norm();
            let coef = (total.full_like(max_norm) / (&total + 1e-6)).clamp_max(1.0);
            for p in &self.params {
                let mut g = p.param.grad();
                if g.defined() {
                    let _ = g.g_mul_(&coef.to_kind(g.kind()));
                }
            }
            total.double_value(&[])
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let fp32 = p.param.kind() == Kind::Float;
                let mut w = if fp32 {
                    p.param.shallow_clone()
                } else {
                    p.param.to_kind(Kind::Float)
                };
                let g = g.to_kind(Kind::Float);
                if p.weight_decay != 0.0 {
                    let _ = w.g_mul_scalar_(1.0 - lr * p.weight_decay);
                }
                let _ = p.m.lerp_(&g, 1.0 - self.beta1);
                let _ = p.v.g_mul_scalar_(self.beta2);
                let _ = p.v.addcmul_(&(&g * (1.0 - self.beta2)), &g);
                let mut denom = p.v.sqrt() / bias_correction2_sqrt;
                let _ = denom.g_add_scalar_(self.eps);
                let _ = w.addcdiv_(&(&p.m * -step_size), &denom);
                if !fp32 {
                    p.param.copy_(&w);
                }
            }
        });
    }

    /// `m.NAME` and `v.NAME` for every parameter.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((format!("m.{}", p.name), p.m.shallow_clone()));
            out.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) and the step count.
    pub fn load_state(
        &mut self,
        mut tensors: BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        for p in &mut self.params {
            for (key, dst) in [("m", &mut p.m), ("v", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let src = tensors
                    .remove(&name)
                    .ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                if src.size() != dst.size() {
                    return Err(format!("optimizer state `{name}` has the wrong shape"));
                }
                tch::no_grad(|| dst.copy_(&src));
            }
        }
        self.step = step;
        Ok(())
    }
}
