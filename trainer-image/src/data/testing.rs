//! Test support (public so integration tests and the training code's tests can use it): a tiny
//! byte-level tokenizer with ChatML special tokens, and a ChatML template like SmolLM2's.

use std::path::Path;

use serde_json::json;

use crate::text::tokenizer::bytes_to_unicode;
use crate::text::{ChatTemplate, TextTokenizer};

/// SmolLM2-Instruct's template with a shorter default system prompt.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of [`byte_tokenizer`] and their ids (after the 256 byte tokens).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level BPE without merges (one token per byte, ids 0..=255 in byte order) plus
/// [`SPECIALS`] as ids 256, 257, 258; `eos` names the eos token. Files are written to `dir`.
pub fn byte_tokenizer(dir: &Path, eos: &str) -> TextTokenizer {
    let table = bytes_to_unicode();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256)
        .map(|b| (table[b].to_string(), json!(b)))
        .chain(
            SPECIALS
                .iter()
                .enumerate()
                .map(|(i, s)| (s.to_string(), json!(256 + i))),
        )
        .collect();
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer.json");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": eos}).to_string(),
    )
    .expect("write tokenizer_config.json");
    TextTokenizer::from_hf_dir(dir).expect("byte tokenizer")
}

pub fn chatml() -> ChatTemplate {
    ChatTemplate::new(CHATML, None, Some("<|im_end|>".into()), None, None).expect("ChatML")
}

/// The supervised tokens of `ids` decoded run by run (consecutive supervised tokens form a run).
pub fn supervised_runs(tok: &TextTokenizer, ids: &[i64], supervised: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<i64> = Vec::new();
    for (&id, &s) in ids.iter().zip(supervised) {
        if s {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).expect("decode"));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).expect("decode"));
    }
    runs
}
