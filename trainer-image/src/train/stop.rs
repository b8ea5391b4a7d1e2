//! Why a run ends before it is done: [`Stop`], what every stage of `run` returns on failure, and
//! how errors of the lower layers map onto it. Each variant becomes one exit code in `job`.

use crate::error::Error;
use crate::fetch::FetchError;

/// Why a run stopped early.
#[derive(Debug)]
pub enum Stop {
    Invalid {
        message: String,
        param: Option<String>,
    },
    Diverged(String),
    /// The retention probe fell below `minScore` with `action: fail`.
    Forgetting(String),
    Oom(String),
    Preempted,
    Error(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match &e {
            Error::Torch(_) if is_oom(&message) => Stop::Oom(message),
            Error::Torch(_) => Stop::Error(message),
            Error::Data { path, line, .. } => Stop::Invalid {
                param: Some(format!("{}:{line}", path.display())),
                message,
            },
            Error::Io { path, .. }
            | Error::Format { path, .. }
            | Error::Tensor { path, .. }
            | Error::Unsupported { path, .. } => Stop::Invalid {
                param: Some(path.display().to_string()),
                message,
            },
            _ => Stop::Invalid {
                message,
                param: None,
            },
        }
    }
}

/// libtorch reports allocation failures only as text.
pub fn is_oom(m: &str) -> bool {
    let m = m.to_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory")
}

/// A refusal naming the field to fix.
pub fn invalid(message: impl Into<String>, param: &str) -> Stop {
    Stop::Invalid {
        message: message.into(),
        param: Some(param.to_string()),
    }
}

/// A failed download (from the Hub or `s3://`) as the operator should take it: a refusal (exit 2,
/// not retried) for what only a new spec or Secret fixes, naming `secret_field` when the server
/// refused the credentials from that Secret and `field` otherwise; an error (retried) for what
/// may pass by itself, its message after `context` when there is one.
pub fn fetch_stop(
    e: FetchError,
    field: &str,
    secret_field: Option<&str>,
    context: Option<&str>,
) -> Stop {
    let message = e.to_string();
    match (e, secret_field) {
        (FetchError::Refused(_), Some(secret)) => invalid(message, secret),
        (FetchError::Refused(_) | FetchError::NotFound(_) | FetchError::Unusable(_), _) => {
            invalid(message, field)
        }
        (
            FetchError::Transport(_)
            | FetchError::Protocol(_)
            | FetchError::Corrupt(_)
            | FetchError::Cache(_),
            _,
        ) => Stop::Error(match context {
            Some(context) => format!("{context}: {message}"),
            None => message,
        }),
    }
}
