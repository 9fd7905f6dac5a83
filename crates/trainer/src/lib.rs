//! sft-trainer: the training run — config, the loop, checkpoints, metrics and plots.
//!
//! The loop ([`run`]) reads top to bottom: batches from sft-data, forward and loss from
//! sft-model, backward, accumulation, clipping and AdamW from sft-optim, the evaluators (IFS,
//! ObjecQA) through sft-eval's traits, checkpoints and logs. Each supporting piece (config,
//! schedule, checkpoint, metrics, plot, summary) is a small module testable on its own.
//! Edges: no CLI parsing (crates/cli), no model or data internals.
pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod evals;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod state;
pub mod summary;
pub mod tensorboard;

pub use run::{train, Outcome, Resume, RunOptions};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    #[error("data: {0}")]
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
}

// Written out rather than `#[from]`, which would also make the data error this one's `source`:
// the message already carries it, and `{:#}` chains would print it twice.
impl From<sft_data::DataError> for TrainError {
    fn from(e: sft_data::DataError) -> Self {
        TrainError::Data(e)
    }
}
