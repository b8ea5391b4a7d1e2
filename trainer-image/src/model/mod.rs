//! The Llama-family causal LM: configuration, rotary embeddings, attention, the decoder stack and
//! LoRA adapters, and NF4, int8 and GGUF-block storage for a quantized frozen base.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod ggml;
pub mod int8;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod quantized;
pub mod rope;
pub mod vocab;
pub mod weights;

pub use attention::KvCache;
pub use config::{Architecture, ModelConfig};
pub use llama::CausalLm;
pub use lora::LoraConfig;
