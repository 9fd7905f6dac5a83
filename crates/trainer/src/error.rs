//! The trainer's error: one variant per part of a run, each message naming what failed.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    // The data crate's messages name their part already (`data config: data.sources: ...`).
    #[error("{0}")]
    Data(sft_data::DataError),
    #[error(transparent)]
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
    #[error("data-parallel: {0}")]
    Dist(String),
}

// Written out rather than `#[from]`, which would also make the data error this one's `source`:
// the message already carries it, and `{:#}` chains would print it twice.
impl From<sft_data::DataError> for TrainError {
    fn from(e: sft_data::DataError) -> Self {
        TrainError::Data(e)
    }
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
    pub(crate) fn dist(e: sft_dist::DistError) -> Self {
        TrainError::Dist(e.to_string())
    }
    pub(crate) fn optim(e: impl std::fmt::Display) -> Self {
        TrainError::Optim(e.to_string())
    }
}
