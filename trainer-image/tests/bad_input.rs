//! Bad input must produce an error naming the file (and tensor), and the binary must exit with
//! status 2 without a panic. Each test crafts a tiny broken file in a temp dir.

use std::path::Path;
use std::process::Command;

use finetune_trainer::Error;
use finetune_trainer::load::ModelSource;
use finetune_trainer::load::gguf::{GgmlType, GgufFile, dequantize};
use finetune_trainer::load::safetensors;
use finetune_trainer::model::{CausalLm, ModelConfig};
use tch::{Device, Kind, Tensor};

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 4,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "tie_word_embeddings": true
    })
}

/// A GGUF v3 file with llama metadata and the given `(name, dims, ggml type, data)` tensors.
fn write_gguf(path: &Path, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    let kv: Vec<(&str, u32)> = vec![
        ("llama.embedding_length", 4),
        ("llama.attention.head_count", 2),
        ("llama.feed_forward_length", 8),
        ("llama.block_count", 1),
        ("llama.vocab_size", 8),
    ];
    b.extend((kv.len() as u64 + 1).to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    for (k, v) in kv {
        s(&mut b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn missing_model_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("absent.gguf");
    let err = ModelSource::open(&p).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("absent.gguf"), "{err}");
    let err = ModelSource::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn unknown_architecture_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = ModelSource::open(dir.path()).unwrap().config().unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("GPT2LMHeadModel") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn unsupported_gguf_tensor_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    // 12 = Q4_K: 256-element super-blocks of 144 bytes.
    write_gguf(&p, &[("token_embd.weight", vec![256, 1], 12, vec![0; 144])]);
    let g = GgufFile::open(&p).unwrap();
    let cfg = g.config().unwrap();
    let err = g
        .load_weights(&cfg, Kind::Float, Device::Cpu, None)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("m.gguf") && msg.contains("token_embd.weight") && msg.contains("Q4_K"),
        "{msg}"
    );
}

#[test]
fn truncated_gguf_tensor_data_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    write_gguf(&p, &[("output_norm.weight", vec![4], 0, vec![0; 16])]);
    // Claim more elements than the file holds by rewriting the file shorter.
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 20]).unwrap();
    let g = GgufFile::open(&p).unwrap();
    let err = g
        .load_weights(&g.config().unwrap(), Kind::Float, Device::Cpu, None)
        .unwrap_err();
    assert!(err.to_string().contains("output_norm.weight"), "{err}");
}

#[test]
fn bad_gguf_magic_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
    assert!(
        GgufFile::open(&p)
            .unwrap_err()
            .to_string()
            .contains("bad magic")
    );
    std::fs::write(&p, b"GGUF\x01\0\0\0").unwrap();
    assert!(
        GgufFile::open(&p)
            .unwrap_err()
            .to_string()
            .contains("version 1")
    );
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let wrong = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("model.embed_tokens.weight", &wrong)], &file).unwrap();
    let cfg = ModelConfig::from_hf_value(&dir.path().join("config.json"), &tiny_config()).unwrap();
    let weights = safetensors::load_dir(dir.path(), Kind::Float, Device::Cpu, None).unwrap();
    let err =
        CausalLm::from_weights(cfg, weights, dir.path(), Kind::Float, Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("model.embed_tokens.weight")
            && msg.contains("[3, 4]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let emb = Tensor::zeros([8, 4], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("model.embed_tokens.weight", &emb)], &file).unwrap();
    let cfg = ModelConfig::from_hf_value(&dir.path().join("config.json"), &tiny_config()).unwrap();
    let weights = safetensors::load_dir(dir.path(), Kind::Float, Device::Cpu, None).unwrap();
    let err =
        CausalLm::from_weights(cfg, weights, dir.path(), Kind::Float, Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.input_layernorm.weight"),
        "{err}"
    );
}

#[test]
fn corrupt_safetensors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    // Header length larger than the file.
    std::fs::write(&p, 1_000u64.to_le_bytes()).unwrap();
    let err = safetensors::read_header(&p).unwrap_err();
    assert!(
        err.to_string().contains("model.safetensors") && err.to_string().contains("header length")
    );
    // Invalid JSON.
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend(b"{{{{");
    std::fs::write(&p, &b).unwrap();
    assert!(
        safetensors::read_header(&p)
            .unwrap_err()
            .to_string()
            .contains("invalid JSON")
    );
    // Offsets beyond the file, named by tensor.
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 4]);
    std::fs::write(&p, &b).unwrap();
    let err = safetensors::read_header(&p).unwrap_err();
    assert!(
        err.to_string().contains("tensor `w`") && err.to_string().contains("truncated"),
        "{err}"
    );
    // Offsets that disagree with dtype × shape.
    let header = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header);
    b.extend([0u8; 8]);
    std::fs::write(&p, &b).unwrap();
    assert!(
        safetensors::read_header(&p)
            .unwrap_err()
            .to_string()
            .contains("do not hold")
    );
}

#[test]
fn dequantize_block_layouts() {
    let d = half::f16::from_f32(0.5).to_le_bytes();
    // Q8_0: x = q * d.
    let mut q8 = d.to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let v = dequantize(GgmlType::Q8_0, &q8);
    assert_eq!(v[0], -8.0);
    assert_eq!(v[31], 7.5);
    // Q4_0: low nibbles are elements 0..16, high nibbles 16..32; x = (q - 8) * d.
    let mut q4 = d.to_vec();
    q4.extend([0x1fu8; 16]);
    let v = dequantize(GgmlType::Q4_0, &q4);
    assert_eq!((v[0], v[16]), ((15.0 - 8.0) * 0.5, (1.0 - 8.0) * 0.5));
    // Q4_1: x = q * d + m.
    let mut q41 = d.to_vec();
    q41.extend(half::f16::from_f32(1.0).to_le_bytes());
    q41.extend([0x21u8; 16]);
    let v = dequantize(GgmlType::Q4_1, &q41);
    assert_eq!((v[0], v[16]), (1.5, 2.0));
}

#[test]
fn binary_exits_2_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_finetune-trainer");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0\xff\xff").unwrap();
    for model in [dir.path().join("missing.gguf"), bad] {
        let out = Command::new(bin)
            .args(["--device", "cpu", "generate", "--prompt", "x", "--model"])
            .arg(&model)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(model.file_name().unwrap().to_str().unwrap()),
            "{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}
