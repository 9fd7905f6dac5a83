//! Full fine-tuning: every weight of the model a `Var`.
use std::collections::HashMap;

use candle_core::Var;

use super::error::{LoraError, Result};
use crate::llama::Llama;

/// Full fine-tuning: rebuilds the model with every weight a `Var` (in the model's dtype) and
/// returns them by hub name. A tied `lm_head` uses the embedding's `Var`.
pub fn make_all_trainable(model: &mut Llama) -> Result<Vec<(String, Var)>> {
    if model.linears_mut().iter().any(|(_, l)| l.lora.is_some()) {
        return Err(LoraError::Config(
            "the model has LoRA adapters: full fine-tuning needs the plain model".into(),
        ));
    }
    let cfg = model.config().clone();
    let mut vars = Vec::new();
    let mut map = HashMap::new();
    for (name, t) in model.named_weights() {
        let v = Var::from_tensor(t)?;
        map.insert(name.clone(), v.as_tensor().clone());
        vars.push((name.clone(), v));
    }
    *model = Llama::from_weights(&cfg, map)?;
    Ok(vars)
}
