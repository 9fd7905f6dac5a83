//! LoRA (Hu et al. 2021) as Hugging Face PEFT defines it, and the parameter setup of full
//! fine-tuning.
//!
//! - [`apply_lora`] wraps the target projections of a [`Llama`]: A (r, in) drawn as PEFT's
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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::linear::{merge_weight, LoraLayer};
use crate::llama::Llama;
use crate::save::{self, TensorEntry};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// What PEFT's `PeftModelForCausalLM` puts before a module name in its state dict.
pub const PEFT_PREFIX: &str = "base_model.model.";
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

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("LoRA: {0}")]
    Config(String),
    #[error(transparent)]
    Save(#[from] save::SaveError),
}

pub type Result<T> = std::result::Result<T, LoraError>;

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

    fn rank_for(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    fn alpha_for(&self, module: &str) -> f64 {
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

    fn validate(&self) -> Result<()> {
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

    /// PEFT's `adapter_config.json` for this adapter.
    pub fn peft_config_json(&self, base_model_name_or_path: &str) -> Value {
        let c = &self.config;
        json!({
            "alpha_pattern": c.alpha_pattern.iter().map(|(k, v)| (k.clone(), num(*v))).collect::<serde_json::Map<_, _>>(),
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": num(c.alpha),
            "lora_bias": false,
            "lora_dropout": c.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": c.rank_pattern,
            "revision": null,
            "target_modules": self.target_module_names(),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": c.use_rslora,
        })
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created).
    pub fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        save::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &self.tensors())?;
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&self.peft_config_json(base_model_name_or_path))
            .map_err(|e| LoraError::Invalid {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        std::fs::write(&path, text + "\n").map_err(|source| LoraError::Io { path, source })
    }
}

/// A whole number as a JSON integer (PEFT types `lora_alpha` as int), else a float.
fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// The dtype adapters are kept in: f32, or f64 for an f64 model.
fn adapter_dtype(model_dtype: DType) -> DType {
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
            l.set_training(seed.map(|s| mix(s, i as u64)));
        }
    }
}

fn mix(seed: u64, i: u64) -> u64 {
    let mut x = seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

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

// ------------------------------------------------------------------------------------------
// Reading PEFT adapters
// ------------------------------------------------------------------------------------------

/// An adapter folder as read from disk: its config and, per module, A, B and the scale.
#[derive(Clone, Debug)]
pub struct AdapterFiles {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    /// (module name, A (r, in), B (out, r), scale), sorted by name.
    pub modules: Vec<(String, Tensor, Tensor, f64)>,
}

fn invalid(path: &Path, msg: impl Into<String>) -> LoraError {
    LoraError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a PEFT `adapter_config.json` into a [`LoraConfig`], refusing what we do not support.
pub fn read_peft_config(path: &Path) -> Result<(LoraConfig, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| invalid(path, format!("not valid JSON: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(invalid(
                path,
                format!("peft_type is {other:?}, only \"LORA\" is supported"),
            ))
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(path, "`r` must be a positive integer"))? as usize;
    let alpha = match field("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(a) => a
            .as_f64()
            .ok_or_else(|| invalid(path, "`lora_alpha` must be a number"))?,
    };
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match field("target_modules") {
        Some(Value::Array(a)) => {
            let names: Vec<String> = a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| invalid(path, "`target_modules` must hold strings"))
                })
                .collect::<Result<_>>()?;
            Targets::from_names(&names).map_err(|e| invalid(path, e.to_string()))?
        }
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => {
            return Err(invalid(
                path,
                format!("`target_modules` is the regex {s:?}: regex targets are not supported"),
            ))
        }
        _ => return Err(invalid(path, "`target_modules` is missing")),
    };
    let flag = |k: &str| field(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["use_dora", "fan_in_fan_out", "lora_bias"] {
        if flag(k) {
            return Err(invalid(path, format!("`{k}: true` is not supported")));
        }
    }
    if let Some(b) = field("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(invalid(
                path,
                format!("`bias: {b}` is not supported (only \"none\")"),
            ));
        }
    }
    match field("modules_to_save") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(m) => {
            return Err(invalid(
                path,
                format!("`modules_to_save: {m}` is not supported"),
            ))
        }
    }
    let pattern = |k: &str| -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        if let Some(obj) = field(k).and_then(Value::as_object) {
            for (key, val) in obj {
                if key.chars().any(|c| "^$*+?()[]{}|\\".contains(c)) {
                    return Err(invalid(
                        path,
                        format!("`{k}` key {key:?} is a regex: only module names are supported"),
                    ));
                }
                let n = val
                    .as_f64()
                    .ok_or_else(|| invalid(path, format!("`{k}.{key}` must be a number")))?;
                out.insert(key.clone(), n);
            }
        }
        Ok(out)
    };
    let rank_pattern = pattern("rank_pattern")?
        .into_iter()
        .map(|(k, v)| (k, v as usize))
        .collect();
    let alpha_pattern = pattern("alpha_pattern")?;
    let cfg = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora: flag("use_rslora"),
        init_seed: 0,
        rank_pattern,
        alpha_pattern,
    };
    cfg.validate().map_err(|e| invalid(path, e.to_string()))?;
    let base = field("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    Ok((cfg, base))
}

/// Reads an adapter folder (PEFT's layout) into memory, on `device`, tensors as stored.
pub fn read_adapter(dir: &Path, device: &Device) -> Result<AdapterFiles> {
    // Only regular files inside the folder are read: a symlink leading out of it, a device or a
    // FIFO is refused.
    let inside = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.symlink_metadata().is_err() {
            return Ok(p);
        }
        crate::safe_path::model_file(dir, name).map_err(|e| invalid(&e.path, e.reason))
    };
    let (config, base) = read_peft_config(&inside(ADAPTER_CONFIG)?)?;
    let wpath = inside(ADAPTER_WEIGHTS)?;
    if !wpath.is_file() {
        let msg = if dir.join("adapter_model.bin").is_file() {
            "missing; only adapter_model.bin (pickle) is there, which is not supported"
        } else {
            "missing"
        };
        return Err(invalid(&wpath, msg));
    }
    let tensors = candle_core::safetensors::load(&wpath, device)
        .map_err(|e| invalid(&wpath, e.to_string()))?;
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(PEFT_PREFIX) else {
            return Err(invalid(
                &wpath,
                format!("key `{key}` does not start with `{PEFT_PREFIX}`"),
            ));
        };
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            a_of.insert(m.to_string(), t);
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            b_of.insert(m.to_string(), t);
        } else {
            return Err(invalid(
                &wpath,
                format!("key `{key}` is not a LoRA A or B weight (unsupported adapter content)"),
            ));
        }
    }
    let mut modules = Vec::new();
    for (name, a) in a_of {
        let b = b_of
            .remove(&name)
            .ok_or_else(|| invalid(&wpath, format!("`{name}` has lora_A but no lora_B")))?;
        let (r, _) = a
            .dims2()
            .map_err(|_| invalid(&wpath, format!("`{name}` lora_A is not a matrix")))?;
        let (_, rb) = b
            .dims2()
            .map_err(|_| invalid(&wpath, format!("`{name}` lora_B is not a matrix")))?;
        if rb != r {
            return Err(invalid(
                &wpath,
                format!("`{name}`: lora_A has rank {r}, lora_B {rb}"),
            ));
        }
        if r != config.rank_for(&name) {
            return Err(invalid(
                &wpath,
                format!(
                    "`{name}` has rank {r}, {ADAPTER_CONFIG} says {}",
                    config.rank_for(&name)
                ),
            ));
        }
        let scale = config.scale_for(&name);
        modules.push((name, a, b, scale));
    }
    if let Some(name) = b_of.keys().next() {
        return Err(invalid(
            &wpath,
            format!("`{name}` has lora_B but no lora_A"),
        ));
    }
    if modules.is_empty() {
        return Err(invalid(&wpath, "holds no LoRA weights"));
    }
    Ok(AdapterFiles {
        dir: dir.to_path_buf(),
        config,
        base_model_name_or_path: base,
        modules,
    })
}

/// Applies an adapter folder (ours or PEFT's) to the model, unmerged, in evaluation mode.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraAdapter> {
    let files = read_adapter(dir, model.device())?;
    let dt = adapter_dtype(model.dtype());
    let mut by_name: HashMap<String, &mut crate::linear::Linear> =
        model.linears_mut().into_iter().collect();
    let mut modules = Vec::new();
    for (name, a, b, scale) in &files.modules {
        let lin = by_name.get_mut(name).ok_or_else(|| {
            invalid(
                &files.dir,
                format!("the adapter targets `{name}`, which is not a linear layer of this model"),
            )
        })?;
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        let r = a.dim(0)?;
        if a.dims() != [r, in_f] || b.dims() != [out_f, r] {
            return Err(invalid(
                &files.dir,
                format!(
                    "`{name}`: A {:?} and B {:?} do not fit a ({out_f}, {in_f}) weight",
                    a.dims(),
                    b.dims()
                ),
            ));
        }
        if lin.lora.is_some() {
            return Err(LoraError::Config(format!(
                "`{name}` already has an adapter"
            )));
        }
        let a = Var::from_tensor(&a.to_dtype(dt)?)?;
        let b = Var::from_tensor(&b.to_dtype(dt)?)?;
        lin.lora = Some(LoraLayer::new(
            a.clone(),
            b.clone(),
            *scale,
            files.config.dropout,
        ));
        modules.push(LoraModule {
            name: name.clone(),
            a,
            b,
            scale: *scale,
        });
    }
    Ok(LoraAdapter {
        config: files.config,
        modules,
    })
}

/// Copies the values of a saved adapter into an applied one (same modules and shapes): how a
/// trainer resumes its adapter from a checkpoint.
pub fn restore_adapter(adapter: &LoraAdapter, dir: &Path) -> Result<()> {
    let dev = adapter
        .modules
        .first()
        .map(|m| m.a.device().clone())
        .unwrap_or(Device::Cpu);
    let files = read_adapter(dir, &dev)?;
    let saved: HashMap<&str, (&Tensor, &Tensor)> = files
        .modules
        .iter()
        .map(|(n, a, b, _)| (n.as_str(), (a, b)))
        .collect();
    if saved.len() != adapter.modules.len() {
        return Err(invalid(
            dir,
            format!(
                "holds {} adapted modules, the model {}",
                saved.len(),
                adapter.modules.len()
            ),
        ));
    }
    for m in &adapter.modules {
        let (a, b) = saved
            .get(m.name.as_str())
            .ok_or_else(|| invalid(dir, format!("no adapter for `{}`", m.name)))?;
        if a.dims() != m.a.dims() || b.dims() != m.b.dims() {
            return Err(invalid(dir, format!("`{}`: shapes differ", m.name)));
        }
        m.a.set(&a.to_dtype(m.a.dtype())?)?;
        m.b.set(&b.to_dtype(m.b.dtype())?)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Merging into a model folder
// ------------------------------------------------------------------------------------------

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
}

/// Folds an adapter into a Hugging Face model folder: every adapted weight becomes
/// `W + scale * B A` (computed in f32, stored in W's dtype), every other tensor is copied as
/// is; config and tokenizer files are copied. Holds one output shard in memory at a time.
pub fn merge_adapter_folder(
    base: &Path,
    adapter: &Path,
    out: &Path,
    max_shard_bytes: usize,
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
        source,
    })?;
    let mut written = save::save_hf_weights_lazy(out, &entries, max_shard_bytes, |e| {
        let w = st.load(&e.name, &Device::Cpu)?;
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
                source,
            })?;
            written.push(dst);
        }
    }
    Ok(MergeReport {
        merged_modules: deltas.len(),
        tensors: entries.len(),
        files: written,
    })
}
