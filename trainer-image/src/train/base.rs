//! The stage before loading for an `hf://` base: fetch it into the model cache (see
//! [`crate::fetch`]), with progress on `/status` and stderr, and the Hub's refusals turned into
//! refusals that name the field (or Secret) to fix.

use std::time::{Duration, Instant};

use finetune_crds::contract::{DownloadProgress, TrainerPhase, env};

use crate::export::BaseModelRef;
use crate::fetch::{self, Event, FetchError, HubClient};
use crate::serve::Live;
use crate::train::plan::Plan;
use crate::train::stop::{Stop, invalid};

/// Seconds between progress lines on stderr.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Fetches the plan's `hf://` base, points `plan.model_path` at it, names it in
/// `plan.base_ref` as PEFT does (repository and commit) and returns the commit; `None` for a
/// base that is already a path.
pub fn fetch_base(plan: &mut Plan, live: &Live) -> Result<Option<String>, Stop> {
    let Some(hub) = plan.hub.clone() else {
        return Ok(None);
    };
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
    live.update(|s| s.phase = TrainerPhase::Downloading);
    let mut logger = ProgressLog::new(&uri);
    let fetched = fetch::fetch_model(&hub, &client, &plan.model_cache, &mut |event| {
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
    .map_err(|e| refusal(e, secret.is_some()))?;
    eprintln!(
        "base model {uri}: commit {} ({}), {}",
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
        s.base_model_commit = Some(fetched.commit.clone());
    });
    plan.model_path = fetched.path;
    plan.base_ref = BaseModelRef {
        name: hub.repo.clone(),
        revision: Some(fetched.commit.clone()),
    };
    Ok(Some(fetched.commit))
}

/// What the operator does next: a refusal (exit 2, not retried) for what only a new spec or
/// Secret can fix; an error (retried with backoff) for what may pass by itself.
fn refusal(e: FetchError, has_token: bool) -> Stop {
    let message = e.to_string();
    match e {
        FetchError::Refused(_) if has_token => invalid(message, "spec.baseModel.tokenSecretRef"),
        FetchError::Refused(_) | FetchError::NotFound(_) | FetchError::Unusable(_) => {
            invalid(message, "spec.baseModel.uri")
        }
        FetchError::Transport(_)
        | FetchError::Protocol(_)
        | FetchError::Corrupt(_)
        | FetchError::Cache(_) => Stop::Error(format!("downloading the base model: {message}")),
    }
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
                eprintln!("base model {uri}: downloading commit {commit}")
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
