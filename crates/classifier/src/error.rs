//! The crate's error type: every variant names the file, line or field at fault.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("candle: {0}")]
    Candle(candle_core::Error),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("{path}:{line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{what}: {msg}")]
    Format { what: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("hub: {0}")]
    Hub(String),
}

pub type Result<T> = std::result::Result<T, Error>;

// Written out rather than `#[from]`, which would also make the candle error this one's
// `source`: the message already carries it, and `{:#}` chains would print it twice.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
    pub(crate) fn format(what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Format {
            what: what.into(),
            msg: msg.to_string(),
        }
    }
}
