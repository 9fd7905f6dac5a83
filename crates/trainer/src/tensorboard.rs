//! TensorBoard curves of a run: every `metrics.jsonl` line mirrored into event files in the run
//! folder (sft-tensorboard writes the format), so `tensorboard --logdir checkpoints` shows each
//! run by its name.
//!
//! Generic over the lines' keys: a training line's numbers go under `train/<key>` (plus
//! `train/tokens_per_s` = tokens / seconds), an evaluation line's under `eval/<key>` with a
//! leading `eval_` dropped (`eval/loss`, `eval/ifs`, `eval/ifs_full`, `eval/objecqa`...); the
//! step is the line's `step`. Values are f32 (TensorBoard's `simple_value`); non-numbers and
//! non-finite values (written as `null`) are skipped. At each evaluation whose evaluator wrote
//! its answers (`evals/step-NNNNNN/<eval>-*.jsonl`), they go in as a markdown table under
//! `eval/<eval>_responses` (TensorBoard's Text tab).
use serde_json::{Map, Value};
use sft_tensorboard::EventWriter;
use std::io;
use std::path::{Path, PathBuf};

pub struct TensorBoardLog {
    run_dir: PathBuf,
    writer: EventWriter,
}

/// Bring the run folder's event files in line with the run about to start: on a resume from
/// `keep_until_step`, drop the events past it (they are logged again); on a fresh start, delete
/// them (a previous attempt's, killed before its first checkpoint). Done whether or not this
/// run writes TensorBoard files, so that no stale curve is left.
pub fn reconcile(run_dir: &Path, keep_until_step: Option<u64>) -> io::Result<()> {
    match keep_until_step {
        Some(step) => {
            let n = sft_tensorboard::keep_until(run_dir, step as i64)?;
            if n > 0 {
                tracing::info!("tensorboard: dropped {n} events logged after step {step}");
            }
        }
        None => {
            sft_tensorboard::remove_all(run_dir)?;
        }
    }
    Ok(())
}

impl TensorBoardLog {
    /// A new event file in `run_dir`. On a resume from `keep_until_step` it starts with
    /// `SessionLog.START` at the next step, so that a TensorBoard already showing the steps
    /// logged after that checkpoint drops them.
    pub fn create(run_dir: &Path, keep_until_step: Option<u64>) -> io::Result<Self> {
        let mut writer = EventWriter::create(run_dir)?;
        if let Some(step) = keep_until_step {
            writer.session_start(step as i64 + 1)?;
        }
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            writer,
        })
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }

    /// Mirror one metrics line.
    pub fn write(&mut self, record: &Map<String, Value>) -> io::Result<()> {
        let Some(step) = record.get("step").and_then(Value::as_u64) else {
            return Ok(());
        };
        let eval = record.get("eval").and_then(Value::as_str);
        let values = scalars(record);
        if !values.is_empty() {
            self.writer
                .scalars(step as i64, values.iter().map(|(t, v)| (t.as_str(), *v)))?;
        }
        if let Some(name) = eval {
            if let Some(md) = responses_markdown(&self.run_dir, step, name)? {
                self.writer
                    .text(step as i64, &format!("eval/{name}_responses"), &md)?;
            }
        }
        Ok(())
    }
}

/// The (tag, value) pairs of one metrics line.
pub fn scalars(record: &Map<String, Value>) -> Vec<(String, f32)> {
    let eval = record.get("eval").and_then(Value::as_str);
    let mut out = Vec::new();
    for (k, v) in record {
        if k == "step" || k == "eval" || (eval.is_some() && k == "examples") {
            continue;
        }
        let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
            continue;
        };
        let tag = match eval {
            Some(_) => format!("eval/{}", k.strip_prefix("eval_").unwrap_or(k)),
            None => format!("train/{k}"),
        };
        out.push((tag, x as f32));
    }
    if eval.is_none() {
        let num = |k: &str| record.get(k).and_then(Value::as_f64);
        if let (Some(t), Some(s)) = (num("tokens"), num("seconds")) {
            if s > 0.0 {
                out.push(("train/tokens_per_s".into(), (t / s) as f32));
            }
        }
    }
    out
}

/// The answers an evaluator wrote at `step` (`evals/step-NNNNNN/<name>-*.jsonl`), as a markdown
/// table with one column per key of the first line.
fn responses_markdown(run_dir: &Path, step: u64, name: &str) -> io::Result<Option<String>> {
    let dir = run_dir.join("evals").join(format!("step-{step:06}"));
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}-")) && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    let Some(file) = files.first() else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)?;
    let rows: Vec<Map<String, Value>> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let cols: Vec<&String> = first.keys().collect();
    let rel = file.strip_prefix(run_dir).unwrap_or(file);
    let mut md = format!(
        "{} answers at step {step} ({})\n\n",
        rows.len(),
        rel.display()
    );
    let header: Vec<String> = cols
        .iter()
        .map(|c| cell(&Value::String(c.to_string())))
        .collect();
    md.push_str(&format!("| {} |\n", header.join(" | ")));
    md.push_str(&format!("|{}\n", " --- |".repeat(cols.len())));
    for r in &rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| cell(r.get(c.as_str()).unwrap_or(&Value::Null)))
            .collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    Ok(Some(md))
}

/// One table cell: HTML-escaped, pipes escaped, line breaks as `<br>`.
fn cell(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
        .replace("\r\n", "<br>")
        .replace('\n', "<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tags_follow_the_line_keys() {
        let train = map(
            serde_json::json!({"step": 3, "examples": 12, "loss": 2.5, "lr": 1e-4,
            "tokens": 300, "seconds": 0.5, "note": "x", "nan": null}),
        );
        let got = scalars(&train);
        let tags: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert!(tags.contains(&"train/loss") && tags.contains(&"train/examples"));
        assert!(!tags
            .iter()
            .any(|t| t.ends_with("note") || t.ends_with("nan")));
        assert!(got.contains(&("train/tokens_per_s".into(), 600.0)));
        let eval = map(
            serde_json::json!({"step": 3, "examples": 12, "eval": "loss",
            "eval_loss": 1.25}),
        );
        assert_eq!(scalars(&eval), vec![("eval/loss".to_string(), 1.25)]);
    }

    #[test]
    fn responses_become_a_markdown_table() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("evals/step-000004");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("ifs-responses.jsonl"),
            "{\"id\":\"a\",\"response\":\"x | y\\nz <b>\",\"prob\":0.25}\n",
        )
        .unwrap();
        let md = responses_markdown(t.path(), 4, "ifs").unwrap().unwrap();
        assert!(md.contains("| id | prob | response |"), "{md}");
        assert!(
            md.contains("| a | 0.250 | x \\| y<br>z &lt;b&gt; |"),
            "{md}"
        );
        assert!(responses_markdown(t.path(), 4, "objecqa")
            .unwrap()
            .is_none());
        assert!(responses_markdown(t.path(), 5, "ifs").unwrap().is_none());
    }
}
