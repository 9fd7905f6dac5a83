//! `sft ifs --model M [--adapter A] [--template T]`: the Instruction Following Score of a model
//! on the bundled instruction set (or `--items`), full and fragment prompts, greedy. Prints a
//! short table on stderr and the scores as JSON on stdout; the responses with their labels go
//! to `--out` (default `ifs-<model folder name>/` in the working folder), and both outputs say
//! where.
use anyhow::Result;
use clap::Args;
use sft_eval::Evaluator;
use sft_trainer::answer::ModelAnswer;
use sft_trainer::config::GenEvalConfig;
use std::path::PathBuf;

use super::output;
use super::score::{out_dir, ModelArgs};

#[derive(Args, Debug)]
pub struct IfsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt template: alpaca_modified (the paper's), raw (base models), chatml, ...
    #[arg(long, default_value = "alpaca_modified")]
    pub template: String,
    /// JSONL instructions (`{"instruction": ...}` lines) instead of the bundled set.
    #[arg(long)]
    pub items: Option<PathBuf>,
    /// Use only the first N instructions (0 = all 274), each full and as a fragment.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// New tokens at most per response (responses are cut there).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompts generated together (more is faster, in more memory).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// A tone-classifier head instead of the shipped one.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// The folder the labelled responses go to (default: `ifs-<model folder name>` in the
    /// working folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: IfsArgs) -> Result<()> {
    // `--adapter` (in ModelArgs) is applied unmerged by `load`.
    let m = args.model.load()?;
    // The evaluator the trainer runs, built from the same settings as `eval.ifs`.
    let mut ev = sft_trainer::evals::ifs(&GenEvalConfig {
        items: args.items.clone(),
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
        classifier: args.classifier.clone(),
        ..GenEvalConfig::default()
    })?;
    let mut answer = ModelAnswer::for_loaded(&m, &args.template, args.batch_size)?;
    let out = out_dir(args.out, &m, "ifs");
    let t = std::time::Instant::now();
    let report = ev
        .evaluate(&mut answer, &out)
        .map_err(|e| anyhow::anyhow!("IFS: {e}"))?;
    let s = sft_ifs::evaluator::IfsScores::from_labels(ev.last());
    say!("            score   95% interval     n");
    for (name, v, ci, n) in [
        ("IFS", s.ifs, s.ci, s.n),
        ("IFS full", s.ifs_full, s.ci_full, s.n_full),
        ("IFS partial", s.ifs_partial, s.ci_partial, s.n_partial),
    ] {
        say!("{name:<11} {v:>6.3}  [{:.3}, {:.3}]  {n:>4}", ci.0, ci.1);
    }
    let responses = report
        .details
        .get("responses")
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    say!(
        "responses written to {responses} ({:.1}s)",
        t.elapsed().as_secs_f64()
    );
    output::json(&serde_json::json!({
        "ifs": s.ifs, "ifs_full": s.ifs_full, "ifs_partial": s.ifs_partial,
        "ci": [s.ci.0, s.ci.1], "ci_full": [s.ci_full.0, s.ci_full.1],
        "ci_partial": [s.ci_partial.0, s.ci_partial.1],
        "n": s.n, "n_full": s.n_full, "n_partial": s.n_partial,
        "template": args.template,
        "responses": responses,
    }))
}
