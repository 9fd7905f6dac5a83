//! GGUF import: turns a llama.cpp checkpoint of a LLaMA-architecture model into a Hugging Face
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that the rest of the crate loads like any hub checkpoint.
//!
//! What it undoes, following transformers' own GGUF loader so that both see the same model:
//! - llama.cpp's tensor names (`blk.N.attn_q.weight`) become the hub's
//!   (`model.layers.N.self_attn.q_proj.weight`);
//! - every tensor is dequantized (candle's reader; GGUF stores dims in ggml order, candle
//!   reverses them, so shapes come out as the hub's `(out, in)`);
//! - the rows of `q_proj`/`k_proj` are un-permuted: llama.cpp interleaves the two rotary halves of
//!   each head (`[x0, x_half, x1, x_half+1, ...]`) for its rope kernel, the hub keeps them split;
//! - the vocabulary and merges become a byte-level BPE `tokenizer.json`, with the pre-tokenizer
//!   transformers picks for the file's `tokenizer.ggml.pre`, and the control tokens as special
//!   tokens.
//!
//! Tensors are dequantized one at a time while `model.safetensors` is written, so peak memory is
//! about one dequantized tensor, not the whole model.
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Errors of the GGUF import; each names the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // Causes are kept as messages in the Display (not as `source`), so that `{:#}` chains do
    // not print them twice and candle's captured backtraces stay out of user-facing errors.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a readable GGUF file: {msg}")]
    Read { path: PathBuf, msg: String },
    #[error("GGUF metadata `{key}`: {msg}")]
    Metadata { key: String, msg: String },
    #[error("GGUF tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("GGUF tensor `{name}`: {msg}")]
    Candle { name: String, msg: String },
    #[error("unsupported GGUF: {0}")]
    Unsupported(String),
    #[error("building the tokenizer from the GGUF vocabulary: {0}")]
    Tokenizer(String),
    #[error("writing {path}: {msg}")]
    Write { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// The file in an imported folder that names the GGUF it came from (`path`, `size`).
pub const GGUF_SOURCE: &str = "gguf_source.json";

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// Hub tensor names written to `model.safetensors`, sorted.
    pub tensor_names: Vec<String>,
    /// Number of parameters written.
    pub n_params: usize,
    /// The `config.json` written.
    pub config: Json,
}

/// Converts `gguf_path` into a Hugging Face folder at `out_dir` (created if needed; files of the
/// same names are replaced). `dtype` is the dtype of `model.safetensors`: F32, BF16 or F16.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<ImportSummary> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(GgufError::Unsupported(format!(
            "output dtype {dtype:?}; expected f32, bf16 or f16"
        )));
    }
    let gguf = GgufFile::open(gguf_path)?;
    let plan = gguf.tensor_plan()?;
    let config = gguf.config_json(dtype, &plan)?;
    let tokenizer = gguf.tokenizer()?;

    let generation_config = gguf.generation_config_json()?;
    let tokenizer_config = gguf.tokenizer_config_json()?;

    std::fs::create_dir_all(out_dir).map_err(|cause| GgufError::Io {
        path: out_dir.to_path_buf(),
        cause,
    })?;
    // Weights first and config.json last: a failed import leaves no folder that looks loadable.
    let n_params = gguf.write_safetensors(&plan, dtype, &out_dir.join("model.safetensors"))?;
    let tok_path = out_dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| GgufError::Write {
            path: tok_path.clone(),
            msg: e.to_string(),
        })?;
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&out_dir.join("generation_config.json"), &generation_config)?;
    // Where the blocks are, for `model.quantize: gguf` (training over the file's own blocks).
    let source = std::fs::canonicalize(gguf_path).unwrap_or_else(|_| gguf_path.to_path_buf());
    let size = std::fs::metadata(gguf_path).map(|m| m.len()).unwrap_or(0);
    write_json(
        &out_dir.join(GGUF_SOURCE),
        &json!({ "path": source.display().to_string(), "size": size }),
    )?;
    write_json(&out_dir.join("config.json"), &config)?;
    let mut tensor_names: Vec<String> = plan.iter().map(|p| p.hub_name.clone()).collect();
    tensor_names.sort();
    tracing::info!(
        "imported {} ({} tensors, {n_params} parameters) into {}",
        gguf_path.display(),
        plan.len(),
        out_dir.display()
    );
    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        tensor_names,
        n_params,
        config,
    })
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| GgufError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|cause| GgufError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// The hub name of a llama.cpp tensor name, e.g. `blk.3.attn_output.weight` ->
/// `model.layers.3.self_attn.o_proj.weight`. `None` for names this importer does not know.
pub fn hub_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let hub = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hub}.{param}"))
}

/// Undoes llama.cpp's rope permutation of the rows of a q or k projection (weight `(out, in)` or
/// bias `(out,)`) with `n_heads` heads: GGUF row `h*d + 2a + b` goes back to hub row
/// `h*d + b*d/2 + a`, for head size `d`, `a < d/2`, `b < 2`.
pub fn unpermute_rope_rows(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_heads == 0 || !rows.is_multiple_of(2 * n_heads) {
        candle_core::bail!("cannot un-permute {rows} rows into {n_heads} heads of even size")
    }
    let half = rows / n_heads / 2;
    let mut split = vec![n_heads, half, 2];
    split.extend_from_slice(&dims[1..]);
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The rope permutation llama.cpp's converter applies (the inverse of [`unpermute_rope_rows`]);
/// used by tests and by anyone writing GGUF-layout weights.
pub fn permute_rope_rows(t: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_heads == 0 || !rows.is_multiple_of(2 * n_heads) {
        candle_core::bail!("cannot permute {rows} rows into {n_heads} heads of even size")
    }
    let half = rows / n_heads / 2;
    let mut split = vec![n_heads, 2, half];
    split.extend_from_slice(&dims[1..]);
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// One tensor to write: where it comes from, where it goes, and whether its rows need the rope
/// un-permutation (with that many heads).
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub gguf_name: String,
    pub hub_name: String,
    /// Hub shape (candle already reversed ggml's dims).
    pub shape: Vec<usize>,
    pub unpermute_heads: Option<usize>,
}

/// An opened GGUF file: its parsed header and metadata. Tensor data is read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    arch: String,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|cause| GgufError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let content = Content::read(&mut file).map_err(|e| GgufError::Read {
            path: path.to_path_buf(),
            msg: candle_message(e),
        })?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(meta_err(
                    "general.architecture",
                    format!("not a string: {v:?}"),
                ))
            }
            None => return Err(meta_err("general.architecture", "missing")),
        };
        if arch != "llama" {
            return Err(GgufError::Unsupported(format!(
                "{}: general.architecture is {arch:?}; only \"llama\" is supported",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            arch,
        })
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| value_usize(key, v)).transpose()
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| meta_err(key, "missing"))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| match v {
                // f32 metadata printed as its shortest decimal (1e-5, not 9.999999747378752e-6):
                // the same f32 once read back, and what the hub's config.json says.
                Value::F32(x) => x
                    .to_string()
                    .parse::<f64>()
                    .map_err(|e| meta_err(key, e.to_string())),
                Value::F64(x) => Ok(*x),
                other => value_usize(key, other).map(|u| u as f64),
            })
            .transpose()
    }

    fn string_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(meta_err(key, format!("expected a string, found {v:?}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(meta_err(key, format!("expected a bool, found {v:?}"))),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        let Some(v) = self.get(key) else {
            return Err(meta_err(key, "missing"));
        };
        let Value::Array(items) = v else {
            return Err(meta_err(key, "expected an array of strings"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s.as_str()),
                other => Err(meta_err(
                    key,
                    format!("item {i} is not a string: {other:?}"),
                )),
            })
            .collect()
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(meta_err(key, "expected an array of integers"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                value_i64(x).ok_or_else(|| meta_err(key, format!("item {i} is not an integer")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Attention geometry: (heads, kv heads, head size).
    fn heads(&self) -> Result<(usize, usize, usize)> {
        let hidden = self.usize_req(&self.arch_key("embedding_length"))?;
        let n_heads = self.usize_req(&self.arch_key("attention.head_count"))?;
        let n_kv = self
            .usize_opt(&self.arch_key("attention.head_count_kv"))?
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
            return Err(meta_err(
                &self.arch_key("attention.head_count_kv"),
                format!("{n_kv} kv heads do not divide {n_heads} heads"),
            ));
        }
        let head_dim = match self.usize_opt(&self.arch_key("attention.key_length"))? {
            Some(d) => d,
            None => {
                if !hidden.is_multiple_of(n_heads) {
                    return Err(meta_err(
                        &self.arch_key("attention.head_count"),
                        format!("{n_heads} heads do not divide hidden size {hidden}"),
                    ));
                }
                hidden / n_heads
            }
        };
        if let Some(rot) = self.usize_opt(&self.arch_key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(GgufError::Unsupported(format!(
                    "rope over {rot} of {head_dim} head dimensions (partial rotary) is not LLaMA"
                )));
            }
        }
        Ok((n_heads, n_kv, head_dim))
    }

    /// Every tensor of the file, mapped to its hub name and shape; fails on names it does not
    /// know rather than dropping them.
    pub fn tensor_plan(&self) -> Result<Vec<TensorPlan>> {
        let (n_heads, n_kv, head_dim) = self.heads()?;
        let mut plan = Vec::with_capacity(self.content.tensor_infos.len());
        for (name, info) in &self.content.tensor_infos {
            if name == "rope_freqs.weight" {
                return Err(GgufError::Unsupported(
                    "tensor rope_freqs.weight (llama3-style rope scaling baked into frequencies) \
                     cannot be expressed as a config.json rope_scaling"
                        .into(),
                ));
            }
            let hub_name = hub_tensor_name(name).ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                msg: "no Hugging Face LLaMA name for this tensor".into(),
            })?;
            let shape = info.shape.dims().to_vec();
            let unpermute_heads = if name.contains(".attn_q.") {
                Some(n_heads)
            } else if name.contains(".attn_k.") {
                Some(n_kv)
            } else {
                None
            };
            if let Some(h) = unpermute_heads {
                if shape[0] != h * head_dim {
                    return Err(GgufError::Tensor {
                        name: name.clone(),
                        msg: format!(
                            "shape {shape:?}: expected {h} heads x {head_dim} = {} rows",
                            h * head_dim
                        ),
                    });
                }
            }
            plan.push(TensorPlan {
                gguf_name: name.clone(),
                hub_name,
                shape,
                unpermute_heads,
            });
        }
        plan.sort_by(|a, b| a.hub_name.cmp(&b.hub_name));
        Ok(plan)
    }

    fn token_id(&self, name: &str) -> Result<Option<usize>> {
        self.usize_opt(&format!("tokenizer.ggml.{name}"))
    }

    fn vocab_size(&self) -> Result<usize> {
        match self.usize_opt(&self.arch_key("vocab_size"))? {
            Some(v) => Ok(v),
            None => Ok(self.string_array("tokenizer.ggml.tokens")?.len()),
        }
    }

    /// `config.json` as transformers' GGUF loader derives it (LlamaForCausalLM).
    pub fn config_json(&self, dtype: DType, plan: &[TensorPlan]) -> Result<Json> {
        let (n_heads, n_kv, head_dim) = self.heads()?;
        let hidden = self.usize_req(&self.arch_key("embedding_length"))?;
        let vocab_size = self.vocab_size()?;
        let rms_key = self.arch_key("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = self
            .f64_opt(&rms_key)?
            .ok_or_else(|| meta_err(&rms_key, "missing"))?;
        // llama.cpp's default base when the key is absent.
        let rope_theta = self
            .f64_opt(&self.arch_key("rope.freq_base"))?
            .unwrap_or(10000.0);
        let rope_scaling = match self.string_opt(&self.arch_key("rope.scaling.type"))? {
            None | Some("none") => Json::Null,
            Some("linear") => {
                let key = self.arch_key("rope.scaling.factor");
                let factor = self
                    .f64_opt(&key)?
                    .ok_or_else(|| meta_err(&key, "missing for linear rope scaling"))?;
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(other) => {
                return Err(GgufError::Unsupported(format!(
                    "{}: rope scaling {other:?}",
                    self.arch_key("rope.scaling.type")
                )))
            }
        };
        let tied = !plan.iter().any(|p| p.gguf_name == "output.weight");
        let embed = plan
            .iter()
            .find(|p| p.gguf_name == "token_embd.weight")
            .ok_or_else(|| GgufError::Tensor {
                name: "token_embd.weight".into(),
                msg: "missing".into(),
            })?;
        if embed.shape != [vocab_size, hidden] {
            return Err(GgufError::Tensor {
                name: "token_embd.weight".into(),
                msg: format!(
                    "shape {:?}, expected [vocab_size {vocab_size}, hidden {hidden}]",
                    embed.shape
                ),
            });
        }
        let attention_bias = plan.iter().any(|p| p.gguf_name.ends_with(".attn_q.bias"));
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.usize_req(&self.arch_key("feed_forward_length"))?,
            "num_hidden_layers": self.usize_req(&self.arch_key("block_count"))?,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "max_position_embeddings": self.usize_req(&self.arch_key("context_length"))?,
            "rms_norm_eps": rms_norm_eps,
            "rope_theta": rope_theta,
            "rope_scaling": rope_scaling,
            "attention_bias": attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "vocab_size": vocab_size,
            "tie_word_embeddings": tied,
            "torch_dtype": dtype_name(dtype),
            "use_cache": true,
        });
        let obj = config.as_object_mut().expect("json! object");
        for (id_name, key) in [
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ] {
            if let Some(id) = self.token_id(key)? {
                obj.insert(id_name.into(), json!(id));
            }
        }
        Ok(config)
    }

    pub fn generation_config_json(&self) -> Result<Json> {
        let mut g = serde_json::Map::new();
        g.insert("_from_model_config".into(), json!(true));
        for (id_name, key) in [
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ] {
            if let Some(id) = self.token_id(key)? {
                g.insert(id_name.into(), json!(id));
            }
        }
        Ok(Json::Object(g))
    }

    /// `tokenizer_config.json`: special tokens by content, the chat template, BOS/EOS flags.
    pub fn tokenizer_config_json(&self) -> Result<Json> {
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let types = self.int_array("tokenizer.ggml.token_type")?;
        let mut cfg = serde_json::Map::new();
        cfg.insert(
            "add_bos_token".into(),
            json!(self
                .bool_opt("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false)),
        );
        cfg.insert(
            "add_eos_token".into(),
            json!(self
                .bool_opt("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false)),
        );
        for (name, key) in [
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ] {
            if let Some(id) = self.token_id(key)? {
                let tok = tokens.get(id).ok_or_else(|| {
                    meta_err(
                        &format!("tokenizer.ggml.{key}"),
                        format!("id {id} outside the vocabulary of {}", tokens.len()),
                    )
                })?;
                cfg.insert(name.into(), json!(tok));
            }
        }
        if let Some(template) = self.string_opt("tokenizer.chat_template")? {
            cfg.insert("chat_template".into(), json!(template));
        }
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.usize_opt(&self.arch_key("context_length"))? {
            cfg.insert("model_max_length".into(), json!(n));
        }
        cfg.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
        let mut decoder = serde_json::Map::new();
        if let Some(types) = types {
            for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    decoder.insert(
                        id.to_string(),
                        json!({
                            "content": tok, "lstrip": false, "normalized": false,
                            "rstrip": false, "single_word": false,
                            "special": ty == TOKEN_TYPE_CONTROL,
                        }),
                    );
                }
            }
        }
        cfg.insert("added_tokens_decoder".into(), Json::Object(decoder));
        Ok(Json::Object(cfg))
    }

    /// The tokenizer the GGUF vocabulary describes, built as transformers builds it: a byte-level
    /// BPE over the file's tokens and merges; control tokens (type 3) as special added tokens and
    /// user-defined ones (type 4) as plain added tokens; the pre-tokenizer chosen by
    /// `tokenizer.ggml.pre` (plain GPT-2 ByteLevel unless the file names a known split regex).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self
            .string_opt("tokenizer.ggml.model")?
            .ok_or_else(|| meta_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(GgufError::Unsupported(format!(
                "tokenizer.ggml.model {model:?}: only byte-level BPE (\"gpt2\") vocabularies are supported"
            )));
        }
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let types = self.int_array("tokenizer.ggml.token_type")?;
        if let Some(types) = &types {
            if types.len() != tokens.len() {
                return Err(meta_err(
                    "tokenizer.ggml.token_type",
                    format!("{} types for {} tokens", types.len(), tokens.len()),
                ));
            }
        }
        let merges = self
            .string_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut parts = m.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(meta_err(
                        "tokenizer.ggml.merges",
                        format!("merge {i} {m:?} is not two tokens separated by one space"),
                    )),
                }
            })
            .collect::<Result<Vec<_>>>()?;

        // Tokens are spelled in GPT-2's byte alphabet; a token that is not (a raw-text spelling)
        // is re-spelled byte by byte, as transformers does.
        let spelling = byte_spelling();
        let alphabet: HashSet<char> = spelling.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = Vocab::default();
        for (id, tok) in tokens.iter().enumerate() {
            let key = if in_alphabet(tok) {
                tok.to_string()
            } else {
                tok.bytes().map(|b| spelling[b as usize]).collect()
            };
            vocab.insert(key, id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Spelled out so the JSON matches transformers' ("" rather than null).
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .build()
            .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);

        let pre = self.string_opt("tokenizer.ggml.pre")?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let post = TemplateProcessing::builder()
            .try_single("$A")
            .and_then(|b| b.try_pair("$A:0 $B:1"))
            .map_err(|e| GgufError::Tokenizer(e.to_string()))?
            .build()
            .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
        tokenizer.with_post_processor(Some(post));

        if let Some(types) = &types {
            // A control token outside the byte alphabet is a llama.cpp mislabel; transformers
            // skips it too (adding it would grow the vocabulary past the embedding).
            let special: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL && in_alphabet(t))
                .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
                .collect();
            tokenizer.add_special_tokens(&special);
            let user: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(t, ty)| **ty == TOKEN_TYPE_USER_DEFINED && in_alphabet(t))
                .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
                .collect();
            tokenizer.add_tokens(&user);
        }
        let size = tokenizer.get_vocab_size(true);
        if size != tokens.len() {
            return Err(GgufError::Tokenizer(format!(
                "built a vocabulary of {size} tokens from {} GGUF tokens (duplicate spellings?)",
                tokens.len()
            )));
        }
        Ok(tokenizer)
    }

    /// Dequantizes one tensor, un-permutes q/k rows, converts to `dtype`, little-endian bytes.
    fn tensor_bytes(
        &self,
        file: &mut BufReader<File>,
        p: &TensorPlan,
        dtype: DType,
    ) -> Result<Vec<u8>> {
        let cerr = |e| GgufError::Candle {
            name: p.gguf_name.clone(),
            msg: candle_message(e),
        };
        let device = Device::Cpu;
        // Each stage is dropped before the next is built, so that at most two copies of the
        // largest tensor (the embedding) are alive at once.
        let t = {
            let q = self
                .content
                .tensor(file, &p.gguf_name, &device)
                .map_err(cerr)?;
            q.dequantize(&device).map_err(cerr)?
        };
        if t.dims() != p.shape.as_slice() {
            return Err(GgufError::Tensor {
                name: p.gguf_name.clone(),
                msg: format!("dequantized to {:?}, header says {:?}", t.dims(), p.shape),
            });
        }
        let t = match p.unpermute_heads {
            Some(h) => unpermute_rope_rows(&t, h).map_err(cerr)?,
            None => t,
        };
        let flat = t
            .flatten_all()
            .map_err(cerr)?
            .to_dtype(dtype)
            .map_err(cerr)?;
        drop(t);
        let bytes = match dtype {
            DType::F32 => {
                let v = flat.to_vec1::<f32>().map_err(cerr)?;
                drop(flat);
                le_bytes(&v, f32::to_le_bytes)
            }
            DType::BF16 => {
                let v = flat.to_vec1::<half::bf16>().map_err(cerr)?;
                drop(flat);
                le_bytes(&v, half::bf16::to_le_bytes)
            }
            DType::F16 => {
                let v = flat.to_vec1::<half::f16>().map_err(cerr)?;
                drop(flat);
                le_bytes(&v, half::f16::to_le_bytes)
            }
            other => return Err(GgufError::Unsupported(format!("output dtype {other:?}"))),
        };
        Ok(bytes)
    }

    /// Writes every planned tensor to a safetensors file, dequantizing each only when the writer
    /// asks for its bytes. Returns the number of parameters.
    pub fn write_safetensors(
        &self,
        plan: &[TensorPlan],
        dtype: DType,
        path: &Path,
    ) -> Result<usize> {
        let file = File::open(&self.path).map_err(|cause| GgufError::Io {
            path: self.path.clone(),
            cause,
        })?;
        let writer = LazyWriter {
            gguf: self,
            file: RefCell::new(BufReader::new(file)),
            error: RefCell::new(None),
            dtype,
        };
        let views: Vec<(String, LazyTensor)> = plan
            .iter()
            .map(|p| {
                (
                    p.hub_name.clone(),
                    LazyTensor {
                        w: &writer,
                        plan: p,
                    },
                )
            })
            .collect();
        let n_params = plan.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        let result = safetensors::serialize_to_file(views, None, path);
        let failed = writer.error.borrow_mut().take();
        if let Some(e) = failed {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        result.map_err(|e| {
            let _ = std::fs::remove_file(path);
            GgufError::Write {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
        Ok(n_params)
    }
}

/// Pre-tokenizer for a `tokenizer.ggml.pre` value, mirroring transformers' GGUF converter: the
/// families with their own split regex get `Split` + ByteLevel without its regex; the rest
/// (`smollm`, `gpt2`, `default`, absent), plain GPT-2 ByteLevel.
fn pre_tokenizer_for(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let regex = match pre {
        None | Some("default") | Some("gpt2") | Some("smollm") => {
            return Ok(ByteLevel::new(false, true, true).into())
        }
        Some("llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3") => LLAMA3,
        Some("qwen2" | "deepseek-r1-qwen") => QWEN2,
        Some(other) => {
            return Err(GgufError::Unsupported(format!(
                "tokenizer.ggml.pre {other:?}: no known pre-tokenizer for it"
            )))
        }
    };
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
    Ok(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])
    .into())
}

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others are
/// shifted to U+0100 and up, in byte order.
fn byte_spelling() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    table
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * N);
    for &x in xs {
        out.extend_from_slice(&f(x));
    }
    out
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set.
fn candle_message(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(*inner),
        e => e.to_string(),
    }
}

fn meta_err(key: &str, msg: impl Into<String>) -> GgufError {
    GgufError::Metadata {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn value_usize(key: &str, v: &Value) -> Result<usize> {
    value_i64(v)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| meta_err(key, format!("expected a non-negative integer, found {v:?}")))
}

struct LazyWriter<'a> {
    gguf: &'a GgufFile,
    file: RefCell<BufReader<File>>,
    /// The first failure; later tensors are skipped and the file is removed afterwards.
    error: RefCell<Option<GgufError>>,
    dtype: DType,
}

struct LazyTensor<'a> {
    w: &'a LazyWriter<'a>,
    plan: &'a TensorPlan,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.w.dtype {
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            _ => safetensors::Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // `View::data` cannot fail: an error is kept for `write_safetensors` to report, and
        // zeros of the right length keep the writer going until then.
        if self.w.error.borrow().is_none() {
            let mut file = self.w.file.borrow_mut();
            match self.w.gguf.tensor_bytes(&mut file, self.plan, self.w.dtype) {
                Ok(bytes) => return Cow::Owned(bytes),
                Err(e) => *self.w.error.borrow_mut() = Some(e),
            }
        }
        Cow::Owned(vec![0; self.data_len()])
    }

    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * self.w.dtype.size_in_bytes()
    }
}

/// `BTreeMap` of hub name -> shape of a plan, handy for tests and reports.
pub fn plan_shapes(plan: &[TensorPlan]) -> BTreeMap<String, Vec<usize>> {
    plan.iter()
        .map(|p| (p.hub_name.clone(), p.shape.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
