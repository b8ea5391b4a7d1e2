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

use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};
use tch::{Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::text::{ChatTemplate, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataFormat {
    Chat,
    Instruction,
    Text,
}

/// One tokenized line.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<i64>,
    pub supervised: Vec<bool>,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    pub examples: usize,
}

fn chat_example(
    messages: &[Value],
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    path: &Path,
    line: usize,
) -> Result<Example> {
    let template = template.ok_or_else(|| Error::Data {
        path: path.to_path_buf(),
        line,
        message: "the model has no chat template; use --format text".into(),
    })?;
    let (text, spans) = template.render_with_assistant_spans(messages)?;
    let (ids, offsets) = tok.encode_with_offsets(&text, false)?;
    let supervised = offsets
        .iter()
        .map(|(start, _)| spans.iter().any(|s| s.contains(start)))
        .collect();
    Ok(Example { ids, supervised })
}

/// Reads and tokenizes a JSONL file in `format`.
pub fn load_examples(
    path: &Path,
    format: DataFormat,
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    max_length: usize,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| Error::Data {
            path: path.to_path_buf(),
            line,
            message: m.to_string(),
        };
        let v: Value = serde_json::from_str(raw).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let str_field = |k: &str| v.get(k).and_then(Value::as_str);
        let mut ex = match format {
            DataFormat::Text => {
                let s = str_field("text").ok_or_else(|| bad("expected {\"text\": string}"))?;
                let ids = tok.encode(s, true)?;
                let supervised = vec![true; ids.len()];
                Example { ids, supervised }
            }
            DataFormat::Instruction => {
                let instruction =
                    str_field("instruction").ok_or_else(|| bad("missing string `instruction`"))?;
                let output = str_field("output").ok_or_else(|| bad("missing string `output`"))?;
                let user = match str_field("input") {
                    Some(x) if !x.is_empty() => format!("{instruction}\n\n{x}"),
                    _ => instruction.to_string(),
                };
                let messages = [
                    json!({"role": "user", "content": user}),
                    json!({"role": "assistant", "content": output}),
                ];
                chat_example(&messages, tok, template, path, line)?
            }
            DataFormat::Chat => {
                let messages = v
                    .get("messages")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("expected {\"messages\": [...]}"))?;
                chat_example(messages, tok, template, path, line)?
            }
        };
        ex.ids.truncate(max_length);
        ex.supervised.truncate(max_length);
        out.push(ex);
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
