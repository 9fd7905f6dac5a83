//! PEFT's adapter files: `adapter_model.safetensors` and `adapter_config.json`, written from an
//! applied adapter, read (refusing what is not supported), applied to a model or restored into
//! an applied adapter.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};

use super::apply::{adapter_dtype, LoraAdapter, LoraModule, PEFT_PREFIX};
use super::config::{LoraConfig, Targets};
use super::error::{invalid, LoraError, Result};
use crate::linear::LoraLayer;
use crate::llama::Llama;
use crate::save;

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

impl LoraAdapter {
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
            cause: source,
        })?;
        save::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &self.tensors())?;
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&self.peft_config_json(base_model_name_or_path))
            .map_err(|e| LoraError::Invalid {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        std::fs::write(&path, text + "\n").map_err(|source| LoraError::Io {
            path,
            cause: source,
        })
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

/// An adapter folder as read from disk: its config and, per module, A, B and the scale.
#[derive(Clone, Debug)]
pub struct AdapterFiles {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    /// (module name, A (r, in), B (out, r), scale), sorted by name.
    pub modules: Vec<(String, Tensor, Tensor, f64)>,
}

/// Reads a PEFT `adapter_config.json` into a [`LoraConfig`], refusing what we do not support.
pub fn read_peft_config(path: &Path) -> Result<(LoraConfig, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        cause: source,
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
