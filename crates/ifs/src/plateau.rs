//! The early-stopping rule at the format-infusion plateau.
//!
//! The paper (arXiv 2307.03692, section 5.3) observes IFS rising fast and levelling off at
//! 0.9-0.95 but gives no rule. Ours: stop once IFS has reached `threshold` and has not improved
//! by more than `min_delta` over the last `patience` evaluations. The "format-infusion"
//! checkpoint is where the plateau began: the last evaluation that improved on the best score by
//! more than `min_delta`, or, when that one was still under the threshold, the first evaluation
//! after it that reached the threshold. A dip after the plateau therefore neither resets the
//! patience nor moves the chosen checkpoint.
use serde::{Deserialize, Serialize};

/// The rule's settings (`early_stopping` in the trainer's config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlateauConfig {
    /// Off switch; the evaluator still runs and is logged.
    pub enabled: bool,
    /// IFS the run must reach before it may stop.
    pub threshold: f64,
    /// An evaluation improves only when it beats the best so far by more than this.
    pub min_delta: f64,
    /// Evaluations without improvement, after reaching the threshold, before stopping.
    pub patience: usize,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 0.9,
            min_delta: 0.01,
            patience: 3,
        }
    }
}

/// One evaluation as the rule sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub examples: u64,
    pub score: f64,
}

/// What the trainer should do after an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Continue,
    /// Stop: the plateau is reached; `anchor` is the format-infusion evaluation.
    Stop {
        anchor: EvalPoint,
        reason: String,
    },
}

/// The rule's whole state; saved in every checkpoint so a resumed run neither forgets its
/// patience counter nor trains past a stop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlateauState {
    pub history: Vec<EvalPoint>,
    /// Index into `history` of the last improving evaluation.
    pub best_index: Option<usize>,
    /// Evaluations since the last improvement.
    pub since_improvement: usize,
    /// Set once the rule has fired.
    pub stopped: Option<EvalPoint>,
}

impl PlateauState {
    pub fn best(&self) -> Option<&EvalPoint> {
        self.best_index.map(|i| &self.history[i])
    }

    /// The format-infusion candidate so far: the plateau's first evaluation at or over the
    /// threshold, counted from the last improvement.
    pub fn anchor(&self, cfg: &PlateauConfig) -> Option<&EvalPoint> {
        let start = self.best_index?;
        self.history[start..]
            .iter()
            .find(|p| p.score >= cfg.threshold)
    }

    /// Record an evaluation and decide.
    pub fn observe(&mut self, cfg: &PlateauConfig, point: EvalPoint) -> Decision {
        let improved = match self.best() {
            None => true,
            Some(best) => point.score > best.score + cfg.min_delta,
        };
        self.history.push(point);
        if improved {
            self.best_index = Some(self.history.len() - 1);
            self.since_improvement = 0;
        } else {
            self.since_improvement += 1;
        }
        if !cfg.enabled || self.since_improvement < cfg.patience {
            return Decision::Continue;
        }
        match self.anchor(cfg).cloned() {
            Some(anchor) => {
                let reason = format!(
                    "plateau: IFS reached {:.3} (threshold {:.2}) at {} examples and did not \
                     improve by more than {} over the last {} evaluations",
                    anchor.score, cfg.threshold, anchor.examples, cfg.min_delta, cfg.patience
                );
                self.stopped = Some(anchor.clone());
                Decision::Stop { anchor, reason }
            }
            None => Decision::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scores: &[f64], cfg: &PlateauConfig) -> (Option<usize>, PlateauState) {
        let mut st = PlateauState::default();
        for (i, &s) in scores.iter().enumerate() {
            let p = EvalPoint {
                step: i as u64 * 10,
                examples: i as u64 * 100,
                score: s,
            };
            if let Decision::Stop { .. } = st.observe(cfg, p) {
                return (Some(i), st);
            }
        }
        (None, st)
    }

    #[test]
    fn rise_then_flat_stops_after_patience_and_keeps_the_plateau_start() {
        let cfg = PlateauConfig::default();
        let (stop, st) = run(&[0.3, 0.6, 0.85, 0.93, 0.935, 0.93, 0.94, 0.95], &cfg);
        assert_eq!(stop, Some(6));
        assert_eq!(st.stopped.unwrap().examples, 300);
    }

    #[test]
    fn noisy_plateau_does_not_reset_patience() {
        let cfg = PlateauConfig::default();
        let (stop, st) = run(&[0.2, 0.7, 0.92, 0.90, 0.925, 0.91, 0.93], &cfg);
        assert_eq!(stop, Some(5));
        assert_eq!(st.stopped.unwrap().score, 0.92);
    }

    #[test]
    fn never_reaching_the_threshold_never_stops() {
        let cfg = PlateauConfig::default();
        let (stop, st) = run(&[0.2, 0.5, 0.6, 0.61, 0.6, 0.62, 0.6, 0.61, 0.6], &cfg);
        assert_eq!(stop, None);
        assert!(st.stopped.is_none());
    }

    #[test]
    fn a_dip_after_the_plateau_keeps_the_earlier_checkpoint() {
        let cfg = PlateauConfig::default();
        let (stop, st) = run(&[0.4, 0.91, 0.95, 0.7, 0.94, 0.95], &cfg);
        assert_eq!(stop, Some(5));
        assert_eq!(st.stopped.unwrap().examples, 200);
    }

    #[test]
    fn threshold_reached_without_improvement_anchors_at_first_crossing() {
        // 0.895 is the last improvement but under the threshold; 0.90 is the first at it.
        let cfg = PlateauConfig::default();
        let (stop, st) = run(&[0.5, 0.895, 0.90, 0.899, 0.901], &cfg);
        assert_eq!(stop, Some(4));
        assert_eq!(st.stopped.unwrap().score, 0.90);
    }

    #[test]
    fn disabled_rule_never_stops() {
        let cfg = PlateauConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(run(&[0.95, 0.95, 0.95, 0.95, 0.95], &cfg).0, None);
    }
}
