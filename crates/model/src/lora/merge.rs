//! Folding an adapter into a Hugging Face model folder (`W' = W + scale * B A`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{invalid, LoraError, Result};
use super::peft::read_adapter;
use crate::linear::merge_weight;
use crate::load::QuantOptions;
use crate::quant::{is_quantized_linear, QuantWeight, Quantize};
use crate::save::{self, TensorEntry};

/// Files copied from the base folder next to the merged weights, when present.
pub const COPIED_FILES: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// What [`merge_adapter_folder`] did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    pub merged_modules: usize,
    pub tensors: usize,
    pub files: Vec<PathBuf>,
    /// Base linears written as their quantized values dequantized (a QLoRA adapter's base).
    pub dequantized: usize,
}

/// The base a QLoRA adapter was trained over: its linears quantized as `how` says, their
/// values rounded through `dtype` (the run's `model.dtype`).
#[derive(Clone, Copy, Debug)]
pub struct TrainedBase {
    pub quant: QuantOptions,
    pub dtype: DType,
}

/// Folds an adapter into a Hugging Face model folder: every adapted weight becomes
/// `W + scale * B A` (computed in f32, stored in W's dtype), every other tensor is copied as
/// is; config and tokenizer files are copied. Holds one output shard in memory at a time.
///
/// With `trained` (a QLoRA adapter), `W` is what training computed with: each base linear
/// quantized as the run quantized it and dequantized, in the run's dtype. The merged weight
/// is stored in the base's own dtype, so the output is a dense model. A `gguf` base's folder
/// already holds its blocks' dequantized values (the import writes exactly those), so it is
/// read as it is.
pub fn merge_adapter_folder(
    base: &Path,
    adapter: &Path,
    out: &Path,
    max_shard_bytes: usize,
    trained: Option<TrainedBase>,
) -> Result<MergeReport> {
    if out.canonicalize().ok().is_some() && out.canonicalize().ok() == base.canonicalize().ok() {
        return Err(invalid(out, "the output folder is the base folder"));
    }
    let files = read_adapter(adapter, &Device::Cpu)?;
    let weight_files = crate::load::weight_files(base).map_err(|e| invalid(base, e.to_string()))?;
    // SAFETY: read-only mapping of files nobody should modify while we read them.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&weight_files) }
        .map_err(|e| invalid(base, e.to_string()))?;
    let mut entries = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = DType::try_from(view.dtype())
            .map_err(|e| invalid(base, format!("tensor `{name}`: {e}")))?;
        entries.push(TensorEntry {
            name,
            dtype,
            shape: view.shape().to_vec(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut deltas: HashMap<String, (&Tensor, &Tensor, f64)> = HashMap::new();
    for (m, a, b, s) in &files.modules {
        let wname = format!("{m}.weight");
        let Some(e) = entries.iter().find(|e| e.name == wname) else {
            let hint = if m == "lm_head" {
                " (the base model ties lm_head to the embeddings)"
            } else {
                ""
            };
            return Err(invalid(
                adapter,
                format!("the adapter targets `{m}`, but the base has no `{wname}`{hint}"),
            ));
        };
        if e.shape != [b.dim(0)?, a.dim(1)?] {
            return Err(invalid(
                adapter,
                format!(
                    "`{m}`: B A is ({}, {}), the base weight {:?}",
                    b.dim(0)?,
                    a.dim(1)?,
                    e.shape
                ),
            ));
        }
        deltas.insert(wname, (a, b, *s));
    }
    std::fs::create_dir_all(out).map_err(|source| LoraError::Io {
        path: out.to_path_buf(),
        cause: source,
    })?;
    let requantize = trained.filter(|t| matches!(t.quant.how, Quantize::Nf4 | Quantize::Q8_0));
    let dequantized = std::cell::Cell::new(0usize);
    let mut written = save::save_hf_weights_lazy(out, &entries, max_shard_bytes, |e| {
        let mut w = st.load(&e.name, &Device::Cpu)?;
        if let Some(t) = requantize.filter(|_| is_quantized_linear(&e.name)) {
            let q = QuantWeight::quantize(
                &w.to_dtype(t.dtype)?,
                t.quant.how,
                t.quant.double_quant,
                t.dtype,
            )?;
            w = q.dequantize(&Device::Cpu)?.to_dtype(e.dtype)?;
            dequantized.set(dequantized.get() + 1);
        }
        match deltas.get(&e.name) {
            Some((a, b, s)) => merge_weight(&w, a, b, *s),
            None => Ok(w),
        }
    })?;
    for f in COPIED_FILES {
        let src = base.join(f);
        if src.is_file() {
            let dst = out.join(f);
            std::fs::copy(&src, &dst).map_err(|source| LoraError::Io {
                path: dst.clone(),
                cause: source,
            })?;
            written.push(dst);
        }
    }
    Ok(MergeReport {
        merged_modules: deltas.len(),
        tensors: entries.len(),
        files: written,
        dequantized: dequantized.get(),
    })
}
