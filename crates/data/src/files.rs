//! The files a config names: globs expanded and hub files fetched (or found in the cache).
use std::path::PathBuf;

use crate::config::{DataConfig, FileFormat, SourceKind};
use crate::error::Result;
use crate::hub::{self, HubOptions};
use crate::source;

/// A file to read and the source it came from.
#[derive(Debug, Clone)]
pub struct ResolvedFile {
    pub path: PathBuf,
    pub format: FileFormat,
    pub source: usize,
}

/// Expands globs and fetches (or finds in the cache) hub files, in config order.
pub fn resolve_files(cfg: &DataConfig, hub_opts: &HubOptions) -> Result<Vec<ResolvedFile>> {
    let mut out = Vec::new();
    for (i, s) in cfg.sources.iter().enumerate() {
        let paths = match s.kind()? {
            SourceKind::Path(p) => source::expand_glob(p, cfg.base_dir.as_deref())?,
            SourceKind::Hub {
                repo,
                revision,
                split,
            } => hub::dataset_files(repo, revision, split, hub_opts)?,
        };
        for p in paths {
            let format = source::format_of(&p, s.format)?;
            out.push(ResolvedFile {
                path: p,
                format,
                source: i,
            });
        }
    }
    Ok(out)
}
