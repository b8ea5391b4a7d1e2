//! Chat templates: compiling a template from a model and rendering a fixed conversation with it.
#![no_main]

use finetune_trainer::text::ChatTemplate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()), None, None) else {
        return;
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}
    ]);
    let _ = t.render(&messages, true);
    if let Some(list) = messages.as_array() {
        let _ = t.render_with_assistant_spans(list);
    }
});
