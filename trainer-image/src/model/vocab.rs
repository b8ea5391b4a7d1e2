//! A vocabulary larger than the checkpoint's: resizing the embedding (and an untied LM head) with
//! new rows at the mean of the existing ones, and PEFT's "trainable tokens" — only the rows of the
//! added tokens are trained while the rest of the matrix stays frozen.
//!
//! Layout (PEFT 0.21 `TrainableTokensLayer`, `LoraConfig.trainable_token_indices`): the adapter
//! holds `model.embed_tokens.token_adapter.trainable_tokens_delta` `[n, hidden]` — despite the
//! name, the rows' *values*, not a difference: PEFT writes them over the base rows with
//! `index_copy`, so the result does not depend on how the loader initialised its resized rows.
//! With tied embeddings the head uses the same patched matrix (PEFT ties a second wrapper to the
//! first and saves nothing for it); an untied `lm_head` gets its own
//! `lm_head.token_adapter.trainable_tokens_delta` and `trainable_token_indices` becomes
//! `{"embed_tokens": ids, "lm_head": ids}`.

use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::model::CausalLm;

/// PEFT name (without `base_model.model.`) of the trained embedding rows.
pub const EMBED_TOKENS_DELTA: &str = "model.embed_tokens.token_adapter.trainable_tokens_delta";
/// PEFT name of the trained rows of an untied LM head.
pub const LM_HEAD_TOKENS_DELTA: &str = "lm_head.token_adapter.trainable_tokens_delta";

/// Trainable rows of the embedding (and untied head) for some token ids; the base matrices stay
/// frozen and are patched on the fly.
#[derive(Debug)]
pub struct TrainableTokens {
    pub ids: Vec<i64>,
    /// `ids` as an int64 tensor on the model's device.
    index: Tensor,
    /// `[n, hidden]` float32 embedding rows.
    pub embed: Tensor,
    /// `[n, hidden]` float32 head rows (untied head only).
    pub head: Option<Tensor>,
    /// Off = the base rows (like LoRA's switch: reference model, base answers).
    pub enabled: bool,
}

/// Tokens the vocabulary was extended with and the extended tokenizer's files, carried with the
/// model so that every writer of it (adapter, checkpoint, merged or full model) writes a tokenizer
/// that matches its vocabulary.
#[derive(Debug, Clone, Default)]
pub struct AddedVocab {
    /// `(id, token)` of every added token.
    pub tokens: Vec<(i64, String)>,
    /// `(file name, content)`: `tokenizer.json`, `tokenizer_config.json` and whichever of the
    /// source's `special_tokens_map.json` / `chat_template.jinja` exist.
    pub files: Vec<(String, Vec<u8>)>,
}

impl AddedVocab {
    /// Writes the tokenizer files into `dir` (overwriting); returns their names.
    pub fn write(&self, dir: &std::path::Path) -> crate::error::Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, bytes) in &self.files {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| crate::error::Error::io(&p, e))?;
            names.push(name.clone());
        }
        Ok(names)
    }
}

/// A `tokenizer_config.json` `added_tokens_decoder` entry for a regular added token, as
/// transformers writes one for `add_tokens([...])`.
pub fn added_token_json(token: &str) -> Value {
    json!({
        "content": token, "lstrip": false, "normalized": true, "rstrip": false,
        "single_word": false, "special": false,
    })
}

/// `rows` `[n, h]` grown to `new_rows` rows, each new row the plain mean of the existing rows
/// (computed in float32). transformers' `resize_token_embeddings(mean_resizing=True)` samples from
/// a normal with that mean and covariance `1e-9 · Σ` — the same up to ~3e-5 standard deviations —
/// so the plain, deterministic mean is used here. The result keeps `rows`' dtype, device and
/// `requires_grad`.
pub fn grow_rows_with_mean(rows: &Tensor, new_rows: i64) -> Tensor {
    let _g = tch::no_grad_guard();
    let size = rows.size();
    let (old, h) = (size[0], size[1]);
    if new_rows <= old {
        return rows.shallow_clone();
    }
    let mean = rows
        .to_kind(Kind::Float)
        .mean_dim(0, true, Kind::Float)
        .to_kind(rows.kind());
    let extra = mean.expand([new_rows - old, h], false);
    Tensor::cat(&[rows.detach(), extra], 0)
        .contiguous()
        .set_requires_grad(rows.requires_grad())
}

impl CausalLm {
    /// Grows the embedding (and an untied head) to `new_size` rows, new rows at the mean of the
    /// old ones, and sets `config.vocab_size`. Never shrinks.
    pub fn resize_vocab(&mut self, new_size: i64) {
        if new_size <= self.config.vocab_size {
            return;
        }
        self.embed_tokens = grow_rows_with_mean(&self.embed_tokens, new_size);
        if let Some(head) = self.lm_head.as_mut() {
            head.weight = grow_rows_with_mean(&head.weight, new_size);
            if let Some(b) = head.bias.as_mut() {
                // Bias rows too (no Llama/Qwen2 head has one; kept for completeness).
                let col = grow_rows_with_mean(&b.unsqueeze(1), new_size).squeeze_dim(1);
                *b = col;
            }
        }
        self.config.vocab_size = new_size;
    }

    /// Makes the rows of `ids` trainable (float32, starting from the current rows). With
    /// `values` (embedding rows, head rows) they start from those instead (loading an adapter).
    pub fn add_trainable_tokens(&mut self, ids: &[i64], values: Option<(Tensor, Option<Tensor>)>) {
        let index = Tensor::from_slice(ids).to_device(self.device);
        let pick = |w: &Tensor| {
            w.detach()
                .index_select(0, &index)
                .to_kind(Kind::Float)
                .contiguous()
        };
        let (embed, head) = match values {
            Some((e, h)) => (e, h),
            None => (
                pick(&self.embed_tokens),
                self.lm_head.as_ref().map(|l| pick(&l.weight)),
            ),
        };
        let prep = |t: Tensor| {
            t.to_kind(Kind::Float)
                .to_device(self.device)
                .contiguous()
                .set_requires_grad(true)
        };
        let head = if self.lm_head.is_some() {
            head.map(prep)
        } else {
            None
        };
        self.trainable_tokens = Some(TrainableTokens {
            ids: ids.to_vec(),
            index,
            embed: prep(embed),
            head,
            enabled: true,
        });
    }

    /// The trainable token rows under PEFT's names (without `base_model.model.`).
    pub fn token_parameters(&self) -> Vec<(String, Tensor)> {
        let Some(t) = &self.trainable_tokens else {
            return Vec::new();
        };
        let mut out = vec![(EMBED_TOKENS_DELTA.to_string(), t.embed.shallow_clone())];
        if let Some(h) = &t.head {
            out.push((LM_HEAD_TOKENS_DELTA.to_string(), h.shallow_clone()));
        }
        out
    }

    /// `trainable_token_indices` for `adapter_config.json` (None without trainable tokens).
    pub fn trainable_token_indices_json(&self) -> Option<Value> {
        let t = self.trainable_tokens.as_ref()?;
        Some(if t.head.is_some() {
            json!({"embed_tokens": t.ids, "lm_head": t.ids})
        } else {
            json!(t.ids)
        })
    }

    /// The input embedding matrix with the trainable rows written over the base rows (autograd
    /// flows into those rows only); the plain matrix without them.
    pub fn embedding_weight(&self) -> Tensor {
        match &self.trainable_tokens {
            Some(t) if t.enabled => {
                let k = self.embed_tokens.kind();
                self.embed_tokens
                    .index_copy(0, &t.index, &t.embed.to_kind(k))
            }
            _ => self.embed_tokens.shallow_clone(),
        }
    }

    /// The untied head's weight with its trainable rows written in, or None when it has none.
    pub fn head_weight_override(&self) -> Option<Tensor> {
        let t = self.trainable_tokens.as_ref().filter(|t| t.enabled)?;
        let (head, rows) = (self.lm_head.as_ref()?, t.head.as_ref()?);
        Some(
            head.weight
                .index_copy(0, &t.index, &rows.to_kind(head.weight.kind())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rows_are_the_mean_of_the_old_ones() {
        let rows = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0]).view([3, 2]);
        let grown = grow_rows_with_mean(&rows, 5);
        assert_eq!(grown.size(), [5, 2]);
        let v: Vec<f32> = grown.flatten(0, -1).try_into().unwrap();
        assert_eq!(v, [1.0, 2.0, 3.0, 6.0, 5.0, 10.0, 3.0, 6.0, 3.0, 6.0]);
        // Never shrinks.
        assert_eq!(grow_rows_with_mean(&rows, 2).size(), [3, 2]);
    }
}
