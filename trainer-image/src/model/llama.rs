//! The decoder-only transformer: embeddings → N × (RMSNorm → attention → residual → RMSNorm →
//! SwiGLU MLP → residual) → RMSNorm → LM head. Parameters keep their Hugging Face names so they can
//! be saved, loaded and (later) wrapped by adapters by name.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::attention::{Attention, KvCache, SideBatch, build_mask};
use crate::model::config::ModelConfig;
use crate::model::linear::Linear;
use crate::model::rope::{Rope, RopeScaling};
use crate::model::vocab::{AddedVocab, TrainableTokens};
use crate::model::weights::WeightMap;

/// The boolean training mask `[batch, 1, seq, seq]` with every query row allowed to see itself
/// (see [`CausalLm::forward_with`]).
pub(super) fn training_mask(m: &Tensor) -> Tensor {
    let t = m.size()[2];
    let eye = Tensor::eye(t, (Kind::Bool, m.device())).view([1, 1, t, t]);
    m.to_kind(Kind::Bool).logical_or(&eye)
}

/// Re-seeds the global generator for layer `i` of a forward pass whose dropout seeds start at
/// `seeds` ([`CausalLm::layer_seeds`]); nothing when dropout is off.
pub(super) fn seed_layer(seeds: Option<i64>, i: usize) {
    if let Some(base) = seeds {
        tch::manual_seed(base + i as i64);
    }
}

/// Root-mean-square norm, computed in float32 whatever the model dtype (as transformers does).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer's seven projections, in the order of `CausalLm::linears`.
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// `x + attn(norm(x))`, then `h + mlp(norm(h))`, appending to the layer's `cache` slot if any.
    pub fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        self.finish(x, h)
    }

    /// [`DecoderLayer::forward`] of several batches side by side in one row
    /// ([`Attention::forward_side`]).
    pub fn forward_side(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        batches: &[SideBatch],
    ) -> Tensor {
        let h = self
            .self_attn
            .forward_side(&self.input_layernorm.forward(x), cos, sin, batches);
        self.finish(x, h)
    }

    /// The attention's residual, then the MLP's.
    fn finish(&self, x: &Tensor, h: Tensor) -> Tensor {
        // Out-of-place residual adds: autograd keeps the pre-residual tensors for backward.
        let hidden = x + h;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&hidden));
        hidden + h
    }
}

/// A Llama-family causal language model with its weights on one device.
#[derive(Debug)]
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the input embeddings are tied to the output projection.
    pub lm_head: Option<Linear>,
    pub(super) rope: Rope,
    /// The rotary embedding no longer matches the checkpoint's config ([`CausalLm::set_rope_scaling`]),
    /// so an adapter alone does not describe the trained model.
    rope_changed: bool,
    pub kind: Kind,
    pub device: Device,
    /// Rows of added tokens trained on top of the frozen embedding (LoRA + vocabulary expansion).
    pub trainable_tokens: Option<TrainableTokens>,
    /// The tokens the vocabulary was extended with and the matching tokenizer files.
    pub added_vocab: Option<AddedVocab>,
    /// Activation checkpointing for the training losses (see [`crate::model::checkpoint`]).
    pub checkpoint_layers: bool,
}

impl CausalLm {
    /// Builds the model by taking every tensor from `weights` (already in `kind` on `device`).
    /// `source` names the checkpoint in error messages.
    pub fn from_weights(
        config: ModelConfig,
        mut weights: WeightMap,
        source: &Path,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let w = &mut weights;
        let linear =
            |w: &mut WeightMap, name: &str, out: i64, inp: i64, bias: bool| -> Result<Linear> {
                let bias = if bias {
                    Some(w.take(&format!("{name}.bias"), &[out], source)?)
                } else {
                    w.take_optional(&format!("{name}.bias"), &[out], source)?
                };
                let weight_name = format!("{name}.weight");
                if let Some(q) = w.take_quantized(&weight_name, &[out, inp])? {
                    return Ok(Linear::from_quantized(q, bias, kind, device));
                }
                let weight = w.take(&weight_name, &[out, inp], source)?;
                Ok(Linear::new(weight, bias))
            };
        let embed_tokens = w.take("model.embed_tokens.weight", &[c.vocab_size, h], source)?;
        let mut layers = Vec::with_capacity(c.num_layers as usize);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm {
                    weight: w.take(&format!("{p}.input_layernorm.weight"), &[h], source)?,
                    eps: c.rms_norm_eps,
                },
                self_attn: Attention {
                    q_proj: linear(w, &format!("{a}.q_proj"), c.num_heads * hd, h, c.qkv_bias)?,
                    k_proj: linear(
                        w,
                        &format!("{a}.k_proj"),
                        c.num_kv_heads * hd,
                        h,
                        c.qkv_bias,
                    )?,
                    v_proj: linear(
                        w,
                        &format!("{a}.v_proj"),
                        c.num_kv_heads * hd,
                        h,
                        c.qkv_bias,
                    )?,
                    o_proj: linear(w, &format!("{a}.o_proj"), h, c.num_heads * hd, c.o_bias)?,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: RmsNorm {
                    weight: w.take(
                        &format!("{p}.post_attention_layernorm.weight"),
                        &[h],
                        source,
                    )?,
                    eps: c.rms_norm_eps,
                },
                mlp: Mlp {
                    gate_proj: linear(
                        w,
                        &format!("{m}.gate_proj"),
                        c.intermediate_size,
                        h,
                        c.mlp_bias,
                    )?,
                    up_proj: linear(
                        w,
                        &format!("{m}.up_proj"),
                        c.intermediate_size,
                        h,
                        c.mlp_bias,
                    )?,
                    down_proj: linear(
                        w,
                        &format!("{m}.down_proj"),
                        h,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                },
            });
        }
        let norm = RmsNorm {
            weight: w.take("model.norm.weight", &[h], source)?,
            eps: c.rms_norm_eps,
        };
        let lm_head = if c.tie_word_embeddings {
            // A tied checkpoint may still carry a copy of the head; transformers ignores it too.
            let _ = w.take_optional("lm_head.weight", &[c.vocab_size, h], source)?;
            None
        } else {
            Some(linear(w, "lm_head", c.vocab_size, h, false)?)
        };
        let leftover: Vec<&str> = w
            .remaining()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !leftover.is_empty() {
            eprintln!(
                "warning: {}: {} unused tensors (first: {})",
                source.display(),
                leftover.len(),
                leftover[0]
            );
        }
        let rope = Rope::new(
            c.rope_scaling.clone(),
            c.rope_theta,
            hd,
            c.max_position_embeddings,
            device,
        );
        Ok(CausalLm {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            rope_changed: false,
            kind,
            device,
            trainable_tokens: None,
            added_vocab: None,
            checkpoint_layers: false,
        })
    }

    /// Replaces the rotary scaling and `max_position_embeddings` (long-context fine-tuning) and
    /// rebuilds the rotary tables; the weights are untouched.
    pub fn set_rope_scaling(&mut self, scaling: RopeScaling, max_position_embeddings: i64) {
        self.rope = Rope::new(
            scaling.clone(),
            self.config.rope_theta,
            self.config.head_dim,
            max_position_embeddings,
            self.device,
        );
        self.config.rope_scaling = scaling;
        self.config.max_position_embeddings = max_position_embeddings;
        self.rope_changed = true;
    }

    /// Whether [`CausalLm::set_rope_scaling`] changed the rope away from the checkpoint's config.
    pub fn rope_changed(&self) -> bool {
        self.rope_changed
    }

    /// Logits `[batch, seq, vocab]` for `input_ids` `[batch, seq]`.
    ///
    /// `padding` is `[batch, past + seq]` with 1 for real tokens (None = all real). With a `cache`,
    /// positions continue after the cached ones and the new keys/values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, s) = input_ids.size2().expect("input_ids is [batch, seq]");
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions = Tensor::arange_start(past, past + s, (Kind::Int64, self.device))
            .unsqueeze(0)
            .expand([b, s], false);
        // Plain causal attention lets SDPA pick its fused causal kernel; anything else needs a mask.
        let mask = if padding.is_none() && past == 0 {
            None
        } else {
            Some(build_mask(padding, b, past, s, self.device))
        };
        self.run(input_ids, &positions, mask.as_ref(), cache)
    }

    /// Logits `[batch, seq, vocab]` for training: rotary positions from `position_ids` `[batch, seq]`
    /// (they restart at 0 for every packed sample) and a boolean `attention_mask`
    /// `[batch, 1, seq, seq]` (true = may attend). `None` is plain causal attention, the fused path
    /// [`forward`](Self::forward) takes too. Query rows with no allowed key (padding) are allowed to
    /// see themselves, so that SDPA never produces NaN rows whose zero gradient would still poison
    /// the weight gradients (0 · NaN); their outputs are ignored by the loss anyway.
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        self.logits(&self.hidden_with(input_ids, position_ids, attention_mask))
    }

    /// The last decoder layer's output `[batch, seq, hidden]` (before the final norm) under the
    /// conventions of [`forward_with`](Self::forward_with). With [`logits`](Self::logits) it is
    /// `forward_with` split in two, so a caller that needs the logits at only some positions (the
    /// supervised ones) can select those rows first and skip the vocabulary-wide projection
    /// everywhere else: the norm and the head act on each position independently.
    pub fn hidden_with(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        let mask = attention_mask.map(training_mask);
        self.decode(input_ids, position_ids, mask.as_ref(), None)
    }

    /// [`hidden_with`](Self::hidden_with) of several batches in one forward: `input_ids` and
    /// `position_ids` `[1, Σ batch·seq]` hold each batch's rows in turn, `batches` their shapes and
    /// training masks (`None`: plain causal). Each batch attends within itself; every other
    /// operation acts on each token, so the result is each batch's own forward, laid side by side
    /// (`[1, Σ batch·seq, hidden]`), for one read of the weights per layer instead of one per
    /// batch. A small batch beside a large one (self-distillation's conversation beside the
    /// task's micro-batch) costs its tokens, not a forward of its own.
    pub fn hidden_side(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        batches: &[SideBatch],
    ) -> Tensor {
        let batches: Vec<SideBatch> = batches
            .iter()
            .map(|b| SideBatch {
                batch: b.batch,
                seq: b.seq,
                mask: b.mask.as_ref().map(training_mask),
            })
            .collect();
        let (cos, sin) = self.rope.cos_sin(position_ids, self.kind);
        let seeds = self.layer_seeds();
        let mut x = self.embed(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            seed_layer(seeds, i);
            x = layer.forward_side(&x, (&cos, &sin), &batches);
        }
        x
    }

    /// The token embeddings of `input_ids` (with any trainable added rows).
    pub(super) fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embedding_weight(), input_ids, -1, false, false)
    }

    /// The base seed of this forward pass's per-layer dropout seeds ([`seed_layer`]), drawn from
    /// the global generator, or `None` when no dropout is active. Each layer re-seeds before it
    /// runs, so a layer recomputed in backward (activation checkpointing) draws the masks it drew
    /// in the forward pass, and a checkpointed run equals a plain one.
    pub(super) fn layer_seeds(&self) -> Option<i64> {
        // Every forward asks, generation's per-token ones too: no module names are built here.
        let active = self
            .layers
            .iter()
            .flat_map(DecoderLayer::projections)
            .filter_map(|l| l.lora.as_ref())
            .any(|a| a.enabled && a.training && a.dropout > 0.0);
        active.then(|| Tensor::randint(1 << 62, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]))
    }

    /// Final norm and LM head on hidden states `[..., hidden]` → logits `[..., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let x = self.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => match self.head_weight_override() {
                Some(w) => x.linear(&w, head.bias.as_ref()),
                None => head.forward(&x),
            },
            None => x.linear::<Tensor>(&self.embedding_weight(), None),
        }
    }

    /// Logits of the last position `[batch, 1, vocab]` for `input_ids` `[batch, seq]` at explicit
    /// rotary `positions` `[batch, seq]` under a boolean `mask` `[batch, 1, seq, past + seq]`
    /// (true = may attend), appending to `cache`: batched decoding of prompts of different
    /// lengths, where each row has its own positions. A prompt's prefill needs only the
    /// distribution of the token that follows it; projecting every position onto the vocabulary
    /// was most of a prefill's memory.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let hidden = self.decode(input_ids, positions, Some(mask), Some(cache));
        let t = hidden.size()[1];
        self.logits(&hidden.narrow(1, t - 1, 1))
    }

    fn run(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        self.logits(&self.decode(input_ids, positions, mask, cache))
    }

    /// Embeddings through every decoder layer; the result has not been through the final norm.
    fn decode(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (cos, sin) = self.rope.cos_sin(positions, self.kind);
        let seeds = self.layer_seeds();
        let mut x = self.embed(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            seed_layer(seeds, i);
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, (&cos, &sin), mask, slot);
        }
        x
    }

    /// Every parameter under its Hugging Face name (tied head omitted, as `save_pretrained` does).
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &l.input_layernorm.weight,
            ));
            let a = &l.self_attn;
            for (n, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                for (suffix, t) in lin.named_parameters() {
                    out.push((format!("{p}.self_attn.{n}.{suffix}"), t));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &l.post_attention_layernorm.weight,
            ));
            let m = &l.mlp;
            for (n, lin) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                for (suffix, t) in lin.named_parameters() {
                    out.push((format!("{p}.mlp.{n}.{suffix}"), t));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm.weight));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), &head.weight));
        }
        out
    }
}
