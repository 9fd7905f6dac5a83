//! The trainer's error: one variant per part of a run, each message naming what failed.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    #[error("data: {0}")]
    Data(#[from] sft_data::DataError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("optimizer: {0}")]
    Optim(String),
    #[error("evaluation: {0}")]
    Eval(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Io(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}

impl TrainError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        TrainError::Io(format!("{}: {e}", path.display()))
    }
    pub(crate) fn checkpoint(e: crate::checkpoint::CheckpointError) -> Self {
        TrainError::Checkpoint(e.to_string())
    }
    pub(crate) fn eval(e: sft_eval::BoxError) -> Self {
        TrainError::Eval(e.to_string())
    }
    pub(crate) fn optim(e: impl std::fmt::Display) -> Self {
        TrainError::Optim(e.to_string())
    }
}
