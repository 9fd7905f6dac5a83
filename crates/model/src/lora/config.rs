//! LoRA hyper-parameters: rank, alpha, dropout, the target modules (PEFT's matching) and the
//! per-module rank and alpha patterns.
use std::collections::BTreeMap;

use super::error::{LoraError, Result};

/// The projection names of a LLaMA block, PEFT's usual `target_modules`.
pub const LLAMA_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which linear layers get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Module names matched as PEFT does for a list: the full name, or its last components
    /// (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Modules(Vec<String>),
    /// PEFT's `all-linear`: every linear layer except the output layer (`lm_head`).
    AllLinear,
}

impl Targets {
    /// `["all-linear"]` (or the single string `all-linear`) is [`Targets::AllLinear`].
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let names: Vec<String> = names
            .iter()
            .map(|s| s.as_ref().trim().to_string())
            .collect();
        if names.is_empty() {
            return Err(LoraError::Config("no target modules given".into()));
        }
        if names.iter().any(|n| n == "all-linear") {
            if names.len() > 1 {
                return Err(LoraError::Config(
                    "`all-linear` cannot be combined with other target modules".into(),
                ));
            }
            return Ok(Targets::AllLinear);
        }
        if let Some(bad) = names
            .iter()
            .find(|n| n.is_empty() || n.contains(char::is_whitespace))
        {
            return Err(LoraError::Config(format!("bad target module name `{bad}`")));
        }
        Ok(Targets::Modules(names))
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::AllLinear => module != "lm_head",
            Targets::Modules(names) => names.iter().any(|t| suffix_match(module, t)),
        }
    }
}

/// PEFT's list matching: `module == t` or `module` ends with `.t`.
fn suffix_match(module: &str, t: &str) -> bool {
    module == t
        || (module.len() > t.len()
            && module.ends_with(t)
            && module.as_bytes()[module.len() - t.len() - 1] == b'.')
}

/// LoRA hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Targets,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Seed of A's initialisation.
    pub init_seed: u64,
    /// Per-module rank and alpha overrides (PEFT's `rank_pattern` / `alpha_pattern`), keyed
    /// by module name suffix.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, dropout: f64, targets: Targets) -> Self {
        Self {
            r,
            alpha,
            dropout,
            targets,
            use_rslora: false,
            init_seed: 0,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    pub(super) fn rank_for(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub(super) fn alpha_for(&self, module: &str) -> f64 {
        pattern_lookup(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// The scale of a module's update, `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    pub fn scale_for(&self, module: &str) -> f64 {
        let (r, alpha) = (self.rank_for(module) as f64, self.alpha_for(module));
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            return Err(LoraError::Config("rank r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config(format!(
                "dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::Config("alpha must be finite".into()));
        }
        Ok(())
    }
}

fn pattern_lookup<T: Copy>(map: &BTreeMap<String, T>, module: &str) -> Option<T> {
    // The longest matching key wins, so `layers.0.q_proj` beats `q_proj`.
    map.iter()
        .filter(|(k, _)| suffix_match(module, k))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}
