//! What a checkpoint remembers of the run besides the weights and the optimizer, and what a
//! resume may change.
use crate::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sft_data::Cursor;
use std::collections::BTreeMap;

/// One evaluation's scores, as logged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRecord {
    pub name: String,
    pub step: u64,
    pub examples: u64,
    pub scores: BTreeMap<String, f64>,
}

/// The checkpoint a stop rule chose when it stopped the run, and the link that names it in the
/// run folder (`format-infusion` for the IFS plateau rule).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chosen {
    pub step: u64,
    pub link: String,
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
    /// When each evaluation (by name; `loss` for the held-out loss) runs next, in examples seen.
    pub due: BTreeMap<String, u64>,
    /// Each stop rule's state, by the rule's name (the plateau rule's history, best and patience
    /// counter...), so that a resumed run neither forgets a counter nor trains past a stop.
    #[serde(default)]
    pub stop_rules: BTreeMap<String, Value>,
    pub evals: Vec<EvalRecord>,
    /// Set when the run has stopped (plateau or limit): a resume says so and does not train on
    /// unless the config no longer stops there.
    pub stopped: Option<String>,
    /// The checkpoint the stop rule that ended the run chose (the format-infusion one).
    #[serde(default)]
    pub chosen: Option<Chosen>,
    /// Steps whose checkpoints stop rules keep as candidates for the chosen one (never pruned).
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
    /// Written by earlier versions (the plateau rule's state and its chosen step), read into
    /// `stop_rules` and `chosen` by [`TrainerState::upgrade`].
    #[serde(default, skip_serializing)]
    plateau: Option<Value>,
    #[serde(default, skip_serializing)]
    format_infusion_step: Option<u64>,
}

impl TrainerState {
    /// The state of a run that has not trained yet; `due`: when each evaluation first runs.
    pub fn fresh(cfg: &Config, world: usize, due: BTreeMap<String, u64>) -> Self {
        let identity = identity(cfg, world);
        Self {
            step: 0,
            examples: 0,
            tokens: 0,
            cursor: Cursor::default(),
            seed: cfg.train.seed,
            bad_steps: 0,
            bad_in_a_row: 0,
            due,
            stop_rules: BTreeMap::new(),
            evals: Vec::new(),
            stopped: None,
            chosen: None,
            pinned: Vec::new(),
            best: None,
            seconds: Default::default(),
            config_hash: hash_value(&identity),
            identity,
            config: serde_json::to_value(cfg).unwrap_or(Value::Null),
            plateau: None,
            format_infusion_step: None,
        }
    }

    /// Read a state written before stop rules were pluggable: the plateau rule's state (the
    /// rule is named `plateau`) and its format-infusion step.
    pub fn upgrade(&mut self) {
        if let Some(p) = self.plateau.take() {
            self.stop_rules.entry("plateau".into()).or_insert(p);
        }
        if let Some(step) = self.format_infusion_step.take() {
            self.chosen.get_or_insert(Chosen {
                step,
                link: "format-infusion".into(),
            });
        }
    }
}

/// The parts of a config that define what is trained: a resume must not change them.
/// What a resume may not change. `grad_accum` is the accumulation of the whole world (micro-
/// batches per optimizer step over every rank), so that a run checkpointed by 2 ranks x
/// accumulation 1 resumes on 1 rank x accumulation 2: the same global batch.
pub fn identity(cfg: &Config, world: usize) -> Value {
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
            "grad_accum": cfg.train.grad_accum * world,
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
