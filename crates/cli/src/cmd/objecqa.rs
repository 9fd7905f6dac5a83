//! `sft objecqa --model M [--adapter A] [--template T] [--limit N]`: the ObjecQA score
//! (objective answers / all) on the bundled 100 questions, built as `eval.objecqa` builds it in
//! training (the same defaults), JSON on stdout, the judged answers kept in `--out` (default
//! `objecqa-<model folder name>/`). `sft objecqa judge eval --input F.jsonl`: the judge's
//! accuracy and F1 on labelled `{"question", "answer", "label"}` lines.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sft_eval::Evaluator;
use sft_trainer::answer::ModelAnswer;
use sft_trainer::config::GenEvalConfig;
use std::path::PathBuf;

use super::output;
use super::score::{out_dir, ModelArgs};

// The score's arguments sit beside the subcommand; `--model` is required only without one.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ObjecqaArgs {
    #[command(subcommand)]
    pub command: Option<ObjecqaCommand>,
    #[command(flatten)]
    pub score: ScoreArgs,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt template the model answers through: alpaca_modified (the paper's), raw, chatml, ...
    #[arg(long, default_value = "alpaca_modified")]
    pub template: String,
    /// JSONL questions (`{"question": ...}` lines) instead of the bundled 100.
    #[arg(long)]
    pub items: Option<PathBuf>,
    /// Use only the first N questions (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// New tokens at most per answer (the default is eval.objecqa's).
    #[arg(long, default_value_t = GenEvalConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Questions answered together (the default is eval.objecqa's).
    #[arg(long, default_value_t = GenEvalConfig::default().batch_size)]
    pub batch_size: usize,
    /// A judge head instead of the shipped one.
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// The folder the judged answers go to (default: `objecqa-<model folder name>` in the
    /// working folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ObjecqaCommand {
    /// The judge.
    Judge {
        #[command(subcommand)]
        command: JudgeCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum JudgeCommand {
    /// Accuracy and F1 of the judge on labelled lines (1 = objective).
    Eval {
        /// Lines `{"question", "answer", "label": 0|1}` (1 = objective).
        #[arg(long)]
        input: PathBuf,
        /// Only lines of this `split` (e.g. `test`).
        #[arg(long)]
        split: Option<String>,
        /// A judge head instead of the shipped one.
        #[arg(long)]
        judge: Option<PathBuf>,
    },
}

pub fn run(args: ObjecqaArgs) -> Result<()> {
    match args.command {
        Some(ObjecqaCommand::Judge {
            command:
                JudgeCommand::Eval {
                    input,
                    split,
                    judge,
                },
        }) => {
            let j =
                sft_objecqa::judge::EncoderJudge::load(judge.as_deref(), &candle_core::Device::Cpu)
                    .map_err(|e| anyhow::anyhow!("the judge: {e}"))?;
            let m = sft_classifier::eval::eval_judge_file(&j.0, &input, split.as_deref())
                .with_context(|| format!("evaluating the judge on {}", input.display()))?;
            output::json(&m)
        }
        None => score(args.score),
    }
}

fn score(args: ScoreArgs) -> Result<()> {
    // `--adapter` (in ModelArgs) is applied unmerged by `load`.
    let m = args.model.load()?;
    // The evaluator the trainer runs, built from the same settings as `eval.objecqa`.
    let mut ev = sft_trainer::evals::objecqa(&GenEvalConfig {
        items: args.items.clone(),
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
        classifier: args.judge.clone(),
        ..GenEvalConfig::default()
    })?;
    let mut answer = ModelAnswer::for_loaded(&m, &args.template, args.batch_size)?;
    let out = out_dir(args.out, &m, "objecqa");
    let r = ev
        .evaluate(&mut answer, &out)
        .map_err(|e| anyhow::anyhow!("ObjecQA: {e}"))?;
    let answers = r
        .details
        .get("answers")
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    say!(
        "ObjecQA {:.3} [{:.3}, {:.3}] over {} questions; answers written to {answers}",
        r.primary,
        r.scores["objecqa_ci_low"],
        r.scores["objecqa_ci_high"],
        ev.last().len(),
    );
    output::json(&serde_json::json!({
        "objecqa": r.primary,
        "ci": [r.scores["objecqa_ci_low"], r.scores["objecqa_ci_high"]],
        "n": ev.last().len(),
        "template": args.template,
        "answers": answers,
    }))
}
