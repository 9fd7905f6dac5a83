//! Writing weights as Hugging Face safetensors: one `model.safetensors`, or shards
//! `model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json` once the total
//! passes a size limit. Files carry `{"format": "pt"}` metadata, as transformers expects.
//!
//! [`save_hf_weights_lazy`] plans the shards from names, dtypes and shapes alone and loads each
//! shard's tensors only when writing it, so merging a large model holds one shard in memory.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sft_common::RawView;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Write { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}`: {cause}")]
    Tensor {
        path: PathBuf,
        name: String,
        cause: Box<candle_core::Error>,
    },
}

pub type Result<T> = std::result::Result<T, SaveError>;

/// Writes tensors to one safetensors file with `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = RawView::from_tensor(t).map_err(|source| SaveError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            cause: Box::new(source),
        })?;
        views.push((name.clone(), v));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| SaveError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// A tensor to be written: its name, dtype and shape (enough to plan the shards).
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorEntry {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Writes `entries` into `dir` as Hugging Face weights, loading each tensor through `load` only
/// when its shard is written. Returns the files written (the index last, when sharded).
pub fn save_hf_weights_lazy(
    dir: &Path,
    entries: &[TensorEntry],
    max_shard_bytes: usize,
    mut load: impl FnMut(&TensorEntry) -> candle_core::Result<Tensor>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| SaveError::Io {
        path: dir.to_path_buf(),
        cause: source,
    })?;
    // Greedy shards in the given order, as transformers' `shard_checkpoint` does.
    let mut shards: Vec<Vec<&TensorEntry>> = vec![vec![]];
    let mut size = 0usize;
    for e in entries {
        let last = shards.last_mut().expect("never empty");
        if !last.is_empty() && size + e.bytes() > max_shard_bytes {
            shards.push(vec![e]);
            size = e.bytes();
        } else {
            last.push(e);
            size += e.bytes();
        }
    }
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        let mut tensors = Vec::with_capacity(shard.len());
        for e in shard {
            let t = load(e).map_err(|source| SaveError::Tensor {
                path: path.clone(),
                name: e.name.clone(),
                cause: Box::new(source),
            })?;
            if t.dims() != e.shape.as_slice() || t.dtype() != e.dtype {
                return Err(SaveError::Write {
                    path,
                    msg: format!(
                        "tensor `{}` is {:?} {:?}, planned as {:?} {:?}",
                        e.name,
                        t.dtype(),
                        t.dims(),
                        e.dtype,
                        e.shape
                    ),
                });
            }
            weight_map.insert(e.name.clone(), file.clone());
            tensors.push((e.name.clone(), t));
        }
        write_safetensors(&path, &tensors)?;
        written.push(path);
    }
    let index_path = dir.join(INDEX_FILE);
    if n > 1 {
        let total: usize = entries.iter().map(TensorEntry::bytes).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).map_err(|e| SaveError::Write {
            path: index_path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&index_path, text).map_err(|source| SaveError::Io {
            path: index_path.clone(),
            cause: source,
        })?;
        written.push(index_path);
    } else if index_path.exists() {
        // A stale index from an earlier sharded save would shadow the single file.
        std::fs::remove_file(&index_path).map_err(|source| SaveError::Io {
            path: index_path.clone(),
            cause: source,
        })?;
    }
    Ok(written)
}

/// Writes in-memory tensors as Hugging Face weights (see [`save_hf_weights_lazy`]).
pub fn save_hf_weights(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|(name, t)| TensorEntry {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
        })
        .collect();
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_hf_weights_lazy(dir, &entries, max_shard_bytes, |e| {
        Ok(by_name[e.name.as_str()].clone())
    })
}
