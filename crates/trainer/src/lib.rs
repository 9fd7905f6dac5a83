//! sft-trainer: the training run — config, the loop, checkpoints, metrics and plots.
//!
//! The loop (`run.rs`) reads top to bottom: batches from sft-data, forward and loss from
//! sft-model, backward, accumulation, clipping and AdamW from sft-optim, the evaluators (IFS,
//! ObjecQA) through a small hook, checkpoints and logs. Each supporting piece (config, schedule,
//! checkpoint, metrics, plot) is a small module testable on its own.
pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod plot;
pub mod schedule;
