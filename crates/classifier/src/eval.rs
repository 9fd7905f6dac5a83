//! Labelled JSONL files and the scores of a classifier on them: the tone classifier's
//! `{"instruction", "response", "label"}` lines and the judge's `{"question", "answer",
//! "label"}` lines (1 = answer-like / objective), with an optional `"split"`.
use std::path::Path;

use serde::Serialize;

use crate::classifier::{Classifier, Judge, ToneClassifier};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// One labelled item: its context (instruction or question), its text, its label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Labelled {
    pub context: String,
    pub text: String,
    pub label: u8,
    pub split: Option<String>,
}

pub const TONE_KEYS: (&str, &str) = ("instruction", "response");
pub const JUDGE_KEYS: (&str, &str) = ("question", "answer");

/// Reads labelled lines with the given (context, text) field names. `label` must be 0 or 1
/// (or false/true); the context may be missing (empty). Blank lines are skipped; anything
/// else wrong is an error naming the file, the line and the field.
pub fn read_labelled(path: impl AsRef<Path>, keys: (&str, &str)) -> Result<Vec<Labelled>> {
    let mut out = Vec::new();
    crate::sources::for_each_object(path.as_ref(), |obj, err| {
        let string = |k: &str, required: bool| -> Result<String> {
            match obj.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
                None => Err(err(format!("missing field `{k}`"))),
                Some(_) => Err(err(format!("field `{k}` must be a string"))),
            }
        };
        let label = match obj.get("label") {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(0) => 0,
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(1) => 1,
            Some(serde_json::Value::Bool(b)) => *b as u8,
            Some(other) => return Err(err(format!("field `label` must be 0 or 1, got {other}"))),
            None => return Err(err("missing field `label` (0 or 1)".into())),
        };
        let split = match obj.get("split") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            None | Some(serde_json::Value::Null) => None,
            Some(_) => return Err(err("field `split` must be a string".into())),
        };
        out.push(Labelled {
            context: string(keys.0, false)?,
            text: string(keys.1, true)?,
            label,
            split,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Scores and per-item predictions of a classifier on labelled items.
pub fn evaluate(c: &Classifier, items: &[Labelled]) -> Result<(Metrics, Vec<(u8, f32)>)> {
    let refs: Vec<(&str, &str)> = items
        .iter()
        .map(|l| (l.context.as_str(), l.text.as_str()))
        .collect();
    let preds = c.predict_items(&refs)?;
    let predicted: Vec<u8> = preds.iter().map(|p| p.0).collect();
    let labels: Vec<u8> = items.iter().map(|l| l.label).collect();
    Ok((Metrics::from_labels(&predicted, &labels), preds))
}

fn only_split(items: Vec<Labelled>, split: Option<&str>) -> Vec<Labelled> {
    match split {
        None => items,
        Some(s) => items
            .into_iter()
            .filter(|l| l.split.as_deref() == Some(s))
            .collect(),
    }
}

/// `sft classifier eval`: the tone classifier on `{"instruction","response","label"}` lines.
pub fn eval_tone_file(tone: &ToneClassifier, path: impl AsRef<Path>) -> Result<Metrics> {
    let items = read_labelled(path, TONE_KEYS)?;
    Ok(evaluate(tone.classifier(), &items)?.0)
}

/// `sft objecqa judge eval`: the judge on `{"question","answer","label"}` lines, all of them or
/// those of one `split` (e.g. `test`).
pub fn eval_judge_file(
    judge: &Judge,
    path: impl AsRef<Path>,
    split: Option<&str>,
) -> Result<Metrics> {
    let path = path.as_ref();
    let items = only_split(read_labelled(path, JUDGE_KEYS)?, split);
    if items.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no labelled lines{}",
            path.display(),
            split
                .map(|s| format!(" with split `{s}`"))
                .unwrap_or_default()
        )));
    }
    Ok(evaluate(judge.classifier(), &items)?.0)
}

/// Items of one split (all of them when `split` is `None`).
pub fn select_split(items: Vec<Labelled>, split: Option<&str>) -> Vec<Labelled> {
    only_split(items, split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_and_names_bad_lines() {
        let (_dir, p) = crate::testing::temp_file(
            "x.jsonl",
            "{\"question\":\"q\",\"answer\":\"a\",\"label\":1,\"split\":\"test\"}\n\n{\"answer\":\"b\",\"label\":false}\n",
        );
        let items = read_labelled(&p, JUDGE_KEYS).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            (items[0].label, items[0].split.as_deref()),
            (1, Some("test"))
        );
        assert_eq!((items[1].context.as_str(), items[1].label), ("", 0));
        assert_eq!(select_split(items, Some("test")).len(), 1);
        for (bad, needle) in [
            ("{\"answer\":\"b\",\"label\":2}", "label"),
            ("{\"answer\":\"b\"}", "label"),
            ("{\"label\":1}", "answer"),
            ("{\"answer\":3,\"label\":1}", "answer"),
            ("[1]", "object"),
        ] {
            std::fs::write(&p, format!("{{\"answer\":\"ok\",\"label\":0}}\n{bad}\n")).unwrap();
            let e = read_labelled(&p, JUDGE_KEYS).unwrap_err().to_string();
            assert!(e.contains("x.jsonl:2") && e.contains(needle), "{e}");
        }
    }
}
