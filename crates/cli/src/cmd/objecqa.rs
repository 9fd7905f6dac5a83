//! `sft objecqa --model M [--adapter A] [--template T]`: the ObjecQA score (objective answers /
//! all) on the bundled 100 questions, JSON on stdout's last line, the judged answers kept in
//! `--out`. `sft objecqa judge eval --input F.jsonl`: the judge's accuracy and F1 on labelled
//! `{"question", "answer", "label"}` lines.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sft_eval::Evaluator;
use sft_trainer::answer::ModelAnswer;
use sft_trainer::config::GenEvalConfig;
use std::path::PathBuf;

use super::score::{out_dir, ModelArgs};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ObjecqaArgs {
    #[command(subcommand)]
    pub command: Option<ObjecqaCommand>,
    #[command(flatten)]
    pub score: Option<ScoreArgs>,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "alpaca_modified")]
    pub template: String,
    /// JSONL questions (`{"question": ...}` lines) instead of the bundled 100.
    #[arg(long)]
    pub items: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 25)]
    pub batch_size: usize,
    /// A judge head instead of the shipped one.
    #[arg(long)]
    pub judge: Option<PathBuf>,
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
        #[arg(long)]
        input: PathBuf,
        /// Only lines of this `split` (e.g. `test`).
        #[arg(long)]
        split: Option<String>,
        #[arg(long)]
        judge: Option<PathBuf>,
    },
}

pub fn run(args: ObjecqaArgs) -> Result<()> {
    match (args.command, args.score) {
        (
            Some(ObjecqaCommand::Judge {
                command:
                    JudgeCommand::Eval {
                        input,
                        split,
                        judge,
                    },
            }),
            _,
        ) => {
            let j =
                sft_objecqa::judge::EncoderJudge::load(judge.as_deref(), &candle_core::Device::Cpu)
                    .map_err(|e| anyhow::anyhow!("the judge: {e}"))?;
            let m = sft_classifier::eval::eval_judge_file(&j.0, &input, split.as_deref())
                .with_context(|| format!("evaluating the judge on {}", input.display()))?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        (None, Some(a)) => score(a),
        (None, None) => anyhow::bail!("give --model M (or `sft objecqa judge eval --input F`)"),
    }
}

fn score(args: ScoreArgs) -> Result<()> {
    // `--adapter` (in ModelArgs) is applied unmerged by `load`.
    let m = args.model.load()?;
    // The evaluator the trainer runs, built from the same settings as `eval.objecqa`.
    let mut ev = sft_trainer::evals::objecqa(&GenEvalConfig {
        items: args.items.clone(),
        max_new_tokens: args.max_new_tokens,
        classifier: args.judge.clone(),
        ..GenEvalConfig::default()
    })?;
    let mut answer = ModelAnswer::for_loaded(&m, &args.template, args.batch_size)?;
    let out = out_dir(args.out, &m, "objecqa");
    let r = ev
        .evaluate(&mut answer, &out)
        .map_err(|e| anyhow::anyhow!("ObjecQA: {e}"))?;
    eprintln!(
        "ObjecQA {:.3} [{:.3}, {:.3}] over {} questions; answers in {}",
        r.primary,
        r.scores["objecqa_ci_low"],
        r.scores["objecqa_ci_high"],
        ev.last().len(),
        out.display()
    );
    println!(
        "{}",
        serde_json::json!({"objecqa": r.primary, "ci": [r.scores["objecqa_ci_low"], r.scores["objecqa_ci_high"]],
                           "n": ev.last().len(), "template": args.template})
    );
    Ok(())
}
