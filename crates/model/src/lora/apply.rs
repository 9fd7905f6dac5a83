//! Adding adapters to a model: fresh A and B on the target projections, the handles on their
//! `Var`s, and training or evaluation mode.
use std::collections::BTreeSet;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::LoraConfig;
use super::error::{LoraError, Result};
use crate::linear::LoraLayer;
use crate::llama::Llama;

/// What PEFT's `PeftModelForCausalLM` puts before a module name in its state dict.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// One adapted module: its name (`model.layers.0.self_attn.q_proj`) and its A and B.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub name: String,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// The adapters applied to a model: handles on the `Var`s inside its layers.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub modules: Vec<LoraModule>,
}

/// PEFT's state-dict key of a module's A or B.
pub fn peft_key(module: &str, which: AB) -> String {
    let ab = match which {
        AB::A => "lora_A",
        AB::B => "lora_B",
    };
    format!("{PEFT_PREFIX}{module}.{ab}.weight")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AB {
    A,
    B,
}

impl LoraAdapter {
    /// The trainable parameters under their PEFT keys, A then B per module, in model order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (peft_key(&m.name, AB::A), m.a.clone()),
                    (peft_key(&m.name, AB::B), m.b.clone()),
                ]
            })
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.a.elem_count() + m.b.elem_count())
            .sum()
    }

    /// The adapter's tensors under their PEFT keys.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }

    /// The short names adapted (`q_proj`, ...), sorted, as PEFT writes `target_modules`.
    pub fn target_module_names(&self) -> Vec<String> {
        let set: BTreeSet<String> = self
            .modules
            .iter()
            .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name).to_string())
            .collect();
        set.into_iter().collect()
    }
}

/// The dtype adapters are kept in: f32, or f64 for an f64 model.
pub(super) fn adapter_dtype(model_dtype: DType) -> DType {
    if model_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Adds fresh adapters (A Kaiming-uniform from `cfg.init_seed`, B zero) to the target modules.
pub fn apply_lora(model: &mut Llama, cfg: &LoraConfig) -> Result<LoraAdapter> {
    cfg.validate()?;
    let dt = adapter_dtype(model.dtype());
    let dev = model.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.init_seed);
    let mut modules = Vec::new();
    let mut names = Vec::new();
    for (name, lin) in model.linears_mut() {
        names.push(name.clone());
        if !cfg.targets.matches(&name) {
            continue;
        }
        if lin.lora.is_some() {
            return Err(LoraError::Config(format!(
                "`{name}` already has an adapter"
            )));
        }
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        let r = cfg.rank_for(&name);
        // kaiming_uniform_(a=sqrt(5)) on (r, in): gain sqrt(2 / 6), bound gain * sqrt(3 / in).
        let bound = 1.0 / (in_f as f64).sqrt();
        let a: Vec<f64> = (0..r * in_f)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_f), &dev)?.to_dtype(dt)?)?;
        let b = Var::zeros((out_f, r), dt, &dev)?;
        let scale = cfg.scale_for(&name);
        lin.lora = Some(LoraLayer::new(a.clone(), b.clone(), scale, cfg.dropout));
        modules.push(LoraModule { name, a, b, scale });
    }
    if modules.is_empty() {
        return Err(LoraError::Config(format!(
            "target modules {:?} match none of the model's linear layers (e.g. {})",
            cfg.targets,
            names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(LoraAdapter {
        config: cfg.clone(),
        modules,
    })
}

/// Training mode for every adapter, with dropout masks drawn from `seed` (each module its own
/// stream), or evaluation mode with `None`.
pub fn set_training(model: &mut Llama, seed: Option<u64>) {
    for (i, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some(l) = &lin.lora {
            l.set_training(seed.map(|s| sft_common::mix(s, i as u64 + 1, 0)));
        }
    }
}
