//! The contamination check on a templated task (the case that used to flag clean samples for
//! their shared phrasing) and on free text with planted partial copies.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::data::Origin;
use crate::data::rng::SplitMix64;

fn sample(file: &str, line: usize, text: &str) -> Sample {
    let origin = Origin {
        path: Arc::from(Path::new(file)),
        line,
    };
    Sample::new(vec![0], vec![false], origin).with_text(text)
}

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

/// A date-normalisation conversation: one of five phrasings, one of four date spellings, the ISO
/// date as the answer, and the system prompt every line shares. Day `k` of the 40 years from 1990.
fn date_task(k: u64, g: &mut SplitMix64) -> String {
    let (year, month, day) = (1990 + k / 336, (k / 28) % 12, 1 + k % 28);
    let name = MONTHS[month as usize];
    let written = match g.below(4) {
        0 => format!("{name} {day}, {year}"),
        1 => format!("{day} {name} {year}"),
        2 => format!("{day:02}/{:02}/{year}", month + 1),
        _ => format!("{}. {day} {year}", &name[..3]),
    };
    let ask = match g.below(5) {
        0 => format!("Convert {written} to ISO 8601 format."),
        1 => format!("What is {written} in YYYY-MM-DD form?"),
        2 => format!("Please rewrite the date {written} as an ISO date (year-month-day)."),
        3 => format!("Normalise this date: {written}"),
        _ => format!(
            "I wrote {written} in my notes. Give me that date in the standard ISO format, please."
        ),
    };
    let iso = format!("{year}-{:02}-{day:02}", month + 1);
    format!("You turn dates into ISO 8601 dates.\n{ask}\nThe date is {iso}.")
}

/// 480 training lines and 50 eval lines on disjoint days (even days train, odd days eval).
fn templated() -> (Vec<Sample>, Vec<Sample>) {
    let mut g = SplitMix64::new(11);
    let days: Vec<u64> = (0..13440).map(|_| g.below(13440)).collect();
    let train = days
        .iter()
        .filter(|d| *d % 2 == 0)
        .take(480)
        .enumerate()
        .map(|(i, &d)| sample("train.jsonl", i + 1, &date_task(d, &mut g)))
        .collect();
    let eval = days
        .iter()
        .filter(|d| *d % 2 == 1)
        .take(50)
        .enumerate()
        .map(|(i, &d)| sample("eval.jsonl", i + 1, &date_task(d, &mut g)))
        .collect();
    (train, eval)
}

#[test]
fn a_clean_templated_eval_set_is_not_flagged_for_its_shared_phrasing() {
    let (train, eval) = templated();
    let report = check_contamination(&train, &eval, ContaminationOptions::default());
    assert_eq!(report.checked, 50);
    assert!(
        report.boilerplate_ngrams > 0,
        "the phrasings are boilerplate"
    );
    assert_eq!(report.count(), 0, "{}", report.summary());
    // The phrasing is shared for real: without the boilerplate rule most samples would be flagged.
    let naive = ContaminationOptions {
        boilerplate_fraction: 1.0,
        ..Default::default()
    };
    let flagged = check_contamination(&train, &eval, naive).flagged.len();
    assert!(flagged >= 10, "only {flagged} flagged without the rule");
}

#[test]
fn every_planted_copy_is_found_first_and_names_the_line_it_copies() {
    let (train, mut eval) = templated();
    // Five eval lines replaced by training lines: three verbatim, two re-cased and re-punctuated.
    let plants = [(3, 17), (9, 120), (22, 301), (30, 45), (41, 479)];
    for (k, &(at, from)) in plants.iter().enumerate() {
        let text = train[from - 1].text.to_string();
        let text = if k < 3 {
            text
        } else {
            text.to_uppercase().replace('.', " !").replace(',', "")
        };
        eval[at - 1] = sample("eval.jsonl", at, &text);
    }
    let report = check_contamination(&train, &eval, ContaminationOptions::default());
    let found: Vec<(String, String, CopyKind)> = report
        .copies
        .iter()
        .map(|c| (c.origin.clone(), c.copies.clone(), c.kind))
        .collect();
    let line = |f: &str, n: usize| format!("{f}:{n}");
    let expected: Vec<(String, String, CopyKind)> = plants
        .iter()
        .enumerate()
        .map(|(k, &(at, from))| {
            let kind = if k < 3 {
                CopyKind::Exact
            } else {
                CopyKind::NearExact
            };
            (line("eval.jsonl", at), line("train.jsonl", from), kind)
        })
        .collect();
    assert_eq!(found, expected);
    assert!(report.flagged.is_empty(), "{}", report.summary());
    let summary = report.summary();
    assert!(
        summary.starts_with(
            "contamination: 5 of 50 eval samples copy a training sample (3 exact, 2 near-exact): \
             eval.jsonl:3 = train.jsonl:17, eval.jsonl:9 = train.jsonl:120"
        ),
        "{summary}"
    );
}

fn prose(seed: u64, words: usize) -> String {
    let mut g = SplitMix64::new(seed);
    let w: Vec<String> = (0..words).map(|_| format!("w{}", g.below(5000))).collect();
    w.join(" ")
}

#[test]
fn partial_copies_are_ranked_by_share_with_the_training_line_they_share_most_with() {
    let system = "You are a helpful assistant who answers every question carefully";
    let train: Vec<Sample> = (0..20)
        .map(|i| {
            sample(
                "train.jsonl",
                i + 1,
                &format!("{system}\n{}", prose(i as u64, 60)),
            )
        })
        .collect();
    let mut eval: Vec<Sample> = (0..5u64)
        .map(|i| {
            sample(
                "eval.jsonl",
                i as usize + 1,
                &format!("{system}\n{}", prose(100 + i, 60)),
            )
        })
        .collect();
    // Line 6: most of training line 3 and some new words; line 7: most of the first half of training line 8.
    let words3: Vec<&str> = train[2].text.split(' ').collect();
    let words8: Vec<&str> = train[7].text.split(' ').collect();
    eval.push(sample(
        "eval.jsonl",
        6,
        &format!("{} {}", words3[..60].join(" "), prose(999, 10)),
    ));
    eval.push(sample(
        "eval.jsonl",
        7,
        &format!("{} {}", words8[..50].join(" "), prose(998, 30)),
    ));
    let report = check_contamination(&train, &eval, ContaminationOptions::default());
    assert!(report.copies.is_empty());
    let ranked: Vec<(&str, Option<&str>)> = report
        .flagged
        .iter()
        .map(|c| (c.origin.as_str(), c.closest.as_deref()))
        .collect();
    assert_eq!(
        ranked,
        [
            ("eval.jsonl:6", Some("train.jsonl:3")),
            ("eval.jsonl:7", Some("train.jsonl:8"))
        ],
        "{}",
        report.summary()
    );
    assert!(report.flagged[0].share > report.flagged[1].share);
    assert!(report.flagged[1].share >= 0.5);
    // A stricter threshold keeps only the larger copy.
    let strict = ContaminationOptions {
        threshold: 0.8,
        ..Default::default()
    };
    assert_eq!(check_contamination(&train, &eval, strict).flagged.len(), 1);
}

#[test]
fn the_summary_names_five_findings_and_counts_the_rest() {
    let train: Vec<Sample> = (0..8)
        .map(|i| sample("t.jsonl", i + 1, &prose(i as u64, 20)))
        .collect();
    let eval: Vec<Sample> = (0..8)
        .map(|i| sample("e.jsonl", i + 1, &train[i].text))
        .collect();
    let report = check_contamination(&train, &eval, ContaminationOptions::default());
    assert_eq!(report.copies.len(), 8);
    let s = report.summary();
    assert!(s.contains("e.jsonl:5 = t.jsonl:5 and 3 more"), "{s}");
    assert!(s.ends_with("(full list in training_summary.json)"), "{s}");
    assert_eq!(report.first_origin(), Some("e.jsonl:1"));
}

#[test]
fn samples_without_words_are_checked_but_never_flagged() {
    let train = vec![sample("t.jsonl", 1, "!!! ???")];
    let eval = vec![sample("e.jsonl", 1, "!!! ???"), sample("e.jsonl", 2, "")];
    let report = check_contamination(&train, &eval, ContaminationOptions::default());
    assert_eq!((report.checked, report.count()), (2, 0));
}

/// A chat JSONL file of the examples as samples carrying only their text (no tokenizer needed).
fn example_chat(name: &str) -> Vec<Sample> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data")
        .join(name);
    let body = std::fs::read_to_string(&path).unwrap();
    body.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let contents: Vec<&str> = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| m["content"].as_str())
                .collect();
            sample(name, i + 1, &contents.join("\n"))
        })
        .collect()
}

#[test]
fn the_example_eval_sets_are_clean() {
    for (train, eval) in [
        ("chat-train.jsonl", "chat-eval.jsonl"),
        ("narrow-train.jsonl", "narrow-eval.jsonl"),
        ("dates-train.jsonl", "dates-eval.jsonl"),
    ] {
        let (train, eval) = (example_chat(train), example_chat(eval));
        let report = check_contamination(&train, &eval, ContaminationOptions::default());
        assert_eq!(report.count(), 0, "{}", report.summary());
    }
}
