//! Data sets: JSONL lines read, validated and encoded in each format (chat, instruction, text,
//! preference) with a byte tokenizer and ChatML.
#![no_main]
#[path = "common.rs"]
mod common;

use finetune_trainer::data::testing::{byte_tokenizer, chatml};
use finetune_trainer::data::{DataFormat, Encoder, LoadOptions, read_jsonl};
use finetune_trainer::text::{ChatTemplate, TextTokenizer};
use libfuzzer_sys::fuzz_target;

fn fixtures() -> &'static (TextTokenizer, ChatTemplate) {
    static F: std::sync::OnceLock<(TextTokenizer, ChatTemplate)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = common::scratch().join("tok");
        std::fs::create_dir_all(&dir).expect("tokenizer dir");
        (byte_tokenizer(&dir, "<|im_end|>"), chatml())
    })
}

fuzz_target!(|data: &[u8]| {
    let (tokenizer, template) = fixtures();
    let path = common::write("data.jsonl", data);
    let Ok(lines) = read_jsonl(&path) else {
        return;
    };
    let enc = Encoder {
        tokenizer,
        template: Some(template),
        options: LoadOptions::sft(),
    };
    for (origin, v) in &lines {
        for format in [DataFormat::Chat, DataFormat::Instruction, DataFormat::Text] {
            let _ = enc.line(v, format, origin);
        }
        let _ = enc.preference(v, origin);
    }
});
