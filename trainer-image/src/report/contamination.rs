//! Contamination findings (`dataset.contamination`), rendered from the JSON's shape rather than
//! from a Rust type: the check's report is being reworked (exact copies with the training line
//! they copy, ranked n-gram findings), so every scalar field becomes a line of settings and every
//! list becomes a table whose columns are the keys its rows have. A new field shows up on its
//! own; a removed one just disappears.

use std::fmt::Write;

use serde_json::{Map, Value};

use super::html::{cell, esc, note, percent, section, table};
use super::run::Run;

/// Rows shown per list; a longer list says how many were left out.
const MAX_ROWS: usize = 200;

/// The "Contamination" section.
pub fn section_html(run: &Run) -> String {
    let body = match run.get("dataset.contamination") {
        None | Some(Value::Null) => {
            note("Not checked in this run (no eval set, or a trainer from before the check).")
        }
        Some(Value::Object(report)) => report_html(report),
        Some(other) => format!(
            "{}<pre>{}</pre>",
            note("Unrecognised shape; shown as written:"),
            esc(&other.to_string())
        ),
    };
    section("contamination", "Train/eval contamination", &body)
}

fn report_html(report: &Map<String, Value>) -> String {
    let settings: Vec<String> = report
        .iter()
        .filter(|(_, v)| !v.is_array())
        .map(|(k, v)| format!("<b>{}</b>: {}", esc(k), cell(v)))
        .collect();
    let mut s = format!(r#"<p class="settings">{}</p>"#, settings.join(" · "));
    for (key, value) in report {
        if let Value::Array(items) = value {
            let _ = write!(s, "<h3>{} ({})</h3>", esc(key), items.len());
            s += &list_table(items);
        }
    }
    s
}

/// A list as a table: objects by their keys (first-seen order), other items in one column.
fn list_table(items: &[Value]) -> String {
    if items.is_empty() {
        return note("none");
    }
    let mut columns: Vec<&str> = Vec::new();
    for item in items {
        for k in item.as_object().into_iter().flat_map(Map::keys) {
            if !columns.contains(&k.as_str()) {
                columns.push(k);
            }
        }
    }
    if columns.is_empty() {
        columns.push("value");
    }
    // The JSON's keys come sorted; where a finding is from and how much of it overlaps read first.
    columns.sort_by_key(|c| match *c {
        "origin" => 0,
        c if c.contains("share") => 1,
        _ => 2,
    });
    let rows: Vec<Vec<String>> = items
        .iter()
        .take(MAX_ROWS)
        .map(|item| match item {
            Value::Object(o) => columns.iter().map(|c| field(c, o.get(*c))).collect(),
            other => vec![cell(other)],
        })
        .collect();
    let mut s = table("findings", &columns, &rows);
    if items.len() > MAX_ROWS {
        s += &note(&format!(
            "{} more not shown (see training_summary.json).",
            items.len() - MAX_ROWS
        ));
    }
    s
}

/// Shares read better as percentages; everything else as written.
fn field(column: &str, v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) if column.contains("share") || column.contains("fraction") => {
            percent(n.as_f64())
        }
        Some(v) => cell(v),
        None => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_list_becomes_a_table_whatever_its_fields() {
        let r = Run::from_summary(json!({"dataset": {"contamination": {
            "n": 13, "checked": 30,
            "flagged": [{"origin": "eval.jsonl:3", "share": 0.625}],
            "copies": [{"origin": "eval.jsonl:8", "copies_of": "<train.jsonl:1>"}],
        }}}));
        let html = section_html(&r);
        assert!(
            html.contains("eval.jsonl:3") && html.contains("62.5%"),
            "{html}"
        );
        assert!(
            html.contains("copies_of") && html.contains("&lt;train.jsonl:1&gt;"),
            "{html}"
        );
        assert!(html.contains("<b>checked</b>: 30"), "{html}");
    }

    #[test]
    fn absent_or_odd_contamination_is_a_note_not_an_error() {
        assert!(section_html(&Run::from_summary(json!({}))).contains("Not checked"));
        let odd = section_html(&Run::from_summary(
            json!({"dataset": {"contamination": "<x>"}}),
        ));
        assert!(
            odd.contains("Unrecognised") && odd.contains("&lt;x&gt;"),
            "{odd}"
        );
    }
}
