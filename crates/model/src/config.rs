//! `config.json` of a LLaMA-architecture checkpoint, as real checkpoints write it.
//!
//! Accepts LLaMA 1/2/3/3.1/3.2, TinyLlama, SmolLM and transformers 5's layout
//! (`rope_parameters` instead of `rope_theta` + `rope_scaling`, `dtype` instead of
//! `torch_dtype`). Anything that would change the computation and that this crate does not
//! implement is an error naming the field, never a silent default: unknown fields too, except
//! the generic bookkeeping fields every transformers config carries (see [`IGNORED_FIELDS`]).
use candle_core::DType;
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{path}: not valid JSON: {cause}")]
    Json {
        path: String,
        cause: serde_json::Error,
    },
    #[error("config.json: field `{field}`: {msg}")]
    Field { field: String, msg: String },
}

fn field_err(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        msg: msg.into(),
    }
}

/// RoPE frequency scaling. Only what LLaMA checkpoints use is implemented.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// LLaMA 3.1's scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp
    /// between (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The hyper-parameters of a LLaMA model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: `num_attention_heads` must be a multiple of it.
    pub num_key_value_heads: usize,
    /// `hidden_size / num_attention_heads` unless the config says otherwise.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends a sequence (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), if stated.
    pub torch_dtype: Option<DType>,
}

/// Fields every transformers `PretrainedConfig` may serialise that do not change the forward
/// pass of a causal LM (generation defaults, labels, bookkeeping). Anything not listed here and
/// not parsed below is refused.
pub const IGNORED_FIELDS: &[&str] = &[
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "transformers_version",
    "use_cache",
    "initializer_range",
    // Tensor-parallel slicing of the pretraining run: mathematically the same linear layers.
    "pretraining_tp",
    // Dropout on attention probabilities: 0.0 in every LLaMA release; see the check below.
    "attention_dropout",
    "is_llama_config",
    "transformers.js_config",
    "max_sequence_length",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "finetuning_task",
    "id2label",
    "label2id",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "problem_type",
    "output_router_logits",
];

impl LlamaConfig {
    /// Reads and validates a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            cause: source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.display().to_string(),
            cause: source,
        })?;
        Self::from_value(&value)
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: "config.json".to_string(),
            cause: source,
        })?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Self, ConfigError> {
        let obj = value
            .as_object()
            .ok_or_else(|| field_err("<root>", "expected a JSON object"))?;
        let mut p = Parser {
            obj,
            used: Vec::new(),
        };

        match p.opt_str("model_type")? {
            Some("llama") => {}
            Some(other) => {
                return Err(field_err(
                    "model_type",
                    format!("`{other}` is not supported; only `llama` is implemented"),
                ))
            }
            None => return Err(field_err("model_type", "missing; expected \"llama\"")),
        }
        if let Some(act) = p.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(field_err(
                    "hidden_act",
                    format!("`{act}` is not supported; LLaMA's SwiGLU uses `silu`"),
                ));
            }
        }
        if p.opt_bool("rope_interleaved")? == Some(true) {
            return Err(field_err(
                "rope_interleaved",
                "interleaved (GPT-J style) rotary embeddings are not supported",
            ));
        }
        if let Some(v) = p.take("quantization_config") {
            if !v.is_null() {
                return Err(field_err(
                    "quantization_config",
                    "quantized checkpoints are not supported; use an unquantized safetensors \
                     checkpoint or import a GGUF file with `sft import-gguf`",
                ));
            }
        }
        if let Some(d) = p.opt_f64("attention_dropout")? {
            if d != 0.0 {
                tracing::warn!("config.json: attention_dropout = {d} is not applied");
            }
        }
        for f in ["sliding_window", "head_dim_scaling"] {
            if let Some(v) = p.take(f) {
                if !v.is_null() {
                    return Err(field_err(f, "not part of the LLaMA architecture"));
                }
            }
        }

        let hidden_size = p.req_usize("hidden_size")?;
        let num_attention_heads = p.req_usize("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(field_err("num_attention_heads", "must be positive"));
        }
        let num_key_value_heads = p
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} must divide num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = match p.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(field_err(
                        "head_dim",
                        "missing, and hidden_size is not a multiple of num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(field_err("head_dim", format!("{head_dim} must be even")));
        }

        // RoPE: transformers 5 writes `rope_parameters` (with `rope_theta` inside); earlier
        // versions `rope_theta` at the top level and an optional `rope_scaling`.
        let top_theta = p.opt_f64("rope_theta")?;
        let rope_scaling_v = p.take("rope_scaling").filter(|v| !v.is_null());
        let rope_params_v = p.take("rope_parameters").filter(|v| !v.is_null());
        let (rope_theta, rope_scaling) = match (rope_params_v, rope_scaling_v) {
            (Some(_), Some(_)) => {
                return Err(field_err(
                    "rope_parameters",
                    "both `rope_parameters` and `rope_scaling` are set; expected one",
                ))
            }
            (Some(v), None) => {
                let (theta, scaling) = parse_rope_dict(&v, "rope_parameters")?;
                let theta = match (theta, top_theta) {
                    (Some(t), _) => t,
                    (None, Some(t)) => t,
                    (None, None) => {
                        return Err(field_err("rope_parameters.rope_theta", "missing"));
                    }
                };
                (theta, scaling)
            }
            (None, Some(v)) => {
                let (theta, scaling) = parse_rope_dict(&v, "rope_scaling")?;
                (theta.or(top_theta).unwrap_or(10000.0), scaling)
            }
            // transformers' LlamaConfig default.
            (None, None) => (top_theta.unwrap_or(10000.0), RopeScaling::None),
        };
        if rope_theta <= 0.0 {
            return Err(field_err("rope_theta", "must be positive"));
        }

        let rms_norm_eps = p.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        let max_position_embeddings = p.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let tie_word_embeddings = p.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let attention_bias = p.opt_bool("attention_bias")?.unwrap_or(false);
        let mlp_bias = p.opt_bool("mlp_bias")?.unwrap_or(false);
        let bos_token_id = p
            .opt_token_ids("bos_token_id")?
            .and_then(|v| v.first().copied());
        let eos_token_ids = p.opt_token_ids("eos_token_id")?.unwrap_or_default();
        let pad_token_id = p
            .opt_token_ids("pad_token_id")?
            .and_then(|v| v.first().copied());
        let torch_dtype = match (p.opt_str("dtype")?, p.opt_str("torch_dtype")?) {
            (Some(d), _) => Some(dtype_field(d, "dtype")?),
            (None, Some(d)) => Some(dtype_field(d, "torch_dtype")?),
            (None, None) => None,
        };

        let cfg = LlamaConfig {
            vocab_size: p.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: p.req_usize("intermediate_size")?,
            num_hidden_layers: p.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            torch_dtype,
        };
        for key in obj.keys() {
            if !p.used.iter().any(|u| u == key) && !IGNORED_FIELDS.contains(&key.as_str()) {
                return Err(field_err(
                    key,
                    "unknown field; it may change the architecture, which this crate does not \
                     implement (a LLaMA with RMSNorm, RoPE, grouped-query attention and SwiGLU)",
                ));
            }
        }
        Ok(cfg)
    }

    /// How many query heads share one key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The RoPE inverse frequencies (length `head_dim / 2`), scaled as the config says, in
    /// float32 as transformers computes them.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => inv,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_ctx = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / lo;
                let high_freq_wavelen = old_ctx / hi;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// A `config.json` value that transformers reads back into the same model.
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("architectures", serde_json::json!(["LlamaForCausalLM"]));
        put("model_type", "llama".into());
        put("hidden_act", "silu".into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_attention_heads", self.num_attention_heads.into());
        put("num_key_value_heads", self.num_key_value_heads.into());
        put("head_dim", self.head_dim.into());
        put("rms_norm_eps", self.rms_norm_eps.into());
        put("rope_theta", self.rope_theta.into());
        put(
            "rope_scaling",
            match &self.rope_scaling {
                RopeScaling::None => Value::Null,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => serde_json::json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        put("attention_bias", self.attention_bias.into());
        put("mlp_bias", self.mlp_bias.into());
        put("attention_dropout", 0.0.into());
        if let Some(b) = self.bos_token_id {
            put("bos_token_id", b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => put("eos_token_id", (*one).into()),
            many => put("eos_token_id", many.to_vec().into()),
        }
        if let Some(p) = self.pad_token_id {
            put("pad_token_id", p.into());
        }
        if let Some(d) = self.torch_dtype {
            let name = match d {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            };
            put("torch_dtype", name.into());
        }
        put("use_cache", true.into());
        Value::Object(m)
    }
}

/// A dtype by name: Hugging Face's (`float32`, `bfloat16`, `float16`) or short (`f32`, `fp32`,
/// `bf16`, `f16`, `fp16`, `half`).
pub fn dtype_from_name(s: &str) -> Option<DType> {
    match s {
        "float32" | "fp32" | "f32" => Some(DType::F32),
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
        _ => None,
    }
}

fn dtype_field(s: &str, field: &str) -> Result<DType, ConfigError> {
    dtype_from_name(s).ok_or_else(|| {
        field_err(
            field,
            format!("`{s}`: expected float32, bfloat16 or float16"),
        )
    })
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5): returns the theta
/// found inside (5 only) and the scaling.
fn parse_rope_dict(v: &Value, name: &str) -> Result<(Option<f64>, RopeScaling), ConfigError> {
    let obj = v
        .as_object()
        .ok_or_else(|| field_err(name, "expected an object or null"))?;
    let f = |k: &str| format!("{name}.{k}");
    let num = |k: &str| -> Result<Option<f64>, ConfigError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| field_err(&f(k), "expected a number")),
        }
    };
    let ty = match (obj.get("rope_type"), obj.get("type")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s.as_str(),
        (None, None) => "default",
        _ => return Err(field_err(&f("rope_type"), "expected a string")),
    };
    let known: &[&str] = match ty {
        "default" => &["rope_type", "type", "rope_theta"],
        "llama3" => &[
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return Err(field_err(
                &f("rope_type"),
                format!(
                    "`{other}` is not supported; implemented: default, llama3 \
                     (linear, dynamic, yarn, longrope... are not)"
                ),
            ))
        }
    };
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            return Err(field_err(
                &f(k),
                format!("unknown setting for rope_type `{ty}`"),
            ));
        }
    }
    let theta = num("rope_theta")?;
    let scaling = if ty == "llama3" {
        let req = |k: &str| -> Result<f64, ConfigError> {
            num(k)?.ok_or_else(|| field_err(&f(k), "missing (required by rope_type llama3)"))
        };
        let factor = req("factor")?;
        let low = req("low_freq_factor")?;
        let high = req("high_freq_factor")?;
        let orig = req("original_max_position_embeddings")?;
        if factor <= 0.0 || low <= 0.0 || high <= low || orig < 1.0 || orig.fract() != 0.0 {
            return Err(field_err(
                name,
                "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and an \
                 integer original_max_position_embeddings",
            ));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig as usize,
        }
    } else {
        RopeScaling::None
    };
    Ok((theta, scaling))
}

/// Reads fields off the JSON object, remembering which were consumed.
struct Parser<'a> {
    obj: &'a Map<String, Value>,
    used: Vec<String>,
}

impl<'a> Parser<'a> {
    fn take(&mut self, k: &str) -> Option<Value> {
        self.used.push(k.to_string());
        self.obj.get(k).cloned()
    }
    fn get(&mut self, k: &str) -> Option<&'a Value> {
        self.used.push(k.to_string());
        match self.obj.get(k) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }
    /// The field `k` read by `f`; absent or null is `None`, another type an error saying what
    /// was `expected`.
    fn opt<T>(
        &mut self,
        k: &str,
        expected: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| field_err(k, expected)),
        }
    }
    fn opt_str(&mut self, k: &str) -> Result<Option<&'a str>, ConfigError> {
        self.opt(k, "expected a string", Value::as_str)
    }
    fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, ConfigError> {
        self.opt(k, "expected true or false", Value::as_bool)
    }
    fn opt_f64(&mut self, k: &str) -> Result<Option<f64>, ConfigError> {
        self.opt(k, "expected a number", Value::as_f64)
    }
    fn opt_usize(&mut self, k: &str) -> Result<Option<usize>, ConfigError> {
        self.opt(k, "expected a non-negative integer", |v| {
            v.as_u64().map(|x| x as usize)
        })
    }
    fn req_usize(&mut self, k: &str) -> Result<usize, ConfigError> {
        let v = self
            .opt_usize(k)?
            .ok_or_else(|| field_err(k, "missing (required)"))?;
        if v == 0 {
            return Err(field_err(k, "must be positive"));
        }
        Ok(v)
    }
    /// A token id given as an integer or a list of integers.
    fn opt_token_ids(&mut self, k: &str) -> Result<Option<Vec<u32>>, ConfigError> {
        let one = |v: &Value| -> Result<u32, ConfigError> {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| field_err(k, "expected a token id (integer) or a list of them"))
        };
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.iter().map(one).collect::<Result<_, _>>()?)),
            Some(v) => Ok(Some(vec![one(v)?])),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const LLAMA2_7B: &str = r#"{
      "_name_or_path": "meta-llama/Llama-2-7b-hf",
      "architectures": ["LlamaForCausalLM"],
      "bos_token_id": 1,
      "eos_token_id": 2,
      "hidden_act": "silu",
      "hidden_size": 4096,
      "initializer_range": 0.02,
      "intermediate_size": 11008,
      "max_position_embeddings": 4096,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "num_key_value_heads": 32,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": null,
      "tie_word_embeddings": false,
      "torch_dtype": "float16",
      "transformers_version": "4.31.0.dev0",
      "use_cache": true,
      "vocab_size": 32000
    }"#;

    const LLAMA3_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "bos_token_id": 128000,
      "eos_token_id": 128001,
      "hidden_act": "silu",
      "hidden_size": 4096,
      "initializer_range": 0.02,
      "intermediate_size": 14336,
      "max_position_embeddings": 8192,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "num_key_value_heads": 8,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": null,
      "rope_theta": 500000.0,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.40.0.dev0",
      "use_cache": true,
      "vocab_size": 128256
    }"#;

    const LLAMA31_8B_INSTRUCT: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009],
      "hidden_act": "silu",
      "hidden_size": 4096,
      "initializer_range": 0.02,
      "intermediate_size": 14336,
      "max_position_embeddings": 131072,
      "mlp_bias": false,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "num_key_value_heads": 8,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3"
      },
      "rope_theta": 500000.0,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.42.3",
      "use_cache": true,
      "vocab_size": 128256
    }"#;

    const TINYLLAMA: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "hidden_act": "silu",
      "hidden_size": 2048,
      "initializer_range": 0.02,
      "intermediate_size": 5632,
      "max_position_embeddings": 2048,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 22,
      "num_key_value_heads": 4,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": null,
      "rope_theta": 10000.0,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.35.0",
      "use_cache": true,
      "vocab_size": 32000
    }"#;

    const SMOLLM2_135M_INSTRUCT: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "head_dim": 64,
      "hidden_act": "silu",
      "hidden_size": 576,
      "initializer_range": 0.041666666666666664,
      "intermediate_size": 1536,
      "is_llama_config": true,
      "max_position_embeddings": 8192,
      "mlp_bias": false,
      "model_type": "llama",
      "num_attention_heads": 9,
      "num_hidden_layers": 30,
      "num_key_value_heads": 3,
      "pad_token_id": 2,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_interleaved": false,
      "rope_scaling": null,
      "rope_theta": 100000,
      "tie_word_embeddings": true,
      "torch_dtype": "bfloat16",
      "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
      "transformers_version": "4.42.3",
      "use_cache": true,
      "vocab_size": 49152
    }"#;

    // Llama-3.2-1B-Instruct as transformers 5 saves it.
    const LLAMA32_1B_TF5: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "bos_token_id": 128000,
      "dtype": "bfloat16",
      "eos_token_id": [128001, 128008, 128009],
      "head_dim": 64,
      "hidden_act": "silu",
      "hidden_size": 2048,
      "initializer_range": 0.02,
      "intermediate_size": 8192,
      "max_position_embeddings": 131072,
      "mlp_bias": false,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 16,
      "num_key_value_heads": 8,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_parameters": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rope_type": "llama3"
      },
      "tie_word_embeddings": true,
      "transformers_version": "5.0.0",
      "use_cache": true,
      "vocab_size": 128256
    }"#;

    #[test]
    fn llama2_7b() {
        let c = LlamaConfig::from_json_str(LLAMA2_7B).unwrap();
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.n_rep(), 1);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.torch_dtype, Some(DType::F16));
    }

    #[test]
    fn llama3_8b_gqa_and_theta() {
        let c = LlamaConfig::from_json_str(LLAMA3_8B).unwrap();
        assert_eq!(c.n_rep(), 4);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.vocab_size, 128256);
        assert_eq!(c.torch_dtype, Some(DType::BF16));
    }

    #[test]
    fn llama31_rope_scaling_and_eos_list() {
        let c = LlamaConfig::from_json_str(LLAMA31_8B_INSTRUCT).unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        // transformers' own frequencies for this config: tests/fixtures/llama3_rope.json.
        let (fx, want) = transformers_llama3_inv_freq("llama3.1-8b");
        assert_eq!(
            (fx.rope_theta, &fx.rope_scaling),
            (c.rope_theta, &c.rope_scaling)
        );
        assert_eq!(c.head_dim, 128);
        assert_close_to_transformers(&c.rope_inv_freq(), &want);
    }

    /// A case of tests/fixtures/llama3_rope.json (written by scripts/make-fixtures): the config
    /// as config.json spells it, parsed here, and the inverse frequencies of transformers'
    /// `LlamaRotaryEmbedding` for it.
    pub(crate) fn transformers_llama3_inv_freq(name: &str) -> (LlamaConfig, Vec<f32>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/llama3_rope.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let fx: Value = serde_json::from_str(&text).unwrap();
        let case = fx["cases"].as_array().unwrap().iter();
        let case = case.clone().find(|c| c["name"] == name).expect(name);
        let cfg = LlamaConfig::from_json_str(&case["config"].to_string()).unwrap();
        assert_eq!(cfg.head_dim as u64, case["head_dim"].as_u64().unwrap());
        assert_eq!(case["attention_scaling"], 1.0);
        let inv = case["inv_freq"].as_array().unwrap();
        (
            cfg,
            inv.iter().map(|v| v.as_f64().unwrap() as f32).collect(),
        )
    }

    /// Within 2 units in the last place of f32 (powf and torch's pow may round differently).
    pub(crate) fn assert_close_to_transformers(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
            assert!(
                ulps <= 2,
                "inv_freq[{i}]: {g} vs transformers' {w} ({ulps} ulps)"
            );
        }
    }

    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        for name in ["llama3.1-8b", "llama3.2-1b", "tiny", "small-ramp"] {
            let (cfg, want) = transformers_llama3_inv_freq(name);
            assert!(
                matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }),
                "{name}"
            );
            assert_close_to_transformers(&cfg.rope_inv_freq(), &want);
        }
    }

    #[test]
    fn tinyllama() {
        let c = LlamaConfig::from_json_str(TINYLLAMA).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.n_rep(), 8);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_hidden_layers, 22);
    }

    #[test]
    fn smollm2() {
        let c = LlamaConfig::from_json_str(SMOLLM2_135M_INSTRUCT).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_rep(), 3);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.pad_token_id, Some(2));
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn transformers5_rope_parameters() {
        let c = LlamaConfig::from_json_str(LLAMA32_1B_TF5).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(c.torch_dtype, Some(DType::BF16));
        assert!(c.tie_word_embeddings);
        // A default rope_parameters.
        let text = TINYLLAMA.replace(
            r#""rope_theta": 10000.0,"#,
            r#""rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"},"#,
        );
        let c = LlamaConfig::from_json_str(&text).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    fn err_of(text: &str) -> String {
        LlamaConfig::from_json_str(text).unwrap_err().to_string()
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        for ty in ["linear", "dynamic", "yarn"] {
            let t = LLAMA2_7B.replace(
                r#""rope_scaling": null"#,
                &format!(r#""rope_scaling": {{"type": "{ty}", "factor": 2.0}}"#),
            );
            let e = err_of(&t);
            assert!(
                e.contains("rope_scaling.rope_type") && e.contains(ty),
                "{e}"
            );
        }
        let e = err_of(&LLAMA2_7B.replace(r#""silu""#, r#""gelu""#));
        assert!(e.contains("`hidden_act`") && e.contains("gelu"), "{e}");
        let e =
            err_of(&LLAMA2_7B.replace(r#""model_type": "llama""#, r#""model_type": "mistral""#));
        assert!(e.contains("`model_type`") && e.contains("mistral"), "{e}");
        let e = err_of(&LLAMA2_7B.replace(
            r#""use_cache": true"#,
            r#""use_cache": true, "frobnicate": 3"#,
        ));
        assert!(e.contains("`frobnicate`") && e.contains("unknown"), "{e}");
        let e =
            err_of(&LLAMA2_7B.replace(r#""torch_dtype": "float16""#, r#""torch_dtype": "int8""#));
        assert!(e.contains("`torch_dtype`"), "{e}");
        let e = err_of(&LLAMA2_7B.replace(r#""hidden_size": 4096,"#, ""));
        assert!(e.contains("`hidden_size`") && e.contains("missing"), "{e}");
        let e = err_of(&SMOLLM2_135M_INSTRUCT.replace(
            r#""rope_interleaved": false"#,
            r#""rope_interleaved": true"#,
        ));
        assert!(e.contains("`rope_interleaved`"), "{e}");
        let e = err_of(
            &TINYLLAMA.replace(r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 5"#),
        );
        assert!(e.contains("`num_key_value_heads`"), "{e}");
        let e = err_of(&LLAMA31_8B_INSTRUCT.replace(r#""low_freq_factor": 1.0,"#, ""));
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }

    #[test]
    fn hf_json_round_trip() {
        for text in [
            LLAMA2_7B,
            LLAMA31_8B_INSTRUCT,
            SMOLLM2_135M_INSTRUCT,
            LLAMA32_1B_TF5,
        ] {
            let c = LlamaConfig::from_json_str(text).unwrap();
            let back = LlamaConfig::from_value(&c.to_hf_json()).unwrap();
            assert_eq!(c, back);
        }
    }
}
