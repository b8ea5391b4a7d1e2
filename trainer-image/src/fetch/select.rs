//! Which files of a Hub repository a model format needs, so a download skips the rest (other
//! weight formats, ONNX exports, the original checkpoints a repository often carries too).

use finetune_crds::model::ModelFormat;

/// Side files of the Hugging Face layout, taken when present.
const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// What to download: the files and the format they make up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub format: ModelFormat,
    pub files: Vec<String>,
    /// For GGUF, the one weights file; the model is that file rather than the directory.
    pub gguf: Option<String>,
}

/// Picks the files `format` needs from a repository's top-level files. A sharded safetensors
/// model needs its index first (to name the shards), so that case returns the index alone with
/// `format: Safetensors` and [`shards_from_index`] finishes the list.
pub fn select(format: ModelFormat, files: &[String]) -> Result<Selection, String> {
    let top: Vec<&String> = files.iter().filter(|f| !f.contains('/')).collect();
    let has = |name: &str| top.iter().any(|f| f.as_str() == name);
    let ggufs: Vec<&String> = top
        .iter()
        .copied()
        .filter(|f| f.ends_with(".gguf"))
        .collect();
    let hf_layout = has("config.json") && top.iter().any(|f| f.ends_with(".safetensors"));
    let format = match format {
        ModelFormat::Auto if hf_layout => ModelFormat::Safetensors,
        ModelFormat::Auto if !ggufs.is_empty() => ModelFormat::Gguf,
        ModelFormat::Auto => {
            return Err(
                "the repository has neither config.json with safetensors weights nor a .gguf file"
                    .into(),
            );
        }
        other => other,
    };
    match format {
        ModelFormat::Gguf => match ggufs.as_slice() {
            [one] => Ok(Selection {
                format,
                files: vec![one.to_string()],
                gguf: Some(one.to_string()),
            }),
            [] => Err("format: gguf, but the repository has no .gguf file at its top level".into()),
            many => Err(format!(
                "format: gguf, but the repository has {} .gguf files ({}); keep one quantization per repository or use format: safetensors",
                many.len(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        _ => {
            if !has("config.json") {
                return Err("format: safetensors, but the repository has no config.json".into());
            }
            let mut chosen: Vec<String> = HF_SIDE_FILES
                .iter()
                .filter(|f| has(f))
                .map(|f| f.to_string())
                .collect();
            if has(SAFETENSORS_INDEX) {
                chosen.push(SAFETENSORS_INDEX.into());
            } else if has("model.safetensors") {
                chosen.push("model.safetensors".into());
            } else {
                return Err(
                    "format: safetensors, but the repository has neither model.safetensors nor model.safetensors.index.json"
                        .into(),
                );
            }
            Ok(Selection {
                format: ModelFormat::Safetensors,
                files: chosen,
                gguf: None,
            })
        }
    }
}

/// The shard files a `model.safetensors.index.json` names (each once, in order).
pub fn shards_from_index(index_json: &str) -> Result<Vec<String>, String> {
    let index: serde_json::Value =
        serde_json::from_str(index_json).map_err(|e| format!("{SAFETENSORS_INDEX}: {e}"))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{SAFETENSORS_INDEX}: no weight_map object"))?;
    let mut shards: Vec<String> = Vec::new();
    for value in map.values() {
        let shard = value
            .as_str()
            .ok_or_else(|| format!("{SAFETENSORS_INDEX}: a weight_map value is not a file name"))?;
        if shard.contains('/') || shard.contains("..") || !shard.ends_with(".safetensors") {
            return Err(format!(
                "{SAFETENSORS_INDEX}: `{shard}` is not a .safetensors file beside the index"
            ));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn safetensors_takes_the_layout_and_leaves_other_formats() {
        let repo = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "model.Q4_1.gguf",
            "tokenizer.json",
            "tokenizer_config.json",
            "onnx/model.onnx",
            "pytorch_model.bin",
        ]);
        let s = select(ModelFormat::Auto, &repo).unwrap();
        assert_eq!(s.format, ModelFormat::Safetensors);
        assert_eq!(
            s.files,
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors"
            ])
        );
        let g = select(ModelFormat::Gguf, &repo).unwrap();
        assert_eq!(g.files, names(&["model.Q4_1.gguf"]));
        assert_eq!(g.gguf.as_deref(), Some("model.Q4_1.gguf"));
    }

    #[test]
    fn refusals_say_what_is_missing() {
        let two = names(&["a.Q4_0.gguf", "a.Q8_0.gguf"]);
        let e = select(ModelFormat::Auto, &two).unwrap_err();
        assert!(
            e.contains("2 .gguf files (a.Q4_0.gguf, a.Q8_0.gguf)"),
            "{e}"
        );
        let bare = names(&["README.md"]);
        assert!(select(ModelFormat::Auto, &bare).is_err());
        let no_weights = names(&["config.json", "tokenizer.json"]);
        let e = select(ModelFormat::Safetensors, &no_weights).unwrap_err();
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn a_sharded_model_lists_each_shard_once_and_refuses_paths() {
        let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            shards_from_index(index).unwrap(),
            names(&[
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ])
        );
        let bad = r#"{"weight_map":{"a":"../../etc/passwd.safetensors"}}"#;
        assert!(shards_from_index(bad).is_err());
        assert!(shards_from_index("[]").is_err());
    }
}
