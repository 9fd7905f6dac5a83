//! What happened to the rows of a build: read, skipped by reason, cut, kept.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to the rows: logged by the trainer and written to its run summary.
/// `rows_read == kept + sum(skipped)` always holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// The files read, in order (hub files as their cache paths).
    pub files: Vec<String>,
    /// Rows seen (blank JSONL lines are not rows).
    pub rows_read: u64,
    /// Rows left out, by reason (see [`crate::record::reason`]).
    pub skipped: BTreeMap<String, u64>,
    /// Examples over `max_length`: dropped (also under `skipped.over_max_length`) or cut.
    pub truncated: u64,
    /// Examples kept (train + eval).
    pub kept: u64,
    /// Tokens of the kept examples, prompt included.
    pub tokens: u64,
    /// Of those, the trained ones (responses and EOS).
    pub trained_tokens: u64,
    /// Examples whose prompt/response boundary fell inside a token (see [`crate::tokenize`]).
    pub boundary_retokenized: u64,
    pub train_examples: u64,
    pub eval_examples: u64,
    /// The first bad rows, as `file:line: reason: detail` (a few per reason).
    pub bad_row_samples: Vec<String>,
    /// Whether the tokenized data came from the cache.
    pub from_cache: bool,
    pub cache_key: String,
}

impl DataReport {
    pub(crate) fn skip(&mut self, why: &str) {
        *self.skipped.entry(why.to_string()).or_default() += 1;
    }

    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}
