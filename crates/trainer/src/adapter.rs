//! How the trainable parameters attach to the model: LoRA adapters on the targeted
//! projections (base frozen), or every weight a variable (full fine-tuning, tied embeddings
//! kept as one tensor); and how they are saved and restored.
use crate::config::{AdapterKind, Config};
use crate::error::TrainError;
use candle_core::{DType, Device, Var};
use sft_model::llama::Llama;
use sft_model::lora::{self, LoraAdapter};
use sft_model::save;
use std::path::{Path, PathBuf};

/// Files copied next to the weights so a checkpoint is usable on its own.
const MODEL_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A trainable parameter: its name in the saved files and its variable.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Weight decay applies (not to norms and biases).
    pub decay: bool,
}

/// What training changes in a model: the parameters, and the LoRA adapter when there is one.
pub struct Trainable {
    pub kind: AdapterKind,
    pub params: Vec<Param>,
    /// The adapter when training LoRA.
    pub lora: Option<LoraAdapter>,
    /// `base_model_name_or_path` written into adapter configs.
    pub base_name: String,
}

impl Trainable {
    /// Attach what `cfg.adapter` asks for to `llama`: fresh LoRA adapters, or every weight.
    pub fn attach(llama: &mut Llama, cfg: &Config) -> Result<Self, TrainError> {
        let (params, lora) = match cfg.adapter.kind {
            AdapterKind::Lora => {
                let (p, a) = apply_lora(llama, cfg)?;
                (p, Some(a))
            }
            AdapterKind::Full => (make_all_trainable(llama)?, None),
        };
        Ok(Self {
            kind: cfg.adapter.kind,
            params,
            lora,
            base_name: cfg.model.source.clone(),
        })
    }

    /// Write the trained weights into `dir`: a PEFT adapter, or full weights in Hugging Face
    /// shards, plus the config and tokenizer files of `model_dir` needed to use them.
    pub fn save(&self, dir: &Path, model_dir: &Path) -> Result<(), TrainError> {
        match (&self.kind, &self.lora) {
            (AdapterKind::Lora, Some(adapter)) => {
                adapter
                    .save(dir, &self.base_name)
                    .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            }
            _ => {
                let tensors: Vec<(String, candle_core::Tensor)> = self
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
                    .collect();
                save::save_hf_weights(dir, &tensors, save::DEFAULT_MAX_SHARD_BYTES)
                    .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            }
        }
        copy_model_files(model_dir, dir)
    }

    /// Set the parameters from a checkpoint folder.
    pub fn restore(&self, dir: &Path, dtype: DType, device: &Device) -> Result<(), TrainError> {
        if let (AdapterKind::Lora, Some(adapter)) = (&self.kind, &self.lora) {
            return lora::restore_adapter(adapter, dir)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())));
        }
        let files = sft_model::load::weight_files(dir)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let saved = sft_model::load::load_safetensors(&files, dtype, device)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        for p in &self.params {
            let t = saved.get(&p.name).ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: no tensor `{}`", dir.display(), p.name))
            })?;
            p.var.set(t)?;
        }
        Ok(())
    }
}

/// Every weight becomes a variable (tied embeddings stay one), the model rebuilt on them.
fn make_all_trainable(llama: &mut Llama) -> Result<Vec<Param>, TrainError> {
    let vars = lora::make_all_trainable(llama).map_err(|e| TrainError::Model(e.to_string()))?;
    Ok(vars
        .into_iter()
        .map(|(name, var)| Param {
            decay: sft_optim::decays_by_name(&name),
            name,
            var,
        })
        .collect())
}

/// Fresh LoRA adapters on the targeted projections (A from the run's seed, B zero).
fn apply_lora(llama: &mut Llama, cfg: &Config) -> Result<(Vec<Param>, LoraAdapter), TrainError> {
    let a = &cfg.adapter;
    let targets = lora::Targets::from_names(&a.targets)
        .map_err(|e| TrainError::Config(format!("adapter.targets: {e}")))?;
    let mut lc = lora::LoraConfig::new(a.r, a.alpha, a.dropout, targets);
    lc.init_seed = cfg.train.seed;
    let adapter = lora::apply_lora(llama, &lc).map_err(|e| TrainError::Model(e.to_string()))?;
    let params = adapter
        .trainable()
        .into_iter()
        .map(|(name, var)| Param {
            name,
            var,
            // PEFT's default: LoRA matrices decay like any weight when weight_decay > 0.
            decay: true,
        })
        .collect();
    Ok((params, adapter))
}

/// Training mode with this dropout seed, or evaluation mode (`None`).
pub fn set_training(llama: &mut Llama, seed: Option<u64>) {
    lora::set_training(llama, seed);
}

fn copy_model_files(from: &Path, to: &Path) -> Result<(), TrainError> {
    for f in MODEL_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| TrainError::io(&src, e))?;
        }
    }
    Ok(())
}

/// The files a restore and the optimizer read from checkpoint folder `dir` for an adapter of
/// `kind`: what the checkpoint's state must list and verify before a resume loads anything.
pub fn resume_files(kind: AdapterKind, dir: &Path) -> Result<Vec<PathBuf>, String> {
    // The optimizer: one file, or the shards of a sharded run (every rank's is verified).
    let shards = sft_optim::ShardedAdamW::files_in(dir).ok();
    let mut files = shards.unwrap_or_else(|| vec![dir.join(crate::checkpoint::OPTIMIZER_FILE)]);
    match kind {
        AdapterKind::Lora => {
            files.push(dir.join(lora::ADAPTER_CONFIG));
            files.push(dir.join(lora::ADAPTER_WEIGHTS));
        }
        AdapterKind::Full => {
            let index = dir.join("model.safetensors.index.json");
            if index.symlink_metadata().is_ok() {
                files.push(index);
            }
            files.extend(sft_model::load::weight_files(dir).map_err(|e| e.to_string())?);
        }
    }
    Ok(files)
}
