//! The tokenizer: Hugging Face `tokenizer.json` for model directories, and for GGUF files a
//! byte-level BPE rebuilt from the `tokenizer.ggml.*` vocabulary and merges — the same
//! `tokenizer.json` structure transformers' `integrations/gguf/gguf_tokenizer_mapping.py` builds,
//! except that the text split follows llama.cpp for every `tokenizer.ggml.pre` we rebuild
//! ([`PreSplit`]): transformers 5.23 knows no `smollm` (digits one by one) and splits SmolLM2's
//! numbers like GPT-2, unlike SmolLM2's own `tokenizer.json` and llama.cpp.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result, contain_panic};
use crate::limits::{MAX_SIDE_FILE, MAX_TOKENIZER_FILE, read_text};
use crate::load::gguf::{GgufFile, MetaValue};
use crate::text::pre_tokenizer::PreSplit;

/// Byte range `[start, end)` of a token in the encoded text.
pub type Offsets = (usize, usize);

/// A tokenizer plus the special-token strings chat templates and generation need.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: either a string or an `AddedToken` object.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// `tokenizer.json` and (optional) `tokenizer_config.json` of a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let text = read_text(&path, MAX_TOKENIZER_FILE, "tokenizer.json")?;
        let inner = parse_tokenizer(&path, text.as_bytes(), "invalid tokenizer")?;
        let config = read_tokenizer_config(dir)?;
        let get = |k: &str| token_string(config.as_ref().and_then(|c| c.get(k)));
        Ok(TextTokenizer {
            inner,
            bos_token: get("bos_token"),
            eos_token: get("eos_token"),
            unk_token: get("unk_token"),
            pad_token: get("pad_token"),
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes (`tokenizer.ggml.model == "gpt2"`, byte-level BPE).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = &gguf.path;
        let model = gguf
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::format(path, "no tokenizer.ggml.model in GGUF metadata"))?;
        if model != "gpt2" {
            return Err(Error::unsupported(
                path,
                format!("GGUF tokenizer `{model}` (only byte-level BPE `gpt2` is rebuilt so far)"),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            gguf.get(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| Error::format(path, format!("no `{key}` array in GGUF metadata")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::format(path, format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = gguf
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default();
        // How llama.cpp splits text for this file. A name outside the ones we rebuild keeps GPT-2's
        // split (what transformers' GGUF loader does for every name it lacks), with a warning:
        // llama.cpp itself would refuse or split differently.
        let pre_name = gguf.get("tokenizer.ggml.pre").and_then(MetaValue::as_str);
        let pre = pre_name.and_then(PreSplit::of_llama_cpp).unwrap_or_else(|| {
            eprintln!(
                "warning: {}: tokenizer.ggml.pre {:?} is not a llama.cpp pre-tokenizer rebuilt here; \
                 splitting text like GPT-2",
                path.display(),
                pre_name.unwrap_or("(absent)")
            );
            PreSplit::Gpt2
        });
        let special = |key: &str| {
            gguf.get(key)
                .and_then(MetaValue::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let bos_token = special("tokenizer.ggml.bos_token_id");
        let add_bos = gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(false);
        // A BOS the post-processor prepends, when the file asks for one (SmolLM2's does not).
        let bos_id = gguf
            .get("tokenizer.ggml.bos_token_id")
            .and_then(MetaValue::as_u64);
        let prepend_bos = match (add_bos, bos_token.as_deref(), bos_id) {
            (true, Some(token), Some(id)) => Some((token, id as usize)),
            _ => None,
        };
        let json = byte_level_json(&tokens, &merges, &types, pre, prepend_bos);
        let inner = parse_tokenizer(
            path,
            json.to_string().as_bytes(),
            "cannot build tokenizer from GGUF vocabulary",
        )?;
        Ok(TextTokenizer {
            inner,
            bos_token,
            eos_token: special("tokenizer.ggml.eos_token_id"),
            unk_token: special("tokenizer.ggml.unknown_token_id"),
            pad_token: special("tokenizer.ggml.padding_token_id"),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// Ids plus each token's byte range in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<i64>, Vec<Offsets>)> {
        let enc = contain_panic(|| self.inner.encode(text, add_special_tokens))
            .map_err(|p| Error::Tokenizer(format!("encoding failed: {p}")))?
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((
            enc.get_ids().iter().map(|&i| i as i64).collect(),
            enc.get_offsets().to_vec(),
        ))
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        contain_panic(|| self.inner.decode(&ids, skip_special_tokens))
            .map_err(|p| Error::Tokenizer(format!("decoding failed: {p}")))?
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The whole tokenizer as a `tokenizer.json` document (what a GGUF vocabulary is rebuilt
    /// into, and what the merge and GGUF exports write or read back).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A bare `tokenizer.json` (no `tokenizer_config.json`: no special-token strings), e.g. the
    /// file `spec.vocabulary.tokenizer` names.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = read_text(path, MAX_TOKENIZER_FILE, "tokenizer.json")?;
        let inner = parse_tokenizer(path, text.as_bytes(), "invalid tokenizer")?;
        Ok(TextTokenizer {
            inner,
            bos_token: None,
            eos_token: None,
            unk_token: None,
            pad_token: None,
        })
    }

    /// Every token string (vocabulary and added tokens) → id.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// The ids that are added tokens (not produced by the model's own vocabulary), with
    /// their content.
    pub fn added_tokens(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        out.sort_unstable();
        out
    }

    /// Adds `token` as a regular (not special) added token, as transformers' `add_tokens` does:
    /// matched in the normalized text before pre-tokenization, so it always encodes to one id.
    /// Returns its id.
    pub fn add_token(&mut self, token: &str) -> Result<i64> {
        self.inner
            .add_tokens([tokenizers::AddedToken::from(token, false)])
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        self.token_to_id(token)
            .ok_or_else(|| Error::Tokenizer(format!("added token `{token}` has no id")))
    }
}

/// Parses a `tokenizer.json` document. The tokenizers crate panics on some malformed documents
/// (an `unwrap` in its decoder deserialisation, found by fuzzing) instead of returning an error;
/// both become an error naming `path`.
fn parse_tokenizer(path: &Path, json: &[u8], what: &str) -> Result<tokenizers::Tokenizer> {
    contain_panic(|| tokenizers::Tokenizer::from_bytes(json))
        .map_err(|p| Error::format(path, format!("{what}: {p}")))?
        .map_err(|e| Error::format(path, format!("{what}: {e}")))
}

/// `tokenizer_config.json` if the directory has one.
pub fn read_tokenizer_config(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(&path, MAX_SIDE_FILE, "tokenizer_config.json")?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))
}

/// GPT-2's reversible byte → printable-character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// The `tokenizer.json` document for a byte-level BPE vocabulary.
fn byte_level_json(
    tokens: &[String],
    merges: &[String],
    types: &[i64],
    pre: PreSplit,
    bos: Option<(&str, usize)>,
) -> Value {
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let key = if spelled(t) {
            t.clone()
        } else {
            t.bytes().map(|b| table[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    // 3 = CONTROL → special; 4 = USER_DEFINED → added but not special. Control tokens spelled outside
    // the byte alphabet are llama.cpp mislabels and skipped, as transformers does.
    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        let special = match ty {
            3 if spelled(t) => true,
            4 => false,
            _ => continue,
        };
        added.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special
        }));
    }
    let pre_tokenizer = pre.tokenizer_json();
    let (single, special_tokens) = match bos {
        Some((b, id)) => (
            json!([{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
            json!({ b: {"id": b, "ids": [id], "tokens": [b]} }),
        ),
        None => (json!([{"Sequence": {"id": "A", "type_id": 0}}]), json!({})),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": special_tokens
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary whose merges join "2024" into one token.
    fn digits_tokenizer(pre: PreSplit) -> tokenizers::Tokenizer {
        let tokens: Vec<String> = ["Ġ", "2", "0", "4", "20", "202", "2024", "Ġ2024"]
            .map(String::from)
            .to_vec();
        let merges: Vec<String> = ["2 0", "20 2", "202 4", "Ġ 2024"]
            .map(String::from)
            .to_vec();
        let json = byte_level_json(&tokens, &merges, &[1; 8], pre, None);
        tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn smollm_splits_digits_one_by_one_like_llama_cpp() {
        // llama.cpp's SMOLLM (and STARCODER, …) split `\p{N}` first: merges never cross digits.
        let pre = PreSplit::of_llama_cpp("smollm").unwrap();
        assert_eq!(pre, PreSplit::DigitsThenGpt2);
        let ids = digits_tokenizer(pre).encode(" 2024", false).unwrap();
        assert_eq!(ids.get_ids(), &[0, 1, 2, 1, 3]);
        // GPT-2's split keeps the number (with its space) whole.
        let ids = digits_tokenizer(PreSplit::Gpt2)
            .encode(" 2024", false)
            .unwrap();
        assert_eq!(ids.get_ids(), &[7]);
    }

    #[test]
    fn pre_name_of_an_unknown_vocabulary_comes_from_its_split() {
        use crate::text::pre_tokenizer::{PreName, derive_llama_cpp_pre};
        let wrap = |inner| TextTokenizer {
            inner,
            bos_token: None,
            eos_token: None,
            unk_token: None,
            pad_token: None,
        };
        // This vocabulary is in no llama.cpp table: the name is that of its split.
        for (split, name) in [
            (PreSplit::DigitsThenGpt2, "smollm"),
            (PreSplit::Gpt2, "gpt-2"),
        ] {
            let got = derive_llama_cpp_pre(&wrap(digits_tokenizer(split))).unwrap();
            assert!(matches!(got, PreName::Structure { .. }), "{got:?}");
            assert_eq!(got.name(), name);
        }
        // A split llama.cpp has no name for is an error, never a guessed `gpt2`.
        let mut other = digits_tokenizer(PreSplit::Gpt2);
        other.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
        let err = derive_llama_cpp_pre(&wrap(other)).unwrap_err();
        assert!(
            err.contains("Whitespace") && err.contains("chkhsh"),
            "{err}"
        );
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }
}
