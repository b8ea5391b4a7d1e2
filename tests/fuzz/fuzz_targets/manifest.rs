//! Manifests: YAML parsing, the structural schema and the CEL rules, for both kinds.
#![no_main]

use finetune_crds::{Adapter, FinetuneJob, parse_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_manifest::<FinetuneJob>(text, "job.yaml");
    let _ = parse_manifest::<Adapter>(text, "adapter.yaml");
});
