//! `sft init-random`: a Hugging Face folder with random weights for a `config.json`, for tests
//! and for benchmarks on machines without real checkpoints (transformers loads the same folder).
//! What it wrote as JSON on stdout.
use anyhow::{Context, Result};
use clap::Args;
use sft_model::config::LlamaConfig;
use std::path::PathBuf;

use super::output;

#[derive(Args, Debug)]
pub struct InitRandomArgs {
    /// The model's config.json.
    #[arg(long)]
    pub config_json: PathBuf,
    /// The folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A model folder whose tokenizer files to copy (tokenizer.json, tokenizer_config.json...).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: InitRandomArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config_json)
        .with_context(|| format!("cannot read {}", args.config_json.display()))?;
    let cfg = LlamaConfig::from_json_str(&text)
        .with_context(|| format!("{}", args.config_json.display()))?;
    let dtype = sft_trainer::model::parse_dtype(&args.dtype)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let weights =
        sft_model::llama::random_weights(&cfg, dtype, &candle_core::Device::Cpu, args.seed)?;
    let file = args.out.join("model.safetensors");
    candle_core::safetensors::save(&weights, &file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    std::fs::write(args.out.join("config.json"), &text)?;
    if let Some(dir) = &args.tokenizer {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            let src = dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, args.out.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
    }
    say!(
        "wrote {} ({} tensors, {:?})",
        args.out.display(),
        weights.len(),
        dtype
    );
    output::json(&serde_json::json!({
        "out": args.out,
        "tensors": weights.len(),
        "dtype": format!("{dtype:?}").to_lowercase(),
    }))
}
