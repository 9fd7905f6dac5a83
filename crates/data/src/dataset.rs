//! From the config to tokenized examples: sources → rows → records → template → tokens, with
//! bad rows counted (or fatal), truncation, the on-disk cache and the held-out split.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache;
use crate::config::{DataConfig, FileFormat, OnBadRow, Truncation};
use crate::error::{DataError, Result};
pub use crate::files::{resolve_files, ResolvedFile};
use crate::hub::HubOptions;
use crate::record::{self, reason, BadRow, Record};
pub use crate::report::DataReport;
use crate::source::{self, Loc, Origin, RawRow};
use crate::template::{self, Rendered, Template};
use crate::tokenize::{Encoder, TokenizerFiles};
pub use crate::tokenized::{Example, TokenizedSet};

/// Everything a run needs from the data: the train and held-out examples, what happened to the
/// rows, and the token ids the batches use.
#[derive(Debug)]
pub struct Dataset {
    pub train: TokenizedSet,
    pub eval: TokenizedSet,
    pub report: DataReport,
    /// The files that `origins` index.
    pub files: Vec<PathBuf>,
    pub eos_id: u32,
    pub pad_id: u32,
}

impl Dataset {
    /// The origin of an example as text (`file:line`).
    pub fn origin(&self, origin: (u32, u64)) -> String {
        match self.files.get(origin.0 as usize) {
            Some(p) => Origin {
                path: p.clone(),
                loc: Loc::decode(origin.1),
            }
            .to_string(),
            None => format!("file #{} row {}", origin.0, origin.1),
        }
    }
}

/// Runtime options of [`build_dataset`] (not part of the config).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Folder of the tokenized-data cache; default `$SFT_CACHE/data` or `~/.cache/sft/data`.
    pub cache_dir: Option<PathBuf>,
    /// The hub cache and network policy.
    pub hub: HubOptions,
    /// Examples tokenized per parallel batch.
    pub chunk: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            cache_dir: None,
            hub: HubOptions::from_env(),
            chunk: 2048,
        }
    }
}

/// The default cache folder: `$SFT_CACHE/data`, else `~/.cache/sft/data`.
pub fn default_cache_dir() -> PathBuf {
    let root = std::env::var_os("SFT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/sft")
        });
    root.join("data")
}

/// The tokenizer and the template a config uses.
pub fn load_encoder_and_template(
    cfg: &DataConfig,
    files: &TokenizerFiles,
) -> Result<(Encoder, Template)> {
    load_template(&cfg.template, cfg.eos_token.as_deref(), files)
}

/// The tokenizer and the template `spec` (`eos_token`: the response end, default the
/// tokenizer's), as a `data` section with that template and EOS token would load them.
pub fn load_template(
    spec: &crate::config::TemplateSpec,
    eos_token: Option<&str>,
    files: &TokenizerFiles,
) -> Result<(Encoder, Template)> {
    let encoder = Encoder::load(files, eos_token)?;
    let chat = if *spec == crate::config::TemplateSpec::ChatTemplate {
        template::load_chat_template(
            files.tokenizer_config.as_deref(),
            files.chat_template.as_deref(),
        )?
    } else {
        None
    };
    let template = Template::new(
        spec,
        &encoder.eos_token,
        encoder.bos_token.as_deref(),
        chat.as_deref(),
    )?;
    Ok((encoder, template))
}

/// Builds the dataset of a config: from the cache when the same sources, template, tokenizer
/// and lengths were tokenized before, else by reading and tokenizing every row.
pub fn build_dataset(
    cfg: &DataConfig,
    tokenizer: &TokenizerFiles,
    opts: &BuildOptions,
) -> Result<Dataset> {
    cfg.validate()?;
    let files = resolve_files(cfg, &opts.hub)?;
    let (encoder, template) = load_encoder_and_template(cfg, tokenizer)?;
    let key = cache::key(cfg, &files, &encoder, &template)?;
    let cache_root = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let (all, mut report) = match cfg
        .cache
        .then(|| cache::load(&cache_root, &key))
        .transpose()?
        .flatten()
    {
        Some((set, mut report)) => {
            tracing::info!(
                "data: {} examples from the cache {}",
                set.len(),
                cache_root.join(&key).display()
            );
            report.from_cache = true;
            (set, report)
        }
        None => {
            let (set, mut report) = tokenize_files(cfg, &files, &encoder, &template, opts.chunk)?;
            report.cache_key = key.clone();
            if cfg.cache {
                if let Err(e) = cache::save(&cache_root, &key, &set, &report) {
                    tracing::warn!("data: could not write the cache: {e}");
                }
            }
            (set, report)
        }
    };
    let (train, eval) = split(&all, cfg)?;
    report.train_examples = train.len() as u64;
    report.eval_examples = eval.len() as u64;
    log_report(&report);
    Ok(Dataset {
        train,
        eval,
        report,
        files: files.into_iter().map(|f| f.path).collect(),
        eos_id: encoder.eos_id,
        pad_id: encoder.pad_id,
    })
}

fn log_report(r: &DataReport) {
    tracing::info!(
        "data: {} rows read, {} kept ({} train, {} eval), {} skipped {:?}, {} over max_length, {} tokens ({} trained)",
        r.rows_read,
        r.kept,
        r.train_examples,
        r.eval_examples,
        r.skipped_total(),
        r.skipped,
        r.truncated,
        r.tokens,
        r.trained_tokens
    );
    for s in &r.bad_row_samples {
        tracing::warn!("data: {s}");
    }
}

/// The held-out split: a seeded permutation's first `k` examples, the rest (in file order) train.
pub fn split(all: &TokenizedSet, cfg: &DataConfig) -> Result<(TokenizedSet, TokenizedSet)> {
    let Some(spec) = cfg.eval_split else {
        return Ok((all.clone(), TokenizedSet::new()));
    };
    let k = spec.count(all.len())?;
    let mut perm: Vec<usize> = (0..all.len()).collect();
    crate::batch::shuffle(&mut perm, cfg.seed ^ SPLIT_SALT);
    let mut eval_idx = perm[..k].to_vec();
    let mut held = vec![false; all.len()];
    for &i in &eval_idx {
        held[i] = true;
    }
    eval_idx.sort_unstable();
    let train_idx: Vec<usize> = (0..all.len()).filter(|&i| !held[i]).collect();
    Ok((all.select(&train_idx), all.select(&eval_idx)))
}

/// Keeps the split's permutation independent of the epoch shuffles of the same seed.
const SPLIT_SALT: u64 = 0x5eed_0e7a_1500_0001;

const SAMPLES_PER_REASON: usize = 5;

/// Rendered examples waiting to be tokenized together, and where each came from.
#[derive(Default)]
struct Pending {
    rendered: Vec<Rendered>,
    origins: Vec<(u32, u64)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.rendered.len()
    }
}

/// Reads and tokenizes every row of `files`.
pub fn tokenize_files(
    cfg: &DataConfig,
    files: &[ResolvedFile],
    encoder: &Encoder,
    template: &Template,
    chunk: usize,
) -> Result<(TokenizedSet, DataReport)> {
    let mut set = TokenizedSet::new();
    let mut report = DataReport {
        files: files.iter().map(|f| f.path.display().to_string()).collect(),
        ..Default::default()
    };
    let mut samples: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut pending = Pending::default();
    let max_rows = cfg.max_rows.unwrap_or(u64::MAX);
    for (fi, file) in files.iter().enumerate() {
        if report.rows_read >= max_rows {
            break;
        }
        let columns = cfg.sources[file.source].columns.as_ref();
        let mut on_row = |loc: Loc, raw: RawRow| -> Result<bool> {
            report.rows_read += 1;
            let code = loc.encode();
            let outcome: std::result::Result<Record, BadRow> =
                raw.and_then(|v| record::to_record(&v, columns));
            match outcome {
                Ok(rec) => {
                    if cfg.max_chars.is_some_and(|m| rec.chars() > m) {
                        report.skip(reason::OVER_MAX_CHARS);
                    } else {
                        pending.rendered.push(template.render(&rec)?);
                        pending.origins.push((fi as u32, code));
                    }
                }
                Err(bad) => {
                    let origin = Origin {
                        path: file.path.clone(),
                        loc,
                    };
                    if cfg.on_bad_row == OnBadRow::Fail {
                        return Err(DataError::BadRow {
                            origin,
                            reason: bad.reason.to_string(),
                            detail: bad.detail,
                        });
                    }
                    let n = samples.entry(bad.reason).or_default();
                    if *n < SAMPLES_PER_REASON {
                        *n += 1;
                        report
                            .bad_row_samples
                            .push(format!("{origin}: {}: {}", bad.reason, bad.detail));
                    }
                    report.skip(bad.reason);
                }
            }
            if pending.len() >= chunk {
                flush(&mut pending, encoder, cfg, &mut set, &mut report)?;
            }
            Ok(report.rows_read < max_rows)
        };
        source::read_rows(&file.path, file.format, &mut on_row)?;
    }
    flush(&mut pending, encoder, cfg, &mut set, &mut report)?;
    report.kept = set.len() as u64;
    let (tokens, trained) = set.token_counts();
    report.tokens = tokens;
    report.trained_tokens = trained;
    debug_assert_eq!(report.rows_read, report.kept + report.skipped_total());
    Ok((set, report))
}

fn flush(
    pending: &mut Pending,
    encoder: &Encoder,
    cfg: &DataConfig,
    set: &mut TokenizedSet,
    report: &mut DataReport,
) -> Result<()> {
    if pending.len() == 0 {
        return Ok(());
    }
    let encoded = encoder.encode_batch(&pending.rendered)?;
    for (&origin, e) in pending.origins.iter().zip(encoded) {
        if e.ids.len() <= e.prompt_len {
            report.skip(reason::EMPTY_RESPONSE);
            continue;
        }
        report.boundary_retokenized += e.retokenized as u64;
        let mut ids: &[u32] = &e.ids;
        if ids.len() > cfg.max_length {
            report.truncated += 1;
            match cfg.truncation {
                Truncation::Drop => {
                    report.skip(reason::OVER_MAX_LENGTH);
                    continue;
                }
                Truncation::Cut => {
                    if e.prompt_len >= cfg.max_length {
                        report.skip(reason::PROMPT_OVER_MAX_LENGTH);
                        continue;
                    }
                    ids = &ids[..cfg.max_length];
                }
            }
        }
        set.push(ids, e.prompt_len, origin);
    }
    pending.rendered.clear();
    pending.origins.clear();
    Ok(())
}

/// Reads a data file's rows as records (no tokenizer): for tools and tests.
pub fn read_records(
    path: &Path,
    format: Option<FileFormat>,
    columns: Option<&crate::config::Columns>,
) -> Result<Vec<(Origin, std::result::Result<Record, BadRow>)>> {
    let format = source::format_of(path, format)?;
    let mut out = Vec::new();
    source::read_rows(path, format, &mut |loc, raw| {
        out.push((
            Origin {
                path: path.to_path_buf(),
                loc,
            },
            raw.and_then(|v| record::to_record(&v, columns)),
        ));
        Ok(true)
    })?;
    Ok(out)
}
