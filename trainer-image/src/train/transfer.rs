//! The stages around training that move data: dataset files downloaded from `s3://` or the Hub
//! before the data loads, results uploaded to `s3://` after they are written. Refusals name the
//! field or Secret to fix; the rest is retried by the operator like any other failure.

use std::collections::BTreeMap;

use finetune_crds::contract::env;

use crate::fetch::prefix::{self, Manifest};
use crate::fetch::s3::{S3Bucket, S3Settings};
use crate::fetch::{self, Event, FetchError, HubClient};
use crate::limits::MAX_REMOTE_FILE;
use crate::train::plan::{Plan, RemoteSource};
use crate::train::stop::{Stop, fetch_stop};

/// Downloads the plan's `s3://` and `hf://datasets/` files to the paths the plan gave them.
pub fn fetch_inputs(plan: &Plan) -> Result<(), Stop> {
    if plan.remote_inputs.is_empty() {
        return Ok(());
    }
    let settings = S3Settings::from_env();
    let mut buckets = Buckets::new(&settings);
    let hub = hub_client(plan);
    for input in &plan.remote_inputs {
        std::fs::create_dir_all(&input.dir)
            .map_err(|e| Stop::Error(format!("{}: {e}", input.dir.display())))?;
        let size = match &input.source {
            RemoteSource::S3 { bucket, key } => buckets
                .get(bucket)
                .and_then(|b| b.download(key, &input.path, MAX_REMOTE_FILE))
                .map_err(|e| refusal(e, &input.field, &settings))?,
            RemoteSource::Hub {
                repo,
                revision,
                path,
            } => {
                let (commit, size) =
                    fetch::fetch_file(&hub, repo, revision, path, &input.dir, &mut |event| {
                        if let Event::Retry { file, reason } = event {
                            eprintln!("dataset {}: fetching {file} again: {reason}", input.uri)
                        }
                    })
                    .map_err(|e| hub_refusal(e, &input.field, plan))?;
                eprintln!("dataset {}: commit {commit}", input.uri);
                size
            }
        };
        eprintln!(
            "dataset {}: {:.1} MiB downloaded to {}",
            input.uri,
            size as f64 / (1 << 20) as f64,
            input.path.display()
        );
    }
    Ok(())
}

/// The Hub client for dataset files: `HF_ENDPOINT`, and the token of `dataset.tokenSecretRef`
/// (read here, never stored in the plan).
fn hub_client(plan: &Plan) -> HubClient {
    let secret = plan.spec().dataset.token_secret_ref.as_ref();
    let token = std::env::var(env::HF_DATASET_TOKEN).ok();
    let source = secret.map(|s| format!("Secret `{}` (key `{}`)", s.name, s.key));
    HubClient::new(&plan.hf_endpoint, token, source)
}

/// [`fetch_stop`] for a Hub dataset file: a refused token names `dataset.tokenSecretRef`.
fn hub_refusal(e: FetchError, field: &str, plan: &Plan) -> Stop {
    let secret_field = plan
        .spec()
        .dataset
        .token_secret_ref
        .is_some()
        .then_some("spec.dataset.tokenSecretRef");
    fetch_stop(
        e,
        field,
        secret_field,
        Some(&format!("downloading {field}")),
    )
}

/// Checks before training that `output.uri` may be written (a probe object put and deleted),
/// so that wrong keys or a missing bucket fail the job now, not after hours of training.
pub fn check_output(plan: &Plan) -> Result<(), Stop> {
    let Some((bucket, prefix)) = &plan.output_uri else {
        return Ok(());
    };
    let settings = S3Settings::from_env();
    let field = "spec.output.uri";
    let probe = format!("{}/.finetune-write-check", prefix.trim_end_matches('/'));
    let bucket = S3Bucket::open(bucket, &settings).map_err(|e| refusal(e, field, &settings))?;
    bucket
        .put(
            &probe,
            b"finetune-operator checks that it may write here\n".to_vec(),
        )
        .and_then(|()| bucket.delete(&probe))
        .map_err(|e| refusal(e, field, &settings))
}

/// Uploads the results in `plan.output_dir` to `output.uri` (checkpoints and staged inputs
/// left out), the manifest last. Nothing to do without an `output.uri`.
pub fn upload_outputs(plan: &Plan) -> Result<Option<Manifest>, Stop> {
    let Some((bucket, prefix)) = &plan.output_uri else {
        return Ok(None);
    };
    let settings = S3Settings::from_env();
    let field = "spec.output.uri";
    let bucket = S3Bucket::open(bucket, &settings).map_err(|e| refusal(e, field, &settings))?;
    let uri = format!("s3://{}/{prefix}", bucket.name());
    eprintln!("output: uploading {} to {uri}", plan.output_dir.display());
    // Local runs keep checkpoints (with the staged inputs) and the model cache inside the
    // output directory; they are not results.
    let skip = [plan.checkpoint_dir.as_path(), plan.model_cache.as_path()];
    let manifest = prefix::upload_dir(&bucket, prefix, &plan.output_dir, &skip, &mut |name| {
        eprintln!("output: {uri}/{name}")
    })
    .map_err(|e| refusal(e, field, &settings))?;
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    eprintln!(
        "output: {} file(s), {:.1} MiB, then {} written to {uri}",
        manifest.files.len(),
        bytes as f64 / (1 << 20) as f64,
        prefix::MANIFEST
    );
    Ok(Some(manifest))
}

/// One client per bucket a job names.
struct Buckets<'a> {
    settings: &'a S3Settings,
    open: BTreeMap<String, S3Bucket>,
}

impl<'a> Buckets<'a> {
    fn new(settings: &'a S3Settings) -> Self {
        Buckets {
            settings,
            open: BTreeMap::new(),
        }
    }

    fn get(&mut self, name: &str) -> Result<&S3Bucket, FetchError> {
        if !self.open.contains_key(name) {
            let bucket = S3Bucket::open(name, self.settings)?;
            self.open.insert(name.to_string(), bucket);
        }
        Ok(&self.open[name])
    }
}

/// [`fetch_stop`] for `s3://`: keys the store refuses name `s3.credentialsSecretRef`.
pub(crate) fn refusal(e: FetchError, field: &str, settings: &S3Settings) -> Stop {
    let secret_field = settings
        .secret_name
        .is_some()
        .then_some("spec.s3.credentialsSecretRef");
    fetch_stop(e, field, secret_field, None)
}
