//! safetensors: the header length, JSON header, dtypes, shapes and data offsets.
#![no_main]
#[path = "common.rs"]
mod common;

use finetune_trainer::load::safetensors::read_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::write("model.safetensors", data);
    let _ = read_header(&path);
});
