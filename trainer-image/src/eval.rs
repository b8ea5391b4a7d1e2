//! `eval`: mean next-token loss of a model on a JSONL data set.
//!
//! Definition. Each line becomes one token sequence `x` and a boolean "supervised" flag per token.
//! Token `x[t]` (t ≥ 1) contributes `−log p(x[t] | x[..t])` when flagged; token 0 is never a target.
//! The reported `loss` is the sum over all flagged targets of all lines divided by their number
//! (`tokens`), i.e. a token-weighted mean, and `perplexity = exp(loss)`. Lines are evaluated one at a
//! time (no padding), truncated to `max_length` tokens.
//!
//! Formats:
//! * `text` — `{"text": s}`: `s` tokenized with the tokenizer's special tokens (e.g. BOS if it adds
//!   one); every token is flagged.
//! * `instruction` — `{"instruction": i, "input"?: x, "output": o}`: rendered with the chat template
//!   as `[{user: i}, {assistant: o}]`, where the user turn is `i + "\n\n" + x` when `x` is non-empty;
//!   then as `chat`.
//! * `chat` — `{"messages": [...]}`: rendered with the chat template (no generation prompt) and
//!   tokenized without added special tokens (as `apply_chat_template(tokenize=True)`); a token is
//!   flagged when its first byte lies inside an assistant span as defined by
//!   [`ChatTemplate::render_with_assistant_spans`] (the reply plus the template's end-of-turn text).
//!
//! Lines are read and validated by the training data loader ([`crate::data::format`]), so `eval`
//! rejects exactly the lines training rejects (`file:line` in the message, exit code 2).

use std::path::Path;

use serde::Serialize;
use tch::{Kind, Reduction, Tensor};

use crate::data::curate::truncate;
use crate::data::{Encoder, LoadOptions, Sample, load_samples};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::text::{ChatTemplate, TextTokenizer};

/// The data formats, shared with training ([`crate::data::DataFormat`]); `preference` is rejected.
pub use crate::data::DataFormat;

/// One tokenized line (the training pipeline's [`Sample`]).
pub type Example = Sample;

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    pub examples: usize,
}

/// Reads and tokenizes a JSONL file in `format` with the training pipeline's loader
/// ([`crate::data::load_samples`]) under [`LoadOptions::eval_command`] — the definition above: no
/// eos appended, assistant spans untrimmed — then truncates each line to `max_length` tokens. Every
/// line is kept (no deduplication, no dropping).
pub fn load_examples(
    path: &Path,
    format: DataFormat,
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    max_length: usize,
) -> Result<Vec<Example>> {
    if format == DataFormat::Preference {
        return Err(Error::Usage(
            "eval scores chat, instruction or text data, not preference pairs".into(),
        ));
    }
    let enc = Encoder {
        tokenizer: tok,
        template,
        options: LoadOptions::eval_command(),
    };
    let mut out = load_samples(path, format, &enc)?;
    for ex in &mut out {
        truncate(ex, max_length);
    }
    Ok(out)
}

/// Sum of target losses and number of targets for one example.
pub fn example_loss(model: &CausalLm, ex: &Example) -> (f64, u64) {
    let n = ex.ids.len() as i64;
    if n < 2 {
        return (0.0, 0);
    }
    let targets: Vec<i64> = ex.ids[1..]
        .iter()
        .zip(&ex.supervised[1..])
        .map(|(&id, &s)| if s { id } else { -100 })
        .collect();
    let count = targets.iter().filter(|&&t| t != -100).count() as u64;
    if count == 0 {
        return (0.0, 0);
    }
    let input = Tensor::from_slice(&ex.ids)
        .to_device(model.device)
        .unsqueeze(0);
    let logits = model
        .forward(&input, None, None)
        .squeeze_dim(0)
        .narrow(0, 0, n - 1);
    let targets = Tensor::from_slice(&targets).to_device(model.device);
    let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &targets,
        None,
        Reduction::Sum,
        -100,
        0.0,
    );
    (loss.double_value(&[]), count)
}

pub fn evaluate(model: &CausalLm, examples: &[Example]) -> EvalReport {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut tokens) = (0.0, 0u64);
    for ex in examples {
        let (s, c) = example_loss(model, ex);
        sum += s;
        tokens += c;
    }
    let loss = if tokens > 0 {
        sum / tokens as f64
    } else {
        f64::NAN
    };
    EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        examples: examples.len(),
    }
}
