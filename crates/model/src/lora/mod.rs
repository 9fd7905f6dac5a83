//! LoRA (Hu et al. 2021) as Hugging Face PEFT defines it, and the parameter setup of full
//! fine-tuning.
//!
//! - [`apply_lora`] wraps the target projections of a [`Llama`](crate::llama::Llama): A (r, in) drawn as PEFT's
//!   `kaiming_uniform_(a = sqrt(5))` (uniform in ±1/sqrt(in)) from a seed, B zero, so step 0 is
//!   the base model. The base weights stay plain tensors (frozen, through
//!   [`crate::ops::frozen_linear`]); only A and B are `Var`s.
//! - Files are PEFT's: `adapter_model.safetensors` with keys
//!   `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` and `adapter_config.json`
//!   (`peft_type: LORA`, `r`, `lora_alpha`, ...). [`LoraAdapter::save`] writes them,
//!   [`load_adapter`] applies ours or PEFT's unmerged, [`merge_adapter_folder`] folds one into a
//!   model folder (`W' = W + scale * B A`).
//! - [`make_all_trainable`] turns every weight into a `Var` for full fine-tuning (a tied
//!   `lm_head` stays the embedding's `Var`).
//!
//! Unsupported PEFT features are refused with the field named: DoRA, LoRA biases,
//! `modules_to_save`, regex `target_modules` and regex rank/alpha patterns.
//!
//! The rooms: `config` (hyper-parameters and target matching), `apply` (fresh
//! adapters on a model), `peft` (PEFT's files: save, read, load, restore), `merge` (into a model
//! folder), `full` (full fine-tuning) and `error`.
mod apply;
mod config;
mod error;
mod full;
mod merge;
mod peft;

pub use apply::{apply_lora, peft_key, set_training, LoraAdapter, LoraModule, AB, PEFT_PREFIX};
pub use config::{LoraConfig, Targets, LLAMA_PROJECTIONS};
pub use error::{LoraError, Result};
pub use full::make_all_trainable;
pub use merge::{merge_adapter_folder, MergeReport, TrainedBase, COPIED_FILES};
pub use peft::{
    load_adapter, read_adapter, read_peft_config, restore_adapter, AdapterFiles, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};
