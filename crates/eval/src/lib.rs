//! sft-eval: what the trainer and the evaluators agree on, and nothing more.
//!
//! An evaluator (IFS, ObjecQA) sees an [`Answer`] capability — "answer these instructions" —
//! never the trainer or the model; the trainer sees [`Evaluator`]s that return named scores.
//! Also the shared statistics: the Wilson score interval of a proportion.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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

/// Accuracy, precision, recall and F1 of binary predictions (positive = 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl BinaryMetrics {
    pub fn compute(predicted: &[u8], truth: &[u8]) -> Self {
        let n = predicted.len().min(truth.len());
        let (mut tp, mut fp, mut fn_, mut correct) = (0usize, 0usize, 0usize, 0usize);
        for (&p, &t) in predicted.iter().zip(truth) {
            correct += usize::from(p == t);
            tp += usize::from(p == 1 && t == 1);
            fp += usize::from(p == 1 && t == 0);
            fn_ += usize::from(p == 0 && t == 1);
        }
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Self {
            n,
            accuracy: ratio(correct, n),
            precision,
            recall,
            f1,
        }
    }
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

    #[test]
    fn binary_metrics() {
        let m = BinaryMetrics::compute(&[1, 1, 0, 0, 1], &[1, 0, 0, 1, 1]);
        assert_eq!(m.n, 5);
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
        // Unequal false positives (2) and false negatives (1): precision 2/4, recall 2/3,
        // F1 4/7 (scikit-learn's definitions); swapping precision and recall fails.
        let m = BinaryMetrics::compute(&[1, 1, 1, 0, 0, 1, 0], &[1, 0, 0, 0, 1, 1, 0]);
        assert_eq!(m.n, 7);
        assert!((m.precision - 0.5).abs() < 1e-12, "{}", m.precision);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12, "{}", m.recall);
        assert!((m.f1 - 4.0 / 7.0).abs() < 1e-12, "{}", m.f1);
        assert!((m.accuracy - 4.0 / 7.0).abs() < 1e-12, "{}", m.accuracy);
    }
}
