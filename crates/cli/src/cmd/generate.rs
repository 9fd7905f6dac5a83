//! `sft generate --model M --input FILE.jsonl --max-new-tokens N [--greedy | --temperature T
//! --top-p P --seed S] [--batch-size B]`: for each line `{"prompt": "..."}`, in order, one JSON
//! line `{"prompt": ..., "output_ids": [...], "text": ...}`. The prompt is used as it is, no
//! template applied. `output_ids` include the EOS token when generation stopped on it; `text`
//! is the decoded output without special tokens.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use sft_model::generate::{generate, GenerateConfig, Sampling};

use super::score::{read_prompts, ModelArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file, one `{"prompt": "..."}` object per line (blank lines are skipped); the
    /// prompt is used as it is, with no template.
    #[arg(long)]
    pub input: PathBuf,
    /// New tokens at most per prompt.
    #[arg(long)]
    pub max_new_tokens: usize,
    /// Greedy decoding (the default when no --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
    pub greedy: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f64>,
    /// Seed of the sampling (one random stream per prompt).
    #[arg(long, requires = "temperature")]
    pub seed: Option<u64>,
    /// Prompts generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Extra texts that end a sequence (repeatable); `text` is cut before them.
    #[arg(long = "stop")]
    pub stop_strings: Vec<String>,
    /// Let the tokenizer add its special tokens (e.g. BOS) to each prompt.
    #[arg(long)]
    pub add_special_tokens: bool,
    /// Do not stop at EOS: always generate --max-new-tokens (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prompts = read_prompts(&args.input)?;
    let m = args.model.load()?;
    let sampling = match args.temperature {
        Some(t) if t > 0.0 => Sampling::Sample {
            temperature: t,
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed.unwrap_or(0),
        },
        Some(t) if t < 0.0 => bail!("--temperature must be >= 0 (got {t})"),
        _ => Sampling::Greedy,
    };
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids: if args.ignore_eos {
            Vec::new()
        } else {
            m.eos_token_ids.clone()
        },
        stop_strings: args.stop_strings.clone(),
        batch_size: args.batch_size,
        add_special_tokens: args.add_special_tokens,
        pad_token_id: m.config.pad_token_id.unwrap_or(0),
    };
    let start = std::time::Instant::now();
    let gens = generate(&m.model, &m.tokenizer, &prompts, &cfg)
        .with_context(|| format!("generating for {}", args.input.display()))?;
    let n_new: usize = gens.iter().map(|g| g.output_ids.len()).sum();
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        "{} prompts, {n_new} new tokens in {secs:.1}s ({:.1} tokens/s)",
        prompts.len(),
        n_new as f64 / secs.max(1e-9)
    );
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (p, g) in prompts.iter().zip(gens) {
        let line = serde_json::json!({"prompt": p, "output_ids": g.output_ids, "text": g.text});
        writeln!(out, "{line}")?;
    }
    Ok(())
}
