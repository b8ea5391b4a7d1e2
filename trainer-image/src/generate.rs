//! Autoregressive decoding with the KV cache: greedy by default, or temperature + nucleus (top-p)
//! sampling. Stops at any EOS id or after `max_new_tokens`.
//!
//! [`generate_greedy_batch`] decodes many prompts at once. On a CPU one decoding step of a small
//! model is bound by reading every weight once, whatever the batch, so answering 30 probe
//! questions together costs little more than answering one.

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

/// Most prompts decoded together by [`generate_greedy_batch`]: bounds the cache's memory.
pub const MAX_BATCH: usize = 64;

/// Greedy answers to several prompts, decoded together; each is what [`generate`] would return
/// for that prompt alone (same positions and causal context; only floating-point summation order
/// differs). Prompts are left-padded: every row gets rotary positions from 0 at its first real
/// token, padded keys are masked out, and padded query rows attend to themselves only so that no
/// row is empty (an empty row would be NaN and, through 0 · NaN, poison the real rows).
pub fn generate_greedy_batch(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos_ids: &[i64],
) -> Vec<Vec<i64>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(MAX_BATCH) {
        out.extend(greedy_chunk(model, chunk, max_new_tokens, eos_ids));
    }
    out
}

fn greedy_chunk(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos_ids: &[i64],
) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let b = prompts.len();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || longest == 0 || max_new_tokens == 0 {
        return out;
    }
    let device = model.device;
    let (mut ids, mut real, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
        real.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
        positions.extend(std::iter::repeat_n(0i64, pad).chain(0..p.len() as i64));
    }
    let l = longest as i64;
    let shape = [b as i64, l];
    let input = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mut keys_real = Tensor::from_slice(&real).view(shape).to_device(device);
    let positions = Tensor::from_slice(&positions).view(shape).to_device(device);
    let causal = Tensor::ones([l, l], (Kind::Bool, device)).tril(0);
    let eye = Tensor::eye(l, (Kind::Bool, device));
    let prefill_mask = causal
        .view([1, 1, l, l])
        .logical_and(&keys_real.view([b as i64, 1, 1, l]))
        .logical_or(&eye.view([1, 1, l, l]));
    let mut cache = KvCache::new(model.layers.len());
    let mut logits = model.forward_cached(&input, &positions, &prefill_mask, &mut cache);
    let mut next_position: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut done: Vec<bool> = prompts.iter().map(Vec::is_empty).collect();
    for _ in 0..max_new_tokens {
        let last = logits.select(1, -1).to_kind(Kind::Float);
        let next: Vec<i64> = Vec::try_from(last.argmax(-1, false)).expect("argmax is [batch] i64");
        for (i, &token) in next.iter().enumerate() {
            if !done[i] {
                out[i].push(token);
                done[i] = eos_ids.contains(&token);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let input = Tensor::from_slice(&next)
            .view([b as i64, 1])
            .to_device(device);
        let step_positions = Tensor::from_slice(&next_position)
            .view([b as i64, 1])
            .to_device(device);
        keys_real = Tensor::cat(
            &[
                &keys_real,
                &Tensor::ones([b as i64, 1], (Kind::Bool, device)),
            ],
            1,
        );
        let total = keys_real.size()[1];
        let mask = keys_real.view([b as i64, 1, 1, total]);
        logits = model.forward_cached(&input, &step_positions, &mask, &mut cache);
        for p in next_position.iter_mut() {
            *p += 1;
        }
    }
    out
}
