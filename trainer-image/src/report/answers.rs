//! Answers side by side, for a person to judge what a score only counts: the retention questions
//! whose answer changed (base model before, tuned model after; lost knowledge first, highlighted)
//! and the generation examples (reference and the tuned model's answer). All of it is model
//! output, escaped cell by cell.

use serde_json::Value;

use super::html::{cell, note, section, table};
use super::run::{Run, array, get};

/// The "Retention answers" section.
pub fn retention_html(run: &Run) -> String {
    let body = match run.get("retention") {
        None => note("The summary has no retention section (a trainer from before the probe)."),
        Some(r) => changed_table(r),
    };
    section(
        "retention-answers",
        "Retention answers: before → after",
        &body,
    )
}

fn changed_table(retention: &Value) -> String {
    let questions = get(retention, "questions").and_then(Value::as_u64);
    let changed = array(retention, "changed");
    if questions == Some(0) {
        return note("No retention questions were asked in this run.");
    }
    if changed.is_empty() {
        return note("Every retention answer is the same as the base model's.");
    }
    let lost = changed
        .iter()
        .filter(|r| r.get("lost") == Some(&Value::Bool(true)));
    let mut s = note(&format!(
        "{} changed answers shown ({} with knowledge lost, highlighted; then up to {} that changed wording).",
        changed.len(),
        lost.count(),
        crate::train::retention::MORE_CHANGED
    ));
    let rows: Vec<String> = changed.iter().map(changed_row).collect();
    s += &format!(
        r#"<table class="answers"><thead><tr><th>Question</th><th>Base model (before)</th><th>Tuned model (after)</th><th>Correct before → after</th></tr></thead><tbody>{}</tbody></table>"#,
        rows.concat()
    );
    s
}

/// One row; `lost` rows get a class so they stand out.
fn changed_row(r: &Value) -> String {
    let class = if r.get("lost") == Some(&Value::Bool(true)) {
        r#" class="lost""#
    } else {
        ""
    };
    let field = |k: &str| r.get(k).map_or_else(|| "—".into(), cell);
    format!(
        "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td></tr>",
        field("question"),
        field("base"),
        field("tuned"),
        correctness(r.get("base_correct")),
        correctness(r.get("tuned_correct"))
    )
}

fn correctness(v: Option<&Value>) -> &'static str {
    match v {
        Some(Value::Bool(true)) => r#"<span class="good">yes</span>"#,
        Some(Value::Bool(false)) => r#"<span class="bad">no</span>"#,
        _ => "no key",
    }
}

/// The "Generation examples" section: reference answer and the tuned model's, side by side.
pub fn generation_html(run: &Run) -> String {
    let examples = array(&run.summary, "generation.examples");
    let body = if examples.is_empty() {
        note(
            "No generation examples in this run (evaluation.generation was off or there is no eval set).",
        )
    } else {
        let rows: Vec<Vec<String>> = examples
            .iter()
            .map(|e| {
                let field = |k: &str| e.get(k).map_or_else(|| "—".into(), cell);
                vec![field("reference"), field("answer")]
            })
            .collect();
        table(
            "answers",
            &["Reference (eval set)", "Tuned model's answer"],
            &rows,
        )
    };
    section(
        "generation-examples",
        &format!("Generation examples ({})", examples.len()),
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_answers_are_escaped_and_lost_rows_marked() {
        let r = Run::from_summary(json!({"retention": {"questions": 2, "changed": [
            {"question": "Q?", "base": "Paris", "tuned": "<script>x()</script>",
             "base_correct": true, "tuned_correct": false, "lost": true},
        ]}}));
        let html = retention_html(&r);
        assert!(
            html.contains("&lt;script&gt;") && !html.contains("<script>"),
            "{html}"
        );
        assert!(html.contains(r#"<tr class="lost">"#), "{html}");
    }

    #[test]
    fn absent_sections_say_so() {
        let r = Run::from_summary(json!({}));
        assert!(retention_html(&r).contains("no retention section"));
        assert!(generation_html(&r).contains("No generation examples"));
    }
}
