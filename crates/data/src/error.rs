//! The crate's error type. Every variant names the file, row or field it is about.
use std::path::PathBuf;

use crate::origin::Origin;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("data config: {0}")]
    Config(String),
    #[error("{origin}: bad row ({reason}): {detail} (set data.on_bad_row: skip to skip and count such rows)")]
    BadRow {
        origin: Origin,
        reason: String,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("parquet {path}: {detail}")]
    Parquet { path: PathBuf, detail: String },
    #[error("tokenizer {path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("template: {0}")]
    Template(String),
    #[error("hub dataset {repo}@{revision}: {detail}")]
    Hub {
        repo: String,
        revision: String,
        detail: String,
    },
    #[error("data cache {path}: {detail}")]
    Cache { path: PathBuf, detail: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
