//! JSONL formats: validation (errors name `file:line`) and tokenization into [`Sample`]s.
//!
//! Which tokens are supervised:
//! * `chat` / `instruction` — the conversation is rendered with the model's own chat template and
//!   tokenized without added special tokens (as `apply_chat_template(tokenize=True)`). A token is
//!   supervised when its first byte lies in an assistant span of
//!   [`ChatTemplate::render_with_assistant_spans`] — found by rendering prefixes, so stock templates
//!   without `{% generation %}` tags work. The span is the reply plus what the template appends to
//!   close the turn (ChatML: `<|im_end|>\n`); with [`LoadOptions::trim_turn_whitespace`] (training)
//!   trailing whitespace is cut from the span, so ChatML supervises exactly the reply and
//!   `<|im_end|>`. If the template closes no turn (the span ends with the reply itself) and
//!   [`LoadOptions::append_eos`] is set, the tokenizer's eos token is inserted after the last reply,
//!   supervised, so the model learns to stop. `assistant_only_loss = false` supervises every token.
//! * `text` — `{"text": s}` tokenized with the tokenizer's special tokens (e.g. a BOS); every token
//!   is supervised; with `append_eos` the eos token is appended.
//! * `preference` — `{"prompt": s | "messages": [...], "chosen": r, "rejected": r}` where a reply `r`
//!   is a string or `[{"role": "assistant", "content": s}]`. Each side becomes prompt + reply rendered
//!   like `chat`, with only the reply (and its end of turn) supervised.
//!
//! Token 0 of a sample is never a target (nothing predicts it), so its `supervised` flag is always
//! false; every other flag means "contributes to the loss".

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Origin, Sample};
use crate::error::{Error, Result};
use crate::limits::{Lines, MAX_DATA_LINE};
use crate::text::{ChatTemplate, TextTokenizer};

/// The line format of a data set (the manifest's `spec.dataset.format`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Chat,
    Instruction,
    Text,
    Preference,
}

/// `spec.dataset.format` of a FinetuneJob: the same four layouts (this copy also derives
/// `clap::ValueEnum` for the CLI, which the API crate does not depend on).
impl From<finetune_crds::data::DataFormat> for DataFormat {
    fn from(f: finetune_crds::data::DataFormat) -> Self {
        match f {
            finetune_crds::data::DataFormat::Chat => DataFormat::Chat,
            finetune_crds::data::DataFormat::Instruction => DataFormat::Instruction,
            finetune_crds::data::DataFormat::Text => DataFormat::Text,
            finetune_crds::data::DataFormat::Preference => DataFormat::Preference,
        }
    }
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Chat => "chat",
            DataFormat::Instruction => "instruction",
            DataFormat::Text => "text",
            DataFormat::Preference => "preference",
        }
    }

    /// The format a JSON line looks like, from its keys (used to explain a mismatch).
    pub fn detect(v: &Value) -> Option<DataFormat> {
        let has = |k: &str| v.get(k).is_some();
        if has("chosen") || has("rejected") {
            Some(DataFormat::Preference)
        } else if has("messages") {
            Some(DataFormat::Chat)
        } else if has("instruction") || has("output") {
            Some(DataFormat::Instruction)
        } else if has("text") {
            Some(DataFormat::Text)
        } else {
            None
        }
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "chat" => DataFormat::Chat,
            "instruction" => DataFormat::Instruction,
            "text" => DataFormat::Text,
            "preference" => DataFormat::Preference,
            other => {
                return Err(Error::Usage(format!(
                    "unknown data format `{other}`: expected chat, instruction, text or preference"
                )));
            }
        })
    }
}

/// How lines become samples. [`LoadOptions::sft`] for training, [`LoadOptions::eval_command`] for
/// the `eval` command (whose loss definition predates training and is pinned by parity tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadOptions {
    /// Supervise only assistant turns (chat/instruction); false supervises every token.
    pub assistant_only_loss: bool,
    /// `text`: append the eos token; chat: insert it after the last reply when the template closes
    /// no turn.
    pub append_eos: bool,
    /// Cut trailing whitespace (ChatML's `\n` after `<|im_end|>`) from assistant spans.
    pub trim_turn_whitespace: bool,
}

impl LoadOptions {
    pub fn sft() -> Self {
        LoadOptions {
            assistant_only_loss: true,
            append_eos: true,
            trim_turn_whitespace: true,
        }
    }

    /// Exactly the `eval` command's documented definition (see [`crate::eval`]).
    pub fn eval_command() -> Self {
        LoadOptions {
            assistant_only_loss: true,
            append_eos: false,
            trim_turn_whitespace: false,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::sft()
    }
}

/// A preference pair for DPO: both sides are prompt + reply, only the reply supervised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// The shared prompt tokens (the prefix of both `chosen.ids` and `rejected.ids`).
    pub prompt: Vec<i64>,
    pub chosen: Sample,
    pub rejected: Sample,
    pub origin: Origin,
}

/// Tokenizer, template and options: turns validated JSON into samples.
#[derive(Clone, Copy)]
pub struct Encoder<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub options: LoadOptions,
}

pub(crate) fn data_error(origin: &Origin, message: impl Into<String>) -> Error {
    Error::Data {
        path: origin.path.to_path_buf(),
        line: origin.line,
        message: message.into(),
    }
}

/// The non-blank lines of a JSONL file, parsed, with their 1-based line numbers. Lines are streamed
/// and capped at [`MAX_DATA_LINE`] bytes, so one huge line cannot take gigabytes of parsed JSON.
pub fn read_jsonl(path: &Path) -> Result<Vec<(Origin, Value)>> {
    let file: Arc<Path> = Arc::from(path);
    let mut out = Vec::new();
    for item in Lines::open(path, MAX_DATA_LINE)? {
        let (line, raw) = item?;
        if raw.trim().is_empty() {
            continue;
        }
        let origin = Origin {
            path: file.clone(),
            line,
        };
        let v: Value = serde_json::from_str(&raw)
            .map_err(|e| data_error(&origin, format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(data_error(&origin, "expected a JSON object"));
        }
        out.push((origin, v));
    }
    if out.is_empty() {
        return Err(Error::format(path, "empty data file: no JSON lines"));
    }
    Ok(out)
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Messages in one conversation. Each assistant turn costs two renders of the conversation up to
/// it (to locate its span), so the work grows with the square of the length; real multi-turn
/// samples have tens of messages.
pub const MAX_MESSAGES: usize = 512;

fn mismatch(origin: &Origin, v: &Value, format: DataFormat, expected: &str) -> Error {
    let hint = match DataFormat::detect(v) {
        Some(f) if f != format => format!(" (this line looks like {f} data)"),
        _ => String::new(),
    };
    data_error(
        origin,
        format!("format {format}: expected {expected}{hint}"),
    )
}

fn string_field<'v>(
    v: &'v Value,
    key: &str,
    origin: &Origin,
    format: DataFormat,
) -> Result<&'v str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(data_error(origin, format!("`{key}` must be a string"))),
        None => Err(mismatch(
            origin,
            v,
            format,
            &format!("a string field `{key}`"),
        )),
    }
}

/// Checks `{role, content}` of every message; `need_assistant` requires at least one assistant turn.
fn validate_messages(messages: &[Value], origin: &Origin, need_assistant: bool) -> Result<()> {
    if messages.is_empty() {
        return Err(data_error(origin, "`messages` is empty"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(data_error(
            origin,
            format!(
                "{} messages in one conversation, more than the limit of {MAX_MESSAGES}",
                messages.len()
            ),
        ));
    }
    let mut assistant = false;
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(_) => {
                return Err(data_error(
                    origin,
                    format!("message {i}: `role` must be a string"),
                ));
            }
            None => return Err(data_error(origin, format!("message {i}: missing `role`"))),
        };
        if !ROLES.contains(&role) {
            return Err(data_error(
                origin,
                format!(
                    "message {i}: unknown role `{role}` (expected system, user, assistant or tool)"
                ),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(c)) => c.as_str(),
            Some(_) => {
                return Err(data_error(
                    origin,
                    format!("message {i}: `content` must be a string"),
                ));
            }
            None => {
                return Err(data_error(
                    origin,
                    format!("message {i}: missing `content`"),
                ));
            }
        };
        if role == "assistant" {
            assistant = true;
            if content.trim().is_empty() {
                return Err(data_error(
                    origin,
                    format!("message {i}: empty assistant turn"),
                ));
            }
        }
    }
    if need_assistant && !assistant {
        return Err(data_error(
            origin,
            "no assistant turn: nothing to learn from this line",
        ));
    }
    Ok(())
}

/// A conversation rendered and tokenized: ids, token byte offsets, assistant spans (trimmed).
struct Rendered {
    ids: Vec<i64>,
    starts: Vec<usize>,
    spans: Vec<Range<usize>>,
    /// Where (byte offset) an eos must be inserted because the template closes no turn.
    eos_at: Option<usize>,
}

impl Encoder<'_> {
    fn eos_id(&self) -> Option<i64> {
        self.tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| self.tokenizer.token_to_id(t))
    }

    fn render(&self, messages: &[Value], origin: &Origin) -> Result<Rendered> {
        let template = self.template.ok_or_else(|| {
            data_error(
                origin,
                "the model has no chat template; use the text format",
            )
        })?;
        let (text, mut spans) = template
            .render_with_assistant_spans(messages)
            .map_err(|e| data_error(origin, e.to_string()))?;
        if self.options.trim_turn_whitespace {
            for s in &mut spans {
                let kept = text[s.clone()].trim_end().len();
                s.end = s.start + kept;
            }
        }
        // The last assistant turn: does the template close it (anything after the reply)?
        let last = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
        let eos_at = match (last, spans.last()) {
            (Some(m), Some(s)) if self.options.append_eos => {
                let reply = m.get("content").and_then(Value::as_str).unwrap_or("");
                let span = text[s.clone()].trim_end();
                (span.ends_with(reply.trim_end())).then_some(s.start + span.len())
            }
            _ => None,
        };
        let (ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&text, false)
            .map_err(|e| data_error(origin, e.to_string()))?;
        Ok(Rendered {
            ids,
            starts: offsets.iter().map(|o| o.0).collect(),
            spans,
            eos_at,
        })
    }

    /// Flags from spans, plus the eos insertion.
    fn finish(&self, r: Rendered, spans: &[Range<usize>], all: bool, origin: &Origin) -> Sample {
        let mut ids = r.ids;
        let mut supervised: Vec<bool> = r
            .starts
            .iter()
            .map(|start| all || spans.iter().any(|s| s.contains(start)))
            .collect();
        if let (Some(at), Some(eos)) = (r.eos_at, self.eos_id()) {
            let pos = r.starts.iter().take_while(|&&s| s < at).count();
            if pos == 0 || ids[pos - 1] != eos {
                ids.insert(pos, eos);
                supervised.insert(pos, true);
            }
        }
        Sample::new(ids, supervised, origin.clone())
    }

    /// A chat conversation (already validated or not).
    pub fn chat(&self, messages: &[Value], origin: &Origin) -> Result<Sample> {
        validate_messages(messages, origin, true)?;
        let r = self.render(messages, origin)?;
        let spans = r.spans.clone();
        Ok(self
            .finish(r, &spans, !self.options.assistant_only_loss, origin)
            .with_text(contents(messages)))
    }

    pub fn text(&self, text: &str, origin: &Origin) -> Result<Sample> {
        if text.is_empty() {
            return Err(data_error(origin, "`text` is empty"));
        }
        let mut ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| data_error(origin, e.to_string()))?;
        if self.options.append_eos
            && let Some(eos) = self.eos_id()
            && ids.last() != Some(&eos)
        {
            ids.push(eos);
        }
        let supervised = vec![true; ids.len()];
        Ok(Sample::new(ids, supervised, origin.clone()).with_text(text))
    }

    /// One line of `format` (not `preference`: see [`Encoder::preference`]).
    pub fn line(&self, v: &Value, format: DataFormat, origin: &Origin) -> Result<Sample> {
        match format {
            DataFormat::Text => self.text(string_field(v, "text", origin, format)?, origin),
            DataFormat::Instruction => {
                let instruction = string_field(v, "instruction", origin, format)?;
                let output = string_field(v, "output", origin, format)?;
                let user = match v.get("input") {
                    None | Some(Value::Null) => instruction.to_string(),
                    Some(Value::String(x)) if x.is_empty() => instruction.to_string(),
                    Some(Value::String(x)) => format!("{instruction}\n\n{x}"),
                    Some(_) => return Err(data_error(origin, "`input` must be a string")),
                };
                if output.trim().is_empty() {
                    return Err(data_error(
                        origin,
                        "`output` is empty (empty assistant turn)",
                    ));
                }
                let messages = [
                    json!({"role": "user", "content": user}),
                    json!({"role": "assistant", "content": output}),
                ];
                self.chat(&messages, origin)
            }
            DataFormat::Chat => match v.get("messages") {
                Some(Value::Array(m)) => self.chat(m, origin),
                Some(_) => Err(data_error(origin, "`messages` must be an array")),
                None => Err(mismatch(origin, v, format, "{\"messages\": [...]}")),
            },
            DataFormat::Preference => Err(data_error(
                origin,
                "preference lines are pairs; load them with load_preference",
            )),
        }
    }

    /// One preference line.
    pub fn preference(&self, v: &Value, origin: &Origin) -> Result<PreferencePair> {
        let format = DataFormat::Preference;
        let prompt: Vec<Value> = match (v.get("prompt"), v.get("messages")) {
            (Some(_), Some(_)) => {
                return Err(data_error(
                    origin,
                    "give either `prompt` or `messages`, not both",
                ));
            }
            (Some(Value::String(p)), None) => {
                if p.trim().is_empty() {
                    return Err(data_error(origin, "`prompt` is empty"));
                }
                vec![json!({"role": "user", "content": p})]
            }
            (Some(Value::Array(m)), None) | (None, Some(Value::Array(m))) => m.clone(),
            (Some(_), None) => return Err(data_error(origin, "`prompt` must be a string")),
            (None, Some(_)) => return Err(data_error(origin, "`messages` must be an array")),
            (None, None) => {
                return Err(mismatch(origin, v, format, "`prompt` or `messages`"));
            }
        };
        validate_messages(&prompt, origin, false)?;
        if prompt
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("assistant")
        {
            return Err(data_error(
                origin,
                "the prompt ends with an assistant turn; chosen/rejected are the reply to it",
            ));
        }
        let reply = |key: &str| -> Result<String> {
            let r = match v.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 => {
                    validate_messages(a, origin, true)?;
                    a[0]["content"].as_str().unwrap_or_default().to_string()
                }
                Some(_) => {
                    return Err(data_error(
                        origin,
                        format!("`{key}` must be a string or [{{\"role\": \"assistant\", ...}}]"),
                    ));
                }
                None => return Err(mismatch(origin, v, format, &format!("a field `{key}`"))),
            };
            if r.trim().is_empty() {
                return Err(data_error(
                    origin,
                    format!("`{key}` is empty (empty assistant turn)"),
                ));
            }
            Ok(r)
        };
        let side = |content: String| -> Result<(Sample, usize)> {
            let mut messages = prompt.clone();
            messages.push(json!({"role": "assistant", "content": content}));
            let r = self.render(&messages, origin)?;
            let span = r
                .spans
                .last()
                .cloned()
                .ok_or_else(|| data_error(origin, "the template rendered no assistant turn"))?;
            let prompt_len = r.starts.iter().take_while(|&&s| s < span.start).count();
            let sample = self
                .finish(r, &[span], false, origin)
                .with_text(contents(&messages));
            Ok((sample, prompt_len))
        };
        let (chosen, n_chosen) = side(reply("chosen")?)?;
        let (rejected, n_rejected) = side(reply("rejected")?)?;
        if chosen.ids == rejected.ids {
            return Err(data_error(
                origin,
                "`chosen` and `rejected` are the same reply: the pair expresses no preference",
            ));
        }
        if n_chosen != n_rejected || chosen.ids[..n_chosen] != rejected.ids[..n_rejected] {
            return Err(data_error(
                origin,
                "chosen and rejected tokenize to different prompts (a token spans the reply boundary)",
            ));
        }
        Ok(PreferencePair {
            prompt: chosen.ids[..n_chosen].to_vec(),
            chosen,
            rejected,
            origin: origin.clone(),
        })
    }
}

/// Reads and tokenizes a JSONL file of `format` (chat, instruction or text); returns the samples
/// in file order and the number of non-blank lines.
pub fn load_samples(path: &Path, format: DataFormat, enc: &Encoder) -> Result<Vec<Sample>> {
    if format == DataFormat::Preference {
        return Err(Error::Usage(
            "preference data holds pairs: use load_preference".into(),
        ));
    }
    read_jsonl(path)?
        .iter()
        .map(|(origin, v)| enc.line(v, format, origin))
        .collect()
}

/// The messages' contents joined by newlines: a conversation's own words without its template.
fn contents(messages: &[Value]) -> String {
    messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and tokenizes a preference JSONL file.
pub fn load_preference(path: &Path, enc: &Encoder) -> Result<Vec<PreferencePair>> {
    read_jsonl(path)?
        .iter()
        .map(|(origin, v)| enc.preference(v, origin))
        .collect()
}
