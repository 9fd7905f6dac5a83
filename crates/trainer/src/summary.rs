//! `summary.json`: what a run did, written at its end (and on interruption).
use crate::config::Config;
use crate::state::TrainerState;
use crate::TrainError;
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
    pub ifs_curve: Vec<CurvePoint>,
    pub objecqa_curve: Vec<CurvePoint>,
    pub best_ifs: Option<f64>,
    /// The checkpoint where the IFS plateau began (`step-000123`), once chosen.
    pub format_infusion_checkpoint: Option<String>,
    /// The checkpoint to use: the format-infusion one if the plateau rule chose one, else the last.
    pub chosen_checkpoint: Option<String>,
    /// ObjecQA at the evaluation nearest the format-infusion checkpoint and at the end.
    pub objecqa_change: Option<Value>,
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
        let curve = |name: &str| -> Vec<CurvePoint> {
            st.evals
                .iter()
                .filter(|r| r.name == name)
                .map(|r| CurvePoint {
                    step: r.step,
                    examples: r.examples,
                    scores: r.scores.clone(),
                })
                .collect()
        };
        let ifs_curve = curve("ifs");
        let objecqa_curve = curve("objecqa");
        let name = crate::checkpoint::step_dir_name;
        let fi = st.format_infusion_step.map(name);
        let objecqa_change = st.format_infusion_step.and_then(|fi_step| {
            let at = |p: &CurvePoint| p.scores.get("objecqa").copied();
            let near = objecqa_curve
                .iter()
                .min_by_key(|p| p.step.abs_diff(fi_step))?;
            let end = objecqa_curve.last()?;
            Some(serde_json::json!({
                "at_format_infusion": at(near),
                "at_format_infusion_step": near.step,
                "at_end": at(end),
                "at_end_step": end.step,
                "change": at(end).zip(at(near)).map(|(a, b)| a - b),
            }))
        });
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
            best_ifs: ifs_curve
                .iter()
                .filter_map(|p| p.scores.get("ifs").copied())
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
            ifs_curve,
            objecqa_curve,
            chosen_checkpoint: fi.clone().or(Some(name(st.step))),
            format_infusion_checkpoint: fi,
            objecqa_change,
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
