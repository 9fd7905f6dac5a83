//! The run's YAML config, validated into typed structs.
//!
//! Unknown keys are refused (`deny_unknown_fields`); a type error names the field path and the
//! line (`train.lr: invalid type: string "fast", expected f64 at line 12 column 7`); values are
//! checked for sense before anything is loaded. `--set key.path=value` overrides apply on top,
//! each value parsed as YAML.
//!
//! Relative paths that a config file reads (`data.sources` paths, a `model.source` folder or
//! `.gguf` file, `eval.*.items` and `eval.*.classifier`) are taken from the config file's folder,
//! so a config works from any working folder; those given with `--set` are taken from the
//! working folder, where the shell typed them. What a run writes (`checkpoint.dir`) goes under
//! the working folder.
use serde::{Deserialize, Serialize};
use sft_model::lora::LLAMA_PROJECTIONS;
use std::path::{Path, PathBuf};

pub use sft_data::DataConfig;
pub use sft_ifs::plateau::PlateauConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("cannot read {file}: {cause}")]
    Io { file: String, cause: std::io::Error },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub adapter: AdapterConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub early_stopping: EarlyStoppingConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// The folder the config's relative input paths are read from (its file's folder); `None`:
    /// the working folder. Not a key of the YAML.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run folder's name under `checkpoint.dir`.
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face folder, a hub id (`meta-llama/Llama-2-7b-hf`) or a `.gguf` file.
    pub source: String,
    /// Hub revision (branch, tag or commit).
    #[serde(default)]
    pub revision: Option<String>,
    /// `f32`, `bf16` or `f16`: the dtype of the base weights.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// The activations' dtype plan: `auto` (CUDA: the weights' dtype with f32 norms, softmax
    /// and loss; CPU: f32), `weights` (CUDA's plan on any device) or `f32`.
    #[serde(default)]
    pub activations: sft_model::llama::Activations,
    /// QLoRA: keep the frozen base linears quantized: `none`, `nf4` (bitsandbytes' NF4),
    /// `q8_0` (GGML's Q8_0) or `gguf` (a GGUF source's own blocks). LoRA only.
    #[serde(default)]
    pub quantize: sft_model::quant::Quantize,
    /// With `nf4`: quantize the absmax too (bitsandbytes' double quantization).
    #[serde(default)]
    pub double_quant: bool,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Lora,
    Full,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub kind: AdapterKind,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, ...) or `[all-linear]`.
    pub targets: Vec<String>,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            kind: AdapterKind::Lora,
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training split; the run ends at the first of the three limits.
    pub epochs: Option<f64>,
    pub max_steps: Option<u64>,
    pub max_examples: Option<u64>,
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Cosine and linear decay to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm clipping; 0 turns it off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Non-finite losses or gradients in a row before the run stops.
    pub max_bad_steps: u32,
    /// Recompute each decoder layer's activations in backward (less memory, more compute).
    pub gradient_checkpointing: bool,
    /// Full fine-tuning of bf16/f16 weights: keep f32 master copies that AdamW updates (exact
    /// small updates, 4 more bytes per parameter); `false` updates the half-precision weights
    /// in place with f32 moments.
    pub master_weights: bool,
    /// ZeRO stage 1: AdamW's moments (and master copies) sharded over the ranks of a
    /// data-parallel run, each rank updating its contiguous share of the flattened trainable
    /// parameters, the updated weights then all-gathered. CPU ranks (MPI) only in this version.
    pub shard_optimizer: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: Some(1.0),
            max_steps: None,
            max_examples: None,
            micro_batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            max_bad_steps: 5,
            gradient_checkpointing: false,
            master_weights: true,
            shard_optimizer: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub loss: LossEvalConfig,
    pub ifs: GenEvalConfig,
    pub objecqa: GenEvalConfig,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossEvalConfig {
    /// Held-out loss every N examples; 0 turns it off.
    pub every_examples: u64,
    /// At most this many held-out examples per evaluation (0 = all).
    pub max_examples: usize,
}

/// A generation-based evaluator's settings (IFS, ObjecQA).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenEvalConfig {
    /// Evaluate every N examples seen; 0 turns the evaluator off.
    pub every_examples: u64,
    /// Also evaluate before the first step (the base model's score).
    pub at_start: bool,
    /// A JSONL file of items instead of the bundled set.
    pub items: Option<PathBuf>,
    /// Use only the first N items of the set (0 = all).
    pub limit: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Prompt template for generation; default: the training template.
    pub template: Option<String>,
    /// A classifier folder instead of the embedded default head.
    pub classifier: Option<PathBuf>,
}

impl Default for GenEvalConfig {
    fn default() -> Self {
        Self {
            every_examples: 0,
            at_start: true,
            items: None,
            limit: 0,
            max_new_tokens: 64,
            batch_size: 16,
            template: None,
            classifier: None,
        }
    }
}

/// `early_stopping`: the IFS plateau rule's four keys (see [`PlateauConfig`]) and `eval_loss`,
/// patience on the held-out loss. Each becomes a [`crate::stop::StopRule`].
/// The four keys are spelled out rather than a `#[serde(flatten)]` PlateauConfig because serde
/// does not support `deny_unknown_fields` with `flatten`, and a misspelt key must be an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingConfig {
    /// The plateau rule's off switch; IFS still runs and is logged.
    pub enabled: bool,
    /// IFS the run must reach before the plateau rule may stop it.
    pub threshold: f64,
    /// An IFS evaluation improves only when it beats the best so far by more than this.
    pub min_delta: f64,
    /// IFS evaluations without improvement, after reaching the threshold, before stopping.
    pub patience: usize,
    /// Stop when the held-out loss stops falling (off unless `patience` > 0).
    pub eval_loss: LossPatienceConfig,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        let p = PlateauConfig::default();
        Self {
            enabled: p.enabled,
            threshold: p.threshold,
            min_delta: p.min_delta,
            patience: p.patience,
            eval_loss: LossPatienceConfig::default(),
        }
    }
}

impl EarlyStoppingConfig {
    /// The plateau rule's settings.
    pub fn plateau(&self) -> PlateauConfig {
        PlateauConfig {
            enabled: self.enabled,
            threshold: self.threshold,
            min_delta: self.min_delta,
            patience: self.patience,
        }
    }
}

/// `early_stopping.eval_loss`: stop once the held-out loss (`eval.loss`) has not fallen by more
/// than `min_delta` below its best for `patience` evaluations in a row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossPatienceConfig {
    /// Evaluations without improvement before stopping; 0 turns the rule off.
    pub patience: usize,
    /// A held-out loss improves only when it is below the best so far by more than this.
    pub min_delta: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    /// Save every N optimizer steps (0: only at evaluations and at the end).
    pub every_steps: u64,
    /// Keep the last K step checkpoints (the best and the format-infusion one are kept too).
    pub keep_last: usize,
    pub keep_best: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("checkpoints"),
            every_steps: 100,
            keep_last: 3,
            keep_best: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log a line every N steps (metrics.jsonl gets every step).
    pub every_steps: u64,
    /// Show a progress bar (off when stderr is not a terminal).
    pub progress: bool,
    /// Redraw the PNG plots at each evaluation.
    pub plots: bool,
    /// Write TensorBoard event files into the run folder (every metrics line's numbers, and the
    /// IFS/ObjecQA answers as text at each evaluation).
    pub tensorboard: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            every_steps: 10,
            progress: true,
            plots: true,
            tensorboard: true,
        }
    }
}

impl Config {
    /// Read, override, parse and validate a config file. Its relative input paths are read from
    /// its folder (see the module documentation).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            cause: source,
        })?;
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Absolute, so that errors name the folder searched whatever the working folder.
        let folder = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
        Self::from_yaml_in(&text, &file, overrides, Some(&folder))
    }

    /// Parse from YAML text; `file` names the source in errors. Relative paths stay relative to
    /// the working folder.
    pub fn from_yaml(text: &str, file: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        Self::from_yaml_in(text, file, overrides, None)
    }

    /// [`Config::from_yaml`], the relative input paths of `text` read from `base` (those of
    /// `--set` overrides stay relative to the working folder).
    pub fn from_yaml_in(
        text: &str,
        file: &str,
        overrides: &[String],
        base: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            message,
        };
        if overrides.is_empty() {
            let mut cfg =
                parse_with_path(serde_yaml::Deserializer::from_str(text)).map_err(invalid)?;
            cfg.validate().map_err(invalid)?;
            if let Some(b) = base {
                cfg.rebase(b, &[]);
            }
            return Ok(cfg);
        }
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut touched = Vec::new();
        for arg in overrides {
            let (key, val) = arg.split_once('=').ok_or_else(|| ConfigError::Override {
                arg: arg.clone(),
                message: "expected key.path=value".into(),
            })?;
            let parsed: serde_yaml::Value =
                serde_yaml::from_str(val).map_err(|e| ConfigError::Override {
                    arg: arg.clone(),
                    message: format!("the value is not YAML: {e}"),
                })?;
            set_path(&mut value, key, parsed).map_err(|message| ConfigError::Override {
                arg: arg.clone(),
                message,
            })?;
            touched.push((key.to_string(), arg.clone()));
        }
        // The override that set the field a message starts with, if one did.
        let blamed = |message: &str| {
            touched
                .iter()
                .rev()
                .find(|(k, _)| {
                    message.starts_with(k.as_str())
                        && message[k.len()..].starts_with([':', '.', '[', '/'])
                })
                .map(|(_, arg)| arg.clone())
        };
        match parse_with_path(value) {
            Ok(mut cfg) => {
                if let Err(messages) = cfg.validate() {
                    // Each broken value is blamed on the --set that gave it, else on the file.
                    let (from_set, from_file): (Vec<&str>, Vec<&str>) =
                        messages.lines().partition(|m| blamed(m).is_some());
                    if let Some(first) = from_set.first() {
                        let arg = blamed(first).unwrap_or_default();
                        let mut message = from_set.join("\n");
                        if !from_file.is_empty() {
                            message = format!("{message}\n{file}: {}", from_file.join("\n"));
                        }
                        return Err(ConfigError::Override { arg, message });
                    }
                    return Err(invalid(messages));
                }
                if let Some(b) = base {
                    let keys: Vec<&str> = touched.iter().map(|(k, _)| k.as_str()).collect();
                    cfg.rebase(b, &keys);
                }
                Ok(cfg)
            }
            Err(message) => {
                // Name the override when the broken field came from one; otherwise re-read the
                // file alone, whose error carries the line number.
                if let Some(arg) = blamed(&message) {
                    return Err(ConfigError::Override { arg, message });
                }
                match parse_with_path(serde_yaml::Deserializer::from_str(text)) {
                    Err(with_line) => Err(invalid(with_line)),
                    Ok(_) => Err(invalid(message)),
                }
            }
        }
    }

    /// Reads the file's relative input paths from `base`, except those under a key an override
    /// set (`overridden`: `--set` keys), which stay relative to the working folder.
    fn rebase(&mut self, base: &Path, overridden: &[&str]) {
        let from_file = |key: &str| {
            !overridden.iter().any(|k| {
                k == &key
                    || key.strip_prefix(k).is_some_and(|r| r.starts_with('.'))
                    || k.strip_prefix(key).is_some_and(|r| r.starts_with('.'))
            })
        };
        self.base_dir = Some(base.to_path_buf());
        if from_file("data.sources") {
            self.data.base_dir = Some(base.to_path_buf());
        }
        // A relative source is a path when it is one there (or plainly says so: `./m`,
        // `m.gguf`); else it stays a hub id (`org/name`).
        let source = Path::new(&self.model.source);
        let a_path = base.join(source).exists()
            || self.model.source.starts_with('.')
            || source
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if from_file("model.source")
            && !self.model.source.starts_with("cache:")
            && source.is_relative()
            && a_path
        {
            self.model.source = base.join(source).display().to_string();
        }
        for (name, e) in [
            ("ifs", &mut self.eval.ifs),
            ("objecqa", &mut self.eval.objecqa),
        ] {
            for (key, path) in [("items", &mut e.items), ("classifier", &mut e.classifier)] {
                if let Some(p) = path.as_mut().filter(|p| p.is_relative()) {
                    if from_file(&format!("eval.{name}.{key}")) {
                        *p = base.join(&*p);
                    }
                }
            }
        }
    }

    /// Checks of values that types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        let t = &self.train;
        if self.run.name.trim().is_empty() || self.run.name.contains('/') {
            errs.push("run.name: expected a non-empty name without '/'".to_string());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            errs.push(format!("train.lr: expected a number > 0, found {}", t.lr));
        }
        if t.micro_batch_size == 0 {
            errs.push("train.micro_batch_size: expected at least 1".into());
        }
        if t.grad_accum == 0 {
            errs.push("train.grad_accum: expected at least 1".into());
        }
        if t.epochs.is_none() && t.max_steps.is_none() && t.max_examples.is_none() {
            errs.push("train: set at least one of epochs, max_steps, max_examples".into());
        }
        if let Some(e) = t.epochs {
            if e.is_nan() || e <= 0.0 {
                errs.push(format!("train.epochs: expected a number > 0, found {e}"));
            }
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            errs.push("train.beta1/beta2: expected values in [0, 1)".into());
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            errs.push("train.weight_decay/max_grad_norm: expected values >= 0".into());
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            errs.push("train.min_lr_ratio: expected a value in [0, 1]".into());
        }
        if self.adapter.kind == AdapterKind::Lora {
            let a = &self.adapter;
            if a.r == 0 {
                errs.push("adapter.r: expected at least 1".into());
            }
            if a.alpha.is_nan() || a.alpha <= 0.0 {
                errs.push(format!(
                    "adapter.alpha: expected a number > 0, found {}",
                    a.alpha
                ));
            }
            if !(0.0..1.0).contains(&a.dropout) {
                errs.push(format!(
                    "adapter.dropout: expected a value in [0, 1), found {}",
                    a.dropout
                ));
            }
            if a.targets.is_empty() {
                errs.push("adapter.targets: expected at least one module name".into());
            }
            for name in &a.targets {
                if !LLAMA_PROJECTIONS.contains(&name.as_str()) && name != "all-linear" {
                    errs.push(format!(
                        "adapter.targets: unknown module '{name}', expected some of {} or all-linear",
                        LLAMA_PROJECTIONS.join(", ")
                    ));
                }
            }
        }
        use sft_model::quant::Quantize;
        if self.model.quantize != Quantize::None && self.adapter.kind == AdapterKind::Full {
            errs.push(format!(
                "model.quantize: {} keeps the base weights frozen and quantized, and full \
                 fine-tuning trains them; use adapter.kind: lora (QLoRA), or model.quantize: none",
                self.model.quantize.name()
            ));
        }
        if self.model.double_quant && self.model.quantize != Quantize::Nf4 {
            errs.push("model.double_quant: only NF4 (model.quantize: nf4) double-quantizes".into());
        }
        if !["f32", "bf16", "f16"].contains(&self.model.dtype.as_str()) {
            errs.push(format!(
                "model.dtype: expected f32, bf16 or f16, found '{}'",
                self.model.dtype
            ));
        }
        let dev = self.model.device.as_str();
        let cuda_ok = dev == "cuda"
            || dev
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if dev != "cpu" && !cuda_ok {
            errs.push(format!(
                "model.device: expected cpu, cuda or cuda:N, found '{dev}'"
            ));
        }
        if t.shard_optimizer && cuda_ok {
            errs.push(format!(
                "train.shard_optimizer: the sharded optimizer runs on CPU ranks only (its \
                 all-gather goes through MPI on the host, not NCCL), and model.device is \
                 '{dev}': set train.shard_optimizer: false on GPUs"
            ));
        }
        if self.checkpoint.keep_last == 0 {
            errs.push("checkpoint.keep_last: expected at least 1".into());
        }
        for (name, e) in [("ifs", &self.eval.ifs), ("objecqa", &self.eval.objecqa)] {
            if e.every_examples > 0 && (e.max_new_tokens == 0 || e.batch_size == 0) {
                errs.push(format!(
                    "eval.{name}: max_new_tokens and batch_size must be at least 1"
                ));
            }
        }
        // The plateau rule without IFS is not an error: it never fires (the trainer logs it).
        let es = &self.early_stopping;
        if !(0.0..=1.0).contains(&es.threshold) || es.patience == 0 {
            errs.push("early_stopping: threshold in [0, 1] and patience >= 1 expected".into());
        }
        if !(es.eval_loss.min_delta >= 0.0 && es.eval_loss.min_delta.is_finite()) {
            errs.push(format!(
                "early_stopping.eval_loss.min_delta: expected a number >= 0, found {}",
                es.eval_loss.min_delta
            ));
        }
        if es.eval_loss.patience > 0 && self.eval.loss.every_examples == 0 {
            errs.push(
                "early_stopping.eval_loss.patience: the held-out loss is never evaluated; set \
                 eval.loss.every_examples (and data.eval_split)"
                    .into(),
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("\n"))
        }
    }
}

fn parse_with_path<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Config, String>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() || inner.starts_with(&path) {
            return inner;
        }
        // serde_yaml names a location too, often the section around the field (`train:
        // unknown field ...` for `train.grad_acum`): say the field's path once.
        let mut at = path.as_str();
        loop {
            if let Some(rest) = inner.strip_prefix(at).and_then(|r| r.strip_prefix(": ")) {
                return format!("{path}: {rest}");
            }
            match at.rfind(['.', '[']) {
                Some(i) => at = &at[..i],
                None => return format!("{path}: {inner}"),
            }
        }
    })
}

/// Set `a.b.c` in a YAML mapping, creating intermediate maps.
fn set_path(root: &mut serde_yaml::Value, key: &str, val: serde_yaml::Value) -> Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("'{key}' is not a key path like train.lr"));
    }
    for (i, part) in parts.iter().enumerate() {
        let map = match cur {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *cur = serde_yaml::Value::Mapping(Default::default());
                match cur {
                    serde_yaml::Value::Mapping(m) => m,
                    _ => unreachable!(),
                }
            }
            _ => return Err(format!("'{}' is not a section", parts[..i].join("."))),
        };
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, val);
            return Ok(());
        }
        cur = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    Ok(())
}
