//! One error type for everything the trainer can reject. Every variant names the file (and where it
//! applies the tensor) so a user can act on the message; `main` maps input errors to exit code 2.

use std::path::{Path, PathBuf};

/// Errors the trainer reports to the user instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what its format requires (corrupt header, bad JSON...).
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// One named tensor of a checkpoint is wrong: missing, wrong shape, unsupported type.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// The checkpoint is well-formed but describes a model this trainer does not implement.
    #[error("{}: unsupported model: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    /// A chat template failed to parse or render (including `raise_exception` from the template).
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A data set line is not in the requested format.
    #[error("{}:{line}: {message}", path.display())]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A command-line combination that cannot work.
    #[error("{0}")]
    Usage(String),
    /// libtorch itself failed (out of memory, device error); not the user's input.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn tensor(path: &Path, tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    pub fn unsupported(path: &Path, message: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// Exit status: 2 for anything caused by the input (files, flags, data), 1 for runtime failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Torch(_) => 1,
            _ => 2,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

thread_local! {
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, a call into a library that panics on some hostile inputs instead of returning an
/// error (oniguruma panics when a pattern exceeds its backtracking limit), and turns that panic
/// into `Err(message)`. While it runs, [`panic_is_contained`] tells the panic hook to stay quiet.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the library panicked".into())
    })
}

/// Whether the current thread is inside [`contain_panic`] (for the binary's panic hook).
pub fn panic_is_contained() -> bool {
    CONTAINING.with(|c| c.get())
}
