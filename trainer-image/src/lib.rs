//! The trainer image's library: a Llama-family causal LM on tch/libtorch, its loaders (Hugging Face
//! safetensors, GGUF), tokenizer and chat templates, and the `generate`/`eval` commands built on them.
//!
//! Layout, one job per module:
//! * [`model`] — config, rotary embeddings, attention, the decoder stack.
//! * [`load`] — safetensors and GGUF readers producing a name → tensor map.
//! * [`text`] — tokenizer (incl. rebuilding one from GGUF metadata) and chat templates.
//! * [`eval`], [`generate`] — the two inference workloads; [`cli`] — argument parsing and dispatch.
//! * [`train`] — the SFT loop (AdamW, schedules, checkpoints, `run JOB.yaml`); [`export`] — PEFT
//!   adapters and full models; [`serve`] — the `/status` and `/metrics` server; [`verify`] — the
//!   `verify-adapter` check of a registered adapter against its base model.
//! * [`launch`] — `launch`: one trainer process per rank (torchrun's job) for data-parallel runs
//!   ([`train::group`]).
//! * [`fetch`] — `hf://` base models downloaded (verified, resumable) into the model cache.
//! * [`report`] — `report.html`, a self-contained picture of a finished run (curves as inline SVG,
//!   before/after tables), written by `report OUTPUT_DIR` and at the end of every run.

pub mod audit;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod init_random;
pub mod launch;
pub mod limits;
pub mod load;
pub mod memory_plan;
pub mod model;
pub mod report;
pub mod serve;
pub mod text;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
