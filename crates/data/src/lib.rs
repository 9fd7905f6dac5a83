//! sft-data: instruction data for supervised fine-tuning, from rows on disk or on the hub to
//! padded, masked, resumable batches.
//!
//! The path: [`DataConfig`] (the `data` section of the trainer's YAML) names sources (JSONL,
//! JSON arrays, parquet, globs, hub dataset repositories); every row is mapped to a [`Record`]
//! (gpt4all, Alpaca, chat or user-named columns; malformed rows are counted by reason or stop
//! the run), rendered by a [`Template`] (the paper's modified Alpaca prompt by default),
//! tokenized with labels only on the response and its EOS ([`tokenize`]), cut or dropped at
//! `max_length`, cached on disk ([`cache`]) and split into train and held-out sets
//! ([`build_dataset`] → [`Dataset`]). A [`Batcher`] turns the train set into batches, grouped by
//! length or packed, from a seeded plan per epoch, and its [`Cursor`] resumes exactly.
//!
//! Edges: this crate knows tokenizers, not models. It produces plain `Vec`s ([`Batch`]); the
//! trainer makes tensors of them, and the model builds its masks from `attention_mask`,
//! `position_ids` and `segment_ids` (see [`batch`] for the contract). Evaluators reuse
//! [`Template::render_prompt`] and [`Encoder::encode_prompt`] so that their prompts are the ones
//! training used.
pub mod batch;
pub mod cache;
pub mod config;
pub mod dataset;
pub mod error;
pub mod files;
pub mod hub;
pub mod origin;
pub mod record;
pub mod report;
pub mod source;
pub mod template;
pub mod tokenize;
pub mod tokenized;

pub use batch::{eval_batches, make_batch, plan_epoch, Batch, BatchOptions, Batcher, Cursor};
pub use config::{
    Columns, DataConfig, EvalSplit, FileFormat, OnBadRow, SourceConfig, TemplateSpec, Truncation,
};
pub use dataset::{
    build_dataset, default_cache_dir, load_encoder_and_template, load_template, BuildOptions,
    Dataset,
};
pub use error::{DataError, Result};
pub use hub::HubOptions;
pub use origin::{Loc, Origin};
pub use record::{BadRow, Record};
pub use report::DataReport;
pub use template::{Rendered, Template};
pub use tokenize::{Encoded, Encoder, TokenizerFiles};
pub use tokenized::{Example, TokenizedSet};
