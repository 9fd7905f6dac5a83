//! `sft merge-lora`: fold a LoRA adapter (ours or PEFT's) into a base model's weights and write
//! a plain Hugging Face folder (config, tokenizer files, safetensors shards). What it wrote as
//! JSON on stdout.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::output;
use super::run_folder::adapter_dir;

#[derive(Args, Debug)]
pub struct MergeLoraArgs {
    /// The base model: a Hugging Face folder (config.json, tokenizer, safetensors).
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors); a run folder
    /// stands for its chosen checkpoint (format-infusion, else latest).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model (created; existing weight files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard in bytes before the weights are split (transformers' default 5 GB).
    #[arg(long, default_value_t = sft_model::save::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: usize,
}

pub fn run(args: MergeLoraArgs) -> anyhow::Result<()> {
    let adapter = adapter_dir(&args.adapter)?;
    let report = sft_model::lora::merge_adapter_folder(
        &args.base,
        &adapter,
        &args.out,
        args.max_shard_bytes,
    )
    .with_context(|| {
        format!(
            "merging adapter {} into {}",
            adapter.display(),
            args.base.display()
        )
    })?;
    say!(
        "merged {} modules into {} tensors; wrote {} files to {}",
        report.merged_modules,
        report.tensors,
        report.files.len(),
        args.out.display()
    );
    output::json(&serde_json::json!({
        "out": args.out,
        "adapter": adapter,
        "merged_modules": report.merged_modules,
        "tensors": report.tensors,
        "files": report.files,
    }))
}
