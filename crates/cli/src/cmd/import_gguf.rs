//! `sft import-gguf FILE.gguf OUT_DIR [--dtype f32|bf16]`: a llama.cpp GGUF checkpoint of a
//! LLaMA-architecture model into a Hugging Face folder (see `sft_model::gguf`).
use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};

use super::output;

#[derive(Args, Debug)]
pub struct ImportGgufArgs {
    /// The GGUF file to convert.
    pub gguf: PathBuf,
    /// The folder to write (created if needed): config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json, generation_config.json.
    pub out_dir: PathBuf,
    /// dtype of the written weights (every tensor is dequantized first).
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    pub dtype: OutDtype,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OutDtype {
    F32,
    Bf16,
}

pub fn run(args: ImportGgufArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::Bf16 => DType::BF16,
    };
    let start = std::time::Instant::now();
    let summary =
        sft_model::gguf::import_gguf(&args.gguf, &args.out_dir, dtype).with_context(|| {
            format!(
                "importing {} into {}",
                args.gguf.display(),
                args.out_dir.display()
            )
        })?;
    output::json(&serde_json::json!({
        "out_dir": summary.out_dir,
        "tensors": summary.tensor_names.len(),
        "parameters": summary.n_params,
        "seconds": (start.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    }))
}
