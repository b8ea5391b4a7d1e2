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
    /// The rank that keeps this parameter's moments and updates it (0 unless sharded).
    pub owner: usize,
}

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimizer steps taken.
    pub step: i64,
    pub params: Vec<ParamState>,
    /// `Some(rank)` when the state is sharded over a group (ZeRO stage 1): this rank keeps the
    /// moments of, and updates, only the parameters it owns.
    pub shard_rank: Option<usize>,
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
                    owner: 0,
                }
            })
            .collect();
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            params,
            shard_rank: None,
        }
    }

    /// Shards the state over `world` ranks as this one, `rank`: each parameter goes to the rank
    /// with the fewest scalars so far (in order, so every rank computes the same owners), and the
    /// moments of the others are freed. Returns the scalars of state this rank keeps.
    pub fn shard(&mut self, rank: usize, world: usize) -> i64 {
        let mut load = vec![0i64; world.max(1)];
        for p in &mut self.params {
            let least = (0..load.len()).min_by_key(|&r| load[r]).unwrap_or(0);
            p.owner = least;
            load[least] += p.param.numel() as i64;
            if least != rank {
                p.m = Tensor::zeros([0], (Kind::Float, p.param.device()));
                p.v = p.m.shallow_clone();
            }
        }
        self.shard_rank = Some(rank);
        load.get(rank).copied().unwrap_or(0) * 2
    }

    /// Whether this rank keeps `p`'s moments and updates it.
    pub fn owns(&self, p: &ParamState) -> bool {
        self.shard_rank.is_none_or(|r| p.owner == r)
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

    /// One update with learning rate `lr`; parameters without a gradient, and under sharding those
    /// of other ranks, are skipped.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        let shard_rank = self.shard_rank;
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() || shard_rank.is_some_and(|r| p.owner != r) {
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

    /// `m.NAME` and `v.NAME` for every parameter this rank keeps (all of them unless sharded).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in self.params.iter().filter(|p| self.owns(p)) {
            out.push((format!("m.{}", p.name), p.m.shallow_clone()));
            out.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) (of every parameter)
    /// and the step count; under sharding only this rank's are kept.
    pub fn load_state(
        &mut self,
        mut tensors: BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        let shard_rank = self.shard_rank;
        for p in &mut self.params {
            let mine = shard_rank.is_none_or(|r| p.owner == r);
            for (key, dst) in [("m", &mut p.m), ("v", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let src = tensors
                    .remove(&name)
                    .ok_or_else(|| format!("optimizer state lacks `{name}`"))?;
                if !mine {
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn opt(sizes: &[i64]) -> AdamW {
        AdamW::new(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let t = Tensor::ones([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                    (format!("p{i}"), t, 0.0)
                })
                .collect(),
        )
    }

    #[test]
    fn sharding_balances_owners_and_frees_the_others_moments() {
        let sizes = [100, 60, 50, 10, 40];
        let owners: Vec<Vec<usize>> = (0..2)
            .map(|rank| {
                let mut o = opt(&sizes);
                let kept = o.shard(rank, 2);
                let mine: i64 = o
                    .params
                    .iter()
                    .filter(|p| o.owns(p))
                    .map(|p| p.m.numel() as i64)
                    .sum();
                assert_eq!(kept, mine * 2, "rank {rank}");
                for p in o.params.iter().filter(|p| !o.owns(p)) {
                    assert_eq!(p.m.numel(), 0);
                }
                assert!(o.state_tensors().iter().all(|(n, _)| {
                    let name = &n[2..];
                    o.params.iter().any(|p| p.name == name && p.owner == rank)
                }));
                o.params.iter().map(|p| p.owner).collect()
            })
            .collect();
        // Every rank computes the same owners; the loads are 150 and 110 scalars.
        assert_eq!(owners[0], owners[1]);
        assert_eq!(owners[0], vec![0, 1, 1, 0, 0]);
    }

    #[test]
    fn a_sharded_step_updates_only_what_this_rank_owns() {
        let mut o = opt(&[4, 4]);
        o.shard(1, 2);
        for p in &o.params {
            (&p.param * 2.0).sum(Kind::Float).backward();
        }
        o.step(0.1);
        let moved: Vec<bool> = o
            .params
            .iter()
            .map(|p| p.param.ne(1.0).any().int64_value(&[]) != 0)
            .collect();
        assert_eq!(moved, vec![false, true]);
    }
}
