//! Hugging Face chat templates rendered with minijinja, configured like transformers'
//! `utils/chat_template_utils.py`: `trim_blocks` and `lstrip_blocks` on, loop controls, a
//! non-escaping `tojson`, `raise_exception` and `strftime_now` globals, and Python string methods
//! (`.strip()`, `.startswith()`...) through minijinja-contrib's pycompat layer. Any model's stock
//! template therefore renders byte-identically to `apply_chat_template`.

use std::ops::Range;

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value};

use crate::error::{Error, Result};

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

/// transformers' `{% generation %}` block (assistant masks) has no minijinja equivalent; the tags
/// only mark text, so they are removed and the content kept.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        // The closing `%}` is searched after the opening `{%`: in `{%}` they share the `%`.
        let Some(len) = rest[start + 2..].find("%}") else {
            break;
        };
        let end = start + 2 + len;
        let inner =
            rest[start + 2..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[start..end + 2]);
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `json.dumps` layout. Known gap: objects arrive as `serde_json::Value`, whose maps are
/// key-sorted (the workspace's serde_json has no `preserve_order`), so a dict is dumped in sorted
/// key order where Python keeps insertion order. Stock templates only `tojson` tool schemas and
/// tool-call arguments, which this issue does not cover yet.
///
/// Python's `json.dumps` layout: `", "`/`": "` separators without indent, `","` and newlines with.
fn py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use serde_json::Value as J;
    if out.len() > MAX_TOJSON_BYTES {
        return Err(template_limit(format!(
            "tojson output exceeds {MAX_TOJSON_BYTES} bytes"
        )));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                py_json(x, indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            let mut keys: Vec<&String> = o.keys().collect();
            if sort_keys {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_json(&o[k], indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
    Ok(())
}

/// Work one render may do: about one unit per VM instruction or per 64 bytes the template creates
/// (minijinja's fuel), so this bounds both time and memory (~64 MB). Stock templates spend a few
/// dozen units per message.
const FUEL: u64 = 1_000_000;
/// Nesting `tojson` walks: real tool schemas are a few levels deep; serialisation recurses.
const MAX_TOJSON_DEPTH: usize = 64;
/// `tojson(indent=…)`: Python accepts any width, but a huge one is only a way to allocate.
const MAX_TOJSON_INDENT: usize = 16;
const MAX_TOJSON_BYTES: usize = 16 << 20;

fn template_limit(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message)
}

/// Depth of a template value, walked with an explicit stack (a deep value must not overflow ours).
fn depth_exceeds(v: &Value, max: usize) -> bool {
    let mut stack = vec![(v.clone(), 1usize)];
    while let Some((v, depth)) = stack.pop() {
        if depth > max {
            return true;
        }
        let children: Vec<Value> = match v.kind() {
            minijinja::value::ValueKind::Map => v
                .try_iter()
                .map(|keys| keys.filter_map(|k| v.get_item(&k).ok()).collect())
                .unwrap_or_default(),
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
                v.try_iter().map(Iterator::collect).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        stack.extend(children.into_iter().map(|c| (c, depth + 1)));
    }
    false
}

fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_TOJSON_INDENT) {
        return Err(template_limit(format!(
            "tojson indent above {MAX_TOJSON_INDENT}"
        )));
    }
    if depth_exceeds(&v, MAX_TOJSON_DEPTH) {
        return Err(template_limit(format!(
            "tojson value nested deeper than {MAX_TOJSON_DEPTH}"
        )));
    }
    let json = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(out)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `strftime_now(format)` in UTC for the directives chat templates use.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let (y, m, d) = civil(days);
    let sod = secs.rem_euclid(86_400);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[days.rem_euclid(7) as usize]),
            Some('a') => out.push_str(&DAYS[days.rem_euclid(7) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles `source`; special tokens become the template variables of the same names.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        unk_token: Option<String>,
        pad_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        // Printing a value recurses through it: refuse one too deep for our stack.
        env.set_formatter(|out, state, value| {
            if depth_exceeds(value, MAX_TOJSON_DEPTH) {
                return Err(template_limit(format!(
                    "printed value nested deeper than {MAX_TOJSON_DEPTH}"
                )));
            }
            minijinja::escape_formatter(out, state, value)
        });
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| Error::Template(format!("cannot parse: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            unk_token,
            pad_token,
        })
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`) like `apply_chat_template(...,
    /// tokenize=False)`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            unk_token => self.unk_token.clone(),
            pad_token => self.pad_token.clone(),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        tmpl.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => Error::Template(format!(
                "rendering exceeded its budget ({FUEL} steps, about {} MB): the template loops \
                 or builds values without bound",
                (FUEL * 64) >> 20
            )),
            _ => Error::Template(format!("{e:#}")),
        })
    }

    /// Renders the whole conversation and returns, with it, the byte ranges of each assistant turn.
    ///
    /// Definition (works for stock templates without `{% generation %}` tags): for the assistant
    /// message at index `i`, `P` = render(messages[..i], add_generation_prompt=true) and
    /// `S` = render(messages[..=i], add_generation_prompt=false). `S` must start with `P`; the span
    /// is `S[len(P)..]` — the reply plus whatever the template appends to close the turn (e.g.
    /// `<|im_end|>\n`), so the model also learns to stop. The final text is render(messages, false).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[serde_json::Value],
    ) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(&serde_json::Value::Array(messages.to_vec()), false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(serde_json::Value::as_str) != Some("assistant") {
                continue;
            }
            let prefix = self.render(&serde_json::Value::Array(messages[..i].to_vec()), true)?;
            let upto = self.render(&serde_json::Value::Array(messages[..=i].to_vec()), false)?;
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(Error::Template(format!(
                    "cannot locate assistant turn {i}: rendering a prefix of the conversation does not \
                     yield a prefix of the full rendering (the template rewrites earlier turns)"
                )));
            }
            spans.push(prefix.len()..upto.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None, None, None).unwrap();
        let out = t
            .render(&json!([{"role": "user", "content": "hi"}]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn assistant_spans_cover_reply_and_turn_end() {
        let t = ChatTemplate::new(CHATML, None, None, None, None).unwrap();
        let msgs = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "yo"}),
        ];
        let (full, spans) = t.render_with_assistant_spans(&msgs).unwrap();
        assert_eq!(&full[spans[0].clone()], "yo<|im_end|>\n");
    }

    #[test]
    fn raise_exception_and_pycompat_methods() {
        let t = ChatTemplate::new(
            "{% if messages[0].content.strip().startswith('x') %}{{ raise_exception('no x') }}{% endif %}ok",
            None, None, None, None,
        )
        .unwrap();
        assert_eq!(
            t.render(&json!([{"role": "user", "content": " a"}]), false)
                .unwrap(),
            "ok"
        );
        let err = t
            .render(&json!([{"role": "user", "content": " x"}]), false)
            .unwrap_err();
        assert!(err.to_string().contains("no x"));
    }

    #[test]
    fn tojson_matches_python_layout() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}", None, None, None, None).unwrap();
        assert_eq!(
            t.render(&json!([{"content": "<a>", "role": "user"}]), false)
                .unwrap(),
            r#"{"content": "<a>", "role": "user"}"#
        );
    }

    #[test]
    fn overlapping_tag_delimiters_do_not_panic() {
        // Found by the chat_template fuzz target: `{%}` made the tag scanner slice backwards.
        let found = "{% for message in messages %}{{'<|im_start|>' + message['rol% endfor %{%} if add_generation_1prompt %}";
        assert!(ChatTemplate::new(found, None, None, None, None).is_err());
        assert_eq!(strip_generation_tags("a{%}b"), "a{%}b");
        assert_eq!(
            strip_generation_tags("{%%}{% generation %}x{%- endgeneration -%}"),
            "{%%}x"
        );
    }

    #[test]
    fn generation_tags_are_removed() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c"),
            "abc"
        );
    }
}
