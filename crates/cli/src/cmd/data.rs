//! `sft data inspect --config FILE.yaml [--n 3] [--json]`: what a config's data section
//! produces. Prints the counts (rows read, skipped by reason, truncated, kept, tokens, padding
//! of the batches) and the first N examples with the trained tokens between ⟦ and ⟧. With
//! `--json` the last line is one JSON object:
//! `{"rows_read", "kept", "skipped": {reason: n}, "truncated", "tokens", "padding_ratio"}`.
//!
//! Only the config's `data` section and `model.source` (where the tokenizer is) are read, and
//! leniently ([`sft_data::RunConfigView`]); the rest of the run config is ignored here.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use sft_data::{build_dataset, BuildOptions, HubOptions, RunConfigView, TokenizerFiles};

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Counts of a config's data and its first examples with the trained tokens marked.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The run config (YAML); its `data` section and `model.source` are used.
    #[arg(long)]
    pub config: PathBuf,
    /// How many examples to show.
    #[arg(long, default_value_t = 3)]
    pub n: usize,
    /// End with one JSON line of the counts.
    #[arg(long)]
    pub json: bool,
    /// Micro-batch size for the padding ratio (default: the config's train.micro_batch, else 8).
    #[arg(long)]
    pub micro_batch: Option<usize>,
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Inspect(a) => inspect(a),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let view = RunConfigView::from_file(&args.config)?;
    let source = view.model_source.as_deref().with_context(|| {
        format!(
            "{}: `model.source` is needed for the tokenizer",
            args.config.display()
        )
    })?;
    let hub = HubOptions::from_env();
    let tok = TokenizerFiles::from_model_source(
        source,
        view.model_revision.as_deref(),
        view.dir.as_deref(),
        &hub,
    )
    .with_context(|| format!("loading the tokenizer of model.source `{source}`"))?;
    let opts = BuildOptions {
        hub,
        ..BuildOptions::default()
    };
    let ds = build_dataset(&view.data, &tok, &opts)?;
    let (encoder, _) = sft_data::dataset::load_encoder_and_template(&view.data, &tok)?;
    let micro_batch = args.micro_batch.or(view.micro_batch).unwrap_or(8);
    let bopts = view.data.batch_options(micro_batch);
    let padding_ratio = if ds.train.is_empty() {
        0.0
    } else {
        let plan = sft_data::plan_epoch(&ds.train, &bopts, 0);
        sft_data::batch::plan_padding_ratio(&ds.train, &plan)
    };
    let r = &ds.report;

    println!("data: {}", args.config.display());
    for f in &r.files {
        println!("  file {f}");
    }
    println!("rows read:   {}", r.rows_read);
    println!("skipped:     {}", r.skipped.values().sum::<u64>());
    for (why, n) in &r.skipped {
        println!("  {why}: {n}");
    }
    println!(
        "truncated:   {} (over max_length {}, {:?})",
        r.truncated, view.data.max_length, view.data.truncation
    );
    println!(
        "kept:        {} ({} train, {} held out)",
        r.kept, r.train_examples, r.eval_examples
    );
    println!("tokens:      {} ({} trained)", r.tokens, r.trained_tokens);
    println!(
        "padding:     {:.4} of the batch slots (micro-batch {micro_batch}{}{})",
        padding_ratio,
        bopts
            .max_tokens
            .map(|t| format!(", budget {t} tokens"))
            .unwrap_or_default(),
        if view.data.pack { ", packed" } else { "" }
    );
    if r.boundary_retokenized > 0 {
        println!(
            "boundary:    {} examples had a token across the prompt/response boundary",
            r.boundary_retokenized
        );
    }
    if r.from_cache {
        println!("(tokenized data from the cache, key {})", r.cache_key);
    }
    for s in &r.bad_row_samples {
        println!("  bad row: {s}");
    }

    let shown = args.n.min(ds.train.len());
    if shown > 0 {
        println!("\nthe first {shown} training examples; the text between ⟦ and ⟧ trains:");
    }
    for i in 0..shown {
        let e = ds.train.get(i);
        let prompt = encoder.decode(&e.ids[..e.prompt_len])?;
        let trained = encoder.decode(e.trained())?;
        println!(
            "\n--- example {} ({}; {} tokens, {} trained) ---",
            i + 1,
            ds.origin(e.origin),
            e.ids.len(),
            e.trained().len()
        );
        println!("{prompt}⟦{trained}⟧");
    }

    if args.json {
        let line = serde_json::json!({
            "rows_read": r.rows_read,
            "kept": r.kept,
            "skipped": r.skipped,
            "truncated": r.truncated,
            "tokens": r.tokens,
            "padding_ratio": padding_ratio,
        });
        println!("{line}");
    }
    Ok(())
}
