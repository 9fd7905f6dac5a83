//! sft-trainer: the training run — config, the loop, checkpoints, metrics and plots.
//!
//! The loop ([`run`]) reads top to bottom: batches from sft-data, forward and loss from
//! sft-model, backward, accumulation, clipping and AdamW from sft-optim, the evaluators
//! ([`evals`]: a list of sft-eval `Evaluator`s, each on its own schedule) and the early-stopping
//! rules ([`stop`]: `StopRule`s that see every evaluation), checkpoints and logs. Each
//! supporting piece (config, schedule, checkpoint, metrics, plot, summary) is a small module
//! testable on its own. Edges: no CLI parsing (crates/cli), no model or data internals.
pub mod adapter;
pub mod answer;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod evals;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod state;
pub mod stop;
pub mod summary;
pub mod tensorboard;

pub use error::TrainError;
pub use run::{train, train_in, train_on, train_with, Outcome, Resume, RunOptions};
