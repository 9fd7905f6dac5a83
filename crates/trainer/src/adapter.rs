//! How the trainable parameters attach to the model: LoRA adapters on the targeted
//! projections (base frozen), or every weight a variable (full fine-tuning, tied embeddings
//! kept as one tensor); and how they are saved and restored.
use crate::config::{AdapterKind, Config};
use crate::model::{Param, TrainModel};
use crate::TrainError;
use candle_core::Var;
use sft_model::llama::Llama;
use std::collections::HashMap;
use std::path::Path;

/// Files copied next to the weights so a checkpoint is usable on its own.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Every weight becomes a variable; the model is rebuilt on them.
pub fn make_all_trainable(llama: &mut Llama) -> Result<Vec<Param>, TrainError> {
    let mut params = Vec::new();
    let mut map = HashMap::new();
    for (name, t) in llama.named_weights() {
        let var = Var::from_tensor(t)?;
        map.insert(name.clone(), var.as_tensor().clone());
        params.push(Param {
            name: name.clone(),
            decay: sft_optim::decays_by_name(name),
            var,
        });
    }
    *llama = Llama::from_weights(llama.config(), map)?;
    Ok(params)
}

pub fn apply_lora(llama: &mut Llama, cfg: &Config) -> Result<Vec<Param>, TrainError> {
    let _ = (llama, cfg);
    Err(TrainError::Model(
        "LoRA is not wired into the trainer yet".into(),
    ))
}

/// Training mode with this dropout seed, or evaluation mode (`None`).
pub fn set_training(llama: &mut Llama, seed: Option<u64>) {
    let _ = (llama, seed);
}

fn copy_model_files(from: &Path, to: &Path) -> Result<(), TrainError> {
    for f in MODEL_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f))
                .map_err(|e| TrainError::Io(format!("{}: {e}", src.display())))?;
        }
    }
    Ok(())
}

pub fn save(model: &TrainModel, dir: &Path) -> Result<(), TrainError> {
    match model.kind {
        AdapterKind::Full => {
            let tensors: HashMap<String, candle_core::Tensor> = model
                .params
                .iter()
                .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
                .collect();
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
            copy_model_files(&model.dir, dir)
        }
        AdapterKind::Lora => Err(TrainError::Model("LoRA saving is not wired yet".into())),
    }
}

pub fn restore(model: &mut TrainModel, dir: &Path) -> Result<(), TrainError> {
    let file = match model.kind {
        AdapterKind::Full => dir.join("model.safetensors"),
        AdapterKind::Lora => dir.join("adapter_model.safetensors"),
    };
    let saved = candle_core::safetensors::load(&file, &model.device)?;
    for p in &model.params {
        let t = saved.get(&p.name).ok_or_else(|| {
            TrainError::Checkpoint(format!("{}: no tensor `{}`", file.display(), p.name))
        })?;
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}
