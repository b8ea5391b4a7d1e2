//! LoRA on a [`CausalLm`]: attaching fresh adapters to the linear layers chosen by name, switching
//! them on and off, listing their parameters under PEFT's names, and loading a PEFT adapter.
//!
//! Initialisation follows PEFT's `init_lora_weights=True`: `lora_A` kaiming-uniform with `a=√5`
//! (for a `[rank, in]` matrix that is `U(-1/√in, 1/√in)`), `lora_B` zeros, so a fresh adapter
//! leaves the model's outputs unchanged. The base weights stay frozen (`requires_grad=false`, so
//! autograd allocates no gradient buffers for them).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::linear::{Linear, Lora};
use crate::model::{CausalLm, ModelConfig};

/// Every module name LoRA may target, in the order parameters are listed: the API's list.
pub use finetune_crds::training::LLAMA_LINEAR_MODULES as LINEAR_MODULES;

/// The adapter hyper-parameters, as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub rslora: bool,
}

/// `spec.adapter.lora` of a FinetuneJob, as the trainer applies it.
impl From<&finetune_crds::training::LoraSettings> for LoraConfig {
    fn from(l: &finetune_crds::training::LoraSettings) -> Self {
        LoraConfig {
            rank: l.rank as i64,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules.clone(),
            rslora: l.rslora,
        }
    }
}

/// What an existing adapter must agree with: a job's `spec.adapter.lora` against its
/// `initAdapter`, or an Adapter's `spec.lora` against the files it names. Dropout is not part of
/// it: it shapes training, not the weights.
#[derive(Debug, Clone, Copy)]
pub struct LoraExpectation<'a> {
    pub rank: i64,
    pub alpha: f64,
    pub rslora: bool,
    /// `None`: any modules (an Adapter's `spec.lora.targetModules` may be left empty).
    pub target_modules: Option<&'a [String]>,
}

impl<'a> From<&'a LoraConfig> for LoraExpectation<'a> {
    fn from(c: &'a LoraConfig) -> Self {
        LoraExpectation {
            rank: c.rank,
            alpha: c.alpha,
            rslora: c.rslora,
            target_modules: Some(&c.target_modules),
        }
    }
}

impl<'a> From<&'a finetune_crds::adapter::AdapterLora> for LoraExpectation<'a> {
    fn from(l: &'a finetune_crds::adapter::AdapterLora) -> Self {
        LoraExpectation {
            rank: i64::from(l.rank),
            alpha: l.alpha,
            rslora: l.rslora,
            target_modules: (!l.target_modules.is_empty()).then_some(l.target_modules.as_slice()),
        }
    }
}

/// The first setting in which an adapter differs from a [`LoraExpectation`].
#[derive(Debug, Clone, PartialEq)]
pub enum LoraMismatch {
    Rank,
    Alpha,
    Rslora,
    /// Both lists sorted: `(have, want)`.
    TargetModules(Vec<String>, Vec<String>),
}

impl LoraConfig {
    /// The one comparison behind `initAdapter` and `verify-adapter`. Alpha is compared with a
    /// relative tolerance of 1e-9 (at least 1e-9 absolute): alpha travels through JSON and YAML
    /// as a decimal, so only a rounding-sized difference is forgiven. Target modules compare as
    /// sets (PEFT writes them in no fixed order).
    pub fn mismatch(&self, want: &LoraExpectation) -> Option<LoraMismatch> {
        if self.rank != want.rank {
            return Some(LoraMismatch::Rank);
        }
        if (self.alpha - want.alpha).abs() > 1e-9 * want.alpha.abs().max(1.0) {
            return Some(LoraMismatch::Alpha);
        }
        if self.rslora != want.rslora {
            return Some(LoraMismatch::Rslora);
        }
        if let Some(wanted) = want.target_modules {
            let mut have = self.target_modules.clone();
            let mut want = wanted.to_vec();
            have.sort();
            want.sort();
            if have != want {
                return Some(LoraMismatch::TargetModules(have, want));
            }
        }
        None
    }

    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// `(out, in)` of every decoder linear as `c` describes it, under the names of
/// [`CausalLm::linears`]: what an adapter must fit, known from the config alone (checking an
/// adapter against a 70B base must not load 70B weights).
pub fn linear_shapes(c: &ModelConfig) -> HashMap<String, (i64, i64)> {
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let mut shapes = HashMap::new();
    for i in 0..c.num_layers {
        for (n, shape) in [
            ("q_proj", (q, hidden)),
            ("k_proj", (kv, hidden)),
            ("v_proj", (kv, hidden)),
            ("o_proj", (hidden, q)),
        ] {
            shapes.insert(format!("model.layers.{i}.self_attn.{n}"), shape);
        }
        for (n, shape) in [
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ] {
            shapes.insert(format!("model.layers.{i}.mlp.{n}"), shape);
        }
    }
    shapes
}

impl CausalLm {
    /// `(PEFT-style module path, layer)` for every decoder linear, e.g.
    /// `model.layers.3.self_attn.q_proj`, in a fixed order.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            for (n, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                out.push((format!("model.layers.{i}.self_attn.{n}"), lin));
            }
            for (n, lin) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.mlp.{n}"), lin));
            }
        }
        out
    }

    /// Mutable version of [`linears`](Self::linears), same order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            for (n, lin) in [
                ("q_proj", &mut a.q_proj),
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("o_proj", &mut a.o_proj),
            ] {
                out.push((format!("model.layers.{i}.self_attn.{n}"), lin));
            }
            let m = &mut l.mlp;
            for (n, lin) in [
                ("gate_proj", &mut m.gate_proj),
                ("up_proj", &mut m.up_proj),
                ("down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.mlp.{n}"), lin));
            }
        }
        out
    }

    /// Attaches fresh adapters (PEFT initialisation, drawn from libtorch's generator: call
    /// `tch::manual_seed` first for a reproducible init). Returns how many layers got one; an
    /// unknown target name is an error.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<usize> {
        check_targets(cfg)?;
        let device = self.device;
        let scaling = cfg.scaling();
        let mut n = 0;
        for (name, lin) in self.linears_mut() {
            if !targets(cfg, &name) {
                continue;
            }
            let (out, inp) = lin.shape();
            let bound = 1.0 / (inp as f64).sqrt();
            let mut a = Tensor::empty([cfg.rank, inp], (Kind::Float, device));
            let _ = a.uniform_(-bound, bound);
            let a = a.set_requires_grad(true);
            let b = Tensor::zeros([out, cfg.rank], (Kind::Float, device)).set_requires_grad(true);
            lin.lora = Some(Lora {
                a,
                b,
                scaling,
                dropout: cfg.dropout,
                enabled: true,
                training: false,
                input_sketch: None,
            });
            n += 1;
        }
        Ok(n)
    }

    /// Attaches adapters with the given weights, keyed by module path (`model.layers.0.self_attn.q_proj`)
    /// → `(lora_A, lora_B)`. Every key must name a linear layer; shapes are checked.
    pub fn set_lora_weights(
        &mut self,
        cfg: &LoraConfig,
        mut weights: BTreeMap<String, (Tensor, Tensor)>,
        source: &Path,
    ) -> Result<usize> {
        let device = self.device;
        let scaling = cfg.scaling();
        let mut n = 0;
        for (name, lin) in self.linears_mut() {
            let Some((a, b)) = weights.remove(&name) else {
                continue;
            };
            let (out, inp) = lin.shape();
            if a.size() != [cfg.rank, inp] || b.size() != [out, cfg.rank] {
                return Err(Error::tensor(
                    source,
                    format!("{name}.lora_A/lora_B"),
                    format!(
                        "shape mismatch: {:?} and {:?}, expected [{}, {inp}] and [{out}, {}]",
                        a.size(),
                        b.size(),
                        cfg.rank,
                        cfg.rank
                    ),
                ));
            }
            lin.lora = Some(Lora {
                a: a.to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(false),
                b: b.to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(false),
                scaling,
                dropout: cfg.dropout,
                enabled: true,
                training: false,
                input_sketch: None,
            });
            n += 1;
        }
        if let Some(name) = weights.keys().next() {
            return Err(Error::tensor(
                source,
                name.clone(),
                "adapter for a layer the model does not have",
            ));
        }
        Ok(n)
    }

    /// Makes the attached adapters trainable (ones loaded from a directory start frozen), trainable
    /// token rows included.
    pub fn set_lora_trainable(&mut self) {
        if let Some(t) = self.trainable_tokens.as_mut() {
            t.embed = t.embed.detach().set_requires_grad(true);
            t.head = t.head.as_ref().map(|h| h.detach().set_requires_grad(true));
        }
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.a = l.a.detach().set_requires_grad(true);
                l.b = l.b.detach().set_requires_grad(true);
            }
        }
    }

    /// Switches every adapter on or off (off = the base model, e.g. the DPO reference), trainable
    /// token rows included.
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        if let Some(t) = self.trainable_tokens.as_mut() {
            t.enabled = enabled;
        }
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.enabled = enabled;
            }
        }
    }

    /// Dropout on (training) or off (evaluation).
    pub fn set_training(&mut self, training: bool) {
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.training = training;
            }
        }
    }

    pub fn has_lora(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora.is_some())
    }

    /// LoRA tensors under PEFT's names without the `base_model.model.` prefix, e.g.
    /// `model.layers.0.self_attn.q_proj.lora_A.weight`, then any trainable token rows
    /// ([`token_parameters`](Self::token_parameters)): everything an adapter trains, saves,
    /// checkpoints and restores.
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, lin) in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((format!("{name}.lora_A.weight"), l.a.shallow_clone()));
                out.push((format!("{name}.lora_B.weight"), l.b.shallow_clone()));
            }
        }
        out.extend(self.token_parameters());
        out
    }

    /// The decoder linear layers' frozen weights: their bytes in the compute dtype and as held
    /// (quantized by the loader on a QLoRA run, [`crate::load::store`]).
    pub fn base_linear_bytes(&self) -> (u64, u64) {
        let (mut full, mut held) = (0u64, 0u64);
        for (_, lin) in self.linears() {
            let (out, inp) = lin.shape();
            full += (out * inp) as u64 * lin.weight.kind().elt_size_in_bytes() as u64;
            held += match &lin.quantized {
                Some(q) => q.bytes() as u64,
                None => (lin.weight.numel() * lin.weight.kind().elt_size_in_bytes()) as u64,
            };
        }
        (full, held)
    }

    /// The storage of the decoder's quantized linear weights and how many layers use each, e.g.
    /// `["Q4_1 × 210"]`; empty when none is quantized.
    pub fn quantized_storage(&self) -> Vec<String> {
        let mut counts = BTreeMap::<String, usize>::new();
        for (_, lin) in self.linears() {
            if let Some(q) = &lin.quantized {
                *counts.entry(q.label()).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|(k, n)| format!("{k} × {n}"))
            .collect()
    }

    /// Makes every base parameter trainable (full fine-tuning).
    pub fn unfreeze_all(&mut self) {
        let params: Vec<Tensor> = self
            .named_parameters()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        for t in params {
            let _ = t.set_requires_grad(true);
        }
    }
}

fn targets(cfg: &LoraConfig, module_path: &str) -> bool {
    let last = module_path.rsplit('.').next().unwrap_or(module_path);
    cfg.target_modules.iter().any(|t| t == last)
}

fn check_targets(cfg: &LoraConfig) -> Result<()> {
    for t in &cfg.target_modules {
        if !LINEAR_MODULES.contains(&t.as_str()) {
            return Err(Error::Usage(format!(
                "adapter.lora.targetModules: `{t}` is not a linear layer of this model (expected some of {})",
                LINEAR_MODULES.join(", ")
            )));
        }
    }
    Ok(())
}
