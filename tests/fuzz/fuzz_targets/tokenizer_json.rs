//! tokenizer.json (+ a fixed tokenizer_config.json): loading, then encoding and decoding text.
#![no_main]
#[path = "common.rs"]
mod common;

use finetune_trainer::text::TextTokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::allow_contained_panics();
    common::write("tokenizer.json", data);
    if let Ok(tok) = TextTokenizer::from_hf_dir(common::scratch())
        && let Ok(ids) = tok.encode("Hello 123  world\n\tsmile", true)
    {
        let _ = tok.decode(&ids, false);
    }
});
