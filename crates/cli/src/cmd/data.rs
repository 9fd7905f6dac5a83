//! `sft data inspect --config FILE.yaml [--n 3] [--json]`: what a config's data section
//! produces. Prints the counts (rows read, skipped by reason, truncated, kept, tokens, padding
//! of the batches) and the first N examples with the trained tokens between ⟦ and ⟧. With
//! `--json` the last line is one JSON object:
//! `{"rows_read", "kept", "skipped": {reason: n}, "truncated", "tokens", "padding_ratio"}`.
//!
//! The config is the trainer's (parsed and checked as `sft train` does, `--set` overrides
//! included); its `data` section, `model.source` (where the tokenizer is) and
//! `train.micro_batch_size` (for the padding ratio) are used. No weights are loaded: a folder
//! or `cache:NAME` is read in place, a hub model gives only its tokenizer files, a `.gguf` file
//! is imported (once, cached) as training would.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use sft_data::{build_dataset, BuildOptions, HubOptions, TokenizerFiles};
use sft_trainer::config::Config;

use super::output;

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
    /// Print the counts as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Micro-batch size for the padding ratio (default: the config's train.micro_batch_size).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Override a config value, as for `sft train` (`--set data.max_length=256`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Inspect(a) => inspect(a),
    }
}

/// The tokenizer files of `model.source` without loading any weights.
fn tokenizer_files(cfg: &Config) -> anyhow::Result<TokenizerFiles> {
    let spec = sft_trainer::model::resolve_model_spec(&cfg.model.source);
    let path = Path::new(&spec);
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let dtype = sft_trainer::model::parse_dtype(&cfg.model.dtype)?;
        let source = sft_model::load::ModelSource::parse(&spec)?;
        let dir =
            sft_model::load::resolve(&source, &sft_model::load::HubOptions::from_env(), dtype)?;
        return Ok(TokenizerFiles::from_dir(&dir)?);
    }
    Ok(TokenizerFiles::from_model_source(
        &spec,
        cfg.model.revision.as_deref(),
        cfg.base_dir.as_deref(),
        &HubOptions::from_env(),
    )?)
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, &args.overrides)?;
    let tok = tokenizer_files(&cfg)
        .with_context(|| format!("the tokenizer of model.source `{}`", cfg.model.source))?;
    let ds = build_dataset(&cfg.data, &tok, &BuildOptions::default())?;
    let (encoder, _) = sft_data::load_encoder_and_template(&cfg.data, &tok)?;
    let micro_batch = args.micro_batch.unwrap_or(cfg.train.micro_batch_size);
    let data = &cfg.data;
    let bopts = data.batch_options(micro_batch);
    let padding_ratio = if ds.train.is_empty() {
        0.0
    } else {
        let plan = sft_data::plan_epoch(&ds.train, &bopts, 0);
        sft_data::batch::plan_padding_ratio(&ds.train, &plan)
    };
    let r = &ds.report;

    say!("data: {}", args.config.display());
    for f in &r.files {
        say!("  file {f}");
    }
    say!("rows read:   {}", r.rows_read);
    say!("skipped:     {}", r.skipped.values().sum::<u64>());
    for (why, n) in &r.skipped {
        say!("  {why}: {n}");
    }
    say!(
        "truncated:   {} (over max_length {}, {:?})",
        r.truncated,
        data.max_length,
        data.truncation
    );
    say!(
        "kept:        {} ({} train, {} held out)",
        r.kept,
        r.train_examples,
        r.eval_examples
    );
    say!("tokens:      {} ({} trained)", r.tokens, r.trained_tokens);
    say!(
        "padding:     {:.4} of the batch slots (micro-batch {micro_batch}{}{})",
        padding_ratio,
        bopts
            .max_tokens
            .map(|t| format!(", budget {t} tokens"))
            .unwrap_or_default(),
        if data.pack { ", packed" } else { "" }
    );
    if r.boundary_retokenized > 0 {
        say!(
            "boundary:    {} examples had a token across the prompt/response boundary",
            r.boundary_retokenized
        );
    }
    if r.from_cache {
        say!("(tokenized data from the cache, key {})", r.cache_key);
    }
    for s in &r.bad_row_samples {
        say!("  bad row: {s}");
    }

    let shown = args.n.min(ds.train.len());
    if shown > 0 {
        say!("\nthe first {shown} training examples; the text between ⟦ and ⟧ trains:");
    }
    for i in 0..shown {
        let e = ds.train.get(i);
        let prompt = encoder.decode(&e.ids[..e.prompt_len])?;
        let trained = encoder.decode(e.trained())?;
        say!(
            "\n--- example {} ({}; {} tokens, {} trained) ---",
            i + 1,
            ds.origin(e.origin),
            e.ids.len(),
            e.trained().len()
        );
        say!("{prompt}⟦{trained}⟧");
    }

    if args.json {
        output::json(&serde_json::json!({
            "rows_read": r.rows_read,
            "kept": r.kept,
            "skipped": r.skipped,
            "truncated": r.truncated,
            "tokens": r.tokens,
            "padding_ratio": padding_ratio,
        }))?;
    }
    Ok(())
}
