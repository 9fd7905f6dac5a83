//! What a checkpoint remembers of the run besides the weights and the optimizer, and what a
//! resume may change.
use crate::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sft_data::Cursor;
use sft_ifs::plateau::PlateauState;
use std::collections::BTreeMap;

/// One evaluation's scores, as logged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRecord {
    pub name: String,
    pub step: u64,
    pub examples: u64,
    pub scores: BTreeMap<String, f64>,
}

/// When each evaluator runs next (in examples seen).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Due {
    pub loss: u64,
    pub ifs: u64,
    pub objecqa: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Training examples seen (micro-batches of skipped steps included).
    pub examples: u64,
    /// Trained (response) tokens seen.
    pub tokens: u64,
    /// Where the batch stream resumes.
    pub cursor: Cursor,
    /// Dropout and every other random draw derive from (seed, step, micro-batch), so a resumed
    /// run needs no other RNG state.
    pub seed: u64,
    /// Steps skipped for a non-finite loss or gradient, in all and in a row.
    pub bad_steps: u64,
    pub bad_in_a_row: u32,
    pub due: Due,
    /// The plateau rule's history, best and patience counter.
    pub plateau: PlateauState,
    pub evals: Vec<EvalRecord>,
    /// Set when the run has stopped (plateau or limit): a resume says so and does not train on
    /// unless the config no longer stops there.
    pub stopped: Option<String>,
    /// Step of the format-infusion checkpoint, once the plateau rule has chosen it.
    pub format_infusion_step: Option<u64>,
    /// Steps whose checkpoints are candidates for the format-infusion one (never pruned).
    pub pinned: Vec<u64>,
    /// The best checkpoint's step and score (IFS if it runs, else held-out loss).
    pub best: Option<(u64, f64)>,
    /// Seconds of training and of each evaluator before this segment of the run.
    pub seconds: BTreeMap<String, f64>,
    /// The config's identity (what was trained) and its hash.
    pub identity: Value,
    pub config_hash: String,
    /// The whole config of the segment that wrote this state.
    pub config: Value,
}

/// The parts of a config that define what is trained: a resume must not change them.
pub fn identity(cfg: &Config) -> Value {
    serde_json::json!({
        "model": {
            "source": cfg.model.source,
            "revision": cfg.model.revision,
            "dtype": cfg.model.dtype,
        },
        "adapter": cfg.adapter,
        "data": cfg.data,
        "train": {
            "seed": cfg.train.seed,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum,
        },
    })
}

pub fn hash_value(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    format!("{:x}", Sha256::digest(bytes))[..16].to_string()
}

/// `path: old -> new` for every leaf that differs between two JSON values.
pub fn differences(old: &Value, new: &Value) -> Vec<String> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_list_changed_leaves() {
        let a = serde_json::json!({"model": {"source": "a", "dtype": "f32"}, "x": 1});
        let b = serde_json::json!({"model": {"source": "b", "dtype": "f32"}, "x": 1, "y": true});
        assert_eq!(
            differences(&a, &b),
            vec![
                "model.source: \"a\" -> \"b\"".to_string(),
                "y: null -> true".to_string()
            ]
        );
    }
}
