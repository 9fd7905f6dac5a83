//! `summary.json`: what a run did, written at its end (and on interruption).
use crate::config::Config;
use crate::error::TrainError;
use crate::state::TrainerState;
use serde::Serialize;
use serde_json::Value;
use sft_data::DataReport;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct CurvePoint {
    pub step: u64,
    pub examples: u64,
    pub scores: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub run: String,
    /// `finished`, `stopped` (early stopping or an earlier stop) or `interrupted`.
    pub status: String,
    /// Why it ended; contains `plateau` when the plateau rule stopped it.
    pub stop_reason: String,
    pub steps: u64,
    pub examples: u64,
    pub trained_tokens: u64,
    pub skipped_steps: u64,
    pub final_loss: Option<f64>,
    /// For each evaluator that ran (`ifs`, `objecqa`...): `<name>_curve` (every evaluation's
    /// scores), `best_<name>` (its highest primary score) and, once a stop rule has chosen a
    /// checkpoint, `<name>_change` (the score at the evaluation nearest the chosen checkpoint
    /// (`at_chosen`) and at the end (`at_end`)); and `<link>_checkpoint` for that checkpoint
    /// (`format_infusion_checkpoint`: where the IFS plateau began).
    #[serde(flatten)]
    pub evaluations: BTreeMap<String, Value>,
    /// The checkpoint to use: the one a stop rule chose, else the last.
    pub chosen_checkpoint: Option<String>,
    /// Wall seconds of the run and of each part (train, eval_ifs, eval_objecqa, checkpoint).
    pub wall_seconds: f64,
    pub seconds: BTreeMap<String, f64>,
    /// Rows read, skipped by reason, truncated, kept.
    pub data: Value,
    pub config_hash: String,
}

impl Summary {
    pub fn build(
        cfg: &Config,
        st: &TrainerState,
        data: &DataReport,
        status: &str,
        stop_reason: &str,
        run_dir: &Path,
        wall_seconds: f64,
    ) -> Summary {
        let name = crate::checkpoint::step_dir_name;
        let mut evaluations = BTreeMap::new();
        let mut evaluators: Vec<&str> = Vec::new();
        for r in &st.evals {
            if r.name != "loss" && !evaluators.contains(&r.name.as_str()) {
                evaluators.push(&r.name);
            }
        }
        for ev in evaluators {
            let curve: Vec<CurvePoint> = st
                .evals
                .iter()
                .filter(|r| r.name == ev)
                .map(|r| CurvePoint {
                    step: r.step,
                    examples: r.examples,
                    scores: r.scores.clone(),
                })
                .collect();
            let at = |p: &CurvePoint| p.scores.get(ev).copied();
            let best = curve
                .iter()
                .filter_map(at)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            let change = st.chosen.as_ref().and_then(|c| {
                let near = curve.iter().min_by_key(|p| p.step.abs_diff(c.step))?;
                let end = curve.last()?;
                Some(serde_json::json!({
                    "at_chosen": at(near),
                    "at_chosen_step": near.step,
                    "at_end": at(end),
                    "at_end_step": end.step,
                    "change": at(end).zip(at(near)).map(|(a, b)| a - b),
                }))
            });
            evaluations.insert(format!("best_{ev}"), serde_json::json!(best));
            evaluations.insert(format!("{ev}_change"), change.unwrap_or(Value::Null));
            evaluations.insert(format!("{ev}_curve"), serde_json::json!(curve));
        }
        if let Some(c) = &st.chosen {
            let key = format!("{}_checkpoint", c.link.replace('-', "_"));
            evaluations.insert(key, name(c.step).into());
        }
        let final_loss = crate::metrics::MetricsLog::read_all(&run_dir.join("metrics.jsonl"))
            .ok()
            .and_then(|r| r.iter().rev().find_map(|m| m.get("loss")?.as_f64()));
        Summary {
            run: cfg.run.name.clone(),
            status: status.into(),
            stop_reason: stop_reason.into(),
            steps: st.step,
            examples: st.examples,
            trained_tokens: st.tokens,
            skipped_steps: st.bad_steps,
            final_loss,
            evaluations,
            chosen_checkpoint: Some(name(st.chosen.as_ref().map_or(st.step, |c| c.step))),
            wall_seconds,
            seconds: st.seconds.clone(),
            data: serde_json::to_value(data).unwrap_or(Value::Null),
            config_hash: st.config_hash.clone(),
        }
    }

    pub fn write(&self, run_dir: &Path) -> Result<(), TrainError> {
        let path = run_dir.join("summary.json");
        let tmp = run_dir.join(".summary.json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| TrainError::Io(e.to_string()))?;
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
    }
}
