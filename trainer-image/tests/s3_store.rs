//! `s3://` against a real S3-compatible server: versitygw, built from its Go module by
//! `tests/cluster/build.sh versitygw` (make test-rust does it), on its posix backend, where a
//! bucket is a directory and an object a file. The tests put data in by writing files and look
//! at what the trainer uploaded by reading them.
//!
//! - A dataset read from `s3://` trains the same adapter, bit for bit, as the same file read
//!   from `file://`; the results land under `output.uri` with the manifest, and nothing else
//!   (no checkpoints, no staged inputs).
//! - `verify-adapter` verifies the uploaded prefix, and refuses it once a byte of it is flipped
//!   or its manifest is gone.
//! - Wrong keys fail at once, exit 2, naming the Secret; a missing object names the field.

mod train_support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HYPER: &str = "{maxSteps: 6, learningRate: 1.0e-2, batchSize: 2, gradientAccumulationSteps: 1, \
                     maxSeqLength: 64, warmupSteps: 1, seed: 7}";
const ACCESS_KEY: &str = "finetune-test";
const SECRET_KEY: &str = "finetune-test-secret-key";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_finetune-trainer")
}

/// The versitygw binary: `$FINETUNE_VERSITYGW_BIN`, else where build.sh puts it.
fn versitygw_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FINETUNE_VERSITYGW_BIN") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("FINETUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/finetune-operator")
        });
    let path = cache.join("cluster/bin/versitygw");
    assert!(
        path.is_file(),
        "{} is missing: run `tests/cluster/build.sh versitygw` (make test-rust does)",
        path.display()
    );
    path
}

/// A versitygw server on a free port, serving the directories under `root` as buckets.
struct Store {
    child: Child,
    root: PathBuf,
    endpoint: String,
}

impl Store {
    fn start(root: &Path) -> Store {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(versitygw_bin())
            .args(["--port", &format!("127.0.0.1:{port}"), "posix"])
            .arg(root)
            .env("ROOT_ACCESS_KEY", ACCESS_KEY)
            .env("ROOT_SECRET_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("versitygw starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "versitygw did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Store {
            child,
            root: root.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Creates a bucket (a directory on the posix backend).
    fn bucket(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The trainer's environment for this store, as the operator sets it.
    fn env(&self, cmd: &mut Command, secret_key: &str) {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret_key)
            .env("FINETUNE_S3_CREDENTIALS_SECRET", "s3-credentials");
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: Store,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    train_support::write_tiny_model(&root.join("model"), 3);
    train_support::write_text_data(&root.join("train.jsonl"), 24);
    std::fs::create_dir_all(root.join("s3")).unwrap();
    let store = Store::start(&root.join("s3"));
    let data = store.bucket("data").join("sets");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(root.join("train.jsonl"), data.join("train.jsonl")).unwrap();
    store.bucket("results");
    Setup {
        _tmp: tmp,
        root,
        store,
    }
}

/// Trains `train` (YAML of `spec.dataset.train`) into `name`, with `extra` spec lines.
fn train(s: &Setup, name: &str, train: &str, extra: &str, secret_key: &str) -> Output {
    let job = write_job(s, name, train, extra);
    run_job(s, name, &job, secret_key)
}

fn write_job(s: &Setup, name: &str, train: &str, extra: &str) -> PathBuf {
    train_support::write_job_training_on(
        &s.root.join(format!("{name}.yaml")),
        &s.root.join("model"),
        train,
        HYPER,
        extra,
    )
}

/// Runs the trainer on `job` with the store's settings, the model cache under the root.
fn run_job(s: &Setup, name: &str, job: &Path, secret_key: &str) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["--device", "cpu", "run"])
        .arg(job)
        .arg("--output")
        .arg(s.root.join(name))
        .env("FINETUNE_STATUS_PORT", "0")
        .env(
            "FINETUNE_TERMINATION_LOG",
            s.root.join(format!("{name}.term")),
        )
        .env("FINETUNE_MODEL_CACHE_DIR", s.root.join("model-cache"))
        .env_remove("FINETUNE_CHECKPOINT_DIR")
        .env_remove("FINETUNE_OUTPUT_DIR");
    s.store.env(&mut cmd, secret_key);
    cmd.output().unwrap()
}

/// Trains the local data on the base model at `base` (a URI) instead of the local one.
fn train_on_base(s: &Setup, name: &str, base: &str) -> Output {
    let local = format!(
        "{{uri: \"file://{}\"}}",
        s.root.join("train.jsonl").display()
    );
    let job = write_job(s, name, &local, "");
    let model = format!("file://{}", s.root.join("model").display());
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace(&model, base)).unwrap();
    run_job(s, name, &job, SECRET_KEY)
}

fn termination(s: &Setup, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(s.root.join(format!("{name}.term"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn verify(s: &Setup, uri: &str, expect: &str) -> (Output, serde_json::Value) {
    let mut cmd = Command::new(bin());
    cmd.args(["verify-adapter", "--adapter", uri, "--expect", expect])
        .arg("--scratch")
        .arg(s.root.join(format!("verify-{}", rand_suffix())))
        .arg("--model")
        .arg(s.root.join("model"));
    s.store.env(&mut cmd, SECRET_KEY);
    let out = cmd.output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_s3_dataset_trains_like_the_file_and_the_results_are_uploaded_with_a_manifest_that_verifies() {
    let s = setup();
    let local = format!(
        "{{uri: \"file://{}\"}}",
        s.root.join("train.jsonl").display()
    );
    let out = train(&s, "local", &local, "", SECRET_KEY);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = train(
        &s,
        "remote",
        "{uri: \"s3://data/sets/train.jsonl\"}",
        "  output: {uri: \"s3://results/runs/one\"}\n",
        SECRET_KEY,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // The same bytes trained: the same data digest and the same adapter, bit for bit.
    let (local_tm, remote_tm) = (termination(&s, "local"), termination(&s, "remote"));
    assert_eq!(local_tm["datasetDigest"], remote_tm["datasetDigest"]);
    let weights = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let uploaded = s.store.root.join("results/runs/one");
    assert_eq!(
        weights(&s.root.join("local")),
        weights(&s.root.join("remote"))
    );
    assert_eq!(weights(&s.root.join("remote")), weights(&uploaded));

    // Results only, each as the manifest lists it.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(uploaded.join("finetune-manifest.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for wanted in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_summary.json",
        "report.html",
    ] {
        assert!(names.contains(&wanted), "{wanted} not in {names:?}");
    }
    assert!(
        names.iter().all(|n| !n.starts_with("checkpoints")),
        "checkpoints or staged inputs uploaded: {names:?}"
    );
    for file in manifest["files"].as_array().unwrap() {
        let path = uploaded.join(file["name"].as_str().unwrap());
        let (sha256, size) = finetune_trainer::train::checkpoint::digest_file(&path).unwrap();
        assert_eq!(
            file["sha256"].as_str().unwrap(),
            sha256,
            "{}",
            path.display()
        );
        assert_eq!(file["size"].as_i64().unwrap(), size);
    }

    // The Adapter registered from the prefix verifies, with the trainer's sha256.
    let files = remote_tm["adapter"]["files"].as_array().unwrap();
    let expected: serde_json::Map<_, _> = files
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["sha256"].clone()))
        .collect();
    let expect = serde_json::json!({"expectedSha256": expected}).to_string();
    let (out, report) = verify(&s, "s3://results/runs/one", &expect);
    assert!(out.status.success(), "{report} {}", stderr(&out));
    assert_eq!(report["reason"], "Verified");

    // One byte flipped on the server: caught against the manifest.
    let weights_path = uploaded.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights_path, &bytes).unwrap();
    let (out, report) = verify(&s, "s3://results/runs/one", &expect);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert_eq!(report["reason"], "DigestMismatch", "{report}");

    // No manifest: an incomplete upload, refused as such.
    std::fs::remove_file(uploaded.join("finetune-manifest.json")).unwrap();
    let (out, report) = verify(&s, "s3://results/runs/one", &expect);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert_eq!(report["reason"], "FileMissing", "{report}");
    let message = report["message"].as_str().unwrap();
    assert!(message.contains("finetune-manifest.json"), "{message}");
}

#[test]
fn wrong_keys_fail_at_once_naming_the_secret_and_a_missing_object_names_the_field() {
    let s = setup();
    let started = Instant::now();
    let out = train(
        &s,
        "badkey",
        "{uri: \"s3://data/sets/train.jsonl\"}",
        "",
        "not-the-secret",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: a refusal is not retried",
        started.elapsed()
    );
    let tm = &termination(&s, "badkey")["error"];
    assert_eq!(tm["param"], "spec.s3.credentialsSecretRef", "{tm}");
    let message = tm["message"].as_str().unwrap();
    assert!(message.contains("Secret `s3-credentials`"), "{message}");
    // The store's own reason, not its XML.
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    assert!(!message.contains("<?xml"), "{message}");
    assert!(
        !message.contains("not-the-secret"),
        "the key leaked: {message}"
    );
    assert!(!stderr(&out).contains("not-the-secret"), "the key leaked");

    // An output bucket that does not exist: refused before any training, naming the field.
    let out = train(
        &s,
        "nobucket",
        "{uri: \"s3://data/sets/train.jsonl\"}",
        "  output: {uri: \"s3://absent-bucket/runs/one\"}\n",
        SECRET_KEY,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let tm = &termination(&s, "nobucket")["error"];
    assert_eq!(tm["param"], "spec.output.uri", "{tm}");
    assert!(!stderr(&out).contains("step 1/"), "trained before refusing");

    let out = train(
        &s,
        "missing",
        "{uri: \"s3://data/sets/absent.jsonl\"}",
        "",
        SECRET_KEY,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let tm = &termination(&s, "missing")["error"];
    assert_eq!(tm["param"], "spec.dataset.train.uri", "{tm}");
    assert!(
        tm["message"]
            .as_str()
            .unwrap()
            .contains("s3://data/sets/absent.jsonl")
    );
}

#[test]
fn a_file_larger_than_a_part_goes_up_in_parts_under_its_key_as_written_and_comes_back_whole() {
    use finetune_trainer::fetch::s3::{S3Bucket, S3Settings};
    let s = setup();
    let big = s.root.join("big.bin");
    // 40 MiB: three parts of 16 MiB, the last one short.
    let bytes: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&big, &bytes).unwrap();
    let settings = S3Settings {
        endpoint: Some(s.store.endpoint.clone()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..S3Settings::default()
    };
    let bucket = S3Bucket::open("results", &settings).unwrap();
    // The key as written: `~` is not re-encoded into another key.
    bucket.upload("large/run~1/big.bin", &big).unwrap();
    assert!(std::fs::read(s.store.root.join("results/large/run~1/big.bin")).unwrap() == bytes);
    let back = s.root.join("back.bin");
    let size = bucket
        .download("large/run~1/big.bin", &back, 40 << 20)
        .unwrap();
    assert_eq!(size, 40 << 20);
    assert!(std::fs::read(&back).unwrap() == bytes);
    // A cap below the object's size refuses it before reading.
    let refused = bucket
        .download("large/run~1/big.bin", &back, 1 << 20)
        .unwrap_err();
    assert!(refused.to_string().contains("more than the"), "{refused}");
}

#[test]
fn an_s3_base_model_trains_like_the_local_one_and_is_cached_until_an_object_changes() {
    use finetune_trainer::fetch::s3::{S3Bucket, S3Settings};
    let s = setup();
    // Uploaded through the API, so that each object has the MD5 ETag of a single-part PUT.
    let settings = S3Settings {
        endpoint: Some(s.store.endpoint.clone()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..S3Settings::default()
    };
    s.store.bucket("models");
    let bucket = S3Bucket::open("models", &settings).unwrap();
    for entry in std::fs::read_dir(s.root.join("model")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        bucket.upload(&format!("tiny/{name}"), &path).unwrap();
    }
    let prefix = s.store.root.join("models/tiny");
    let local = format!(
        "{{uri: \"file://{}\"}}",
        s.root.join("train.jsonl").display()
    );
    let out = train(&s, "local", &local, "", SECRET_KEY);
    assert!(out.status.success(), "{}", stderr(&out));

    // A byte flipped on the server (its ETag unchanged): caught by the MD5, and the attempt
    // fails as one the operator retries, not as a refusal.
    let weights_on_server = prefix.join("model.safetensors");
    let good = std::fs::read(&weights_on_server).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    std::fs::write(&weights_on_server, &flipped).unwrap();
    let out = train_on_base(&s, "corrupt", "s3://models/tiny");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("has MD5"), "{}", stderr(&out));
    std::fs::write(&weights_on_server, &good).unwrap();

    // Repaired: the retry finishes the download (the files that passed are kept).
    let out = train_on_base(&s, "first", "s3://models/tiny");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("MiB downloaded"), "{}", stderr(&out));
    let weights =
        |dir: &str| std::fs::read(s.root.join(dir).join("adapter_model.safetensors")).unwrap();
    assert!(
        weights("local") == weights("first"),
        "the same base trains the same adapter"
    );

    // Unchanged objects: found in the cache, nothing downloaded.
    let out = train_on_base(&s, "second", "s3://models/tiny");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("from the cache"), "{}", stderr(&out));

    // A new upload of one object (another ETag and size) is another version: downloaded again,
    // beside the first in the cache.
    let config = s.root.join("model/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let edited = s.root.join("config.json");
    std::fs::write(&edited, format!("{text}\n")).unwrap();
    bucket.upload("tiny/config.json", &edited).unwrap();
    let out = train_on_base(&s, "third", "s3://models/tiny");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("MiB downloaded"), "{}", stderr(&out));
    let entries: Vec<_> = std::fs::read_dir(s.root.join("model-cache/s3/models/tiny"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        entries.iter().all(|e| e.ends_with(".safetensors")),
        "{entries:?}"
    );

    // A prefix with nothing under it names the field.
    let out = train_on_base(&s, "empty", "s3://models/absent");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let tm = &termination(&s, "empty")["error"];
    assert_eq!(tm["param"], "spec.baseModel.uri", "{tm}");
}
