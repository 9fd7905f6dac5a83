//! Finding and loading a checkpoint: a local Hugging Face folder, a hub repository (through
//! hf-hub, with its cache and offline use), or a `.gguf` file imported on the fly.
//!
//! A model folder holds `config.json`, `tokenizer.json` and the weights as `model.safetensors`
//! or as shards listed by `model.safetensors.index.json` (memory-mapped while loading).
//! PyTorch pickle checkpoints (`pytorch_model.bin`) are refused: unpickling runs arbitrary
//! code, and safetensors conversions exist for every public LLaMA.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::config::{ConfigError, LlamaConfig};
use crate::llama::Llama;
use crate::quant::{QuantWeight, Quantize, SharedQuant};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: {cause}")]
    Candle {
        path: PathBuf,
        cause: candle_core::Error,
    },
    #[error(
        "{path}: only PyTorch pickle weights ({files}) found; they are not loaded because \
         unpickling can run arbitrary code. Convert them to safetensors first, e.g. in Python: \
         `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
    )]
    Pickle { path: PathBuf, files: String },
    #[error("hub repository `{repo}` (revision `{revision}`): {msg}")]
    Hub {
        repo: String,
        revision: String,
        msg: String,
    },
    #[error("{path}: cannot load the tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("importing {path}: {cause}")]
    Gguf {
        path: PathBuf,
        cause: crate::gguf::GgufError,
    },
    #[error(
        "`{spec}` is neither a model folder, a .gguf file, cache:NAME nor a hub id (org/name)"
    )]
    Spec { spec: String },
}

pub type Result<T> = std::result::Result<T, LoadError>;

/// Where a model comes from, as given to `--model`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Gguf(PathBuf),
    /// A hub repository, with an optional revision (`org/name@rev` on the command line).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// Reads a `--model` value: an existing folder, a `.gguf` file, `cache:NAME` (the folder
    /// `$SFT_CACHE/models/NAME`, as scripts/fetch-test-models.sh fills it) or
    /// `org/name[@revision]`.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(name) = spec.strip_prefix("cache:") {
            let models = sft_cache_dir().join("models");
            crate::safe_path::plain_relative(name).map_err(|msg| LoadError::Invalid {
                path: models.clone(),
                msg,
            })?;
            let dir = models.join(name);
            if dir.is_dir() {
                return Ok(Self::Dir(dir));
            }
            return Err(LoadError::Invalid {
                path: dir,
                msg: "no such folder in the sft cache ($SFT_CACHE, which \
                      scripts/fetch-test-models.sh fills)"
                    .to_string(),
            });
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            if path.is_file() {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            return Err(LoadError::Io {
                path: path.to_path_buf(),
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such GGUF file"),
            });
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            _ => (spec, None),
        };
        let ok_part = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match repo.split_once('/') {
            Some((org, name)) if ok_part(org) && ok_part(name) => Ok(Self::Hub {
                repo: repo.to_string(),
                revision,
            }),
            _ => Err(LoadError::Spec {
                spec: spec.to_string(),
            }),
        }
    }
}

/// How to reach the hub. [`HubOptions::from_env`] reads the usual variables. Its `Debug`
/// shows the token as `<redacted>`.
#[derive(Clone, Default)]
pub struct HubOptions {
    /// `HF_TOKEN`, else the token file hf-hub finds in the cache's parent folder.
    pub token: Option<String>,
    /// The hub cache (`models--org--name/...`): `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Use only the cache (`HF_HUB_OFFLINE=1`). Without it, a failing network also falls back
    /// to the cache.
    pub offline: bool,
    /// Revision used when the source names none (default `main`).
    pub revision: Option<String>,
    /// The hub's address (`HF_ENDPOINT`, default https://huggingface.co).
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("revision", &self.revision)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl HubOptions {
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")));
        let offline =
            env("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v.to_lowercase() != "false");
        Self {
            token: env("HF_TOKEN"),
            cache_dir,
            offline,
            revision: None,
            endpoint: env("HF_ENDPOINT"),
        }
    }

    fn cache(&self) -> hf_hub::Cache {
        match &self.cache_dir {
            Some(d) => hf_hub::Cache::new(d.clone()),
            None => hf_hub::Cache::from_env(),
        }
    }
}

/// The project's cache root: `$SFT_CACHE`, else `~/.cache/sft`.
pub fn sft_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SFT_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("sft")
}

/// Turns a model source into a local folder holding config, tokenizer and safetensors weights:
/// the folder itself, the hub snapshot folder (downloading what is missing unless offline), or
/// the folder a GGUF file was imported into (`<sft cache>/models/gguf/...`, reused if present).
/// `dtype` only matters for a GGUF import (the dtype its dequantized weights are written in).
pub fn resolve(source: &ModelSource, hub: &HubOptions, dtype: DType) -> Result<PathBuf> {
    match source {
        ModelSource::Dir(d) => Ok(d.clone()),
        ModelSource::Gguf(p) => import_gguf_cached(p, dtype),
        ModelSource::Hub { repo, revision } => {
            let rev = revision
                .clone()
                .or_else(|| hub.revision.clone())
                .unwrap_or_else(|| "main".to_string());
            resolve_hub(repo, &rev, hub)
        }
    }
}

/// The import cache's folder name for a GGUF file: its model name and a hash of its content
/// (file size, header and tensor index, and the dtype written), so one file imported under two
/// names, paths or modification times is imported once. The tensor data is not read: the index
/// already fixes every tensor's name, shape, type and offset.
fn gguf_cache_name(path: &Path, dtype: DType) -> Result<String> {
    use std::io::{Read, Seek};
    let io = |cause| LoadError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
        LoadError::Invalid {
            path: path.to_path_buf(),
            msg: format!("not a readable GGUF file: {e}"),
        }
    })?;
    let mut head = format!("sft-gguf-import-v1|{size}|{dtype:?}|").into_bytes();
    file.rewind().map_err(io)?;
    (&mut file)
        .take(content.tensor_data_offset)
        .read_to_end(&mut head)
        .map_err(io)?;
    let name: String = match content.metadata.get("general.name") {
        Some(candle_core::quantized::gguf_file::Value::String(s)) => s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(48)
            .collect(),
        _ => String::new(),
    };
    let name = name.trim_matches(['-', '.']);
    let name = if name.is_empty() { "model" } else { name };
    Ok(format!("{name}-{}", &sft_common::sha256_hex(&head)[..16]))
}

fn import_gguf_cached(path: &Path, dtype: DType) -> Result<PathBuf> {
    let name = gguf_cache_name(path, dtype)?;
    let root = sft_cache_dir().join("models").join("gguf");
    let dir = root.join(&name);
    if dir.join(".complete").is_file() {
        tracing::info!(
            "{}: imported before, into {}",
            path.display(),
            dir.display()
        );
        return Ok(dir);
    }
    tracing::info!("importing {} into {}", path.display(), dir.display());
    let tmp = root.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    crate::gguf::import_gguf(path, &tmp, dtype).map_err(|source| LoadError::Gguf {
        path: path.to_path_buf(),
        cause: source,
    })?;
    std::fs::write(tmp.join(".complete"), b"").map_err(|source| LoadError::Io {
        path: tmp.clone(),
        cause: source,
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|source| LoadError::Io {
        path: dir.clone(),
        cause: source,
    })?;
    Ok(dir)
}

/// Files a model folder needs besides the weights; the first two are required.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "generation_config.json",
    "tokenizer_config.json",
];

fn resolve_hub(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf> {
    let hub_err = |msg: String| LoadError::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        msg,
    };
    if !opts.offline {
        match download_hub(repo, revision, opts) {
            Ok(dir) => return Ok(dir),
            Err(HubFailure::Fatal(e)) => return Err(e),
            Err(HubFailure::Network(msg)) => {
                tracing::warn!("hub unreachable for {repo} ({msg}); trying the local cache");
                return cached_snapshot(repo, revision, opts).map_err(|e| {
                    hub_err(format!(
                        "download failed ({msg}), and the cache has no complete copy: {e}"
                    ))
                });
            }
        }
    }
    cached_snapshot(repo, revision, opts)
        .map_err(|e| hub_err(format!("offline (HF_HUB_OFFLINE): {e}")))
}

enum HubFailure {
    /// The hub could not be reached: the cache may still serve.
    Network(String),
    Fatal(LoadError),
}

fn download_hub(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
) -> std::result::Result<PathBuf, HubFailure> {
    use hf_hub::api::sync::ApiBuilder;
    let fatal = |msg: String| {
        HubFailure::Fatal(LoadError::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            msg,
        })
    };
    let mut builder = ApiBuilder::from_cache(opts.cache()).with_progress(false);
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if opts.token.is_some() {
        builder = builder.with_token(opts.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| HubFailure::Network(e.to_string()))?;
    let classify = |e: hf_hub::api::sync::ApiError| classify(repo, revision, &e.to_string());
    let api = api.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let info = api.info().map_err(classify)?;
    let files: BTreeSet<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut wanted: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| files.contains(**f))
        .map(|f| f.to_string())
        .collect();
    for req in &MODEL_FILES[..2] {
        if !files.contains(*req) {
            return Err(fatal(format!("the repository has no `{req}`")));
        }
    }
    if files.contains("model.safetensors.index.json") {
        let index = api.get("model.safetensors.index.json").map_err(classify)?;
        let shards = index_shards(&index).map_err(HubFailure::Fatal)?;
        wanted.extend(shards);
    } else if files.contains("model.safetensors") {
        wanted.push("model.safetensors".to_string());
    } else {
        let pickles: Vec<&String> = files.iter().filter(|f| is_pickle_name(f)).collect();
        if !pickles.is_empty() {
            return Err(HubFailure::Fatal(LoadError::Pickle {
                path: PathBuf::from(repo),
                files: pickles
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }));
        }
        return Err(fatal(
            "the repository has no model.safetensors(.index.json)".to_string(),
        ));
    }
    let mut dir = None;
    for f in &wanted {
        tracing::info!("hub: {repo}@{revision}: {f}");
        let p = api.get(f).map_err(classify)?;
        if f == "config.json" {
            dir = p.parent().map(Path::to_path_buf);
        }
    }
    dir.ok_or_else(|| fatal("config.json has no parent folder".to_string()))
}

/// Tells HTTP answers (the hub said no: final) from transport failures (try the cache).
fn classify(repo: &str, revision: &str, msg: &str) -> HubFailure {
    let status = ["status code 401", "status code 403", "status code 404"];
    if status.iter().any(|s| msg.contains(s)) {
        HubFailure::Fatal(LoadError::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            msg: format!("{msg} (gated or private repositories need HF_TOKEN)"),
        })
    } else {
        HubFailure::Network(msg.to_string())
    }
}

/// The snapshot folder of `repo` at `revision` in the hub cache, if it holds a complete model.
/// `revision` is a branch or tag (looked up in `refs/`) or a commit hash.
pub fn cached_snapshot(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf> {
    let root = opts
        .cache()
        .path()
        .join(format!("models--{}", repo.replace('/', "--")));
    let invalid = |msg: String| LoadError::Invalid {
        path: root.clone(),
        msg,
    };
    if !root.is_dir() {
        return Err(invalid("not in the hub cache".to_string()));
    }
    let ref_path = root.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => return Err(invalid(format!("no refs/{revision} in the cache"))),
    };
    let dir = root.join("snapshots").join(&commit);
    if !dir.is_dir() {
        return Err(invalid(format!("no snapshots/{commit} in the cache")));
    }
    for req in &MODEL_FILES[..2] {
        if !dir.join(req).is_file() {
            return Err(invalid(format!("snapshot {commit} lacks {req}")));
        }
    }
    weight_files(&dir)?;
    Ok(dir)
}

fn is_pickle_name(f: &str) -> bool {
    let f = f.rsplit('/').next().unwrap_or(f);
    (f.starts_with("pytorch_model") && f.ends_with(".bin"))
        || f.ends_with(".pt")
        || f.ends_with(".pth")
        || f.ends_with(".ckpt")
}

/// Shard file names listed by a `model.safetensors.index.json`, sorted, without repeats.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
        path: index.to_path_buf(),
        cause: source,
    })?;
    let invalid = |msg: &str| LoadError::Invalid {
        path: index.to_path_buf(),
        msg: msg.to_string(),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(&format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no `weight_map` object"))?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| invalid(&format!("weight_map.{name}: expected a file name")))?;
        if let Err(why) = crate::safe_path::plain_relative(f) {
            return Err(invalid(&format!("weight_map.{name}: {why}")));
        }
        shards.insert(f.to_string());
    }
    if shards.is_empty() {
        return Err(invalid("`weight_map` is empty"));
    }
    Ok(shards.into_iter().collect())
}

/// The safetensors files of a model folder: the shards of `model.safetensors.index.json`, or
/// `model.safetensors`. Pickle-only folders are refused with an explanation.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if present(&index) {
        let index = checked_file(dir, "model.safetensors.index.json")?;
        let mut files = Vec::new();
        for f in index_shards(&index)? {
            if !present(&dir.join(&f)) {
                return Err(LoadError::Invalid {
                    path: index.clone(),
                    msg: format!("lists {}, which is missing", dir.join(&f).display()),
                });
            }
            files.push(checked_file(dir, &f)?);
        }
        return Ok(files);
    }
    if present(&dir.join("model.safetensors")) {
        return Ok(vec![checked_file(dir, "model.safetensors")?]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        cause: source,
    })?;
    let mut pickles: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|f| is_pickle_name(f))
        .collect();
    pickles.sort();
    if !pickles.is_empty() {
        return Err(LoadError::Pickle {
            path: dir.to_path_buf(),
            files: pickles.join(", "),
        });
    }
    Err(LoadError::Invalid {
        path: dir.to_path_buf(),
        msg: "no model.safetensors or model.safetensors.index.json".to_string(),
    })
}

/// Whether something (a file, a folder, a dangling symlink) is at `p`.
fn present(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// `dir/name` if it is a regular file inside the model folder (a hub snapshot's files may lead
/// into its `blobs`); a symlink leading elsewhere, a device or a FIFO is refused.
pub fn checked_file(dir: &Path, name: &str) -> Result<PathBuf> {
    crate::safe_path::model_file(dir, name).map_err(|e| LoadError::Invalid {
        path: e.path,
        msg: format!(
            "{} (model and checkpoint folders are read only through regular files inside them; \
             copy the file in with `cp -L` if the link is intended)",
            e.reason
        ),
    })
}

/// Loads every tensor of the given safetensors files (memory-mapped), converted to `dtype`
/// on `device`.
pub fn load_safetensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    Ok(load_parts(
        files,
        dtype,
        device,
        &QuantOptions::default(),
        &HashSet::new(),
    )?
    .0)
}

/// The tensors of safetensors files, the base linears quantized one at a time as they are read
/// (the dense copy of each is dropped before the next is read), those named in `skip` left out.
fn load_parts(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    q: &QuantOptions,
    skip: &HashSet<String>,
) -> Result<(HashMap<String, Tensor>, HashMap<String, SharedQuant>)> {
    let mut dense = HashMap::new();
    let mut quant = HashMap::new();
    for f in files {
        let candle = |source| LoadError::Candle {
            path: f.clone(),
            cause: source,
        };
        // SAFETY: the file is mapped read-only; modifying it while loading is undefined, as for
        // every memory-mapped checkpoint loader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(candle)?;
        for (name, view) in st.tensors() {
            if skip.contains(&name) {
                continue;
            }
            let quantize = matches!(q.how, Quantize::Nf4 | Quantize::Q8_0)
                && crate::quant::is_quantized_linear(&name);
            let at = if quantize { &Device::Cpu } else { device };
            let t = st.load(&name, at).map_err(candle)?;
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype).map_err(candle)?
            };
            let dup = if quantize {
                let w = QuantWeight::quantize(&t, q.how, q.double_quant, dtype).map_err(|e| {
                    LoadError::Invalid {
                        path: f.clone(),
                        msg: format!("quantizing `{name}` to {}: {e}", q.how.name()),
                    }
                })?;
                drop(t);
                quant.insert(name.clone(), std::sync::Arc::new(w)).is_some()
            } else {
                dense.insert(name.clone(), t).is_some()
            };
            if dup {
                return Err(LoadError::Invalid {
                    path: f.clone(),
                    msg: format!("tensor `{name}` appears in more than one shard"),
                });
            }
            // The tensor now lives in its own memory (candle copies out of the map); the
            // mapped pages it was read from still count in the resident set until the kernel
            // needs them. Released one tensor at a time, a 7B load peaks at the model held in
            // memory, not that plus the whole mapped file.
            release_mapped_pages(view.data());
        }
    }
    Ok((dense, quant))
}

/// Drops the resident pages behind `bytes`, a slice of a read-only file mapping. Later reads
/// fault the same bytes back in from the file, so this changes memory use, never content.
fn release_mapped_pages(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return,
    };
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    // SAFETY: [start, end) lies inside the mapping that holds `bytes` (a mapping starts on a
    // page boundary, so rounding down stays in it), which is mapped read-only from a file:
    // MADV_DONTNEED only drops page-table entries, the next access re-reads the file.
    // A failure only leaves the pages resident, so its result is ignored.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// How a model's frozen base linears are held: dense, or quantized for QLoRA
/// (`model.quantize`, `model.double_quant`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantOptions {
    pub how: Quantize,
    /// NF4 only: quantize the absmax too (bitsandbytes' `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

/// The GGUF file an imported folder came from (its `gguf_source.json`), checked to be there
/// with the size it had.
pub fn gguf_source(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(crate::gguf::GGUF_SOURCE);
    let invalid = |msg: String| LoadError::Invalid {
        path: path.clone(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|_| {
        invalid(
            "model.quantize: gguf keeps a GGUF file's own blocks, and this folder was not \
             imported from one (no gguf_source.json): give the .gguf file as the model source"
                .into(),
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let file = PathBuf::from(v["path"].as_str().unwrap_or_default());
    let size = v["size"].as_u64();
    match std::fs::metadata(&file) {
        Ok(m) if Some(m.len()) == size => Ok(file),
        Ok(m) => Err(invalid(format!(
            "the GGUF it names, {}, is {} bytes, not the {} it was imported from",
            file.display(),
            m.len(),
            size.unwrap_or(0)
        ))),
        Err(e) => Err(invalid(format!(
            "the GGUF it names, {}, cannot be read: {e}",
            file.display()
        ))),
    }
}

/// The base linears of a GGUF file kept in its own quantized blocks, by hub name (q and k rows
/// un-permuted as whole rows of blocks). Tensors stored unquantized (F32, F16) are not listed:
/// they load dense from the imported folder.
fn gguf_linears(
    gguf: &Path,
    cfg: &LlamaConfig,
    dtype: DType,
) -> Result<HashMap<String, SharedQuant>> {
    use candle_core::quantized::GgmlDType;
    let err = |msg: String| LoadError::Invalid {
        path: gguf.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(gguf).map_err(|cause| LoadError::Io {
        path: gguf.to_path_buf(),
        cause,
    })?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
    let mut out = HashMap::new();
    for (name, info) in &content.tensor_infos {
        let Some(hub) = crate::gguf::hub_tensor_name(name) else {
            continue;
        };
        if !crate::quant::is_quantized_linear(&hub)
            || matches!(
                info.ggml_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            )
        {
            continue;
        }
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        let heads = if name.contains(".attn_q.") {
            Some(cfg.num_attention_heads)
        } else if name.contains(".attn_k.") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        let order = match heads {
            Some(h) => {
                let rows = q.shape().dims()[0];
                let idx = Tensor::arange(0u32, rows as u32, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.reshape((rows, 1)))
                    .and_then(|t| crate::gguf::unpermute_rope_rows(&t, h))
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
                Some(idx.into_iter().map(|v| v as usize).collect::<Vec<_>>())
            }
            None => None,
        };
        let w = QuantWeight::from_qtensor(&q, order.as_deref(), dtype)
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        out.insert(hub, std::sync::Arc::new(w));
    }
    Ok(out)
}

/// The tokenizer of a model folder (`tokenizer.json`).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !present(&path) {
        return Err(LoadError::Tokenizer {
            path,
            msg: "missing (only tokenizer.json is supported)".to_string(),
        });
    }
    let path = checked_file(dir, "tokenizer.json")?;
    Tokenizer::from_file(&path).map_err(|e| LoadError::Tokenizer {
        path,
        msg: e.to_string(),
    })
}

/// End-of-sequence ids: `config.json`'s, plus `generation_config.json`'s when present.
pub fn eos_token_ids(dir: &Path, config: &LlamaConfig) -> Result<Vec<u32>> {
    let mut ids = config.eos_token_ids.clone();
    let path = dir.join("generation_config.json");
    if present(&path) {
        let path = checked_file(dir, "generation_config.json")?;
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            cause: source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Invalid {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let extra: Vec<u64> = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
            Some(x) => x.as_u64().into_iter().collect(),
            None => vec![],
        };
        for id in extra {
            let id = id as u32;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// A model ready to run: weights, tokenizer and where they came from.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub config: LlamaConfig,
    /// The local folder the files were read from.
    pub dir: PathBuf,
    /// Ids that end generation (config + generation_config).
    pub eos_token_ids: Vec<u32>,
}

/// Loads config, weights and tokenizer from a local model folder.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load_dir_with(dir, dtype, device, &QuantOptions::default(), None)
}

/// [`load_dir`] with the base linears quantized as `q` says (QLoRA). For `gguf`, the blocks
/// come from `gguf` (else from the GGUF the folder was imported from).
pub fn load_dir_with(
    dir: &Path,
    dtype: DType,
    device: &Device,
    q: &QuantOptions,
    gguf: Option<&Path>,
) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let config_path = if present(&config_path) {
        checked_file(dir, "config.json")?
    } else {
        config_path
    };
    let config = LlamaConfig::from_file(config_path)?;
    let files = weight_files(dir)?;
    let kept = match q.how {
        Quantize::Gguf => {
            let src = match gguf {
                Some(p) => p.to_path_buf(),
                None => gguf_source(dir)?,
            };
            gguf_linears(&src, &config, dtype)?
        }
        _ => HashMap::new(),
    };
    let skip: HashSet<String> = kept.keys().cloned().collect();
    let (weights, mut quant) = load_parts(&files, dtype, device, q, &skip)?;
    quant.extend(kept);
    let host_dequantized = quant
        .values()
        .filter(|w| !crate::ops::quant_has_gpu_kernel(w))
        .count();
    if device.is_cuda() && host_dequantized > 0 {
        tracing::warn!(
            "model.quantize on {device:?}: {host_dequantized} base linears are in block types \
             the GPU does not dequantize yet (Q5_0, Q5_1, Q2_K, Q3_K); they are dequantized on \
             the host for each product, which is slow"
        );
    }
    let model = Llama::from_parts(&config, weights, quant).map_err(|source| LoadError::Candle {
        path: dir.to_path_buf(),
        cause: source,
    })?;
    let tokenizer = load_tokenizer(dir)?;
    let eos_token_ids = eos_token_ids(dir, &config)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        config,
        dir: dir.to_path_buf(),
        eos_token_ids,
    })
}

/// Loads a model from a `--model` value (folder, `.gguf` file or hub id), reading hub settings
/// from the environment.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load_model_with(spec, dtype, device, &QuantOptions::default())
}

/// [`load_model`] with the base linears quantized as `q` says (QLoRA).
pub fn load_model_with(
    spec: &str,
    dtype: DType,
    device: &Device,
    q: &QuantOptions,
) -> Result<LoadedModel> {
    let source = ModelSource::parse(spec)?;
    let hub = HubOptions::from_env();
    tracing::debug!("model {source:?}, hub {hub:?}");
    let dir = resolve(&source, &hub, dtype)?;
    let gguf = match &source {
        ModelSource::Gguf(p) => Some(p.as_path()),
        _ => None,
    };
    load_dir_with(&dir, dtype, device, q, gguf)
}
