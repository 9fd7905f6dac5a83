//! Reading rows from files: JSON lines, JSON arrays and parquet (row group by row group, through
//! the `parquet` crate's record API), with every row located by file and line, element or row.
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::config::FileFormat;
use crate::error::{DataError, Result};
pub use crate::origin::{Loc, Origin};
use crate::record::{reason, BadRow};

/// Expands a path or glob (sorted, so the row order is stable); a relative one is read from
/// `base` (a config's folder), else from the working folder. Finding nothing is an error that
/// names the folder searched.
pub fn expand_glob(pattern: &str, base: Option<&Path>) -> Result<Vec<PathBuf>> {
    let relative = Path::new(pattern).is_relative();
    let full = match base {
        // The folder's own characters are no pattern: `[` in a folder name is literal.
        Some(b) if relative => match b.to_str() {
            Some(s) => format!(
                "{}/{pattern}",
                glob::Pattern::escape(s.trim_end_matches('/'))
            ),
            None => b.join(pattern).display().to_string(),
        },
        _ => pattern.to_string(),
    };
    let paths = glob::glob(&full)
        .map_err(|e| DataError::Config(format!("data.sources: bad glob `{pattern}`: {e}")))?;
    let mut out = Vec::new();
    for p in paths {
        let p = p.map_err(|e| {
            DataError::io(e.path().to_path_buf(), std::io::Error::other(e.to_string()))
        })?;
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        let searched = match base {
            Some(b) if relative => format!(" in {} (the config's folder)", b.display()),
            _ if relative => std::env::current_dir()
                .map(|d| format!(" in {} (the working folder)", d.display()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        return Err(DataError::Config(format!(
            "data.sources: no file matches `{pattern}`{searched}"
        )));
    }
    Ok(out)
}

/// The format of `path`: the configured one, else from the extension.
pub fn format_of(path: &Path, configured: Option<FileFormat>) -> Result<FileFormat> {
    configured
        .or_else(|| FileFormat::from_path(path))
        .ok_or_else(|| DataError::Format {
            path: path.to_path_buf(),
            detail: "unknown extension: expected .jsonl, .json or .parquet (or set `format`)"
                .into(),
        })
}

/// A row as read: a JSON value, or why it could not be read.
pub type RawRow = std::result::Result<Value, BadRow>;

/// Calls `f(loc, row)` for every row of the file, in order; `f` returns `false` to stop early.
/// Blank lines of JSON-lines files are not rows.
pub fn read_rows(
    path: &Path,
    format: FileFormat,
    f: &mut dyn FnMut(Loc, RawRow) -> Result<bool>,
) -> Result<()> {
    match format {
        FileFormat::Jsonl => read_jsonl(path, f),
        FileFormat::Json => {
            // `.json` is often JSON lines in disguise: sniff the first non-blank byte.
            let mut head = [0u8; 4096];
            let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
            let n = file.read(&mut head).map_err(|e| DataError::io(path, e))?;
            let first = head[..n]
                .iter()
                .find(|b| !b.is_ascii_whitespace() && **b != 0xEF && **b != 0xBB && **b != 0xBF);
            if first == Some(&b'[') {
                read_json_array(path, f)
            } else {
                read_jsonl(path, f)
            }
        }
        FileFormat::Parquet => read_parquet(path, f),
    }
}

fn read_jsonl(path: &Path, f: &mut dyn FnMut(Loc, RawRow) -> Result<bool>) -> Result<()> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let mut bytes = &buf[..];
        if line == 1 && bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
            bytes = &bytes[3..];
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let row = match std::str::from_utf8(bytes) {
            Err(e) => Err(BadRow::new(
                reason::INVALID_UTF8,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )),
            Ok(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                BadRow::new(
                    reason::NOT_JSON,
                    format!("not JSON: {e} (column {})", e.column()),
                )
            }),
        };
        if !f(Loc::Line(line), row)? {
            return Ok(());
        }
    }
}

fn read_json_array(path: &Path, f: &mut dyn FnMut(Loc, RawRow) -> Result<bool>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    // A JSON array is one document: if it does not parse, no row of it can be trusted.
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        detail: format!(
            "not a JSON array: {e} (line {}, column {}); use JSON lines to skip bad rows one by one",
            e.line(),
            e.column()
        ),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            detail: "expected a JSON array of objects".into(),
        });
    };
    for (i, item) in items.into_iter().enumerate() {
        if !f(Loc::Element(i as u64), Ok(item))? {
            break;
        }
    }
    Ok(())
}

fn read_parquet(path: &Path, f: &mut dyn FnMut(Loc, RawRow) -> Result<bool>) -> Result<()> {
    let perr = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(perr)?;
    let mut row_index = 0u64;
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(perr)?;
        let n_rows = group.metadata().num_rows() as u64;
        let rows = group.get_row_iter(None).map_err(perr)?;
        let mut seen = 0u64;
        for row in rows {
            let loc = Loc::Row(row_index);
            row_index += 1;
            seen += 1;
            let raw = match row {
                Ok(r) => row_to_json(&r),
                Err(e) => {
                    // The record reader fails a whole row group on a bad value (such as
                    // invalid UTF-8 in a string column): report this row, skip the group's rest.
                    let msg = e.to_string();
                    let why =
                        if msg.contains("String") || msg.contains("utf8") || msg.contains("UTF8") {
                            reason::INVALID_UTF8
                        } else {
                            reason::NOT_JSON
                        };
                    let rest = n_rows.saturating_sub(seen);
                    let keep = f(
                        loc,
                        Err(BadRow::new(
                            why,
                            format!("{msg} ({rest} later rows of row group {g} unreadable)"),
                        )),
                    )?;
                    for k in 0..rest {
                        if !keep {
                            break;
                        }
                        f(
                            Loc::Row(row_index + k),
                            Err(BadRow::new(
                                why,
                                format!("row group {g} failed to decode at an earlier row"),
                            )),
                        )?;
                    }
                    row_index += rest;
                    if !keep {
                        return Ok(());
                    }
                    break;
                }
            };
            if !f(loc, raw)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A parquet row as a JSON object (strings, numbers, lists and nested groups).
fn row_to_json(row: &Row) -> RawRow {
    let mut obj = Map::new();
    for (name, field) in row.get_column_iter() {
        obj.insert(name.clone(), field_to_json(name, field)?);
    }
    Ok(Value::Object(obj))
}

fn field_to_json(name: &str, field: &Field) -> RawRow {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float(x) => Value::from(*x as f64),
        Field::Double(x) => Value::from(*x),
        Field::Str(s) => Value::String(s.clone()),
        // Unannotated byte arrays: text if it is UTF-8.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => {
                return Err(BadRow::new(
                    reason::INVALID_UTF8,
                    format!("column `{name}`: invalid UTF-8 at byte {}", e.valid_up_to()),
                ))
            }
        },
        Field::Group(r) => row_to_json(r)?,
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(|e| field_to_json(name, e))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match field_to_json(name, k)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, field_to_json(name, v)?);
            }
            Value::Object(obj)
        }
        // Dates, times, decimals: not text a template uses; keep a readable form.
        other => Value::String(other.to_string()),
    })
}
