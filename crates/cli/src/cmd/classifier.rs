//! `sft classifier train --config FILE.yaml`: trains a classifier head (the IFS tone classifier
//! or the ObjecQA judge) on the frozen MiniLM encoder and writes it with its metadata.
//! `sft classifier eval --input FILE.jsonl [--classifier PATH]`: scores a head (default: the
//! shipped tone classifier) on labelled lines `{"instruction", "response", "label"}` (a judge
//! head reads `{"question", "answer", "label"}`): accuracy (with its 95% Wilson interval),
//! precision, recall and F1, the confusion per `template` and per `kind` (full / partial) when
//! the lines name them, and the misclassified lines, as JSON on stdout; the same for people on
//! stderr.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, Subcommand};
use sft_classifier::eval::{
    breakdown, evaluate, read_labelled, Breakdown, GroupScore, JUDGE_KEYS, TONE_KEYS,
};
use sft_classifier::{train, Classifier, Encoder, Judge, ToneClassifier, TrainConfig};

use super::output;

#[derive(Args, Debug)]
pub struct ClassifierArgs {
    #[command(subcommand)]
    pub command: ClassifierCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClassifierCommand {
    /// Train a head from a YAML config (see configs/classifier/) and write it.
    Train {
        /// The training config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Score a head on labelled JSONL (JSON on stdout).
    Eval {
        /// Lines `{"instruction", "response", "label": 0|1}` (1 = answer-like).
        #[arg(long)]
        input: PathBuf,
        /// A head file or a folder holding `head.safetensors` (default: the shipped tone head).
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// Encoder folder (default: $SFT_CACHE/models/all-minilm-l6-v2).
        #[arg(long)]
        encoder: Option<PathBuf>,
        /// Only the lines whose "split" field is this.
        #[arg(long)]
        split: Option<String>,
    },
}

pub fn run(args: ClassifierArgs) -> anyhow::Result<()> {
    match args.command {
        ClassifierCommand::Train { config } => {
            let cfg = TrainConfig::from_yaml_file(&config)?;
            let report = train::run(&cfg, &Device::Cpu)
                .with_context(|| format!("training from {}", config.display()))?;
            let heldout = report.heldout.as_ref();
            say!(
                "{}: {} training / {} held-out examples; held-out accuracy {} F1 {}{}; wrote {}",
                report.task,
                report.n_train,
                report.n_heldout,
                heldout.map_or("-".into(), |m| format!("{:.4}", m.accuracy)),
                heldout.map_or("-".into(), |m| format!("{:.4}", m.f1)),
                report
                    .validation
                    .as_ref()
                    .map_or(String::new(), |m| format!(
                        "; validation accuracy {:.4} ({}/{})",
                        m.accuracy,
                        m.tp + m.tn,
                        m.n
                    )),
                report.output.display()
            );
            output::json(&report)?;
        }
        ClassifierCommand::Eval {
            input,
            classifier,
            encoder,
            split,
        } => {
            let device = Device::Cpu;
            let enc = match &encoder {
                Some(dir) => Encoder::load(dir, &device),
                None => Encoder::load_default(&device),
            }
            .context("loading the encoder")?;
            let enc = Arc::new(enc);
            let c: Classifier = match &classifier {
                Some(path) => Classifier::load(enc, path)
                    .with_context(|| format!("loading the head {}", path.display()))?,
                None => ToneClassifier::default_embedded(enc)?.into_inner(),
            };
            let keys = if c.meta().task == Judge::TASK {
                JUDGE_KEYS
            } else {
                TONE_KEYS
            };
            let items = read_labelled(&input, keys)?;
            let items = sft_classifier::eval::select_split(items, split.as_deref());
            anyhow::ensure!(!items.is_empty(), "{}: no labelled lines", input.display());
            let (_, preds) = evaluate(&c, &items)?;
            let b = breakdown(&items, &preds);
            let m = &b.all.metrics;
            say!(
                "{} on {} lines: accuracy {:.4} (95% Wilson {:.3}-{:.3})  precision {:.4}  recall {:.4}  F1 {:.4}  (tp {} fp {} tn {} fn {})",
                c.meta().task,
                m.n,
                m.accuracy,
                b.all.accuracy_ci95.0,
                b.all.accuracy_ci95.1,
                m.precision,
                m.recall,
                m.f1,
                m.tp,
                m.fp,
                m.tn,
                m.fn_
            );
            say_breakdown(&b);
            output::json(&b)?;
        }
    }
    Ok(())
}

/// The confusion per template and per kind, and the misclassified lines, for people.
fn say_breakdown(b: &Breakdown) {
    let groups: Vec<(&str, &String, &GroupScore)> = b
        .by_template
        .iter()
        .map(|(k, g)| ("template", k, g))
        .chain(b.by_kind.iter().map(|(k, g)| ("kind", k, g)))
        .collect();
    if !groups.is_empty() {
        say!(
            "{:<8} {:<20} {:>5} {:>8}  {:<13} {:>4} {:>4} {:>4} {:>4}",
            "by",
            "group",
            "n",
            "accuracy",
            "95% Wilson",
            "tp",
            "fp",
            "tn",
            "fn"
        );
        for (by, name, g) in groups {
            let m = &g.metrics;
            say!(
                "{by:<8} {name:<20} {:>5} {:>8.4}  {:.3}-{:.3}   {:>4} {:>4} {:>4} {:>4}",
                m.n,
                m.accuracy,
                g.accuracy_ci95.0,
                g.accuracy_ci95.1,
                m.tp,
                m.fp,
                m.tn,
                m.fn_
            );
        }
    }
    say!("{} misclassified:", b.misclassified.len());
    for x in &b.misclassified {
        let text: String = x.text.chars().take(160).collect();
        let more = if x.text.chars().count() > 160 {
            "..."
        } else {
            ""
        };
        say!(
            "  #{} {} {} {}: label {}, p(1) {:.2}: {text:?}{more}",
            x.index,
            x.id.as_deref().unwrap_or("-"),
            x.template.as_deref().unwrap_or("-"),
            x.kind.as_deref().unwrap_or("-"),
            x.label,
            x.prob
        );
    }
}
