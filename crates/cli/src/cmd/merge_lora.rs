//! `sft merge-lora`: fold a LoRA adapter (ours or PEFT's) into a base model's weights and write
//! a plain Hugging Face folder (config, tokenizer files, safetensors shards). What it wrote as
//! JSON on stdout. A QLoRA adapter is folded into the base it was trained over: the base
//! linears quantized as the run quantized them, dequantized, written in the base's dtype.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use sft_model::load::QuantOptions;
use sft_model::lora::TrainedBase;

use super::output;
use super::run_folder::{adapter_dir, trained_base};
use super::score::{DtypeArg, QuantizeArg};

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
    /// The base the adapter was trained over, for an adapter without our checkpoint's record
    /// of it (a PEFT QLoRA adapter): none, nf4, q8_0 or gguf. Unset: what the checkpoint's
    /// run used, else none.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// With --quantize nf4: the run double-quantized the absmax.
    #[arg(long)]
    pub double_quant: bool,
    /// With --quantize: the dtype the run computed in (its dequantized values were rounded
    /// through it). Unset: the checkpoint's, else f32.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
}

pub fn run(args: MergeLoraArgs) -> anyhow::Result<()> {
    let adapter = adapter_dir(&args.adapter)?;
    let recorded = trained_base(&adapter);
    let trained = match args.quantize {
        Some(q) => TrainedBase {
            quant: QuantOptions {
                how: q.quantize(),
                double_quant: args.double_quant,
            },
            dtype: args
                .dtype
                .map(DtypeArg::dtype)
                .or(recorded.map(|t| t.dtype))
                .unwrap_or(candle_core::DType::F32),
        },
        None => {
            let mut t = recorded.unwrap_or(TrainedBase {
                quant: QuantOptions::default(),
                dtype: candle_core::DType::F32,
            });
            t.quant.double_quant |= args.double_quant;
            if let Some(d) = args.dtype {
                t.dtype = d.dtype();
            }
            t
        }
    };
    if trained.quant.double_quant && trained.quant.how != sft_model::quant::Quantize::Nf4 {
        bail!(
            "--double-quant applies to --quantize nf4 only (here: {})",
            trained.quant.how.name()
        );
    }
    let quantized = !trained.quant.how.is_none();
    let report = sft_model::lora::merge_adapter_folder(
        &args.base,
        &adapter,
        &args.out,
        args.max_shard_bytes,
        quantized.then_some(trained),
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
    if quantized {
        say!(
            "the adapter was trained over a {} base: the merged model holds that base's \
             dequantized values ({} linears{}), in the base's own dtype, not the original \
             weights",
            trained.quant.how.name(),
            report.dequantized,
            if report.dequantized == 0 {
                ": a GGUF import's folder holds its blocks' values already"
            } else {
                ""
            }
        );
    }
    output::json(&serde_json::json!({
        "quantize": trained.quant.how.name(),
        "dequantized_linears": report.dequantized,
        "out": args.out,
        "adapter": adapter,
        "merged_modules": report.merged_modules,
        "tensors": report.tensors,
        "files": report.files,
    }))
}
