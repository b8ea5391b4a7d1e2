//! Text in and out of the model: tokenization and chat-template rendering.

pub mod chat_template;
pub mod pre_tokenizer;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use tokenizer::TextTokenizer;

/// The words of `text` as its runs of letters and digits (any script), in order: what the
/// contamination check compares and what a retention answer key must appear as.
pub fn word_runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}
