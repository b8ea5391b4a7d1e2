//! The page, top to bottom: a header with the run's headline numbers, the curves, eval and
//! retention before/after, the changed answers, contamination, and the run's details. Each part is
//! its own function returning HTML, so a missing part of the summary only blanks its own section.

use serde_json::Value;

use super::html::{cell, duration, esc, fixed, note, page, percent, section, table};
use super::run::{Run, array, get, num, text};
use super::{answers, charts, contamination};

/// The complete document for `run`.
pub fn render(run: &Run) -> String {
    let job = run.text("job").unwrap_or_else(|| "unnamed run".into());
    let mut body = header(run, &job);
    for n in &run.notes {
        body += &note(n);
    }
    body += &cards(run);
    body += &charts::section_html(run);
    body += &results(run);
    body += &answers::retention_html(run);
    body += &answers::generation_html(run);
    body += &contamination::section_html(run);
    body += &details(run);
    page(&format!("{job}: training report"), &body)
}

fn header(run: &Run, job: &str) -> String {
    let parts: Vec<String> = [
        run.text("attempt").map(|a| format!("attempt {a}")),
        run.text("device"),
        run.text("dtype"),
        Some(run.dir.display().to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    format!(
        r#"<header><h1>Training report: {}</h1><p class="subtitle">{}</p></header>"#,
        esc(job),
        esc(&parts.join(" · "))
    )
}

/// A headline number with a label and a line of context.
fn card(label: &str, value: &str, detail: &str) -> String {
    format!(
        r#"<div class="card"><div class="label">{}</div><div class="value">{}</div><div class="detail">{}</div></div>"#,
        esc(label),
        esc(value),
        esc(detail)
    )
}

fn cards(run: &Run) -> String {
    let first_loss = run.steps().first().map(|s| s.loss);
    let all = [
        model_card(run),
        method_card(run),
        steps_card(run),
        card(
            "Final train loss",
            &fixed(run.num("metrics.trainLoss"), 4),
            &format!("first step {}", fixed(first_loss, 4)),
        ),
        card(
            "Eval loss",
            &fixed(run.num("metrics.evalLoss"), 4),
            &format!(
                "before {}, best {} (step {})",
                fixed(run.num("initial_eval_loss"), 4),
                fixed(run.num("best_eval_loss"), 4),
                run.text("best_step").unwrap_or_else(|| "—".into())
            ),
        ),
        card(
            "Wall time",
            &duration(run.num("timings.total_seconds")),
            &format!("training {}", duration(run.num("timings.train_seconds"))),
        ),
        retention_card(run),
        card(
            "Tokens/s",
            &fixed(run.num("tokens_per_second"), 0),
            &format!(
                "{} tokens trained",
                fixed(run.num("metrics.trainedTokens"), 0)
            ),
        ),
    ];
    format!(r#"<div class="cards" id="summary">{}</div>"#, all.concat())
}

/// The base model as the adapter names it; a full fine-tune's output is the model itself.
fn model_card(run: &Run) -> String {
    let base = run
        .adapter_config
        .as_ref()
        .and_then(|c| text(c, "base_model_name_or_path"));
    let params = run.num("trainable_parameters").map_or(String::new(), |p| {
        format!("{:.2}M trainable parameters", p / 1e6)
    });
    // The file or directory name is the model; the whole URI goes underneath.
    let Some(base) = base else {
        return card("Model", "—", &params);
    };
    let name = base
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(&base);
    card("Model", name, &format!("{base}; {params}"))
}

fn method_card(run: &Run) -> String {
    let objective = if run.get("preference").is_some_and(|p| !p.is_null()) {
        "DPO"
    } else {
        "SFT"
    };
    let adapter = match run.text("adapter").as_deref() {
        Some("lora") => "LoRA",
        Some("full") => "Full",
        Some(_) | None => "—",
    };
    let mut detail = Vec::new();
    if let Some(c) = &run.adapter_config {
        let (r, alpha) = (text(c, "r"), text(c, "lora_alpha"));
        if let (Some(r), Some(alpha)) = (r, alpha) {
            detail.push(format!("rank {r}, alpha {alpha}"));
        }
    }
    detail.push(format!("forgetting guard: {}", guard(run)));
    card(
        "Method",
        &format!("{adapter} {objective}"),
        &detail.join("; "),
    )
}

/// The effective guard's name(s), e.g. `selfDistillation`, or `none`.
fn guard(run: &Run) -> String {
    match run.get("forgetting_guard") {
        Some(Value::Object(g)) => {
            let names: Vec<&str> = g
                .iter()
                .filter(|(k, v)| *k != "disabled" && !v.is_null())
                .map(|(k, _)| k.as_str())
                .collect();
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        }
        _ => "—".into(),
    }
}

fn steps_card(run: &Run) -> String {
    let value = format!(
        "{} / {}",
        run.text("steps").unwrap_or_else(|| "—".into()),
        run.text("total_steps").unwrap_or_else(|| "—".into())
    );
    let detail = run
        .text("stop_reason")
        .unwrap_or_else(|| match run.text("resumed_from_step") {
            Some(s) => format!("resumed from step {s}"),
            None => "ran to the planned end".into(),
        });
    card("Steps", &value, &detail)
}

fn retention_card(run: &Run) -> String {
    let kept = match run.text("retention.basis").as_deref() {
        Some("answer-keys") => format!(
            "{}/{} correct base answers kept",
            run.text("retention.kept").unwrap_or_default(),
            run.text("retention.base_correct").unwrap_or_default()
        ),
        Some(_) => format!(
            "{} of {} answers verbatim",
            percent(run.num("retention.verbatim")),
            run.text("retention.questions").unwrap_or_default()
        ),
        None => "probe not run".into(),
    };
    let floor = run.num("retention.min_score").map_or(String::new(), |f| {
        format!("; minScore {}", percent(Some(f)))
    });
    card(
        "Retention kept",
        &percent(run.num("retention.score")),
        &format!("{kept}{floor}"),
    )
}

/// Eval and retention measures before and after training, with the change.
fn results(run: &Run) -> String {
    let s = &run.summary;
    let mut rows = vec![
        row(
            "Eval loss",
            num(s, "initial_eval_loss"),
            num(s, "metrics.evalLoss"),
            4,
            Better::Lower,
        ),
        row(
            "Retention text loss",
            num(s, "retention.loss_before"),
            num(s, "retention.loss_after"),
            4,
            Better::Lower,
        ),
        share_row(
            "Retention score (base = 100%)",
            (num(s, "retention.score").is_some()).then_some(1.0),
            num(s, "retention.score"),
        ),
        share_row(
            "Generation exact match",
            num(s, "generation.before.exact_match"),
            num(s, "generation.after.exact_match"),
        ),
        share_row(
            "Generation normalized match",
            num(s, "generation.before.normalized_match"),
            num(s, "generation.after.normalized_match"),
        ),
    ];
    if get(s, "preference").is_some_and(|p| !p.is_null()) {
        rows.push(share_row(
            "Preference reward accuracy",
            num(s, "preference.before.reward_accuracy"),
            num(s, "preference.after.reward_accuracy"),
        ));
        rows.push(row(
            "Preference reward margin",
            num(s, "preference.before.reward_margin"),
            num(s, "preference.after.reward_margin"),
            4,
            Better::Higher,
        ));
    }
    let body = table(
        "numbers results",
        &["Measure", "Before training", "After training", "Change"],
        &rows,
    );
    section("results", "Eval and retention: before → after", &body)
}

#[derive(Clone, Copy)]
enum Better {
    Lower,
    Higher,
}

fn row(name: &str, before: Option<f64>, after: Option<f64>, dp: usize, b: Better) -> Vec<String> {
    let change = before.zip(after).map(|(b, a)| a - b);
    vec![
        esc(name),
        fixed(before, dp),
        fixed(after, dp),
        signed(change, b, |d| format!("{d:+.dp$}")),
    ]
}

fn share_row(name: &str, before: Option<f64>, after: Option<f64>) -> Vec<String> {
    let change = before.zip(after).map(|(b, a)| a - b);
    vec![
        esc(name),
        percent(before),
        percent(after),
        signed(change, Better::Higher, |d| format!("{:+.1} pts", d * 100.0)),
    ]
}

/// A change coloured by whether it is an improvement.
fn signed(change: Option<f64>, better: Better, fmt: impl Fn(f64) -> String) -> String {
    let Some(d) = change.filter(|d| d.is_finite()) else {
        return "—".into();
    };
    let good = match better {
        Better::Lower => d < 0.0,
        Better::Higher => d > 0.0,
    };
    let class = if d == 0.0 {
        ""
    } else if good {
        "good"
    } else {
        "bad"
    };
    format!(r#"<span class="{class}">{}</span>"#, esc(&fmt(d)))
}

/// Device, data, timings and files: the facts behind the numbers above.
fn details(run: &Run) -> String {
    let s = &run.summary;
    let mut rows: Vec<Vec<String>> = [
        "device",
        "dtype",
        "threads",
        "warmup_steps",
        "steps_per_epoch",
    ]
    .iter()
    .filter_map(|k| Some(vec![esc(k), cell(get(s, k)?)]))
    .collect();
    if let Some(rss) = num(s, "peak_rss_bytes") {
        let mib = format!("{:.0} MiB", rss / f64::from(1 << 20));
        rows.push(vec![esc("peak memory (RSS)"), esc(&mib)]);
    }
    for split in ["train", "eval"] {
        if let Some(Value::Object(stats)) = get(s, &format!("dataset.{split}")) {
            let line: Vec<String> = stats.iter().map(|(k, v)| format!("{k} {v}")).collect();
            rows.push(vec![esc(&format!("{split} data")), esc(&line.join(", "))]);
        }
    }
    if let Some(Value::Object(t)) = get(s, "timings") {
        let line: Vec<String> = t
            .iter()
            .map(|(k, v)| format!("{k} {}", duration(v.as_f64())))
            .collect();
        rows.push(vec![esc("timings"), esc(&line.join(", "))]);
    }
    let files: Vec<String> = array(s, "files")
        .iter()
        .filter_map(|f| Some(format!("{} ({} bytes)", text(f, "name")?, text(f, "size")?)))
        .collect();
    if !files.is_empty() {
        rows.push(vec![esc("files"), esc(&files.join(", "))]);
    }
    section(
        "details",
        "Run details",
        &table("details", &["", ""], &rows),
    )
}
