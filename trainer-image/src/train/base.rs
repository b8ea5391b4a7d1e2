//! The stage before loading for an `hf://` or `s3://` base: fetch it into the model cache (see
//! [`crate::fetch`]), with progress on `/status` and stderr, and the refusals of the Hub or the
//! store turned into refusals that name the field (or Secret) to fix.

use std::time::{Duration, Instant};

use finetune_crds::contract::{DownloadProgress, TrainerPhase, env};

use crate::export::BaseModelRef;
use crate::fetch::s3::{S3Bucket, S3Settings};
use crate::fetch::s3_model::{S3Model, fetch_s3_model};
use crate::fetch::{self, Event, FetchError, Fetched, HubClient, HubModel};
use crate::serve::Live;
use crate::train::plan::{Plan, RemoteBase};
use crate::train::stop::{Stop, fetch_stop};
use crate::train::transfer;

/// Seconds between progress lines on stderr.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Fetches the plan's `hf://` or `s3://` base and points `plan.model_path` at it. For the Hub
/// it also names the base in `plan.base_ref` as PEFT does (repository and commit) and returns
/// the commit; `None` for any other base.
pub fn fetch_base(plan: &mut Plan, live: &Live) -> Result<Option<String>, Stop> {
    match plan.remote_base.clone() {
        None => Ok(None),
        Some(RemoteBase::Hub(hub)) => fetch_hub_base(plan, live, &hub).map(Some),
        Some(RemoteBase::S3(model)) => {
            fetch_s3_base(plan, live, &model)?;
            Ok(None)
        }
    }
}

fn fetch_hub_base(plan: &mut Plan, live: &Live, hub: &HubModel) -> Result<String, Stop> {
    let secret = plan.spec().base_model.token_secret_ref.clone();
    // Read here, never stored in the plan: the plan is Debug-printed, the token must not be.
    let token = std::env::var(env::HF_TOKEN).ok();
    let token_source = secret
        .as_ref()
        .map(|s| format!("Secret `{}` (key `{}`)", s.name, s.key));
    let client = HubClient::new(&plan.hf_endpoint, token, token_source);
    let uri = plan.spec().base_model.uri.clone();
    eprintln!(
        "base model {uri}: from {} into {}",
        client.endpoint(),
        plan.model_cache.display()
    );
    let fetched = downloading(live, &uri, |report| {
        fetch::fetch_model(hub, &client, &plan.model_cache, report)
    })
    .map_err(|e| {
        let secret_field = secret.is_some().then_some("spec.baseModel.tokenSecretRef");
        fetch_stop(
            e,
            "spec.baseModel.uri",
            secret_field,
            Some("downloading the base model"),
        )
    })?;
    done(live, &uri, &fetched, Some(&fetched.commit));
    plan.model_path = fetched.path;
    plan.base_ref = BaseModelRef {
        name: hub.repo.clone(),
        revision: Some(fetched.commit.clone()),
    };
    Ok(fetched.commit)
}

fn fetch_s3_base(plan: &mut Plan, live: &Live, model: &S3Model) -> Result<(), Stop> {
    let settings = S3Settings::from_env();
    let field = "spec.baseModel.uri";
    let uri = plan.spec().base_model.uri.clone();
    eprintln!("base model {uri}: into {}", plan.model_cache.display());
    let fetched = downloading(live, &uri, |report| {
        let bucket = S3Bucket::open(&model.bucket, &settings)?;
        fetch_s3_model(model, &bucket, &plan.model_cache, report)
    })
    .map_err(|e| transfer::refusal(e, field, &settings))?;
    done(live, &uri, &fetched, None);
    plan.model_path = fetched.path;
    Ok(())
}

/// Runs `fetch` in the `Downloading` phase, its bytes on `/status` and its progress on stderr.
fn downloading(
    live: &Live,
    uri: &str,
    fetch: impl FnOnce(&mut dyn FnMut(Event)) -> Result<Fetched, FetchError>,
) -> Result<Fetched, FetchError> {
    live.update(|s| s.phase = TrainerPhase::Downloading);
    let mut logger = ProgressLog::new(uri);
    fetch(&mut |event| {
        if let Event::Bytes { done, total } = &event {
            live.update(|s| {
                s.download = Some(DownloadProgress {
                    bytes_done: *done as i64,
                    bytes_total: *total as i64,
                })
            });
        }
        logger.log(&event);
    })
}

/// Says where the model came from and leaves the `Downloading` phase.
fn done(live: &Live, uri: &str, fetched: &Fetched, commit: Option<&String>) {
    eprintln!(
        "base model {uri}: {} ({}), {}",
        fetched.commit,
        fetched.path.display(),
        match fetched.downloaded {
            0 => "from the cache".to_string(),
            n => format!("{:.1} MiB downloaded", n as f64 / (1 << 20) as f64),
        }
    );
    live.update(|s| {
        s.phase = TrainerPhase::Loading;
        s.download = None;
        s.base_model_commit = commit.cloned();
    });
}

/// Progress lines at most every [`LOG_EVERY`], and every retry.
struct ProgressLog<'a> {
    uri: &'a str,
    last: Option<Instant>,
    /// Bytes at the last line (the end of a file reports the count its last chunk did).
    last_done: u64,
    started: Instant,
}

impl<'a> ProgressLog<'a> {
    fn new(uri: &'a str) -> Self {
        ProgressLog {
            uri,
            last: None,
            last_done: u64::MAX,
            started: Instant::now(),
        }
    }

    fn log(&mut self, event: &Event) {
        let uri = self.uri;
        match event {
            Event::Resolved { commit, cached } if !cached => {
                eprintln!("base model {uri}: downloading version {commit}")
            }
            Event::Resolved { .. } => {}
            Event::Waiting => eprintln!(
                "base model {uri}: another job is downloading it into the shared cache; waiting"
            ),
            Event::Retry { file, reason } => {
                eprintln!("base model {uri}: fetching {file} again: {reason}")
            }
            Event::Bytes { done, total } => {
                let due = self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY);
                if (due || done == total) && *done != self.last_done {
                    self.last = Some(Instant::now());
                    self.last_done = *done;
                    let mib = |b: u64| b as f64 / (1 << 20) as f64;
                    let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!(
                        "base model {uri}: {:.1} of {:.1} MiB ({:.0}%), {:.1} MiB/s",
                        mib(*done),
                        mib(*total),
                        100.0 * *done as f64 / (*total).max(1) as f64,
                        mib(*done) / secs
                    );
                }
            }
        }
    }
}
