//! The sentence encoder: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) through candle-transformers'
//! `bert`, with sentence-transformers' pooling: the mean of the last hidden states over the real
//! tokens, then L2 normalisation. Inference runs candle's BERT, whose fused LayerNorm passes no
//! gradient; fine-tuning the top layers goes through [`crate::finetune`]'s own forward, and its
//! trained deltas are merged into the weights at load ([`Encoder::with_deltas`]).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// The name recorded in a head's metadata; a head only makes sense on the encoder it was trained on.
pub const DEFAULT_ENCODER_NAME: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Folder name of the encoder inside the cache (`$SFT_CACHE/models/...`).
pub const DEFAULT_ENCODER_DIR: &str = "all-minilm-l6-v2";

/// A frozen BERT sentence encoder.
pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    hidden_size: usize,
    max_len: usize,
    batch_size: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("dir", &self.dir)
            .field("hidden_size", &self.hidden_size)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// The cache root: `$SFT_CACHE`, else `~/.cache/sft`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("SFT_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("sft")
}

/// Where `scripts/fetch-test-models.sh` unpacks all-MiniLM-L6-v2.
pub fn default_encoder_dir() -> PathBuf {
    cache_root().join("models").join(DEFAULT_ENCODER_DIR)
}

impl Encoder {
    /// Tokens kept per text (the tokenizer file's own truncation; sentence-transformers uses 256,
    /// but the tone of a response shows in its start and 128 halves the cost).
    pub const DEFAULT_MAX_LEN: usize = 128;
    pub const DEFAULT_BATCH_SIZE: usize = 32;

    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::format(config_path.display().to_string(), e))?;
        let hidden_size: usize = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("hidden_size").and_then(|h| h.as_u64()))
            .ok_or_else(|| {
                Error::format(
                    config_path.display().to_string(),
                    "expected an integer field `hidden_size`",
                )
            })? as usize;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::io(
                &weights,
                std::io::Error::new(std::io::ErrorKind::NotFound, "missing encoder weights"),
            ));
        }
        // SAFETY: the file is memory-mapped read-only and not modified while the encoder lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            msg: e.to_string(),
        })?;
        // Padding is done here per batch (to the batch's longest text), not by the tokenizer.
        tokenizer.with_padding(None);
        let mut enc = Self {
            model,
            tokenizer,
            device: device.clone(),
            hidden_size,
            max_len: 0,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            dir: dir.to_path_buf(),
        };
        enc.set_max_len(Self::DEFAULT_MAX_LEN)?;
        Ok(enc)
    }

    /// The same encoder with `deltas` added to some of its weights (named as in
    /// `model.safetensors`, e.g. `encoder.layer.5.attention.self.query.weight`): how a head with
    /// a fine-tuned encoder is loaded, so that its inference stays one forward of candle's BERT.
    /// Reads the weights again from the encoder's folder; same tokenizer, `max_len` and batch size.
    pub fn with_deltas(&self, deltas: &[(String, Tensor)]) -> Result<Self> {
        let weights = self.dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights, &self.device)?;
        for (name, delta) in deltas {
            let base = tensors.get(name).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no weight `{name}` for a fine-tuned delta",
                    weights.display()
                ))
            })?;
            if base.dims() != delta.dims() {
                return Err(Error::Invalid(format!(
                    "{}: weight `{name}` is {:?}, its delta {:?}",
                    weights.display(),
                    base.dims(),
                    delta.dims()
                )));
            }
            let merged = (base.to_dtype(DType::F32)? + delta.to_device(&self.device)?)?;
            tensors.insert(name.clone(), merged);
        }
        let config_path = self.dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| Error::format(config_path.display().to_string(), e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        Ok(Self {
            model: BertModel::load(vb, &config)?,
            tokenizer: self.tokenizer.clone(),
            device: self.device.clone(),
            hidden_size: self.hidden_size,
            max_len: self.max_len,
            batch_size: self.batch_size,
            dir: self.dir.clone(),
        })
    }

    /// Loads the encoder from the cache, with an error that says how to get it.
    pub fn load_default(device: &Device) -> Result<Self> {
        let dir = default_encoder_dir();
        if !dir.join("model.safetensors").is_file() {
            return Err(Error::Invalid(format!(
                "the all-MiniLM-L6-v2 encoder is not in {} (set SFT_CACHE or run scripts/fetch-test-models.sh)",
                dir.display()
            )));
        }
        Self::load(&dir, device)
    }

    /// Tokens kept per text, `[CLS]` and `[SEP]` included.
    pub fn set_max_len(&mut self, max_len: usize) -> Result<()> {
        if !(3..=512).contains(&max_len) {
            return Err(Error::Invalid(format!(
                "encoder max_len must be in 3..=512, got {max_len}"
            )));
        }
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        self.max_len = max_len;
        Ok(())
    }

    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.batch_size = batch_size.max(1);
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids of each text as the encoder sees them (truncated, with `[CLS]` and `[SEP]`).
    pub fn token_ids(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Sentence embeddings, shape `(texts.len(), hidden_size)`, f32, unit L2 norm, on the
    /// encoder's device. Texts are batched by similar length so that little is padded.
    pub fn embed(&self, texts: &[String]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.hidden_size),
                DType::F32,
                &self.device,
            )?);
        }
        let ids = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| (ids[i].len(), i));
        let mut chunks = Vec::new();
        for batch in order.chunks(self.batch_size) {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| ids[i].as_slice()).collect();
            chunks.push(self.embed_ids(&seqs)?);
        }
        let sorted = Tensor::cat(&chunks, 0)?;
        // Row r of `sorted` is text order[r]; put every text back in its place.
        let mut inverse = vec![0u32; order.len()];
        for (r, &i) in order.iter().enumerate() {
            inverse[i] = r as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), &self.device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// One padded batch through BERT, mean-pooled over the attention mask and normalised.
    fn embed_ids(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut input = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            input.extend_from_slice(s);
            input.extend(std::iter::repeat_n(0u32, len - s.len()));
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            mask.extend(std::iter::repeat_n(0u32, len - s.len()));
        }
        let shape = (seqs.len(), len);
        let input = Tensor::from_vec(input, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        l2_normalize(&mean)
    }
}

/// Divides each row by its L2 norm (floored at 1e-12, as torch's `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}
