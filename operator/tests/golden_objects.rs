//! The objects the operator applies for every example, compared byte for byte with the files
//! under `tests/golden/`: a refactoring of the builders or of the controller around them must not
//! change one byte of a ConfigMap, claim or pod that reaches the apiserver. An intended change is
//! recorded with `UPDATE_GOLDEN=1 cargo test -p finetune-operator --test golden_objects`, and the
//! diff of the golden files shows it in review.
//!
//! Server-side values are fixed (namespace, UID, generation, the resolved starting adapter), so
//! the output depends on the builders alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use finetune_crds::{Adapter, FinetuneJob, parse_manifest};
use finetune_operator::adapter::build::verification_pod;
use finetune_operator::api::stamp_hash;
use finetune_operator::finetunejob::build;
use finetune_operator::finetunejob::names;
use finetune_operator::pods::BuildSettings;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

const NAMESPACE: &str = "team-a";
const UID: &str = "0b5c7a4e-1111-2222-3333-444455556666";
const ATTEMPT: i32 = 0;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn pretty<T: Serialize>(object: &T) -> String {
    let mut text = serde_json::to_string_pretty(object).expect("objects serialize to JSON");
    text.push('\n');
    text
}

/// The trainer pod as the controller applies it, with the starting adapter resolved to `init`.
fn trainer_pod(job: &FinetuneJob, init: Option<&str>) -> Pod {
    build::trainer_pod(job, ATTEMPT, &BuildSettings::default(), init).unwrap()
}

/// Where the controller finds the files of the Adapter a job starts from: the output of the
/// example job that registers it (as `init_adapter::adapter_uri` resolves a `source.fromJob`),
/// plus one case for each other place an Adapter's files can be, so that every way of mounting
/// the starting adapter is covered.
fn init_adapter_cases(job: &FinetuneJob, jobs: &[FinetuneJob]) -> Vec<(String, String)> {
    let Some(adapter) = &job.spec.adapter.init_adapter else {
        return Vec::new();
    };
    let producer = jobs
        .iter()
        .find(|other| other.spec.output.adapter_name.as_ref() == Some(adapter))
        .expect("an example job produces the starting adapter");
    let producer_name = producer.metadata.name.clone().unwrap();
    let producer_claim = (producer.spec.storage.claim_name.clone())
        .unwrap_or_else(|| names::storage_claim(&producer_name));
    let own_claim = names::storage_claim(&job.metadata.name.clone().unwrap());
    vec![
        (
            "pod".into(),
            format!("pvc://{producer_claim}/{producer_name}/output"),
        ),
        (
            "pod-init-own-claim".into(),
            format!("pvc://{own_claim}/earlier/output"),
        ),
        (
            "pod-init-base-model-claim".into(),
            "pvc://models/adapters/earlier".into(),
        ),
        (
            "pod-init-file".into(),
            "file:///srv/adapters/earlier".into(),
        ),
    ]
}

fn job_objects(stem: &str, job: &FinetuneJob, jobs: &[FinetuneJob]) -> BTreeMap<String, String> {
    let mut objects = BTreeMap::new();
    let mut map = build::manifest_config_map(job).unwrap();
    stamp_hash(&mut map);
    objects.insert(format!("{stem}.configmap.json"), pretty(&map));
    if let Some(mut claim) = build::storage_claim(job, &BuildSettings::default()).unwrap() {
        stamp_hash(&mut claim);
        objects.insert(format!("{stem}.pvc.json"), pretty(&claim));
    }
    let cases = init_adapter_cases(job, jobs);
    if cases.is_empty() {
        objects.insert(format!("{stem}.pod.json"), pretty(&trainer_pod(job, None)));
    }
    for (name, uri) in cases {
        let pod = trainer_pod(job, Some(&uri));
        objects.insert(format!("{stem}.{name}.json"), pretty(&pod));
    }
    objects
}

fn adapter_objects(stem: &str, text: &str) -> BTreeMap<String, String> {
    let mut adapter: Adapter = parse_manifest(text, stem).unwrap();
    adapter.metadata.namespace = Some(NAMESPACE.into());
    adapter.metadata.uid = Some(UID.into());
    adapter.metadata.generation = Some(1);
    let pod = verification_pod(&adapter, &BuildSettings::default()).unwrap();
    BTreeMap::from([(format!("{stem}.verification-pod.json"), pretty(&pod))])
}

/// Every object built from every example, by golden file name.
fn built_objects() -> BTreeMap<String, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    let mut objects = BTreeMap::new();
    let mut jobs = Vec::new();
    for path in paths {
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let kind: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        match kind["kind"].as_str() {
            Some("FinetuneJob") => {
                let mut job: FinetuneJob = parse_manifest(&text, &stem).unwrap();
                job.metadata.namespace = Some(NAMESPACE.into());
                job.metadata.uid = Some(UID.into());
                job.metadata.generation = Some(1);
                jobs.push((stem, job));
            }
            Some("Adapter") => objects.extend(adapter_objects(&stem, &text)),
            _ => {}
        }
    }
    let all: Vec<FinetuneJob> = jobs.iter().map(|(_, job)| job.clone()).collect();
    for (stem, job) in &jobs {
        objects.extend(job_objects(stem, job, &all));
    }
    objects
}

#[test]
fn applied_objects_match_the_golden_files_byte_for_byte() {
    let built = built_objects();
    let dir = golden_dir();
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &built {
            std::fs::write(dir.join(name), text).unwrap();
        }
        return;
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error} (UPDATE_GOLDEN=1 writes it)", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let expected: Vec<String> = built.keys().cloned().collect();
    assert_eq!(
        on_disk, expected,
        "the golden files are not the built objects"
    );
    for (name, text) in &built {
        let golden = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            golden == *text,
            "{name} differs from its golden file; built:\n{text}"
        );
    }
}
