//! Dataset and tokenizer files from the Hugging Face hub through `hf-hub` (sync API), with its
//! cache layout (`datasets--org--name/{blobs,refs/<revision>,snapshots/<commit>/…}`).
//!
//! Environment: `HF_HUB_CACHE` or `HF_HOME` (cache folder, default `~/.cache/huggingface/hub`),
//! `HF_TOKEN` (else the token file of the cache), `HF_HUB_OFFLINE=1` (cache only, no network).
//! Online, the repository listing comes from the hub and each file is downloaded unless cached;
//! if the hub cannot be reached, a complete cached snapshot of the revision is used instead.
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{DataError, Result};

/// Where the hub cache is and whether the network may be used. Its `Debug` shows the token as
/// `<redacted>`.
#[derive(Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub token: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubOptions {
    /// From `HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE` and `HF_TOKEN`.
    pub fn from_env() -> HubOptions {
        let cache_dir = if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = std::env::var_os("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/huggingface/hub")
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        HubOptions {
            cache_dir,
            offline,
            token,
        }
    }

    /// An offline view of a given cache folder (tests, air-gapped machines).
    pub fn offline_at(cache_dir: impl Into<PathBuf>) -> HubOptions {
        HubOptions {
            cache_dir: cache_dir.into(),
            offline: true,
            token: None,
        }
    }
}

const DATA_EXTENSIONS: [&str; 4] = ["parquet", "jsonl", "json", "ndjson"];

/// Whether a repository file belongs to `split`: a data file whose path, cut at `/ - _ .`, has
/// the split's name as one of its words (`data/train-00000-of-00004.parquet`, `train/x.jsonl`).
pub fn split_matches(rel_path: &str, split: &str) -> bool {
    is_data_file(rel_path)
        && rel_path
            .split(['/', '-', '_', '.'])
            .any(|w| w.eq_ignore_ascii_case(split))
}

fn is_data_file(rel_path: &str) -> bool {
    let ext = rel_path.rsplit('.').next().unwrap_or("");
    DATA_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e))
        && !rel_path.starts_with('.')
        && !rel_path.contains("/.")
}

/// Picks the split's files from a listing; a repository without split names is all `train`.
fn select(files: &[String], split: &str) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| split_matches(f, split))
        .cloned()
        .collect();
    if out.is_empty() && split == "train" {
        let known = ["train", "test", "validation", "valid", "dev", "eval"];
        out = files
            .iter()
            .filter(|f| is_data_file(f) && !known.iter().any(|s| split_matches(f, s)))
            .cloned()
            .collect();
    }
    out.sort();
    out
}

/// The local paths of the files of `split` at `revision` of the dataset `repo`.
pub fn dataset_files(
    repo: &str,
    revision: &str,
    split: &str,
    opts: &HubOptions,
) -> Result<Vec<PathBuf>> {
    let err = |detail: String| DataError::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        detail,
    };
    if opts.offline {
        return cached_files(repo, revision, split, opts).map_err(err);
    }
    let handle = repo_api(repo, revision, RepoType::Dataset, opts).map_err(err)?;
    let info = match handle.info() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("hub dataset {repo}@{revision}: listing failed ({e}); trying the cache");
            return cached_files(repo, revision, split, opts)
                .map_err(|c| err(format!("the hub could not be reached ({e}) and {c}")));
        }
    };
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen = select(&names, split);
    if chosen.is_empty() {
        return Err(err(format!(
            "no data file for split `{split}` among {} files ({})",
            names.len(),
            names
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut out = Vec::with_capacity(chosen.len());
    for name in chosen {
        tracing::info!("hub dataset {repo}@{revision}: {name}");
        out.push(handle.get(&name).map_err(|e| err(format!("{name}: {e}")))?);
    }
    Ok(out)
}

fn repo_folder(cache_dir: &Path, repo: &str, kind: &str) -> PathBuf {
    cache_dir.join(format!("{kind}--{}", repo.replace('/', "--")))
}

/// The revision's snapshot folder in the cache: `refs/<revision>` names the commit, or the
/// revision is itself a commit with a snapshot.
fn snapshot_dir(
    cache_dir: &Path,
    repo: &str,
    revision: &str,
    kind: &str,
) -> std::result::Result<PathBuf, String> {
    let folder = repo_folder(cache_dir, repo, kind);
    let ref_path = folder.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        Err(_) if folder.join("snapshots").join(revision).is_dir() => revision.to_string(),
        Err(_) => {
            return Err(format!(
                "the cache has no revision `{revision}` ({} is missing)",
                ref_path.display()
            ))
        }
    };
    let snap = folder.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(format!("the cache has no snapshot {}", snap.display()));
    }
    Ok(snap)
}

fn cached_files(
    repo: &str,
    revision: &str,
    split: &str,
    opts: &HubOptions,
) -> std::result::Result<Vec<PathBuf>, String> {
    let snap = snapshot_dir(&opts.cache_dir, repo, revision, "datasets")?;
    let mut rel = Vec::new();
    walk(&snap, &snap, &mut rel).map_err(|e| format!("{}: {e}", snap.display()))?;
    let chosen = select(&rel, split);
    if chosen.is_empty() {
        return Err(format!(
            "the cached snapshot {} has no data file for split `{split}`",
            snap.display()
        ));
    }
    Ok(chosen.into_iter().map(|r| snap.join(r)).collect())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// The hub API of a repository at a revision, with the options' cache and token.
fn repo_api(
    repo: &str,
    revision: &str,
    kind: RepoType,
    opts: &HubOptions,
) -> std::result::Result<ApiRepo, String> {
    let cache = Cache::new(opts.cache_dir.clone());
    let token = opts.token.clone().or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache)
        .with_token(token)
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(api.repo(Repo::with_revision(
        repo.to_string(),
        kind,
        revision.to_string(),
    )))
}

/// A file of a model repository (for the tokenizer): from the cache, else downloaded.
/// `Ok(None)` when the repository has no such file.
pub fn model_file(
    repo: &str,
    revision: &str,
    file: &str,
    opts: &HubOptions,
) -> Result<Option<PathBuf>> {
    let err = |detail: String| DataError::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        detail,
    };
    if let Ok(snap) = snapshot_dir(&opts.cache_dir, repo, revision, "models") {
        let p = snap.join(file);
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    if opts.offline {
        return Ok(None);
    }
    let handle = repo_api(repo, revision, RepoType::Model, opts).map_err(err)?;
    match handle.get(file) {
        Ok(p) => Ok(Some(p)),
        // hf-hub exposes ureq's error without re-exporting ureq: a missing file is a 404.
        Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
            Ok(None)
        }
        Err(e) => Err(err(format!("{file}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_token() {
        let opts = HubOptions {
            token: Some("hf_secretTokenValue123".into()),
            ..HubOptions::offline_at("/tmp/hub")
        };
        let shown = format!("{opts:?} {opts:#?}");
        assert!(!shown.contains("secretTokenValue"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("/tmp/hub"),
            "{shown}"
        );
        let none = format!("{:?}", HubOptions::offline_at("/tmp/hub"));
        assert!(none.contains("token: None"), "{none}");
    }

    #[test]
    fn split_matching() {
        assert!(split_matches(
            "data/train-00000-of-00004-abc.parquet",
            "train"
        ));
        assert!(split_matches("train/part1.jsonl", "train"));
        assert!(split_matches("my_train.json", "train"));
        assert!(!split_matches("data/test-00000.parquet", "train"));
        assert!(!split_matches("data/training-notes.md", "train"));
        assert!(!split_matches("README.md", "train"));
        assert!(!split_matches(".gitattributes", "train"));
        let files = vec![
            "a.jsonl".to_string(),
            "README.md".into(),
            "test.jsonl".into(),
        ];
        assert_eq!(select(&files, "train"), vec!["a.jsonl".to_string()]);
        assert_eq!(select(&files, "test"), vec!["test.jsonl".to_string()]);
    }
}
