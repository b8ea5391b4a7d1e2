//! Autoregressive decoding with the KV cache: greedy by default, or temperature + nucleus (top-p)
//! sampling. Stops at any EOS id or after `max_new_tokens`.
//!
//! [`generate_greedy_batch`] decodes many prompts at once: a decoding step reads every weight once
//! for the whole batch, so the batch is as large as a KV-cache budget allows
//! ([`CHUNK_CACHE_BYTES`], [`GPU_CHUNK_CACHE_BYTES`]). Rows whose answer ended leave the batch, since past a few rows the
//! per-row work dominates (SmolLM2-135M on 2 CPU cores: 0.12 s a step at 22 rows, 0.25 s at 64).

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

/// Most KV-cache bytes one chunk of [`generate_greedy_batch`] may fill on a CPU: prompts are
/// decoded together until their rows, each as long as the chunk's longest prompt plus the answer
/// limit, would hold more. 1 GiB takes the 150 questions of the retention probe (32-token answers)
/// in one chunk for SmolLM2-135M in float32 (45 KiB a token), about 26 such rows for a Llama-2-7B
/// shape in bfloat16 (512 KiB a token), and bounds a chunk of long prompts by their length too.
/// A fixed row count (64 until 2026-12-07) did neither: it cut the probe into three chunks, each
/// paying for reading every weight at each of its decoding steps (0.07 s here even for one row),
/// and let 64 long eval prompts fill a cache of any size.
pub const CHUNK_CACHE_BYTES: i64 = 1 << 30;

/// [`CHUNK_CACHE_BYTES`] on a GPU, whose memory is larger and whose decoding step costs little
/// more for many rows than for a few: 8 GiB, the whole probe of a Llama-2-7B shape (5.6 GiB).
pub const GPU_CHUNK_CACHE_BYTES: i64 = 8 << 30;

/// Most rows of a chunk, however short its prompts.
pub const MAX_BATCH: usize = 256;

/// KV-cache bytes per token of `model`: keys and values for every layer.
fn cache_bytes_per_token(model: &CausalLm) -> i64 {
    let c = &model.config;
    let element = if model.kind == Kind::Float { 4 } else { 2 };
    (c.num_layers * 2 * c.num_kv_heads * c.head_dim * element).max(1)
}

/// The KV-cache budget of one chunk on `model`'s device.
fn chunk_budget(model: &CausalLm) -> i64 {
    if model.device.is_cuda() {
        GPU_CHUNK_CACHE_BYTES
    } else {
        CHUNK_CACHE_BYTES
    }
}

/// `prompts` cut, in order, into consecutive chunks whose cache (rows × (longest prompt +
/// `max_new_tokens`) tokens × `token_bytes`) stays within `budget` bytes, with at most
/// [`MAX_BATCH`] rows; a prompt too long for the budget alone gets a chunk of its own.
fn chunks(
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    token_bytes: i64,
    budget: i64,
) -> Vec<&[Vec<i64>]> {
    let mut out = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let rows = (i - start + 1) as i64;
        let widest = longest.max(p.len());
        let bytes = rows * (widest + max_new_tokens) as i64 * token_bytes;
        if i > start && (bytes > budget || rows as usize > MAX_BATCH) {
            out.push(&prompts[start..i]);
            (start, longest) = (i, p.len());
        } else {
            longest = widest;
        }
    }
    if start < prompts.len() {
        out.push(&prompts[start..]);
    }
    out
}

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
    generate_greedy_batch_until(model, prompts, max_new_tokens, eos_ids, &mut |_, _| false)
}

/// [`generate_greedy_batch`], where a row also stops once `settled(prompt index, its answer so
/// far)` says that nothing it could add would change what the caller wants to know (the
/// retention probe: the answer already holds its key as a finished word). A settled answer is
/// the greedy answer's beginning, as one cut off at `max_new_tokens` is.
pub fn generate_greedy_batch_until(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos_ids: &[i64],
    settled: &mut dyn FnMut(usize, &[i64]) -> bool,
) -> Vec<Vec<i64>> {
    let mut out = Vec::with_capacity(prompts.len());
    let (token_bytes, budget) = (cache_bytes_per_token(model), chunk_budget(model));
    for chunk in chunks(prompts, max_new_tokens, token_bytes, budget) {
        let first = out.len();
        let mut settled_in_chunk = |i: usize, ids: &[i64]| settled(first + i, ids);
        out.extend(greedy_chunk(
            model,
            chunk,
            max_new_tokens,
            eos_ids,
            &mut settled_in_chunk,
        ));
    }
    out
}

fn greedy_chunk(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos_ids: &[i64],
    settled: &mut dyn FnMut(usize, &[i64]) -> bool,
) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let b = prompts.len();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    if b == 0 || prompts.iter().all(Vec::is_empty) || max_new_tokens == 0 {
        return out;
    }
    let device = model.device;
    // The rows still decoding: `active[r]` is the prompt that row `r` of the batch answers. An
    // empty prompt has nothing to continue and gets no row.
    let mut active: Vec<usize> = (0..b).filter(|&i| !prompts[i].is_empty()).collect();
    let prefill = Prefill::left_padded(active.iter().map(|&i| &prompts[i]), device);
    let mut cache = KvCache::new(model.layers.len());
    let mut logits = model.forward_cached(
        &prefill.input,
        &prefill.positions,
        &prefill.mask,
        &mut cache,
    );
    let mut keys_real = prefill.keys_real;
    for _ in 0..max_new_tokens {
        let last = logits.select(1, -1).to_kind(Kind::Float);
        let next: Vec<i64> = Vec::try_from(last.argmax(-1, false)).expect("argmax is [batch] i64");
        let mut keep = Vec::with_capacity(active.len());
        for (r, (&i, &token)) in active.iter().zip(&next).enumerate() {
            out[i].push(token);
            if !eos_ids.contains(&token) && !settled(i, &out[i]) {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        // Answers that ended leave the batch: each step then costs what the rows still
        // decoding cost (at 64 rows most of a step is per-row work, not reading the weights).
        let next: Vec<i64> = keep.iter().map(|&r| next[r]).collect();
        if keep.len() < active.len() {
            let rows = Tensor::from_slice(&to_i64(&keep)).to_device(device);
            cache.keep_rows(&rows);
            keys_real = keys_real.index_select(0, &rows);
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let n = active.len() as i64;
        let positions: Vec<i64> = active
            .iter()
            .map(|&i| out_position(prompts, &out, i))
            .collect();
        keys_real = Tensor::cat(
            &[&keys_real, &Tensor::ones([n, 1], (Kind::Bool, device))],
            1,
        );
        let mask = keys_real.view([n, 1, 1, -1]);
        logits = model.forward_cached(
            &Tensor::from_slice(&next).view([n, 1]).to_device(device),
            &Tensor::from_slice(&positions)
                .view([n, 1])
                .to_device(device),
            &mask,
            &mut cache,
        );
    }
    out
}

/// The rotary position of the token `out[i]` ends with: prompt `i`'s positions start at 0.
fn out_position(prompts: &[Vec<i64>], out: &[Vec<i64>], i: usize) -> i64 {
    (prompts[i].len() + out[i].len() - 1) as i64
}

fn to_i64(rows: &[usize]) -> Vec<i64> {
    rows.iter().map(|&r| r as i64).collect()
}

/// The first forward of a greedy chunk: prompts left-padded to the longest.
struct Prefill {
    input: Tensor,
    positions: Tensor,
    /// `[batch, longest]`: which key positions are real tokens.
    keys_real: Tensor,
    /// `[batch, 1, longest, longest]`: causal over real keys; a padded query sees itself only.
    mask: Tensor,
}

impl Prefill {
    fn left_padded<'a>(
        prompts: impl Iterator<Item = &'a Vec<i64>> + Clone,
        device: tch::Device,
    ) -> Self {
        let longest = prompts.clone().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut real, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        let mut b = 0;
        for p in prompts {
            b += 1;
            let pad = longest - p.len();
            ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
            real.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
            positions.extend(std::iter::repeat_n(0i64, pad).chain(0..p.len() as i64));
        }
        let (b, l) = (b as i64, longest as i64);
        let keys_real = Tensor::from_slice(&real).view([b, l]).to_device(device);
        let causal = Tensor::ones([l, l], (Kind::Bool, device)).tril(0);
        let eye = Tensor::eye(l, (Kind::Bool, device));
        let mask = causal
            .view([1, 1, l, l])
            .logical_and(&keys_real.view([b, 1, 1, l]))
            .logical_or(&eye.view([1, 1, l, l]));
        Prefill {
            input: Tensor::from_slice(&ids).view([b, l]).to_device(device),
            positions: Tensor::from_slice(&positions)
                .view([b, l])
                .to_device(device),
            keys_real,
            mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(chunks: &[&[Vec<i64>]]) -> Vec<usize> {
        chunks.iter().map(|c| c.len()).collect()
    }

    #[test]
    fn chunks_fill_the_cache_budget_in_order() {
        // The retention probe on SmolLM2-135M in float32: 150 prompts of about 45 tokens.
        let probe = vec![vec![1i64; 45]; 150];
        assert_eq!(lens(&chunks(&probe, 32, 46_080, CHUNK_CACHE_BYTES)), [150]);
        // A token of 512 KiB (a 7B shape in bfloat16): 1 GiB holds 2048 tokens, 26 rows of 77.
        let split = chunks(&probe, 32, 512 << 10, CHUNK_CACHE_BYTES);
        assert_eq!(lens(&split), [26, 26, 26, 26, 26, 20]);
        assert_eq!(split.concat(), probe, "every prompt once, in order");
        // Short prompts stop at MAX_BATCH rows.
        let tiny = vec![vec![1i64; 2]; MAX_BATCH + 1];
        assert_eq!(
            lens(&chunks(&tiny, 1, 4, CHUNK_CACHE_BYTES)),
            [MAX_BATCH, 1]
        );
        // A GPU's budget: the 7B shape's probe in one chunk.
        assert_eq!(
            lens(&chunks(&probe, 32, 512 << 10, GPU_CHUNK_CACHE_BYTES)),
            [150]
        );
    }

    #[test]
    fn a_long_prompt_shrinks_its_chunk_and_an_overlong_one_stands_alone() {
        let budget_tokens = (CHUNK_CACHE_BYTES / 1024) as usize;
        let mut prompts = vec![vec![1i64; 10]; 3];
        prompts.push(vec![1i64; budget_tokens / 2]);
        prompts.push(vec![1i64; budget_tokens * 2]);
        prompts.push(vec![1i64; 10]);
        // Rows 0-3 would need 4 × (budget/2 + 6) tokens: row 3 starts a chunk, which row 4 (too
        // long for any budget) cannot join, and row 5 cannot join row 4's.
        assert_eq!(
            lens(&chunks(&prompts, 6, 1024, CHUNK_CACHE_BYTES)),
            [3, 1, 1, 1]
        );
        assert!(chunks(&[], 6, 1024, CHUNK_CACHE_BYTES).is_empty());
    }
}
