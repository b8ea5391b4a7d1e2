//! Bad manifests are rejected with a message that names the field at fault. Each case breaks
//! one thing in an otherwise valid job.

mod common;

use finetune_crds::{FinetuneJob, parse_manifest, validate};
use serde_json::{Value, json};

fn valid_job() -> Value {
    let path = common::repo_root().join("examples/sft-lora-smollm2.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Sets (or with `None` removes) the value at a JSON pointer, creating objects on the way.
fn edit(mut job: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut target = &mut job;
    for part in parent.split('/').skip(1) {
        target = target
            .as_object_mut()
            .unwrap()
            .entry(part)
            .or_insert_with(|| json!({}));
    }
    let object = target.as_object_mut().unwrap();
    match value {
        Some(value) => object.insert(key.to_string(), value),
        None => object.remove(key),
    };
    job
}

/// Asserts the job is rejected with an error on `field` whose message contains `words`.
fn assert_rejected(job: &Value, field: &str, words: &str) {
    let yaml = serde_yaml::to_string(job).unwrap();
    let error = parse_manifest::<FinetuneJob>(&yaml, "job.yaml")
        .expect_err("the manifest must be rejected");
    assert!(
        error
            .errors
            .iter()
            .any(|e| e.field == field && e.message.contains(words)),
        "expected an error on {field} containing {words:?}, got:\n{error}"
    );
    assert!(
        error
            .to_string()
            .starts_with("job.yaml: invalid FinetuneJob:"),
        "{error}"
    );
}

#[test]
fn the_base_job_is_valid() {
    let yaml = serde_yaml::to_string(&valid_job()).unwrap();
    let job = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap();
    assert_eq!(job.spec.adapter.lora.unwrap().rank, 16);
}

#[test]
fn unknown_field_is_named() {
    let job = edit(
        valid_job(),
        "/spec/hyperparameters/learningRat",
        Some(json!(0.1)),
    );
    assert_rejected(
        &job,
        "spec.hyperparameters.learningRat",
        "Unsupported field",
    );
}

#[test]
fn wrong_type_is_named() {
    let job = edit(
        valid_job(),
        "/spec/adapter/lora/rank",
        Some(json!("sixteen")),
    );
    assert_rejected(&job, "spec.adapter.lora.rank", "must be of type integer");
}

#[test]
fn lora_rank_below_one() {
    let job = edit(valid_job(), "/spec/adapter/lora/rank", Some(json!(0)));
    assert_rejected(
        &job,
        "spec.adapter.lora.rank",
        "must be greater than or equal to 1",
    );
}

#[test]
fn learning_rate_must_be_positive() {
    let job = edit(
        valid_job(),
        "/spec/hyperparameters/learningRate",
        Some(json!(0.0)),
    );
    assert_rejected(
        &job,
        "spec.hyperparameters.learningRate",
        "must be greater than 0",
    );
}

#[test]
fn dropout_must_be_below_one() {
    let job = edit(valid_job(), "/spec/adapter/lora/dropout", Some(json!(1.0)));
    assert_rejected(&job, "spec.adapter.lora.dropout", "must be less than 1");
}

#[test]
fn unknown_method_lists_the_supported_ones() {
    let job = edit(valid_job(), "/spec/method/type", Some(json!("ppo")));
    assert_rejected(
        &job,
        "spec.method.type",
        "supported values: \"sft\", \"dpo\"",
    );
}

#[test]
fn epochs_and_max_steps_together() {
    let job = edit(
        valid_job(),
        "/spec/hyperparameters/maxSteps",
        Some(json!(100)),
    );
    assert_rejected(
        &job,
        "spec.hyperparameters",
        "set exactly one of hyperparameters.epochs or hyperparameters.maxSteps",
    );
}

#[test]
fn neither_epochs_nor_max_steps() {
    let job = edit(valid_job(), "/spec/hyperparameters/epochs", None);
    assert_rejected(&job, "spec.hyperparameters", "set exactly one of");
}

#[test]
fn dpo_needs_preference_data() {
    let job = edit(valid_job(), "/spec/method", Some(json!({"type": "dpo"})));
    assert_rejected(
        &job,
        "spec.dataset.format",
        "set dataset.format: preference",
    );
}

#[test]
fn preference_data_needs_dpo() {
    let job = edit(
        valid_job(),
        "/spec/dataset/format",
        Some(json!("preference")),
    );
    assert_rejected(&job, "spec.method.type", "only used by method.type: dpo");
}

#[test]
fn lora_settings_need_a_lora_adapter() {
    let job = edit(valid_job(), "/spec/adapter/type", Some(json!("full")));
    assert_rejected(&job, "spec.adapter.lora", "need adapter.type: lora");
}

#[test]
fn eval_split_out_of_range() {
    let job = edit(valid_job(), "/spec/dataset/eval", None);
    let job = edit(job, "/spec/dataset/evalSplit", Some(json!(0.7)));
    assert_rejected(&job, "spec.dataset.evalSplit", "must be in (0, 0.5]");
}

#[test]
fn eval_file_and_split_together() {
    let job = edit(valid_job(), "/spec/dataset/evalSplit", Some(json!(0.1)));
    assert_rejected(
        &job,
        "spec.dataset.evalSplit",
        "either dataset.eval or dataset.evalSplit",
    );
}

#[test]
fn early_stopping_without_eval_data() {
    let job = edit(valid_job(), "/spec/dataset/eval", None);
    assert_rejected(&job, "spec.evaluation.earlyStopping", "needs eval data");
}

#[test]
fn model_uri_scheme_is_checked() {
    let job = edit(
        valid_job(),
        "/spec/baseModel/uri",
        Some(json!("gs://bucket/model.gguf")),
    );
    assert_rejected(
        &job,
        "spec.baseModel.uri",
        "pvc://CLAIM/PATH (no . or .. segments), file:///PATH, hf://ORG/NAME[@REVISION] or s3://BUCKET/KEY",
    );
}

#[test]
fn uris_that_leave_their_volume_are_refused() {
    for (pointer, uri) in [
        ("/spec/baseModel/uri", "pvc://models/../other/model.gguf"),
        ("/spec/baseModel/uri", "pvc://models/./model.gguf"),
        ("/spec/baseModel/uri", "pvc://models//etc/passwd"),
        ("/spec/baseModel/uri", "pvc://models/.."),
        ("/spec/dataset/train/uri", "pvc://data/a/../../b.jsonl"),
        ("/spec/dataset/train/uri", "configmap://examples/.."),
        ("/spec/dataset/train/uri", "configmap://examples/."),
    ] {
        let job = edit(valid_job(), pointer, Some(json!(uri)));
        let field = pointer[1..].replace('/', ".");
        assert_rejected(&job, &field, "no . or .. segments");
    }
    // Dots inside a name are fine, and so are dotted claim and ConfigMap names.
    for (pointer, uri) in [
        (
            "/spec/baseModel/uri",
            "pvc://team.models/smollm2/..model.v2.gguf",
        ),
        (
            "/spec/dataset/train/uri",
            "configmap://team.data/.hidden.jsonl",
        ),
    ] {
        let job = edit(valid_job(), pointer, Some(json!(uri)));
        let yaml = serde_yaml::to_string(&job).unwrap();
        parse_manifest::<FinetuneJob>(&yaml, "job.yaml").expect(uri);
    }
}

#[test]
fn quantities_are_checked() {
    for (pointer, value) in [
        ("/spec/resources/cpu", json!("banana")),
        ("/spec/resources/memory", json!("16 GiB")),
        ("/spec/resources/cpu", json!("-2")),
        ("/spec/storage/size", json!("20GB")),
    ] {
        let job = edit(valid_job(), pointer, Some(value));
        let field = pointer[1..].replace('/', ".");
        assert_rejected(&job, &field, "Kubernetes quantity");
    }
    for (pointer, value) in [
        ("/spec/resources/cpu", json!("500m")),
        ("/spec/resources/cpu", json!(4)),
        ("/spec/resources/memory", json!("16Gi")),
        ("/spec/resources/memory", json!("1e9")),
        ("/spec/storage/size", json!("1.5Ti")),
    ] {
        let job = edit(valid_job(), pointer, Some(value.clone()));
        let yaml = serde_yaml::to_string(&job).unwrap();
        parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap_or_else(|e| panic!("{value}: {e}"));
    }
}

#[test]
fn token_secret_only_for_hub_models() {
    let job = edit(
        valid_job(),
        "/spec/baseModel/tokenSecretRef",
        Some(json!({"name": "hf"})),
    );
    assert_rejected(
        &job,
        "spec.baseModel.tokenSecretRef",
        "only used with hf://",
    );
}

#[test]
fn l2_guard_only_for_full_fine_tuning() {
    let job = edit(
        valid_job(),
        "/spec/forgettingGuard/l2ToInit",
        Some(json!({"weight": 0.1})),
    );
    assert_rejected(
        &job,
        "spec.forgettingGuard.l2ToInit",
        "with LoRA use selfDistillation",
    );
}

#[test]
fn layer_anchor_only_for_lora() {
    let full = edit(valid_job(), "/spec/adapter", Some(json!({"type": "full"})));
    let job = edit(
        full,
        "/spec/forgettingGuard/layerAnchor",
        Some(json!({"weight": 3.0e4})),
    );
    assert_rejected(
        &job,
        "spec.forgettingGuard.layerAnchor",
        "full fine-tuning uses l2ToInit",
    );
}

#[test]
fn disabled_guard_cannot_name_a_guard() {
    let job = edit(
        valid_job(),
        "/spec/forgettingGuard",
        Some(json!({"disabled": true, "selfReplay": {"ratio": 0.25}})),
    );
    assert_rejected(
        &job,
        "spec.forgettingGuard",
        "cannot be combined with a guard",
    );
    let off = edit(
        valid_job(),
        "/spec/forgettingGuard",
        Some(json!({"disabled": true})),
    );
    let yaml = serde_yaml::to_string(&off).unwrap();
    let job = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").expect("disabled alone is valid");
    assert!(job.spec.forgetting_guard.unwrap().disabled);
}

#[test]
fn missing_required_section() {
    let job = edit(valid_job(), "/spec/dataset", None);
    assert_rejected(&job, "spec.dataset", "Required value");
}

#[test]
fn existing_claim_excludes_size() {
    let job = edit(
        valid_job(),
        "/spec/storage",
        Some(json!({"claimName": "ckpt", "size": "10Gi"})),
    );
    assert_rejected(&job, "spec.storage.claimName", "uses an existing claim");
}

#[test]
fn adapter_name_must_be_a_dns_label() {
    let job = edit(
        valid_job(),
        "/spec/output/adapterName",
        Some(json!("My_Adapter")),
    );
    assert_rejected(&job, "spec.output.adapterName", "lowercase DNS label");
}

#[test]
fn wrong_api_version() {
    let job = edit(valid_job(), "/apiVersion", Some(json!("finetune.dev/v1")));
    assert_rejected(&job, "apiVersion", "must be finetune.dev/v1alpha1");
}

#[test]
fn every_problem_is_reported_at_once() {
    let job = edit(valid_job(), "/spec/adapter/lora/rank", Some(json!(0)));
    let job = edit(job, "/spec/hyperparameters/batchSize", Some(json!(-1)));
    let yaml = serde_yaml::to_string(&job).unwrap();
    let error = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap_err();
    let fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.adapter.lora.rank", "spec.hyperparameters.batchSize"]
    );
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let error = parse_manifest::<FinetuneJob>(
        "apiVersion: finetune.dev/v1alpha1\nkind: [FinetuneJob\n",
        "job.yaml",
    )
    .unwrap_err();
    assert!(error.to_string().contains("line"), "{error}");
}

#[test]
fn defaults_are_filled_in_like_the_apiserver() {
    let job = edit(
        valid_job(),
        "/spec/adapter",
        Some(json!({"type": "lora", "lora": {}})),
    );
    let job = edit(job, "/spec/checkpoint", None);
    let yaml = serde_yaml::to_string(&job).unwrap();
    let job = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap();
    let lora = job.spec.adapter.lora.unwrap();
    assert_eq!(
        (lora.rank, lora.alpha, lora.target_modules.len()),
        (16, 32.0, 7)
    );
    assert_eq!(job.spec.checkpoint.keep_last, 3);
}

#[test]
fn started_jobs_keep_their_dataset() {
    let old = edit(
        valid_job(),
        "/status/startTime",
        Some(json!("2026-11-26T10:00:00Z")),
    );
    let changed = edit(
        old.clone(),
        "/spec/dataset/format",
        Some(json!("instruction")),
    );
    let error = validate::check_update::<FinetuneJob>(&changed, &old).unwrap_err();
    assert!(
        error.iter().any(|e| e.field == "spec.dataset"
            && e.message.contains("cannot change once the job has started")),
        "{error:?}"
    );

    let not_started = edit(
        valid_job(),
        "/spec/dataset/format",
        Some(json!("instruction")),
    );
    assert!(validate::check_update::<FinetuneJob>(&not_started, &valid_job()).is_ok());
}

#[test]
fn job_names_leave_room_for_pod_names() {
    let job = edit(valid_job(), "/metadata/name", Some(json!("x".repeat(49))));
    assert_rejected(&job, "", "metadata.name must be at most 48 characters");
}

#[test]
fn label_smoothing_must_stay_below_one_half() {
    let dpo = json!({"type": "dpo", "dpo": {"labelSmoothing": 0.5}});
    let job = edit(valid_job(), "/spec/method", Some(dpo));
    let job = edit(job, "/spec/dataset/format", Some(json!("preference")));
    assert_rejected(&job, "spec.method.dpo.labelSmoothing", "must be below 0.5");
    // Whole numbers are valid values: the apiserver once rejected 0 through a truncated bound.
    let job = edit(job, "/spec/method/dpo/labelSmoothing", Some(json!(0)));
    let yaml = serde_yaml::to_string(&job).unwrap();
    parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap();
}

#[test]
fn deep_flow_nesting_is_refused_before_parsing() {
    let yaml = format!("spec: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let start = std::time::Instant::now();
    let error = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").expect_err("too deep");
    assert!(start.elapsed().as_secs() < 2, "{:?}", start.elapsed());
    assert!(
        error.to_string().contains("nested deeper than 100"),
        "{error}"
    );
    // Brackets inside quoted scalars and comments do not count.
    let mut job = valid_job();
    job["metadata"]["annotations"] = json!({"note": "[".repeat(500)});
    let yaml = serde_yaml::to_string(&job).unwrap() + &format!("# {}\n", "{".repeat(500));
    parse_manifest::<FinetuneJob>(&yaml, "job.yaml").expect("quoted brackets are text");
}

#[test]
fn oversized_manifest_file_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(4 << 30).unwrap(); // sparse: 4 GiB of NUL bytes
    let error = finetune_crds::read_manifest::<FinetuneJob>(&path).expect_err("too large");
    assert!(error.to_string().contains("apiserver's limit"), "{error}");
}

fn mixture(sources: Value) -> Value {
    edit(
        valid_job(),
        "/spec/dataset/train",
        Some(json!({"sources": sources})),
    )
}

#[test]
fn a_mixture_parses_and_its_rules_name_the_field() {
    let ok = mixture(json!([
        {"uri": "configmap://d/a.jsonl", "weight": 3},
        {"uri": "pvc://data/b.jsonl", "format": "instruction", "samples": 500}
    ]));
    let yaml = serde_yaml::to_string(&ok).unwrap();
    let job = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").expect("a valid mixture");
    assert_eq!(job.spec.dataset.train.sources.len(), 2);
    assert_eq!(job.spec.dataset.train.uris().len(), 2);

    let both = edit(
        ok.clone(),
        "/spec/dataset/train/uri",
        Some(json!("file:///x.jsonl")),
    );
    assert_rejected(&both, "spec.dataset.train", "uri (one file) or sources");
    let neither = edit(valid_job(), "/spec/dataset/train", Some(json!({})));
    assert_rejected(&neither, "spec.dataset.train", "uri (one file) or sources");
    let one = mixture(json!([{"uri": "configmap://d/a.jsonl"}]));
    assert_rejected(&one, "spec.dataset.train.sources", "");
    let twice = mixture(json!([
        {"uri": "configmap://d/a.jsonl", "weight": 1, "samples": 10},
        {"uri": "configmap://d/b.jsonl"}
    ]));
    assert_rejected(&twice, "spec.dataset.train.sources[0].samples", "not both");
    let escape = mixture(json!([
        {"uri": "pvc://data/../etc/passwd"}, {"uri": "configmap://d/b.jsonl"}
    ]));
    assert_rejected(
        &escape,
        "spec.dataset.train.sources[0].uri",
        "no . or .. segments",
    );
    let dpo = edit(
        edit(ok, "/spec/method", Some(json!({"type": "dpo"}))),
        "/spec/dataset/format",
        Some(json!("preference")),
    );
    assert_rejected(&dpo, "spec.dataset.train.sources", "for SFT data");
}

#[test]
fn s3_and_hub_dataset_uris_outputs_and_the_store_settings_are_checked() {
    // Accepted: an s3:// dataset and output, with an http endpoint and a credentials Secret.
    let job = edit(
        valid_job(),
        "/spec/dataset/train/uri",
        Some(json!("s3://team-data/sets/train.jsonl")),
    );
    let job = edit(
        job,
        "/spec/output/uri",
        Some(json!("s3://team-results/runs/one")),
    );
    let job = edit(
        job,
        "/spec/s3",
        Some(
            json!({"endpoint": "http://minio.storage:9000", "credentialsSecretRef": {"name": "s3"}}),
        ),
    );
    let yaml = serde_yaml::to_string(&job).unwrap();
    let parsed = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap();
    assert_eq!(
        parsed.spec.s3.unwrap().credentials_secret_ref.unwrap().name,
        "s3"
    );
    // And a file of a Hub dataset, with its own token.
    let job = edit(
        valid_job(),
        "/spec/dataset/train/uri",
        Some(json!("hf://datasets/team/support-chat@v2/data/train.jsonl")),
    );
    let job = edit(
        job,
        "/spec/dataset/tokenSecretRef",
        Some(json!({"name": "hf-data"})),
    );
    let yaml = serde_yaml::to_string(&job).unwrap();
    let parsed = parse_manifest::<FinetuneJob>(&yaml, "job.yaml").unwrap();
    assert_eq!(parsed.spec.dataset.token_secret_ref.unwrap().key, "token");

    for (pointer, uri, field, words) in [
        (
            "/spec/dataset/train/uri",
            "s3://Team/k.jsonl",
            "spec.dataset.train.uri",
            "s3://BUCKET/KEY",
        ),
        (
            "/spec/dataset/train/uri",
            "s3://team/a/../k",
            "spec.dataset.train.uri",
            "s3://BUCKET/KEY",
        ),
        (
            "/spec/output/uri",
            "pvc://results/run",
            "spec.output.uri",
            "s3://BUCKET/PREFIX",
        ),
        (
            "/spec/output/uri",
            "s3://team-results",
            "spec.output.uri",
            "s3://BUCKET/PREFIX",
        ),
        (
            "/spec/s3/endpoint",
            "minio:9000",
            "spec.s3.endpoint",
            "http:// or https://",
        ),
        (
            "/spec/s3/endpoint",
            "https://key:secret@minio",
            "spec.s3.endpoint",
            "without credentials",
        ),
        (
            "/spec/dataset/train/uri",
            "hf://datasets/org/chat",
            "spec.dataset.train.uri",
            "hf://datasets/ORG/NAME[@REVISION]/PATH",
        ),
        (
            "/spec/dataset/train/uri",
            "hf://org/model",
            "spec.dataset.train.uri",
            "hf://datasets/ORG/NAME[@REVISION]/PATH",
        ),
    ] {
        let job = edit(valid_job(), pointer, Some(json!(uri)));
        assert_rejected(&job, field, words);
    }
}
