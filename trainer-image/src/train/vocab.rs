//! `spec.vocabulary`: extending the tokenizer and the model before the data is encoded.
//!
//! The tokens (`addTokens`, and the tokens of `tokenizer` that the base vocabulary lacks) become
//! regular added tokens — matched before pre-tokenization, so each encodes to one id, as
//! transformers' `tokenizer.add_tokens([...])` — and the embedding (and an untied LM head) grows to
//! the new vocabulary with the new rows at the mean of the existing rows
//! ([`crate::model::vocab::grow_rows_with_mean`]). Under LoRA only those rows are trained, as PEFT
//! trainable tokens (layout in [`crate::model::vocab`]); a full fine-tune trains the whole resized
//! matrix. The extended tokenizer's files travel with the model ([`AddedVocab`]) so the adapter,
//! checkpoints and merged or full models are written with it.

use std::collections::HashSet;
use std::path::Path;

use finetune_crds::training::Vocabulary;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::load::LoadedModel;
use crate::model::vocab::{AddedVocab, added_token_json};
use crate::text::TextTokenizer;

/// A refusal: which spec field is wrong and why (the job maps it to exit 2).
#[derive(Debug)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// What the expansion did, for `training_summary.json`.
#[derive(Debug, Clone, Default)]
pub struct Expansion {
    /// `(id, token)` in id order.
    pub added: Vec<(i64, String)>,
    /// Tokens that were already one token of the base vocabulary.
    pub skipped: Vec<String>,
    pub vocab_size_before: i64,
    pub vocab_size: i64,
}

impl Expansion {
    pub fn summary_json(&self) -> Value {
        json!({
            "added_tokens": self.added.iter().map(|(id, t)| json!({"id": id, "token": t})).collect::<Vec<_>>(),
            "skipped_tokens": self.skipped,
            "vocab_size_before": self.vocab_size_before,
            "vocab_size": self.vocab_size,
        })
    }
}

/// The candidate tokens: first the extra tokens of `tokenizer_file` (in its id order, so a file
/// that is the base tokenizer plus added tokens keeps its ids), then `addTokens`.
pub fn candidate_tokens(
    vocab: &Vocabulary,
    tokenizer_file: Option<&Path>,
    base: &TextTokenizer,
) -> Result<Vec<String>, FieldError> {
    let mut out = Vec::new();
    if let Some(path) = tokenizer_file {
        const FIELD: &str = "spec.vocabulary.tokenizer.uri";
        let file =
            TextTokenizer::from_json_file(path).map_err(|e| field_err(FIELD, e.to_string()))?;
        let known = base.vocab();
        let added: HashSet<u32> = file.added_tokens().into_iter().map(|(id, _)| id).collect();
        let mut extra: Vec<(u32, String)> = file
            .vocab()
            .into_iter()
            .filter(|(t, _)| !known.contains_key(t))
            .map(|(t, id)| (id, t))
            .collect();
        extra.sort_unstable();
        for (id, raw) in extra {
            // A model-vocabulary entry is stored in the model's alphabet (byte-level `Ġ…`, `▁…`);
            // the text it stands for is what gets added. Added tokens are stored as text already.
            let text = if added.contains(&id) {
                raw.clone()
            } else {
                file.decode(&[i64::from(id)], false)
                    .map_err(|e| field_err(FIELD, e.to_string()))?
            };
            if text.trim().is_empty() || text.contains('\u{FFFD}') {
                eprintln!(
                    "warning: spec.vocabulary.tokenizer: token {id} `{raw}` is not whole text (a byte fragment or whitespace); skipped"
                );
                continue;
            }
            out.push(text);
        }
        if out.is_empty() {
            eprintln!(
                "warning: {FIELD}: {} has no tokens the base vocabulary lacks",
                path.display()
            );
        }
    }
    for (i, t) in vocab.add_tokens.iter().enumerate() {
        if t.trim().is_empty() {
            return Err(field_err(
                &format!("spec.vocabulary.addTokens[{i}]"),
                "an added token must not be empty or whitespace",
            ));
        }
        out.push(t.clone());
    }
    Ok(out)
}

/// `(added (id, token), skipped tokens)`.
type AddResult = (Vec<(i64, String)>, Vec<String>);

/// Adds `tokens` to `tok` (skipping, with a warning, duplicates and tokens that already encode to
/// one id); returns `(added (id, token), skipped)`.
pub fn add_to_tokenizer(
    tok: &mut TextTokenizer,
    tokens: &[String],
) -> Result<AddResult, FieldError> {
    let mut added = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let err = |e: crate::error::Error| field_err("spec.vocabulary", e.to_string());
        // One id that decodes back to the text (not an unknown-token id).
        let existing = match tok.token_to_id(t) {
            Some(id) => Some(id),
            None => match tok.encode(t, false).map_err(err)?.as_slice() {
                [id] if tok.decode(&[*id], false).map_err(err)?.trim() == t.trim() => Some(*id),
                _ => None,
            },
        };
        if let Some(id) = existing {
            eprintln!("warning: spec.vocabulary: `{t}` already is one token (id {id}); skipped");
            skipped.push(t.clone());
            continue;
        }
        let id = tok
            .add_token(t)
            .map_err(|e| field_err("spec.vocabulary", e.to_string()))?;
        added.push((id, t.clone()));
    }
    added.sort_unstable();
    Ok((added, skipped))
}

/// Sets the rows `ids` of `w` to the mean of its first `old` rows (rows past the checkpoint's end
/// already are; this also covers ids inside a padded matrix, e.g. Qwen2's unused rows).
fn mean_init_rows(w: &Tensor, ids: &Tensor, old: i64) {
    let _g = tch::no_grad_guard();
    let h = w.size()[1];
    let mean = w
        .narrow(0, 0, old)
        .to_kind(Kind::Float)
        .mean_dim(0, true, Kind::Float)
        .to_kind(w.kind());
    let mut w = w.shallow_clone();
    let _ = w.index_copy_(0, ids, &mean.expand([ids.size()[0], h], false));
}

/// The tokenizer files to write with the model: `tokenizer.json` of `tok`, the source's
/// `tokenizer_config.json` with `added_tokens_decoder` entries for the new tokens (a minimal one
/// for a GGUF source, with its chat template), and the source's `special_tokens_map.json` /
/// `chat_template.jinja` when present.
fn tokenizer_files(
    tok: &TextTokenizer,
    added: &[(i64, String)],
    source: &Path,
) -> crate::error::Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![("tokenizer.json".to_string(), tok.to_json()?.into_bytes())];
    let mut config = if source.is_dir() {
        crate::text::tokenizer::read_tokenizer_config(source)?
    } else {
        None
    };
    if config.is_none() {
        let mut c = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
        for (key, t) in [
            ("bos_token", &tok.bos_token),
            ("eos_token", &tok.eos_token),
            ("unk_token", &tok.unk_token),
            ("pad_token", &tok.pad_token),
        ] {
            c[key] = t.as_ref().map_or(Value::Null, |t| json!(t));
        }
        if source.extension().is_some_and(|e| e == "gguf") {
            let g = crate::load::gguf::GgufFile::open(source)?;
            if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
                c["chat_template"] = json!(t);
            }
        }
        config = Some(c);
    }
    let mut config = config.unwrap_or_default();
    if !config["added_tokens_decoder"].is_object() {
        config["added_tokens_decoder"] = json!({});
    }
    for (id, t) in added {
        config["added_tokens_decoder"][id.to_string()] = added_token_json(t);
    }
    files.push((
        "tokenizer_config.json".into(),
        (serde_json::to_string_pretty(&config).expect("JSON serializes") + "\n").into_bytes(),
    ));
    if source.is_dir() {
        for f in ["special_tokens_map.json", "chat_template.jinja"] {
            let p = source.join(f);
            if p.exists() {
                files.push((
                    f.to_string(),
                    std::fs::read(&p).map_err(|e| crate::error::Error::io(&p, e))?,
                ));
            }
        }
    }
    Ok(files)
}

/// Applies `spec.vocabulary` to the loaded tokenizer and model (before any data is encoded).
/// `tokenizer_file` is the resolved `spec.vocabulary.tokenizer.uri`; `lora` makes only the new
/// rows trainable (PEFT trainable tokens); `source` is the base model path (its tokenizer files).
pub fn expand(
    vocab: &Vocabulary,
    tokenizer_file: Option<&Path>,
    lora: bool,
    loaded: &mut LoadedModel,
    source: &Path,
) -> Result<Expansion, FieldError> {
    if vocab.add_tokens.is_empty() && tokenizer_file.is_none() {
        return Err(field_err(
            "spec.vocabulary",
            "vocabulary needs addTokens or a tokenizer to extend from",
        ));
    }
    let tokens = candidate_tokens(vocab, tokenizer_file, &loaded.tokenizer)?;
    let (added, skipped) = add_to_tokenizer(&mut loaded.tokenizer, &tokens)?;
    let model = &mut loaded.model;
    let before = model.config.vocab_size;
    let mut exp = Expansion {
        skipped,
        vocab_size_before: before,
        vocab_size: before,
        ..Default::default()
    };
    if added.is_empty() {
        eprintln!("warning: spec.vocabulary: no token added; the vocabulary is unchanged");
        return Ok(exp);
    }
    let ids: Vec<i64> = added.iter().map(|(id, _)| *id).collect();
    let needed = (loaded.tokenizer.vocab_size() as i64).max(ids.iter().max().map_or(0, |m| m + 1));
    model.resize_vocab(needed);
    let index = Tensor::from_slice(&ids).to_device(model.device);
    mean_init_rows(&model.embed_tokens, &index, before);
    if let Some(head) = &model.lm_head {
        mean_init_rows(&head.weight, &index, before);
    }
    if lora {
        model.add_trainable_tokens(&ids, None);
    }
    let files = tokenizer_files(&loaded.tokenizer, &added, source)
        .map_err(|e| field_err("spec.vocabulary", e.to_string()))?;
    model.added_vocab = Some(AddedVocab {
        tokens: added.clone(),
        files,
    });
    exp.vocab_size = model.config.vocab_size;
    eprintln!(
        "vocabulary: {} tokens added (ids {}..={}), vocab {} → {}{}",
        added.len(),
        ids[0],
        ids[ids.len() - 1],
        before,
        exp.vocab_size,
        if lora {
            "; their embedding rows are trained (PEFT trainable tokens)"
        } else {
            ""
        }
    );
    exp.added = added;
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer: `hello`, `world`, `[UNK]`, whitespace pre-tokenizer.
    fn tiny_tokenizer(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
        let mut vocab = json!({"[UNK]": 0, "hello": 1, "world": 2});
        for (i, t) in extra.iter().enumerate() {
            vocab[*t] = json!(3 + i);
        }
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        });
        let path = dir.join(format!("tok{}.json", extra.len()));
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    }

    fn spec(tokens: &[&str]) -> Vocabulary {
        Vocabulary {
            add_tokens: tokens.iter().map(|s| s.to_string()).collect(),
            tokenizer: None,
        }
    }

    #[test]
    fn add_tokens_encode_to_single_ids_and_existing_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut tok = TextTokenizer::from_json_file(&tiny_tokenizer(dir.path(), &[])).unwrap();
        let cands =
            candidate_tokens(&spec(&["ŋgalaŋ", "hello", "tɔkɔrɔ", "ŋgalaŋ"]), None, &tok).unwrap();
        let (added, skipped) = add_to_tokenizer(&mut tok, &cands).unwrap();
        assert_eq!(
            added,
            [(3, "ŋgalaŋ".to_string()), (4, "tɔkɔrɔ".to_string())]
        );
        assert_eq!(skipped, ["hello"]);
        assert_eq!(tok.encode("hello ŋgalaŋ tɔkɔrɔ", false).unwrap(), [1, 3, 4]);
    }

    #[test]
    fn tokens_come_from_a_tokenizer_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let base = TextTokenizer::from_json_file(&tiny_tokenizer(dir.path(), &[])).unwrap();
        let file = tiny_tokenizer(dir.path(), &["mbɛlɛ", "world"]);
        let v = Vocabulary {
            add_tokens: vec!["ŋgalaŋ".into()],
            tokenizer: None,
        };
        let cands = candidate_tokens(&v, Some(&file), &base).unwrap();
        // `world` is known; the file's extra tokens come first, in its id order.
        assert_eq!(cands, ["mbɛlɛ", "ŋgalaŋ"]);
    }

    #[test]
    fn bad_input_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = TextTokenizer::from_json_file(&tiny_tokenizer(dir.path(), &[])).unwrap();
        let e = candidate_tokens(&spec(&["ok", " "]), None, &base).unwrap_err();
        assert_eq!(e.field, "spec.vocabulary.addTokens[1]");
        let junk = dir.path().join("junk.json");
        std::fs::write(&junk, "{not a tokenizer").unwrap();
        let e = candidate_tokens(&spec(&[]), Some(&junk), &base).unwrap_err();
        assert_eq!(e.field, "spec.vocabulary.tokenizer.uri");
        assert!(e.message.contains("junk.json"), "{}", e.message);
    }

    #[test]
    fn mean_init_covers_rows_inside_the_matrix() {
        let w = Tensor::from_slice(&[1.0f32, 1.0, 3.0, 5.0, 9.0, 9.0]).view([3, 2]);
        mean_init_rows(&w, &Tensor::from_slice(&[2i64]), 2);
        let v: Vec<f32> = w.flatten(0, -1).try_into().unwrap();
        assert_eq!(v, [1.0, 1.0, 3.0, 5.0, 2.0, 3.0]);
    }
}
