//! Early stopping: rules that watch every evaluation and say when the run is done.
//!
//! The trainer hands each rule every evaluation as it is logged (an [`EvalRecord`]: the
//! evaluator's name, where the run is, the scores; the held-out loss is named `loss`, its score
//! `eval_loss`) and acts on the [`Decision`]. A rule's state goes into every checkpoint
//! ([`StopRule::state`]) and comes back on resume ([`StopRule::restore`]), so a resumed run
//! decides exactly as the uninterrupted one. [`from_config`] builds the shipped rules: the IFS
//! plateau rule (`early_stopping`) and patience on the held-out loss
//! (`early_stopping.eval_loss`).
use crate::config::{Config, LossPatienceConfig};
use crate::state::{Chosen, EvalRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sft_ifs::plateau::{self, EvalPoint, PlateauConfig, PlateauState};

/// What the trainer does after a rule has seen an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Continue,
    /// This evaluation's checkpoint may become the chosen one: save it now and never prune it;
    /// `release` is an earlier candidate of this rule that it no longer needs.
    Keep {
        release: Option<u64>,
    },
    /// Stop the run after this evaluation; `chosen` is the checkpoint the rule recommends.
    Stop {
        reason: String,
        chosen: Option<Chosen>,
    },
}

/// An early-stopping rule.
pub trait StopRule {
    /// The key of the rule's state in checkpoints (`stop_rules.<name>` in trainer_state.json).
    fn name(&self) -> &str;
    /// See one evaluation (of any evaluator, in the order they are logged) and decide.
    fn observe(&mut self, eval: &EvalRecord) -> Decision;
    /// The state a resumed run needs to decide as the uninterrupted one would.
    fn state(&self) -> Value;
    /// Take back a state [`StopRule::state`] returned.
    fn restore(&mut self, state: Value) -> Result<(), String>;
}

/// The rules a config turns on: the plateau rule on `ifs` (it never fires when IFS is off)
/// and, when `early_stopping.eval_loss.patience` > 0, patience on the held-out loss.
pub fn from_config(cfg: &Config) -> Vec<Box<dyn StopRule>> {
    let es = &cfg.early_stopping;
    if es.enabled && cfg.eval.ifs.every_examples == 0 {
        tracing::info!("eval.ifs.every_examples is 0: IFS early stopping is off for this run");
    }
    let mut rules: Vec<Box<dyn StopRule>> = vec![Box::new(Plateau::new(es.plateau(), "ifs"))];
    if es.eval_loss.patience > 0 {
        rules.push(Box::new(LossPatience::new(es.eval_loss.clone())));
    }
    rules
}

/// The format-infusion plateau rule ([`sft_ifs::plateau`]) on one evaluator's primary score.
pub struct Plateau {
    cfg: PlateauConfig,
    eval: String,
    state: PlateauState,
}

impl Plateau {
    pub fn new(cfg: PlateauConfig, eval: &str) -> Self {
        Self {
            cfg,
            eval: eval.to_string(),
            state: PlateauState::default(),
        }
    }
}

impl StopRule for Plateau {
    fn name(&self) -> &str {
        "plateau"
    }

    fn observe(&mut self, eval: &EvalRecord) -> Decision {
        let Some(&score) = eval
            .scores
            .get(&self.eval)
            .filter(|_| eval.name == self.eval)
        else {
            return Decision::Continue;
        };
        let point = EvalPoint {
            step: eval.step,
            examples: eval.examples,
            score,
        };
        let before = self.state.anchor(&self.cfg).cloned();
        match self.state.observe(&self.cfg, point) {
            plateau::Decision::Stop { anchor, reason } => Decision::Stop {
                reason,
                chosen: Some(Chosen {
                    step: anchor.step,
                    link: "format-infusion".into(),
                }),
            },
            plateau::Decision::Continue => {
                // Every evaluation that could become the format-infusion one keeps its checkpoint.
                let anchor = self.state.anchor(&self.cfg);
                if anchor.is_some_and(|a| a.step == eval.step) && before.as_ref() != anchor {
                    Decision::Keep { release: None }
                } else {
                    Decision::Continue
                }
            }
        }
    }

    fn state(&self) -> Value {
        serde_json::to_value(&self.state).unwrap_or(Value::Null)
    }

    fn restore(&mut self, state: Value) -> Result<(), String> {
        self.state = serde_json::from_value(state).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Patience on the held-out loss: stop once it has not fallen more than `min_delta` below its
/// best for `patience` evaluations; the best one's checkpoint is kept (`best-eval-loss`).
pub struct LossPatience {
    cfg: LossPatienceConfig,
    state: LossPatienceState,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossPatienceState {
    /// Step and held-out loss of the best evaluation so far.
    pub best: Option<(u64, f64)>,
    /// Evaluations since it.
    pub since_best: usize,
}

impl LossPatience {
    pub fn new(cfg: LossPatienceConfig) -> Self {
        Self {
            cfg,
            state: LossPatienceState::default(),
        }
    }
}

impl StopRule for LossPatience {
    fn name(&self) -> &str {
        "eval_loss_patience"
    }

    fn observe(&mut self, eval: &EvalRecord) -> Decision {
        let loss = match eval.scores.get("eval_loss") {
            Some(&l) if eval.name == "loss" && l.is_finite() => l,
            _ => return Decision::Continue,
        };
        let st = &mut self.state;
        if st
            .best
            .is_none_or(|(_, best)| loss < best - self.cfg.min_delta)
        {
            let release = st.best.map(|(step, _)| step).filter(|&s| s != eval.step);
            st.best = Some((eval.step, loss));
            st.since_best = 0;
            return Decision::Keep { release };
        }
        st.since_best += 1;
        if st.since_best < self.cfg.patience {
            return Decision::Continue;
        }
        let (step, best) = st.best.unwrap_or((eval.step, loss));
        Decision::Stop {
            reason: format!(
                "held-out loss: no improvement by more than {} over the last {} evaluations \
                 (best {best:.4} at step {step})",
                self.cfg.min_delta, self.cfg.patience
            ),
            chosen: Some(Chosen {
                step,
                link: "best-eval-loss".into(),
            }),
        }
    }

    fn state(&self) -> Value {
        serde_json::to_value(&self.state).unwrap_or(Value::Null)
    }

    fn restore(&mut self, state: Value) -> Result<(), String> {
        self.state = serde_json::from_value(state).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, step: u64, key: &str, v: f64) -> EvalRecord {
        EvalRecord {
            name: name.into(),
            step,
            examples: step * 8,
            scores: [(key.to_string(), v)].into_iter().collect(),
        }
    }

    #[test]
    fn loss_patience_stops_after_patience_and_chooses_the_best() {
        let mut r = LossPatience::new(LossPatienceConfig {
            patience: 2,
            min_delta: 0.05,
        });
        let d: Vec<Decision> = [(0, 2.0), (2, 1.5), (4, 1.48), (6, 1.6)]
            .iter()
            .map(|&(s, l)| r.observe(&rec("loss", s, "eval_loss", l)))
            .collect();
        assert_eq!(d[0], Decision::Keep { release: None });
        assert_eq!(d[1], Decision::Keep { release: Some(0) });
        assert_eq!(d[2], Decision::Continue, "1.48 is within min_delta");
        match &d[3] {
            Decision::Stop { chosen, reason } => {
                assert_eq!(chosen.as_ref().map(|c| c.step), Some(2));
                assert!(reason.contains("held-out loss"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // Other evaluations and a missing held-out set are ignored.
        let mut r = LossPatience::new(LossPatienceConfig {
            patience: 1,
            min_delta: 0.0,
        });
        assert_eq!(r.observe(&rec("ifs", 0, "ifs", 0.1)), Decision::Continue);
        assert_eq!(
            r.observe(&rec("loss", 0, "eval_loss", f64::NAN)),
            Decision::Continue
        );
    }

    #[test]
    fn a_restored_rule_decides_as_the_uninterrupted_one() {
        let cfg = PlateauConfig {
            threshold: 0.5,
            patience: 2,
            ..Default::default()
        };
        let scores = [0.2, 0.6, 0.6, 0.6];
        let mut whole = Plateau::new(cfg.clone(), "ifs");
        let all: Vec<Decision> = (0..4)
            .map(|i| whole.observe(&rec("ifs", i, "ifs", scores[i as usize])))
            .collect();
        let mut first = Plateau::new(cfg.clone(), "ifs");
        first.observe(&rec("ifs", 0, "ifs", scores[0]));
        first.observe(&rec("ifs", 1, "ifs", scores[1]));
        let mut resumed = Plateau::new(cfg, "ifs");
        resumed.restore(first.state()).unwrap();
        let rest: Vec<Decision> = (2..4)
            .map(|i| resumed.observe(&rec("ifs", i, "ifs", scores[i as usize])))
            .collect();
        assert_eq!(all[1], Decision::Keep { release: None });
        assert_eq!(&all[2..], &rest[..]);
        assert!(matches!(&rest[1], Decision::Stop { chosen: Some(c), .. } if c.step == 1));
    }
}
