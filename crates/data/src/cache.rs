//! The tokenized-data cache: `<cache>/data/<key>/` with little-endian arrays and a JSON index.
//!
//! - `index.json`: format version, counts and the [`DataReport`] of the build;
//! - `tokens.u32`, `starts.u64`, `prompt_lens.u32`, `origin_files.u32`, `origin_locs.u64`: the
//!   fields of [`TokenizedSet`], little-endian.
//!
//! The key is the SHA-256 of everything that shapes the tokens: each file's path, size and
//! modification time, the source settings (columns, formats), the template (and chat template
//! text), the tokenizer.json hash, EOS and prefix ids, `max_length`, `truncation`, `max_chars`,
//! `max_rows` and `on_bad_row`. The split and batching settings are applied after loading, so
//! changing them reuses the cache. Entries are written to a temporary folder and renamed, so a
//! crash never leaves a half-written entry under a valid key.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::error::{DataError, Result};
use crate::files::ResolvedFile;
use crate::report::DataReport;
use crate::template::Template;
use crate::tokenize::{hex, Encoder};
use crate::tokenized::TokenizedSet;

const VERSION: u32 = 1;

#[derive(Serialize)]
struct KeyDoc<'a> {
    version: u32,
    files: Vec<(String, u64, u128, usize, String)>,
    sources: &'a [crate::config::SourceConfig],
    template: String,
    tokenizer: &'a str,
    eos_id: u32,
    prefix_ids: &'a [u32],
    max_length: usize,
    truncation: crate::config::Truncation,
    max_chars: Option<usize>,
    max_rows: Option<u64>,
    on_bad_row: crate::config::OnBadRow,
}

/// The cache key of a config over its resolved files.
pub fn key(
    cfg: &DataConfig,
    files: &[ResolvedFile],
    encoder: &Encoder,
    template: &Template,
) -> Result<String> {
    let mut entries = Vec::with_capacity(files.len());
    for f in files {
        let meta = std::fs::metadata(&f.path).map_err(|e| DataError::io(&f.path, e))?;
        let mtime = sft_common::mtime_nanos(&meta);
        let path = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
        entries.push((
            path.display().to_string(),
            meta.len(),
            mtime,
            f.source,
            format!("{:?}", f.format),
        ));
    }
    let doc = KeyDoc {
        version: VERSION,
        files: entries,
        sources: &cfg.sources,
        template: template.fingerprint(),
        tokenizer: &encoder.tokenizer_hash,
        eos_id: encoder.eos_id,
        prefix_ids: &encoder.prefix_ids,
        max_length: cfg.max_length,
        truncation: cfg.truncation,
        max_chars: cfg.max_chars,
        max_rows: cfg.max_rows,
        on_bad_row: cfg.on_bad_row,
    };
    let json = serde_json::to_vec(&doc).map_err(|e| DataError::Config(e.to_string()))?;
    Ok(hex(&Sha256::digest(&json))[..32].to_string())
}

#[derive(Serialize, Deserialize)]
struct Index {
    version: u32,
    examples: u64,
    tokens: u64,
    report: DataReport,
}

fn cerr(path: &Path, detail: impl Into<String>) -> DataError {
    DataError::Cache {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn write_u32s(path: &Path, v: &[u32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

fn write_u64s(path: &Path, v: &[u64]) -> Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 8);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

fn read_u32s(path: &Path, n: u64) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 != n * 4 {
        return Err(cerr(
            path,
            format!("expected {n} u32 values, found {} bytes", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_u64s(path: &Path, n: u64) -> Result<Vec<u64>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 != n * 8 {
        return Err(cerr(
            path,
            format!("expected {n} u64 values, found {} bytes", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Writes an entry (atomically: a temporary folder renamed into place).
pub fn save(root: &Path, key: &str, set: &TokenizedSet, report: &DataReport) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| DataError::io(root, e))?;
    let dir = root.join(key);
    let tmp = root.join(format!(".tmp-{key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let files: Vec<u32> = set.origins.iter().map(|o| o.0).collect();
    let locs: Vec<u64> = set.origins.iter().map(|o| o.1).collect();
    write_u32s(&tmp.join("tokens.u32"), &set.tokens)?;
    write_u64s(&tmp.join("starts.u64"), &set.starts)?;
    write_u32s(&tmp.join("prompt_lens.u32"), &set.prompt_lens)?;
    write_u32s(&tmp.join("origin_files.u32"), &files)?;
    write_u64s(&tmp.join("origin_locs.u64"), &locs)?;
    let index = Index {
        version: VERSION,
        examples: set.len() as u64,
        tokens: set.tokens.len() as u64,
        report: report.clone(),
    };
    let json = serde_json::to_vec_pretty(&index).map_err(|e| cerr(&tmp, e.to_string()))?;
    // The index last: an entry without one is incomplete.
    std::fs::write(tmp.join("index.json"), json).map_err(|e| DataError::io(&tmp, e))?;
    if dir.exists() {
        // Another process wrote the same key meanwhile; its content is the same.
        let _ = std::fs::remove_dir_all(&tmp);
    } else if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("index.json").is_file() {
            return Err(DataError::io(&dir, e));
        }
    }
    Ok(dir)
}

/// Reads an entry; `Ok(None)` when there is none (or it is unreadable: rebuilt then).
pub fn load(root: &Path, key: &str) -> Result<Option<(TokenizedSet, DataReport)>> {
    let dir = root.join(key);
    let index_path = dir.join("index.json");
    if !index_path.is_file() {
        return Ok(None);
    }
    match load_entry(&dir) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            tracing::warn!("data cache: removing a damaged entry: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            Ok(None)
        }
    }
}

fn load_entry(dir: &Path) -> Result<(TokenizedSet, DataReport)> {
    let index_path = dir.join("index.json");
    let text = std::fs::read(&index_path).map_err(|e| DataError::io(&index_path, e))?;
    let index: Index =
        serde_json::from_slice(&text).map_err(|e| cerr(&index_path, e.to_string()))?;
    if index.version != VERSION {
        return Err(cerr(
            &index_path,
            format!("version {} (expected {VERSION})", index.version),
        ));
    }
    let n = index.examples;
    let tokens = read_u32s(&dir.join("tokens.u32"), index.tokens)?;
    let starts = read_u64s(&dir.join("starts.u64"), n + 1)?;
    let prompt_lens = read_u32s(&dir.join("prompt_lens.u32"), n)?;
    let files = read_u32s(&dir.join("origin_files.u32"), n)?;
    let locs = read_u64s(&dir.join("origin_locs.u64"), n)?;
    if starts.first() != Some(&0)
        || starts.last() != Some(&index.tokens)
        || starts.windows(2).any(|w| w[0] > w[1])
    {
        return Err(cerr(dir, "inconsistent example offsets"));
    }
    let set = TokenizedSet {
        tokens,
        starts,
        prompt_lens,
        origins: files.into_iter().zip(locs).collect(),
    };
    Ok((set, index.report))
}
