//! Autoregressive decoding with the KV cache: greedy by default, or temperature + nucleus (top-p)
//! sampling. Stops at any EOS id or after `max_new_tokens`.

use tch::{Kind, Tensor};

use crate::model::{CausalLm, KvCache};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// `None` = greedy (argmax), the reproducible default.
    pub temperature: Option<f64>,
    pub top_p: f64,
    pub seed: Option<u64>,
}

/// Picks the next token from float32 logits `[vocab]`.
fn choose(logits: &Tensor, sampling: &Sampling) -> i64 {
    match sampling.temperature {
        None => logits.argmax(-1, false).int64_value(&[]),
        Some(t) if t <= 0.0 => logits.argmax(-1, false).int64_value(&[]),
        Some(t) => {
            let probs = (logits / t).softmax(-1, Kind::Float);
            let probs = if sampling.top_p < 1.0 {
                // Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
                let (sorted, idx) = probs.sort(-1, true);
                let cum = sorted.cumsum(-1, Kind::Float);
                let drop_sorted = (cum - &sorted).gt(sampling.top_p);
                let drop = drop_sorted.zeros_like().scatter(-1, &idx, &drop_sorted);
                probs.masked_fill(&drop, 0.0)
            } else {
                probs
            };
            probs.multinomial(1, false).int64_value(&[0])
        }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, returning only the new ids (EOS included when hit).
pub fn generate(
    model: &CausalLm,
    prompt: &[i64],
    max_new_tokens: usize,
    eos_ids: &[i64],
    sampling: &Sampling,
) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    if let Some(seed) = sampling.seed {
        tch::manual_seed(seed as i64);
    }
    let mut cache = KvCache::new(model.layers.len());
    let mut out = Vec::new();
    if prompt.is_empty() || max_new_tokens == 0 {
        return out;
    }
    let mut input = Tensor::from_slice(prompt)
        .to_device(model.device)
        .unsqueeze(0);
    for _ in 0..max_new_tokens {
        let logits = model.forward(&input, None, Some(&mut cache));
        let last = logits.select(1, -1).squeeze_dim(0).to_kind(Kind::Float);
        let next = choose(&last, sampling);
        out.push(next);
        if eos_ids.contains(&next) {
            break;
        }
        input = Tensor::from_slice(&[next])
            .to_device(model.device)
            .unsqueeze(0);
    }
    out
}
