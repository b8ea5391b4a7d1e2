//! Why a run ends before it is done: [`Stop`], what every stage of `run` returns on failure, and
//! how errors of the lower layers map onto it. Each variant becomes one exit code in `job`.

use crate::error::Error;

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
