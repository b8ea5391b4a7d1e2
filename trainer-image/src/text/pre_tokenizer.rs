//! llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`): how a byte-level BPE vocabulary splits
//! text before merging, which our GGUF loader must rebuild and our GGUF export must name.
//!
//! llama.cpp refuses a file whose name it does not know (`unknown pre-tokenizer type`), and each
//! name selects a fixed list of split regexes (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`). Its
//! converter (`get_vocab_base_pre`, in `conversion/base.py` of llama.cpp as vendored by
//! llama-cpp-python 0.3.36; `convert_hf_to_gguf.py` in older trees) names a Hugging Face tokenizer
//! by hashing its token ids for a fixed probe text, [`CHKTXT`]: sha256 of Python's `str()` of the
//! id list. [`derive_llama_cpp_pre`] does the same with the entries of that table for the
//! pre-tokenizers [`PreSplit`] can rebuild.

use sha2::{Digest, Sha256};

use super::TextTokenizer;

/// How text is split before byte-level BPE merges, as llama.cpp's BPE tokenizer does per
/// pre-tokenizer type (the regexes in `llm_tokenizer_bpe`, `src/llama-vocab.cpp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreSplit {
    /// GPT-2's regex alone (`LLAMA_VOCAB_PRE_TYPE_GPT2`): Hugging Face `ByteLevel(use_regex=true)`.
    Gpt2,
    /// Every digit on its own (`\p{N}`), then GPT-2's regex (`STARCODER`, `REFACT`, `COMMAND_R`,
    /// `SMOLLM`, `CODESHELL`, `EXAONE`, `MINERVA`): Hugging Face
    /// `Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]`, as in SmolLM2's
    /// own `tokenizer.json`.
    DigitsThenGpt2,
    /// Llama 3's regex (numbers in groups of up to three).
    Llama3,
    /// Qwen2's regex (every digit on its own).
    Qwen2,
}

/// Llama 3's split regex (Hugging Face `tokenizer.json` spelling; llama.cpp's is equivalent).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex.
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreSplit {
    /// The split of a llama.cpp pre-tokenizer name, for the names rebuilt here (llama.cpp's
    /// groups in `llama_vocab::impl::load`); `None` for any other name.
    pub fn of_llama_cpp(pre: &str) -> Option<PreSplit> {
        Some(match pre {
            "gpt-2" => PreSplit::Gpt2,
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => PreSplit::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => PreSplit::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => PreSplit::Qwen2,
            _ => return None,
        })
    }

    /// The `pre_tokenizer` of a `tokenizer.json` that splits this way.
    pub fn tokenizer_json(self) -> serde_json::Value {
        use serde_json::json;
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let regex = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]})
        };
        match self {
            PreSplit::Gpt2 => byte_level(true),
            PreSplit::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true)
            ]}),
            PreSplit::Llama3 => regex(LLAMA3_SPLIT),
            PreSplit::Qwen2 => regex(QWEN2_SPLIT),
        }
    }

    /// The split a `tokenizer.json` `pre_tokenizer` performs, when it is exactly one of ours.
    pub fn of_tokenizer_json(pre: &serde_json::Value) -> Option<PreSplit> {
        [
            PreSplit::Gpt2,
            PreSplit::DigitsThenGpt2,
            PreSplit::Llama3,
            PreSplit::Qwen2,
        ]
        .into_iter()
        .find(|s| same_pre_tokenizer(&s.tokenizer_json(), pre))
    }

    /// The llama.cpp name written for this split when the tokenizer's hash is not in [`CHKHSH`].
    /// `smollm` for the digit split: the same regexes as `starcoder`, and like our decoder it does
    /// not clean up spaces (llama.cpp's `clean_spaces = false`).
    pub fn fallback_name(self) -> &'static str {
        match self {
            PreSplit::Gpt2 => "gpt-2",
            PreSplit::DigitsThenGpt2 => "smollm",
            PreSplit::Llama3 => "llama-bpe",
            PreSplit::Qwen2 => "qwen2",
        }
    }
}

/// Pre-tokenizer JSON equality up to the fields that do not change the split (`trim_offsets`
/// only moves offsets; a missing `use_regex` means true, a missing `invert` false).
fn same_pre_tokenizer(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    let norm = |v: &Value| -> Value {
        let mut v = v.clone();
        fn walk(v: &mut Value) {
            match v {
                Value::Object(o) => {
                    o.remove("trim_offsets");
                    if o.get("type").and_then(Value::as_str) == Some("ByteLevel") {
                        o.entry("use_regex").or_insert(Value::Bool(true));
                    }
                    if o.get("type").and_then(Value::as_str) == Some("Split") {
                        o.entry("invert").or_insert(Value::Bool(false));
                    }
                    o.values_mut().for_each(walk);
                }
                Value::Array(a) => a.iter_mut().for_each(walk),
                _ => {}
            }
        }
        walk(&mut v);
        v
    };
    norm(a) == norm(b)
}

/// llama.cpp's probe text (`chktxt` in `get_vocab_base_pre`), verbatim.
pub const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫\u{fe0f} (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// `chkhsh` → pre-tokenizer name, copied from llama.cpp's `get_vocab_base_pre`
/// (`vendor/llama.cpp/conversion/base.py` in the llama-cpp-python 0.3.36 sdist), keeping only the
/// names [`PreSplit::of_llama_cpp`] rebuilds. Each hash is one model's vocabulary tokenizing
/// [`CHKTXT`] (with special tokens), so it names that tokenizer family, not just its split.
pub const CHKHSH: &[(&str, &str)] = &[
    // sapienzanlp/Minerva-7B-base-v1.0
    (
        "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35",
        "minerva-7b",
    ),
    // tiiuae/Falcon-H1-0.5B-Base
    (
        "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6",
        "falcon-h1",
    ),
    // tiiuae/Falcon-H1-1B-Base
    (
        "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86",
        "falcon-h1",
    ),
    // tiiuae/Falcon-H1-7B-Base
    (
        "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896",
        "falcon-h1",
    ),
    // tiiuae/Falcon-H1-34B-Base
    (
        "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b",
        "falcon-h1",
    ),
    // Qwen/Qwen3-Embedding-0.6B
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ),
    // evilfreelancer/ruGPT3XL
    (
        "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
        "gpt-2",
    ),
    // LiquidAI/LFM2.5-8B-A1B
    (
        "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7",
        "lfm2",
    ),
    // meta-llama/Meta-Llama-3-8B
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    // tiiuae/Falcon3-7B-Base
    (
        "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e",
        "falcon3",
    ),
    // bigcode/starcoder2-3b
    (
        "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34",
        "starcoder",
    ),
    // openai-community/gpt2
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
    // smallcloudai/Refact-1_6-base
    (
        "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff",
        "refact",
    ),
    // CohereForAI/c4ai-command-r-v01
    (
        "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8",
        "command-r",
    ),
    // Qwen/Qwen1.5-7B
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    // databricks/dbrx-base
    (
        "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e",
        "dbrx",
    ),
    // jinaai/jina-embeddings-v5-text-nano
    (
        "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d",
        "jina-v5-nano",
    ),
    // abacusai/Smaug-Llama-3-70B-Instruct
    (
        "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d",
        "smaug-bpe",
    ),
    // WisdomShell/CodeShell-7B
    (
        "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f",
        "codeshell",
    ),
    // HuggingFaceTB/SmolLM-135M
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
    // LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct
    (
        "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae",
        "exaone",
    ),
    // Infinigence/Megrez-3B-Instruct
    (
        "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1",
        "megrez",
    ),
    // deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    (
        "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5",
        "deepseek-r1-qwen",
    ),
    // mistral-community/pixtral-12b
    (
        "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3",
        "pixtral",
    ),
    // K-intelligence/Midm-2.0-Base-Instruct
    (
        "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4",
        "midm-2.0",
    ),
    // LiquidAI/LFM2.5-350M
    (
        "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51",
        "lfm2",
    ),
    // KORMo-Team/KORMo-tokenizer
    (
        "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665",
        "kormo",
    ),
    // codefuse-ai/F2LLM-v2-4B
    (
        "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015",
        "f2llmv2",
    ),
];

/// sha256 (hex) of Python's `str()` of an id list (`"[1, 2, 3]"`), as `get_vocab_base_pre` hashes.
pub fn chkhsh(ids: &[i64]) -> String {
    let text = format!(
        "[{}]",
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How a tokenizer's llama.cpp pre-tokenizer name was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreName {
    /// Its hash of [`CHKTXT`] is in llama.cpp's table ([`CHKHSH`]).
    Hash(&'static str),
    /// Unknown hash, but its `pre_tokenizer` is exactly one llama.cpp has a name for: the split
    /// (what tokenization depends on) is right; only llama.cpp's per-family extras are guessed.
    Structure { name: &'static str, chkhsh: String },
}

impl PreName {
    pub fn name(&self) -> &'static str {
        match self {
            PreName::Hash(n) | PreName::Structure { name: n, .. } => n,
        }
    }
}

/// The llama.cpp pre-tokenizer name of `tok` the way llama.cpp's converter derives it (the hash
/// of its ids for [`CHKTXT`]); else, when the `pre_tokenizer` of its `tokenizer.json` is exactly a
/// split we rebuild, that split's name ([`PreSplit::fallback_name`]). `Err` carries the hash and a
/// description of the pre-tokenizer when neither applies.
pub fn derive_llama_cpp_pre(tok: &TextTokenizer) -> std::result::Result<PreName, String> {
    let ids = tok
        .encode(CHKTXT, true)
        .map_err(|e| format!("cannot tokenize llama.cpp's probe text: {e}"))?;
    let hash = chkhsh(&ids);
    if let Some((_, name)) = CHKHSH.iter().find(|(h, _)| *h == hash) {
        return Ok(PreName::Hash(name));
    }
    let json: serde_json::Value = tok
        .to_json()
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    match PreSplit::of_tokenizer_json(&json["pre_tokenizer"]) {
        Some(split) => Ok(PreName::Structure {
            name: split.fallback_name(),
            chkhsh: hash,
        }),
        None => Err(format!(
            "its pre-tokenizer {} (chkhsh {hash}) is not one llama.cpp names and this exporter rebuilds",
            json["pre_tokenizer"]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probe_text_is_llama_cpps() {
        // sha256 of `chktxt` as UTF-8, computed in Python from llama.cpp's source.
        let h: String = Sha256::digest(CHKTXT.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            h,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
        assert_eq!(CHKTXT.chars().count(), 350);
    }

    #[test]
    fn chkhsh_hashes_pythons_list_repr() {
        // hashlib.sha256(str([1, 22, 333]).encode()).hexdigest()
        assert_eq!(
            chkhsh(&[1, 22, 333]),
            "276d8737d9d5a80805e0731e8d5ae18972a8e3ba721f4988f67151c6e9159068"
        );
    }

    #[test]
    fn every_table_name_is_rebuilt_and_hashes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (h, name) in CHKHSH {
            assert_eq!(h.len(), 64, "{h}");
            assert!(seen.insert(*h), "duplicate {h}");
            assert!(PreSplit::of_llama_cpp(name).is_some(), "{name}");
        }
        let smollm = CHKHSH.iter().find(|(_, n)| *n == "smollm").unwrap();
        assert_eq!(
            smollm.0,
            "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
        );
        // Our old export wrote `gpt2`, which llama.cpp does not know: it is no name of ours.
        assert_eq!(PreSplit::of_llama_cpp("gpt2"), None);
    }

    #[test]
    fn structure_round_trips_and_ignores_offsets() {
        for s in [
            PreSplit::Gpt2,
            PreSplit::DigitsThenGpt2,
            PreSplit::Llama3,
            PreSplit::Qwen2,
        ] {
            assert_eq!(PreSplit::of_tokenizer_json(&s.tokenizer_json()), Some(s));
            assert_eq!(PreSplit::of_llama_cpp(s.fallback_name()), Some(s), "{s:?}");
        }
        // SmolLM2's own tokenizer.json pre_tokenizer (trim_offsets differs from ours: same split).
        let smollm2 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}
        ]});
        assert_eq!(
            PreSplit::of_tokenizer_json(&smollm2),
            Some(PreSplit::DigitsThenGpt2)
        );
        let grouped = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]});
        assert_eq!(PreSplit::of_tokenizer_json(&grouped), None);
        assert_eq!(
            PreSplit::of_tokenizer_json(&json!({"type": "Whitespace"})),
            None
        );
    }
}
