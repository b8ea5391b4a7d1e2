//! Shared fixtures for the `train_*` integration tests: a tiny random Llama in Hugging Face layout
//! (config.json, model.safetensors, a word-level tokenizer.json) and a small text data set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use finetune_trainer::load::ModelSource;
use finetune_trainer::model::{CausalLm, LoraConfig};
use finetune_trainer::train::optim::AdamW;
use tch::{Device, Kind, Tensor};

pub const WORDS: [&str; 30] = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "and", "then", "slept",
    "under", "tree", "big", "small", "red", "blue", "bird", "sang", "song", "every", "morning",
    "night", "quietly", "loudly", "home", "went", "saw",
];

pub fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": true, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
        "rope_theta": 10000.0
    })
}

/// Writes the tiny model into `dir` (weights drawn from `seed`).
pub fn write_tiny_model(dir: &Path, seed: i64) {
    std::fs::create_dir_all(dir).unwrap();
    let c = config();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    tch::manual_seed(seed);
    let (v, h, i, hd) = (40, 32, 64, 8);
    let mut t: Vec<(String, Tensor)> = vec![(
        "model.embed_tokens.weight".into(),
        Tensor::randn([v, h], (Kind::Float, Device::Cpu)) * 0.5,
    )];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [4 * hd, h]),
            ("self_attn.k_proj", [2 * hd, h]),
            ("self_attn.v_proj", [2 * hd, h]),
            ("self_attn.o_proj", [h, 4 * hd]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            t.push((
                format!("{p}.{n}.weight"),
                Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.15,
            ));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.push((
                format!("{p}.{n}.weight"),
                Tensor::ones([h], (Kind::Float, Device::Cpu)),
            ));
        }
    }
    t.push((
        "model.norm.weight".into(),
        Tensor::ones([h], (Kind::Float, Device::Cpu)),
    ));
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, dir.join("model.safetensors")).unwrap();
    let mut vocab = serde_json::Map::new();
    for (id, w) in ["<unk>", "<s>", "</s>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert((*w).to_string(), id.into());
    }
    let special = |id: i64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"})
            .to_string(),
    )
    .unwrap();
}

pub fn load_tiny(dir: &Path) -> CausalLm {
    ModelSource::open(dir)
        .unwrap()
        .load(Kind::Float, Device::Cpu)
        .unwrap()
        .model
}

/// The tiny model in `dir` with LoRA `cfg` (drawn after seeding with `seed`), B made non-zero so
/// that A gets gradients in the first step too, in training mode, with AdamW (decay 0.01) over the
/// adapter.
pub fn lora_model(dir: &Path, seed: i64, cfg: &LoraConfig) -> (CausalLm, AdamW) {
    let mut m = load_tiny(dir);
    tch::manual_seed(seed);
    m.add_lora(cfg).unwrap();
    for (_, mut t) in m.lora_parameters() {
        tch::no_grad(|| {
            let _ = t.g_add_(&(t.randn_like() * 0.05));
        });
    }
    m.set_training(true);
    let params = m.lora_parameters();
    let opt = AdamW::new(params.into_iter().map(|(n, t)| (n, t, 0.01)).collect());
    (m, opt)
}

/// `n` lines of `{"text": ...}` of 4–14 words, deterministic.
pub fn write_text_data(path: &Path, n: usize) {
    write_text_data_seeded(path, n, 12345);
}

/// [`write_text_data`] with another sequence of words for each `seed`.
pub fn write_text_data_seeded(path: &Path, n: usize, seed: u64) {
    write_text_lines(path, n, seed, 4..15);
}

/// `n` lines of `{"text": ...}` whose word counts are drawn from `words`, deterministic in `seed`.
pub fn write_text_lines(path: &Path, n: usize, seed: u64, words: std::ops::Range<usize>) {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut out = String::new();
    for _ in 0..n {
        let len = words.start + next() % words.len();
        let line: Vec<&str> = (0..len).map(|_| WORDS[next() % WORDS.len()]).collect();
        out.push_str(&serde_json::json!({"text": line.join(" ")}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// `hyper` (a YAML flow mapping) with `precision: fp32` unless it names a precision: the tests
/// compare numbers made in float32, and `precision: auto` is bfloat16 on CPUs with native bf16.
pub fn pin_fp32(hyper: &str) -> String {
    if hyper.contains("precision") {
        hyper.to_string()
    } else {
        hyper.replacen('{', "{precision: fp32, ", 1)
    }
}

/// A FinetuneJob on `file://` URIs; `extra` is appended to `spec.hyperparameters`' siblings.
/// The precision is float32 unless `hyper` names one ([`pin_fp32`]).
pub fn write_job(path: &Path, model: &Path, data: &Path, hyper: &str, extra: &str) -> PathBuf {
    let train = format!("{{uri: \"file://{}\"}}", data.display());
    write_job_training_on(path, model, &train, hyper, extra)
}

/// [`write_job`] with `train` as the YAML of `spec.dataset.train` (e.g. a mixture).
pub fn write_job_training_on(
    path: &Path,
    model: &Path,
    train: &str,
    hyper: &str,
    extra: &str,
) -> PathBuf {
    let yaml = format!(
        "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: tiny}}
spec:
  baseModel: {{uri: \"file://{}\"}}
  dataset:
    train: {train}
    evalSplit: 0.2
    format: text
  adapter: {{type: lora, lora: {{rank: 4, alpha: 8, dropout: 0.1}}}}
  hyperparameters: {hyper}
  resources: {{gpus: 0}}
{extra}",
        model.display(),
        hyper = pin_fp32(hyper),
    );
    std::fs::write(path, yaml).unwrap();
    path.to_path_buf()
}
