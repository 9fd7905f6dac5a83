//! Binary classification metrics with 1 as the positive class.
use serde::{Deserialize, Serialize};

/// The thresholds a choice of threshold is made among: the training logs and `tune_tone` report
/// accuracy at each.
pub const THRESHOLD_SWEEP: [f32; 5] = [0.3, 0.4, 0.5, 0.6, 0.7];

/// Counts and scores of predictions against labels; precision, recall and F1 are of class 1
/// (0 where undefined, as scikit-learn's `zero_division=0`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Metrics {
    /// `predicted` and `labels` are 0/1 and of equal length (extra items of either are ignored).
    pub fn from_labels(predicted: &[u8], labels: &[u8]) -> Self {
        let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
        for (&p, &y) in predicted.iter().zip(labels) {
            match (p == 1, y == 1) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, false) => tn += 1,
                (false, true) => fn_ += 1,
            }
        }
        let n = tp + fp + tn + fn_;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Metrics {
            n,
            accuracy: ratio(tp + tn, n),
            precision,
            recall,
            f1,
            tp,
            fp,
            tn,
            fn_,
        }
    }

    /// Probabilities of class 1 cut at `threshold` (a probability equal to it predicts 1, as a
    /// classifier's labels do), scored against `labels`.
    pub fn at_threshold(probs: &[f32], labels: &[u8], threshold: f32) -> Self {
        let predicted: Vec<u8> = probs.iter().map(|&p| (p >= threshold) as u8).collect();
        Self::from_labels(&predicted, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_scores() {
        let m = Metrics::from_labels(&[1, 1, 0, 0, 1], &[1, 0, 0, 1, 1]);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_, m.n), (2, 1, 1, 1, 5));
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12);
    }

    /// Unequal false positives (2) and false negatives (1), so precision and recall differ and
    /// swapping them fails. Reference: scikit-learn's definitions, precision = tp / (tp + fp)
    /// = 2/4, recall = tp / (tp + fn) = 2/3, F1 = 2PR / (P + R) = 4/7.
    #[test]
    fn precision_and_recall_with_unequal_errors() {
        let m = Metrics::from_labels(&[1, 1, 1, 0, 0, 1, 0], &[1, 0, 0, 0, 1, 1, 0]);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_, m.n), (2, 2, 2, 1, 7));
        assert!((m.precision - 0.5).abs() < 1e-12, "{}", m.precision);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12, "{}", m.recall);
        assert!((m.f1 - 4.0 / 7.0).abs() < 1e-12, "{}", m.f1);
        assert!((m.accuracy - 4.0 / 7.0).abs() < 1e-12, "{}", m.accuracy);
    }

    #[test]
    fn false_positives_count_against_precision_and_false_negatives_against_recall() {
        // tp 2, fp 3, tn 1, fn 1: precision 2/5, recall 2/3, so a swap of FP and FN shows.
        let m = Metrics::from_labels(&[1, 1, 1, 1, 0, 0, 1], &[1, 0, 0, 0, 0, 1, 1]);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_, m.n), (2, 3, 1, 1, 7));
        assert!((m.accuracy - 3.0 / 7.0).abs() < 1e-12);
        assert!((m.precision - 2.0 / 5.0).abs() < 1e-12);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        let f1 = 2.0 * (2.0 / 5.0) * (2.0 / 3.0) / (2.0 / 5.0 + 2.0 / 3.0);
        assert!((m.f1 - f1).abs() < 1e-12);
    }

    #[test]
    fn a_probability_at_the_threshold_predicts_one() {
        let m = Metrics::at_threshold(&[0.4, 0.5, 0.6, 0.2], &[0, 1, 1, 1], 0.5);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_), (2, 0, 1, 1));
    }

    #[test]
    fn undefined_scores_are_zero() {
        let m = Metrics::from_labels(&[0, 0], &[0, 0]);
        assert_eq!(
            (m.accuracy, m.precision, m.recall, m.f1),
            (1.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(Metrics::from_labels(&[], &[]).accuracy, 0.0);
    }
}
