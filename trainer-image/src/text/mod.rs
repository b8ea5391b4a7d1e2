//! Text in and out of the model: tokenization and chat-template rendering.

pub mod chat_template;
pub mod pre_tokenizer;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use tokenizer::TextTokenizer;
