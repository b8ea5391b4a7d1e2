//! `verify-adapter` on a real adapter written by the trainer for a tiny random base model: the
//! verified report, and each failure the operator turns into an Adapter condition (missing file,
//! digest, LoRA settings, another base model, unreadable base), through the library and through
//! the binary's exit code and termination log.

mod train_support;

use std::path::Path;
use std::process::Command;

use finetune_crds::adapter::AdapterLora;
use finetune_crds::contract::{AdapterExpectations, AdapterVerification, VerificationReason};
use finetune_trainer::export::{BaseModelRef, write_peft_adapter};
use finetune_trainer::model::LoraConfig;
use finetune_trainer::model::lora::linear_shapes;
use finetune_trainer::train::checkpoint::digest_file;
use finetune_trainer::verify::verify_adapter;
use train_support::{load_tiny, write_tiny_model};

const URI: &str = "pvc://adapters/team/sft";

/// A base model, an adapter trained for it (r = 4 on q and v) and a second base model with
/// another hidden size, under `root`.
fn fixtures(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let base = root.join("base");
    write_tiny_model(&base, 3);
    let mut model = load_tiny(&base);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        rslora: false,
    };
    model.add_lora(&lora).unwrap();
    let adapter = root.join("adapter");
    write_peft_adapter(&adapter, &model, &lora, &BaseModelRef::named("tiny-base")).unwrap();
    let other = root.join("other-base");
    std::fs::create_dir_all(&other).unwrap();
    let mut config = train_support::config();
    config["hidden_size"] = 48.into();
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    (base, adapter, other)
}

fn expect_rank(rank: i32) -> AdapterExpectations {
    AdapterExpectations {
        lora: Some(AdapterLora {
            rank,
            alpha: 8.0,
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            rslora: false,
        }),
        ..Default::default()
    }
}

#[test]
fn the_config_alone_gives_the_shapes_of_the_loaded_model() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let model = load_tiny(dir.path());
    let loaded: std::collections::HashMap<String, (i64, i64)> = model
        .linears()
        .into_iter()
        .map(|(name, linear)| (name, linear.shape()))
        .collect();
    assert_eq!(linear_shapes(&model.config), loaded);
}

#[test]
fn a_fitting_adapter_is_verified_with_its_digests() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter, _) = fixtures(dir.path());
    let (weights_sha, weights_size) =
        digest_file(&adapter.join("adapter_model.safetensors")).unwrap();
    let mut expect = expect_rank(4);
    expect.expected_sha256.insert(
        "adapter_model.safetensors".into(),
        weights_sha.to_uppercase(),
    );
    let report = verify_adapter(&adapter, Some(&base), &expect, URI);
    assert!(report.verified, "{report:?}");
    assert_eq!(report.reason, VerificationReason::Verified);
    assert!(
        report.message.contains("4 LoRA layer(s), r = 4"),
        "{}",
        report.message
    );
    let without_base = verify_adapter(&adapter, None, &expect, URI);
    assert!(without_base.verified, "{without_base:?}");
    assert!(
        without_base
            .message
            .contains("fit to the base model not checked"),
        "{}",
        without_base.message
    );
    let names: Vec<&str> = report.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    assert_eq!(report.files[1].sha256, weights_sha);
    assert_eq!(report.files[1].size, weights_size);
}

#[test]
fn each_failure_has_its_reason_and_names_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter, other) = fixtures(dir.path());
    let check = |adapter: &Path, base: &Path, expect: &AdapterExpectations| {
        verify_adapter(adapter, Some(base), expect, URI)
    };
    let none = AdapterExpectations::default();

    let report = check(&dir.path().join("nowhere"), &base, &none);
    assert_eq!(report.reason, VerificationReason::FileMissing);
    assert_eq!(
        report.message,
        format!("{URI}: the adapter directory does not exist")
    );

    let mut wrong_digest = none.clone();
    wrong_digest
        .expected_sha256
        .insert("adapter_config.json".into(), "0".repeat(64));
    let report = check(&adapter, &base, &wrong_digest);
    assert_eq!(report.reason, VerificationReason::DigestMismatch);
    assert!(
        report.message.contains("adapter_config.json has sha256")
            && report.message.contains(&"0".repeat(64)),
        "{}",
        report.message
    );
    assert_eq!(
        report.files.len(),
        2,
        "the digests found are still reported"
    );

    let mut names_a_missing_file = none.clone();
    names_a_missing_file
        .expected_sha256
        .insert("tokenizer.json".into(), "0".repeat(64));
    let report = check(&adapter, &base, &names_a_missing_file);
    assert_eq!(report.reason, VerificationReason::FileMissing);
    assert!(
        report.message.contains("tokenizer.json is missing"),
        "{}",
        report.message
    );

    let report = check(&adapter, &base, &expect_rank(8));
    assert_eq!(report.reason, VerificationReason::LoraMismatch);
    assert_eq!(
        report.message,
        format!("{URI}: adapter_config.json has r = 4 but spec.lora.rank is 8")
    );

    let report = check(&adapter, &other, &none);
    assert_eq!(report.reason, VerificationReason::BaseModelMismatch);
    assert!(
        report
            .message
            .starts_with(&format!("{URI}/adapter_model.safetensors"))
            && report.message.contains("the base's q_proj is 48 → 48")
            && report.message.contains("adapter for another base model"),
        "{}",
        report.message
    );

    let mut outside = none.clone();
    outside
        .expected_sha256
        .insert("../base/config.json".into(), "0".repeat(64));
    let report = check(&adapter, &base, &outside);
    assert_eq!(report.reason, VerificationReason::FileMissing);
    assert!(
        report.message.contains("not a path inside"),
        "{}",
        report.message
    );

    // A file outside the listing (a subdirectory) is hashed on its own.
    std::fs::create_dir_all(adapter.join("extra")).unwrap();
    std::fs::write(adapter.join("extra/notes.txt"), "hello").unwrap();
    let mut nested = none.clone();
    nested.expected_sha256.insert(
        "extra/notes.txt".into(),
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
    );
    assert!(check(&adapter, &base, &nested).verified);

    let report = check(&adapter, &dir.path().join("no-model"), &none);
    assert_eq!(report.reason, VerificationReason::BaseModelUnavailable);
    assert!(
        report.message.starts_with("base model: "),
        "{}",
        report.message
    );

    // A config that disagrees with its own tensors is the adapter's fault, with or without a base.
    let config_path = adapter.join("adapter_config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
    config["r"] = 8.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    for base in [Some(base.as_path()), None] {
        let report = verify_adapter(&adapter, base, &none, URI);
        assert_eq!(
            report.reason,
            VerificationReason::InvalidAdapter,
            "{report:?}"
        );
        assert!(
            report.message.contains("rank mismatch"),
            "{}",
            report.message
        );
    }

    std::fs::write(
        adapter.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\"}",
    )
    .unwrap();
    let report = check(&adapter, &base, &none);
    assert_eq!(report.reason, VerificationReason::InvalidAdapter);
    assert_eq!(
        report.message,
        format!("{URI}/adapter_config.json: missing integer `r`")
    );

    std::fs::remove_file(adapter.join("adapter_model.safetensors")).unwrap();
    let report = check(&adapter, &base, &none);
    assert_eq!(report.reason, VerificationReason::FileMissing);
    assert!(
        report
            .message
            .contains("adapter_model.safetensors is missing"),
        "{}",
        report.message
    );
}

#[test]
fn the_binary_exits_2_and_leaves_the_report_for_the_kubelet() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter, other) = fixtures(dir.path());
    let log = dir.path().join("termination-log");
    let run = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_finetune-trainer"))
            .arg("verify-adapter")
            .arg("--adapter")
            .arg(&adapter)
            .arg("--model")
            .arg(model)
            .args(["--shown-as", URI, "--expect"])
            .arg(serde_json::to_string(&expect_rank(4)).unwrap())
            .env("FINETUNE_TERMINATION_LOG", &log)
            .output()
            .unwrap()
    };
    let read_log = || -> AdapterVerification {
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap()
    };

    let ok = run(&base);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(read_log().verified);

    let mismatch = run(&other);
    assert_eq!(mismatch.status.code(), Some(2));
    let report = read_log();
    assert_eq!(report.reason, VerificationReason::BaseModelMismatch);
    let stderr = String::from_utf8_lossy(&mismatch.stderr);
    assert!(
        stderr.contains("not verified (BaseModelMismatch)"),
        "{stderr}"
    );

    let bad_flag = Command::new(env!("CARGO_BIN_EXE_finetune-trainer"))
        .args([
            "verify-adapter",
            "--adapter",
            "a",
            "--model",
            "b",
            "--expect",
            "{",
        ])
        .output()
        .unwrap();
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_flag.stderr).contains("--expect: invalid JSON"));
}
