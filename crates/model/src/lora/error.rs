//! The LoRA error type.
use std::path::{Path, PathBuf};

use crate::save;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("LoRA: {0}")]
    Config(String),
    #[error(transparent)]
    Save(#[from] save::SaveError),
}

pub type Result<T> = std::result::Result<T, LoraError>;

pub(super) fn invalid(path: &Path, msg: impl Into<String>) -> LoraError {
    LoraError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}
