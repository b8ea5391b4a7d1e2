//! Training mixtures through the real pipeline: two files of different sizes and formats mixed
//! 3:1 by weight, curated, split and drawn, then one epoch of the real batcher counted by where
//! each trained sample came from.

use std::path::Path;

use finetune_trainer::data::mixture::{MixSource, Share, prepare_mixture};
use finetune_trainer::data::testing::byte_tokenizer;
use finetune_trainer::data::{
    BatchPlan, Batcher, ContaminationOptions, CurateOptions, DataConfig, DataFormat, Encoder,
    LoadOptions,
};

fn write_lines(path: &Path, n: usize, line: impl Fn(usize) -> serde_json::Value) {
    let text: String = (0..n).map(|i| format!("{}\n", line(i))).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_3_to_1_mixture_trains_that_ratio_over_an_epoch_and_draws_the_same_set_again() {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(dir.path(), "<|endoftext|>");
    let template = finetune_trainer::data::testing::chatml();
    // 30 text lines (repeated 3x to fill their share) and 90 instruction lines (subsampled).
    let small = dir.path().join("small.jsonl");
    write_lines(
        &small,
        30,
        |i| serde_json::json!({"text": format!("alpha line {i}")}),
    );
    let large = dir.path().join("large.jsonl");
    write_lines(
        &large,
        90,
        |i| serde_json::json!({"instruction": format!("say {i}"), "output": format!("beta {i}")}),
    );
    let sources = vec![
        MixSource {
            path: small.clone(),
            format: DataFormat::Text,
            share: Share::Weight(3.0),
        },
        MixSource {
            path: large.clone(),
            format: DataFormat::Instruction,
            share: Share::Weight(1.0),
        },
    ];
    let encoder = Encoder {
        tokenizer: &tok,
        template: Some(&template),
        options: LoadOptions::sft(),
    };
    let cfg = DataConfig {
        format: DataFormat::Text,
        load: LoadOptions::sft(),
        curate: CurateOptions {
            max_seq_length: 128,
            dedupe: true,
        },
        eval_fraction: Some(0.1),
        seed: 11,
        contamination: ContaminationOptions::default(),
    };
    let (prepared, reports) = prepare_mixture(&sources, None, &encoder, &cfg).unwrap();
    // 10 % of each source held out first: 27 + 81 = 108 training samples, drawn 81 : 27.
    assert_eq!(prepared.eval.len(), 3 + 9);
    assert_eq!(
        reports
            .iter()
            .map(|r| (r.available, r.drawn))
            .collect::<Vec<_>>(),
        vec![(27, 81), (81, 27)]
    );
    let eval_lines: Vec<_> = prepared.eval.iter().map(|s| s.origin.clone()).collect();

    let mut batcher = Batcher::new(
        prepared.train.clone(),
        BatchPlan {
            batch_size: 4,
            max_seq_length: 128,
            packing: false,
            seed: 11,
        },
    );
    let (mut from_small, mut from_large) = (0usize, 0usize);
    for _ in 0..batcher.batches_per_epoch() {
        for row in batcher.next_rows() {
            for &i in &row {
                let origin = &batcher.samples()[i].origin;
                assert!(
                    !eval_lines.contains(origin),
                    "{origin} is held out for eval"
                );
                if *origin.path == *small {
                    from_small += 1;
                } else {
                    from_large += 1;
                }
            }
        }
    }
    let ratio = from_small as f64 / from_large as f64;
    eprintln!("one epoch: {from_small} from the small file, {from_large} from the large one");
    assert!((ratio - 3.0).abs() <= 0.15, "ratio {ratio} is not 3 ± 5 %");
    // Seeded: the same sources and seed give the same set (the resume check's digest).
    let (again, _) = prepare_mixture(&sources, None, &encoder, &cfg).unwrap();
    assert_eq!(again.train_digest, prepared.train_digest);
    let other = DataConfig { seed: 12, ..cfg };
    let (reseeded, _) = prepare_mixture(&sources, None, &encoder, &other).unwrap();
    assert_ne!(reseeded.train_digest, prepared.train_digest);
}
