//! `sft runs list` and `sft runs show RUN`: what the runs in a checkpoints folder did, as a
//! table on stderr, or with `--json` as JSON on stdout.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;
use sft_trainer::checkpoint::Checkpoints;
use sft_trainer::metrics::MetricsLog;
use std::path::{Path, PathBuf};

use super::output;

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: RunsCommand,
}

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// One line per run: status, steps, examples, last loss, last IFS.
    List {
        /// The checkpoints folder (a config's checkpoint.dir).
        #[arg(long, default_value = "checkpoints")]
        dir: PathBuf,
        /// Print the runs as a JSON array on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A run's summary (or, while it runs, its latest metrics) and checkpoints.
    Show {
        /// A run name under --dir, or a run folder.
        run: String,
        /// The checkpoints folder the run name is looked up in (a config's checkpoint.dir).
        #[arg(long, default_value = "checkpoints")]
        dir: PathBuf,
        /// Print the raw summary.json on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct RunInfo {
    name: String,
    status: String,
    steps: u64,
    examples: u64,
    loss: Option<f64>,
    ifs: Option<f64>,
}

fn last_f64(records: &[serde_json::Map<String, Value>], key: &str) -> Option<f64> {
    records.iter().rev().find_map(|r| r.get(key)?.as_f64())
}

fn info(dir: &Path) -> Option<RunInfo> {
    let metrics = dir.join("metrics.jsonl");
    let summary: Option<Value> = std::fs::read(dir.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if summary.is_none() && !metrics.exists() {
        return None;
    }
    let records = MetricsLog::read_all(&metrics).unwrap_or_default();
    let status = summary
        .as_ref()
        .and_then(|s| s.get("status")?.as_str().map(String::from))
        .unwrap_or_else(|| "running or killed".into());
    Some(RunInfo {
        name: dir.file_name()?.to_string_lossy().into_owned(),
        status,
        steps: last_f64(&records, "step").unwrap_or(0.0) as u64,
        examples: last_f64(&records, "examples").unwrap_or(0.0) as u64,
        loss: last_f64(&records, "loss"),
        ifs: last_f64(&records, "ifs"),
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// A label and its value, the labels in one column wide enough for the longest.
fn row(label: &str, value: impl std::fmt::Display) {
    say!("{label:<28} {value}");
}

pub fn run(args: RunsArgs) -> Result<()> {
    match args.command {
        RunsCommand::List { dir, json } => {
            let mut runs: Vec<RunInfo> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read the checkpoints folder {}", dir.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| info(&e.path()))
                .collect();
            runs.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                return output::json(&runs);
            }
            say!(
                "{:<24} {:<18} {:>7} {:>9} {:>8} {:>7}",
                "run",
                "status",
                "steps",
                "examples",
                "loss",
                "ifs"
            );
            for r in runs {
                say!(
                    "{:<24} {:<18} {:>7} {:>9} {:>8} {:>7}",
                    r.name,
                    r.status,
                    r.steps,
                    r.examples,
                    fmt_opt(r.loss),
                    fmt_opt(r.ifs)
                );
            }
            Ok(())
        }
        RunsCommand::Show { run, dir, json } => {
            let path = if Path::new(&run).is_dir() {
                PathBuf::from(&run)
            } else {
                dir.join(&run)
            };
            let i =
                info(&path).with_context(|| format!("{} is not a run folder", path.display()))?;
            let summary = std::fs::read_to_string(path.join("summary.json")).ok();
            if json {
                let text = summary.context("this run has no summary.json yet")?;
                return Ok(output::line(text.trim_end())?);
            }
            row("run", &i.name);
            row("status", &i.status);
            row("steps", i.steps);
            row("examples", i.examples);
            row("last loss", fmt_opt(i.loss));
            row("last IFS", fmt_opt(i.ifs));
            if let Some(s) = summary.and_then(|s| serde_json::from_str::<Value>(&s).ok()) {
                for key in [
                    "stop_reason",
                    "format_infusion_checkpoint",
                    "chosen_checkpoint",
                ] {
                    if let Some(v) = s.get(key).filter(|v| !v.is_null()) {
                        row(key, v.as_str().map_or(v.to_string(), String::from));
                    }
                }
            }
            let cps = Checkpoints::new(&path).list();
            row(
                "checkpoints",
                cps.iter()
                    .map(|(s, _)| format!("step-{s:06}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            Ok(())
        }
    }
}
