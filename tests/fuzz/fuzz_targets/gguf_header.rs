//! GGUF: header, metadata, tensor directory, the model config and the tokenizer built from them.
#![no_main]
#[path = "common.rs"]
mod common;

use finetune_trainer::load::gguf::GgufFile;
use finetune_trainer::text::TextTokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::allow_contained_panics();
    let path = common::write("model.gguf", data);
    if let Ok(gguf) = GgufFile::open(&path) {
        let _ = gguf.config();
        if let Ok(tok) = TextTokenizer::from_gguf(&gguf) {
            let _ = tok.encode("Hello 123 world", true);
        }
    }
});
