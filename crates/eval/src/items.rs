//! Evaluation sets as JSON lines: one item per line, blank lines skipped, every error naming the
//! file and line. The IFS instructions and the ObjecQA questions are such sets.
use std::path::Path;

use serde::de::DeserializeOwned;

/// An item of a JSONL evaluation set: its text (which must not be blank) and its id (`line-N`
/// where the line gives none).
pub trait JsonlItem: DeserializeOwned {
    /// The field holding the text, as messages name it (`instruction`, `question`).
    const FIELD: &'static str;
    fn text(&self) -> &str;
    fn id_mut(&mut self) -> &mut String;
}

#[derive(Debug, thiserror::Error)]
pub enum ItemsError {
    #[error("{file}:{line}: {message}")]
    Bad {
        file: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {file}: {cause}")]
    Io { file: String, cause: std::io::Error },
}

/// Parses JSONL items; `file` names the source in errors.
pub fn parse_jsonl<T: JsonlItem>(text: &str, file: &str) -> Result<Vec<T>, ItemsError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| ItemsError::Bad {
            file: file.to_string(),
            line: i + 1,
            message,
        };
        let mut item: T = serde_json::from_str(line)
            .map_err(|e| bad(format!("expected {{\"{}\": \"...\"}}: {e}", T::FIELD)))?;
        if item.text().trim().is_empty() {
            return Err(bad(format!("empty {}", T::FIELD)));
        }
        let id = item.id_mut();
        if id.is_empty() {
            *id = format!("line-{}", i + 1);
        }
        out.push(item);
    }
    Ok(out)
}

/// Reads and parses a JSONL file of items.
pub fn read_jsonl<T: JsonlItem>(path: &Path) -> Result<Vec<T>, ItemsError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| ItemsError::Io {
        file: file.clone(),
        cause,
    })?;
    parse_jsonl(&text, &file)
}
