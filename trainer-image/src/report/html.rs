//! HTML building blocks: escaping, number formatting, tables, and the page shell with its inline
//! stylesheet. Every string that comes from a file goes through [`esc`]: retention answers are
//! model output and data set paths are user input, so both are treated as hostile.

use std::fmt::Write;

use serde_json::Value;

/// Text or attribute value with the five HTML-significant characters escaped.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number with `decimals` decimals, or an em dash when absent or not finite.
pub fn fixed(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "—".into(),
    }
}

/// A share in [0, 1] as a percentage.
pub fn percent(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{:.1}%", v * 100.0),
        _ => "—".into(),
    }
}

/// Seconds as `1h02m`, `3m05s` or `4.2s`.
pub fn duration(v: Option<f64>) -> String {
    match v {
        Some(s) if s.is_finite() && s >= 60.0 => {
            let s = s as u64;
            if s >= 3600 {
                format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
            } else {
                format!("{}m{:02}s", s / 60, s % 60)
            }
        }
        Some(s) if s.is_finite() => format!("{s:.1}s"),
        _ => "—".into(),
    }
}

/// A JSON value for a table cell: strings as they are, numbers rounded for reading (integers
/// stay integers), anything nested as compact JSON. Escaped.
pub fn cell(v: &Value) -> String {
    let text = match v {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => n.as_f64().map_or(n.to_string(), |f| format!("{f:.4}")),
        other => other.to_string(),
    };
    esc(&text)
}

/// A table from a header row (none when empty) and rows of already-escaped HTML cells.
pub fn table(class: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(r#"<table class="{class}">"#);
    if !header.is_empty() {
        s += "<thead><tr>";
        for h in header {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s += "</tr></thead>";
    }
    s += "<tbody>";
    for row in rows {
        s += "<tr>";
        for c in row {
            let _ = write!(s, "<td>{c}</td>");
        }
        s += "</tr>";
    }
    s + "</tbody></table>"
}

/// A section with a heading and an already-built body.
pub fn section(id: &str, title: &str, body: &str) -> String {
    format!(
        r#"<section id="{id}"><h2>{}</h2>{body}</section>"#,
        esc(title)
    )
}

/// A grey note, e.g. why a section is empty.
pub fn note(text: &str) -> String {
    format!(r#"<p class="note">{}</p>"#, esc(text))
}

/// The whole document. The Content-Security-Policy forbids scripts and every network load, so
/// even a mistake in escaping cannot make the page run code or call out.
pub fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{}</title>
<style>{STYLE}</style></head>
<body>{body}</body></html>
"#,
        esc(title)
    )
}

/// System fonts only: nothing to download.
const STYLE: &str = r#"
:root { --fg: #1d2430; --muted: #5f6b7a; --line: #d9dee5; --bg: #f6f7f9; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 0 0 12px; }
.subtitle { color: var(--muted); margin: 0 0 16px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 10px;
  margin: 0 0 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; margin-top: 2px; overflow-wrap: anywhere; }
.card .detail { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.charts figure { margin: 0; }
.charts figure.wide { grid-column: 1 / -1; }
.charts figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; font-family: inherit; }
svg .grid { stroke: #e6e9ee; stroke-width: 1; }
svg .frame { fill: none; stroke: #b8c0cc; stroke-width: 1; }
svg .tick { font-size: 11px; fill: var(--muted); }
svg .axis-label { font-size: 12px; fill: var(--fg); }
svg .legend-text { font-size: 12px; fill: var(--fg); }
table { border-collapse: collapse; width: 100%; margin: 0 0 8px; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td { overflow-wrap: anywhere; white-space: pre-wrap; }
table.details td:first-child { width: 180px; color: var(--muted); }
table.numbers td:not(:first-child), table.numbers th:not(:first-child) { text-align: right;
  font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.lost td { background: #fdecec; }
.bad { color: #b42318; font-weight: 600; }
.good { color: #067647; font-weight: 600; }
.note { color: var(--muted); font-style: italic; margin: 4px 0; }
h3 { font-size: 14px; margin: 14px 0 6px; }
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escaping_neutralises_markup_in_model_output() {
        let hostile = r#"<script>alert('x')</script> & "q""#;
        assert_eq!(
            esc(hostile),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(cell(&json!("<img src=x>")), "&lt;img src=x&gt;");
        let t = table("t", &["<h>"], &[vec![esc("<td>")]]);
        assert!(!t.contains("<h>") && !t.contains("<td><td>"), "{t}");
    }

    #[test]
    fn numbers_read_well_and_absent_ones_are_a_dash() {
        assert_eq!(fixed(Some(1.23456), 3), "1.235");
        assert_eq!(fixed(Some(f64::NAN), 3), "—");
        assert_eq!(percent(Some(0.5)), "50.0%");
        assert_eq!(percent(None), "—");
        assert_eq!(duration(Some(4.24)), "4.2s");
        assert_eq!(duration(Some(185.0)), "3m05s");
        assert_eq!(duration(Some(3720.0)), "1h02m");
        assert_eq!(cell(&json!(0.123456789)), "0.1235");
        assert_eq!(cell(&json!(7)), "7");
        assert_eq!(cell(&json!(null)), "—");
    }

    #[test]
    fn the_page_loads_nothing_and_runs_nothing() {
        let p = page("<t>", "body");
        assert!(p.contains("default-src 'none'") && p.contains("&lt;t&gt;"));
        assert!(!p.contains("<script") && !p.contains("http://") && !p.contains("https://"));
    }
}
