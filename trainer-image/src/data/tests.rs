//! Unit tests of formats, masks, curation, contamination and batch layout (no files beyond a
//! temporary tokenizer, no model).

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::testing::{byte_tokenizer, chatml, supervised_runs};
use super::*;
use crate::text::{ChatTemplate, TextTokenizer};

fn origin(line: usize) -> Origin {
    Origin {
        path: Arc::from(Path::new("mem.jsonl")),
        line,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    tok: TextTokenizer,
    template: ChatTemplate,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path(), "<|im_end|>");
    Fixture {
        _dir: dir,
        tok,
        template: chatml(),
    }
}

impl Fixture {
    fn enc(&self, options: LoadOptions) -> Encoder<'_> {
        Encoder {
            tokenizer: &self.tok,
            template: Some(&self.template),
            options,
        }
    }

    fn runs(&self, s: &Sample) -> Vec<String> {
        supervised_runs(&self.tok, &s.ids, &s.supervised)
    }
}

fn chat_line() -> Value {
    json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok then"},
    ]})
}

#[test]
fn chatml_supervises_exactly_replies_and_im_end() {
    let f = fixture();
    let s = f
        .enc(LoadOptions::sft())
        .line(&chat_line(), DataFormat::Chat, &origin(1))
        .unwrap();
    assert_eq!(f.runs(&s), ["yo<|im_end|>", "ok then<|im_end|>"]);
    // The rendering itself is the template's, unchanged (no eos added: ChatML closes its turns).
    let text = f.tok.decode(&s.ids, false).unwrap();
    assert!(text.ends_with("ok then<|im_end|>\n"), "{text:?}");
    assert!(!s.supervised[0]);
    // What the contamination check compares: the messages' contents, no template.
    assert_eq!(&*s.text, "Be brief.\nhi\nyo\nagain\nok then");
}

#[test]
fn eval_command_options_keep_the_eval_definition() {
    let f = fixture();
    let s = f
        .enc(LoadOptions::eval_command())
        .line(&chat_line(), DataFormat::Chat, &origin(1))
        .unwrap();
    // eval's spans include the template's newline after <|im_end|>.
    assert_eq!(f.runs(&s), ["yo<|im_end|>\n", "ok then<|im_end|>\n"]);
    let t = f
        .enc(LoadOptions::eval_command())
        .line(&json!({"text": "abc"}), DataFormat::Text, &origin(1))
        .unwrap();
    assert_eq!(t.ids, [97, 98, 99]);
    assert_eq!(t.supervised, [false, true, true]);
}

#[test]
fn assistant_only_loss_false_supervises_every_token() {
    let f = fixture();
    let opts = LoadOptions {
        assistant_only_loss: false,
        ..LoadOptions::sft()
    };
    let s = f
        .enc(opts)
        .line(&chat_line(), DataFormat::Chat, &origin(1))
        .unwrap();
    assert_eq!(s.supervised_count(), s.len() - 1);
}

#[test]
fn text_gets_eos_appended() {
    let f = fixture();
    let s = f
        .enc(LoadOptions::sft())
        .line(&json!({"text": "abc"}), DataFormat::Text, &origin(1))
        .unwrap();
    assert_eq!(s.ids, [97, 98, 99, 258]);
    assert_eq!(s.supervised, [false, true, true, true]);
}

#[test]
fn template_without_turn_end_gets_eos_after_the_last_reply() {
    let f = fixture();
    let plain = ChatTemplate::new(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        None, None, None, None,
    )
    .unwrap();
    let enc = Encoder {
        tokenizer: &f.tok,
        template: Some(&plain),
        options: LoadOptions::sft(),
    };
    let line = json!({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]});
    let s = enc.line(&line, DataFormat::Chat, &origin(1)).unwrap();
    assert_eq!(f.runs(&s), ["b", "d<|im_end|>"]);
    assert_eq!(
        f.tok.decode(&s.ids, false).unwrap(),
        "user: a\nassistant: b\nuser: c\nassistant: d<|im_end|>\n"
    );
}

#[test]
fn instruction_renders_as_a_user_turn() {
    let f = fixture();
    let enc = f.enc(LoadOptions::sft());
    let a = enc
        .line(
            &json!({"instruction": "Translate.", "input": "Hi", "output": "Salut"}),
            DataFormat::Instruction,
            &origin(1),
        )
        .unwrap();
    let b = enc
        .chat(
            &[
                json!({"role": "user", "content": "Translate.\n\nHi"}),
                json!({"role": "assistant", "content": "Salut"}),
            ],
            &origin(1),
        )
        .unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.supervised, b.supervised);
    assert_eq!(f.runs(&a), ["Salut<|im_end|>"]);
}

#[test]
fn preference_pairs_share_the_prompt_and_supervise_only_replies() {
    let f = fixture();
    let enc = f.enc(LoadOptions::sft());
    let p = enc
        .preference(
            &json!({"prompt": "2+2?", "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]}),
            &origin(7),
        )
        .unwrap();
    assert_eq!(
        f.tok.decode(&p.prompt, false).unwrap(),
        "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(p.chosen.ids[..p.prompt.len()], p.prompt[..]);
    assert_eq!(p.rejected.ids[..p.prompt.len()], p.prompt[..]);
    assert_eq!(f.runs(&p.chosen), ["4<|im_end|>"]);
    assert_eq!(f.runs(&p.rejected), ["5<|im_end|>"]);
    // A multi-turn prompt: earlier assistant turns are context, not supervised.
    let q = enc
        .preference(
            &json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}],
                    "chosen": "yes", "rejected": "no"}),
            &origin(8),
        )
        .unwrap();
    assert_eq!(f.runs(&q.chosen), ["yes<|im_end|>"]);
    let err = enc
        .preference(
            &json!({"prompt": "x", "chosen": "", "rejected": "n"}),
            &origin(9),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("mem.jsonl:9: `chosen` is empty"),
        "{err}"
    );
}

#[test]
fn validation_messages_name_the_line() {
    let f = fixture();
    let enc = f.enc(LoadOptions::sft());
    let cases: [(Value, DataFormat, &str); 9] = [
        (
            json!({"messages": [{"content": "x"}]}),
            DataFormat::Chat,
            "message 0: missing `role`",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            DataFormat::Chat,
            "unknown role `robot`",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
            DataFormat::Chat,
            "message 1: empty assistant turn",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            DataFormat::Chat,
            "no assistant turn",
        ),
        (
            json!({"text": "x"}),
            DataFormat::Chat,
            "looks like text data",
        ),
        (
            json!({"instruction": "x"}),
            DataFormat::Instruction,
            "`output`",
        ),
        (
            json!({"messages": []}),
            DataFormat::Text,
            "looks like chat data",
        ),
        (
            json!({"text": 3}),
            DataFormat::Text,
            "`text` must be a string",
        ),
        (json!({"text": ""}), DataFormat::Text, "`text` is empty"),
    ];
    for (v, fmt, want) in cases {
        let err = enc.line(&v, fmt, &origin(42)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("mem.jsonl:42: "), "{msg}");
        assert!(msg.contains(want), "{msg} lacks {want}");
        assert_eq!(err.exit_code(), 2);
    }
    let no_template = Encoder {
        tokenizer: &f.tok,
        template: None,
        options: LoadOptions::sft(),
    };
    let err = no_template
        .line(&chat_line(), DataFormat::Chat, &origin(3))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("mem.jsonl:3: the model has no chat template")
    );
    let err = "csv".parse::<DataFormat>().unwrap_err();
    assert!(
        err.to_string().contains("unknown data format `csv`"),
        "{err}"
    );
    assert_eq!(
        "preference".parse::<DataFormat>().unwrap(),
        DataFormat::Preference
    );
}

fn sample(ids: &[i64], supervised: &[bool], line: usize) -> Sample {
    Sample::new(ids.to_vec(), supervised.to_vec(), origin(line))
}

#[test]
fn curate_counts_duplicates_truncation_and_drops() {
    let t = true;
    let n = false;
    let samples = vec![
        sample(&[1, 2, 3], &[n, t, t], 1),
        sample(&[1, 2, 3], &[n, t, t], 2), // duplicate of 1
        sample(&[1, 2, 3], &[n, n, t], 3), // same ids, other mask: kept
        sample(&[5, 6, 7, 8, 9, 10], &[n, t, t, t, t, t], 4), // truncated, loses 2
        sample(&[5, 6, 7, 8, 9, 11], &[n, n, n, n, t, t], 5), // truncated to no supervision
        sample(&[1, 2, 3], &[n, t, t], 6), // duplicate of 1
    ];
    let (kept, stats) = curate(
        samples,
        CurateOptions {
            max_seq_length: 4,
            dedupe: true,
        },
    );
    let lines: Vec<usize> = kept.iter().map(|s| s.origin.line).collect();
    assert_eq!(lines, [1, 3, 4]);
    assert_eq!(
        (
            stats.lines,
            stats.samples,
            stats.duplicates,
            stats.truncated,
            stats.dropped
        ),
        (6, 3, 2, 2, 1)
    );
    assert_eq!(stats.truncated_supervised_tokens, 4);
    assert_eq!(
        (stats.tokens, stats.supervised_tokens, stats.max_length),
        (10, 6, 4)
    );
    assert!((stats.mean_length - 10.0 / 3.0).abs() < 1e-12);
    assert_eq!(
        stats.summary(),
        "6 lines -> 3 samples (2 duplicates, 1 dropped, 2 truncated losing 4 supervised tokens); \
         10 tokens, 6 supervised; length mean 3.3 max 4"
    );
    let (no_dedupe, s2) = curate(
        vec![sample(&[1, 2], &[n, t], 1), sample(&[1, 2], &[n, t], 2)],
        CurateOptions {
            max_seq_length: 8,
            dedupe: false,
        },
    );
    assert_eq!((no_dedupe.len(), s2.duplicates), (2, 0));
}

#[test]
fn digest_covers_ids_masks_and_order_only() {
    let a = vec![
        sample(&[1, 2, 3], &[false, true, true], 1),
        sample(&[4, 5], &[false, true], 2),
    ];
    let d = dataset_digest(&a);
    assert_eq!(d.len(), 64);
    let mut moved = a.clone();
    moved[0].origin.line = 99;
    assert_eq!(dataset_digest(&moved), d);
    let mut mask = a.clone();
    mask[0].supervised[1] = false;
    assert_ne!(dataset_digest(&mask), d);
    let swapped = vec![a[1].clone(), a[0].clone()];
    assert_ne!(dataset_digest(&swapped), d);
    // Boundaries count: [1,2,3],[4,5] differs from [1,2],[3,4,5].
    let resplit = vec![
        sample(&[1, 2], &[false, true], 1),
        sample(&[3, 4, 5], &[false, true, true], 2),
    ];
    assert_ne!(dataset_digest(&resplit), d);
}

#[test]
fn eval_split_is_seeded_and_deterministic() {
    let items: Vec<usize> = (0..100).collect();
    let (tr, ev) = split_eval(items.clone(), 0.1, 42);
    assert_eq!((tr.len(), ev.len()), (90, 10));
    assert_eq!(split_eval(items.clone(), 0.1, 42), (tr.clone(), ev.clone()));
    assert_ne!(split_eval(items.clone(), 0.1, 43).1, ev);
    assert!(ev.windows(2).all(|w| w[0] < w[1]), "file order kept");
    let mut all: Vec<usize> = tr.iter().chain(&ev).copied().collect();
    all.sort_unstable();
    assert_eq!(all, items);
    // Tiny sets: at least one eval sample, never all.
    assert_eq!(split_eval(vec![1, 2], 0.01, 0).1.len(), 1);
    assert_eq!(split_eval(vec![1, 2], 0.99, 0).1.len(), 1);
    assert_eq!(split_eval(vec![1], 0.5, 0).1.len(), 0);
}

/// Token ids of a "document" drawn from a seeded generator, with a shared boilerplate prefix.
#[test]
fn first_fit_packs_in_order_into_the_first_row_with_room() {
    let lengths = [5, 4, 3, 6, 2, 1];
    let order: Vec<usize> = (0..6).collect();
    let rows = batch::first_fit(&order, &lengths, 8);
    assert_eq!(rows, vec![vec![0, 2], vec![1, 4, 5], vec![3]]);
}

#[test]
fn prepare_sft_splits_dedupes_and_checks_contamination() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    let mut lines: Vec<String> = (0..20)
        .map(|i| {
            json!({"text": format!("document number {i} says something distinct {}", i * 7919)})
                .to_string()
        })
        .collect();
    lines.push(lines[3].clone()); // a duplicate
    std::fs::write(&path, lines.join("\n")).unwrap();
    let cfg = DataConfig {
        format: DataFormat::Text,
        load: LoadOptions::sft(),
        curate: CurateOptions {
            max_seq_length: 40,
            dedupe: true,
        },
        eval_fraction: Some(0.2),
        seed: 7,
        contamination: ContaminationOptions::default(),
    };
    let p = prepare_sft(&path, None, &f.enc(LoadOptions::eval_command()), &cfg).unwrap();
    assert_eq!((p.train.len(), p.eval.len()), (16, 4));
    let s = &p.train_stats;
    assert_eq!(
        (s.lines, s.duplicates, s.held_out, s.samples),
        (21, 1, 4, 16)
    );
    assert_eq!(s.truncated, 20, "every line is longer than 40 bytes");
    assert!(
        s.summary()
            .starts_with("21 lines -> 16 samples + 4 held out for eval (1 duplicates")
    );
    assert_eq!(p.eval_stats.as_ref().unwrap().samples, 4);
    // cfg.load wins over the encoder's options: eos appended (ids end with <|im_end|> = 258
    // unless truncated away), i.e. the SFT options were used.
    let p2 = prepare_sft(&path, None, &f.enc(LoadOptions::sft()), &cfg).unwrap();
    assert_eq!(p2.train_digest, p.train_digest);
    assert_eq!(p.contamination.as_ref().unwrap().checked, 4);
    assert_ne!(p.train_digest, p.eval_digest);
    // The contamination check compares the lines' own words, which every sample carries.
    assert!(
        p.train
            .iter()
            .all(|s| s.text.starts_with("document number "))
    );
}

#[test]
fn pairs_are_deduped_truncated_and_dropped_as_units() {
    let f = fixture();
    let enc = f.enc(LoadOptions::sft());
    let pair = |p: &str, c: &str, r: &str, line| {
        enc.preference(
            &json!({"prompt": p, "chosen": c, "rejected": r}),
            &origin(line),
        )
        .unwrap()
    };
    let long = "x".repeat(200);
    let pairs = vec![
        pair("q", "a", "b", 1),
        pair("q", "a", "b", 2),   // duplicate
        pair("q", "a", &long, 3), // rejected truncated, still supervised
        pair(&long, "a", "b", 4), // prompt alone exceeds the limit: dropped
    ];
    let prompt_len = pairs[0].prompt.len();
    let (kept, stats) = curate_pairs(
        pairs,
        CurateOptions {
            max_seq_length: prompt_len + 10,
            dedupe: true,
        },
    );
    assert_eq!(
        kept.iter().map(|p| p.origin.line).collect::<Vec<_>>(),
        [1, 3]
    );
    assert_eq!(
        (stats.duplicates, stats.truncated, stats.dropped),
        (1, 2, 1)
    );
    assert_eq!(kept[1].rejected.len(), prompt_len + 10);
    assert_eq!(pairs_digest(&kept), pairs_digest(&kept.clone()));
}
