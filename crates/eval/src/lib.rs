//! sft-eval: what the trainer and the evaluators agree on, and nothing more.
//!
//! An evaluator (IFS, ObjecQA) sees an [`Answer`] capability — "answer these instructions" —
//! never the trainer or the model; the trainer sees [`Evaluator`]s that return named scores.
//! Also the shared statistics (the Wilson score interval of a proportion) and the JSONL reader
//! of evaluation sets ([`items`]).
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub mod items;
pub use items::{parse_jsonl, read_jsonl, ItemsError, JsonlItem};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Answers instructions with the model under evaluation: the implementor renders each
/// instruction through its prompt template, generates (greedy, batched) and returns the
/// decoded responses, one per instruction and in order.
pub trait Answer {
    fn answer(
        &mut self,
        instructions: &[String],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, BoxError>;
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalReport {
    /// The score the early-stopping rule watches, if this evaluator drives it.
    pub primary: f64,
    /// Every named score (`ifs`, `ifs_full`, `ifs_partial`, `ifs_ci_low`...), as logged.
    pub scores: BTreeMap<String, f64>,
    /// Free-form details (counts, file names) for the summary.
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A generation-based evaluation run during training.
pub trait Evaluator {
    /// The key of the primary score in metrics (`ifs`, `objecqa`).
    fn name(&self) -> &str;
    /// Evaluate; responses and labels may be written under `out_dir` for inspection.
    fn evaluate(&mut self, model: &mut dyn Answer, out_dir: &Path) -> Result<EvalReport, BoxError>;
}

/// The 95% Wilson score interval of `successes / n` (the interval that stays inside [0, 1]
/// and behaves at 0 and n, unlike the normal approximation).
pub fn wilson_interval(successes: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = n as f64;
    let p = successes as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10: (0.4902, 0.9433) as tabulated for the Wilson interval.
        let (lo, hi) = wilson_interval(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 20);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-4, "{hi}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
    }
}
