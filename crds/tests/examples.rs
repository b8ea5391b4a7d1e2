//! Every example manifest deserializes into the Rust types, passes `validate`, and validates
//! against the generated CRD schema with an independent JSON Schema validator.

mod common;

use finetune_crds::{Adapter, FinetuneJob, parse_manifest};
use kube::CustomResourceExt;
use serde_json::Value;

#[test]
fn every_example_is_a_valid_resource() {
    let examples = common::example_manifests();
    assert!(
        examples.len() >= 5,
        "expected at least five examples, found {examples:?}"
    );
    let mut kinds = Vec::new();
    for path in &examples {
        let text = std::fs::read_to_string(path).unwrap();
        let document: Value = serde_yaml::from_str(&text).unwrap();
        let source = path.display().to_string();
        match document["kind"].as_str() {
            Some("FinetuneJob") => {
                let job: FinetuneJob =
                    parse_manifest(&text, &source).unwrap_or_else(|e| panic!("{e}"));
                kinds.push(format!(
                    "{:?}/{:?}",
                    job.spec.method.kind, job.spec.adapter.kind
                ));
                check_with_independent_validator(&FinetuneJob::crd(), &document, &source);
            }
            Some("Adapter") => {
                parse_manifest::<Adapter>(&text, &source).unwrap_or_else(|e| panic!("{e}"));
                kinds.push("Adapter".into());
                check_with_independent_validator(&Adapter::crd(), &document, &source);
            }
            other => panic!("{source}: unexpected kind {other:?}"),
        }
    }
    for expected in ["Sft/Lora", "Dpo/Lora", "Sft/Full", "Adapter"] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "no example of {expected}: {kinds:?}"
        );
    }
}

#[test]
fn example_datasets_exist_and_parse() {
    let data = common::repo_root().join("examples/data");
    for (file, key) in [
        ("chat-train.jsonl", "messages"),
        ("chat-eval.jsonl", "messages"),
        ("instruction-train.jsonl", "instruction"),
        ("preference-train.jsonl", "chosen"),
        ("domain-text.jsonl", "text"),
    ] {
        let text = std::fs::read_to_string(data.join(file)).unwrap();
        for (index, line) in text.lines().enumerate() {
            let row: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{file}:{}: {e}", index + 1));
            assert!(row.get(key).is_some(), "{file}:{}: no {key}", index + 1);
        }
    }
}

/// Validates with the `jsonschema` crate (OpenAPI 3.0 bounds are JSON Schema draft 4), after
/// closing every object schema to unknown fields as the apiserver's strict field validation does.
fn check_with_independent_validator(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    document: &Value,
    source: &str,
) {
    let mut schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    // The apiserver checks these itself; a CRD schema leaves them out.
    let root = schema["properties"].as_object_mut().unwrap();
    for (name, kind) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        root.insert(name.into(), serde_json::json!({ "type": kind }));
    }
    close_objects(&mut schema);
    let validator =
        jsonschema::draft4::new(&schema).expect("the CRD schema is a valid draft-4 schema");
    let errors: Vec<String> = validator
        .iter_errors(document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{source}: {errors:#?}");
}

fn close_objects(schema: &mut Value) {
    if let Some(object) = schema.as_object_mut() {
        let has_properties = object.contains_key("properties");
        let preserves =
            object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if has_properties && !preserves && !object.contains_key("additionalProperties") {
            object.insert("additionalProperties".into(), Value::Bool(false));
        }
        for value in object.values_mut() {
            close_objects(value);
        }
    } else if let Some(items) = schema.as_array_mut() {
        items.iter_mut().for_each(close_objects);
    }
}
