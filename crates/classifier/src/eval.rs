//! Labelled JSONL files and the scores of a classifier on them: the tone classifier's
//! `{"instruction", "response", "label"}` lines and the judge's `{"question", "answer",
//! "label"}` lines (1 = answer-like / objective), with an optional `"split"`, and, for real
//! model outputs, optional `"id"`, `"template"` and `"kind"` (`full` / `partial`) by which
//! [`breakdown`] groups the scores and lists the misclassified items.
use std::collections::BTreeMap;
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
    /// Where the item came from, when the file says: the instruction's id, the prompt template
    /// and the prompt's kind (`full` / `partial`).
    pub id: Option<String>,
    pub template: Option<String>,
    pub kind: Option<String>,
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
        let optional = |k: &str| -> Result<Option<String>> {
            match obj.get(k) {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(_) => Err(err(format!("field `{k}` must be a string"))),
            }
        };
        out.push(Labelled {
            context: string(keys.0, false)?,
            text: string(keys.1, true)?,
            label,
            split: optional("split")?,
            id: optional("id")?,
            template: optional("template")?,
            kind: optional("kind")?,
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

/// The scores of a group of items, with the 95% Wilson interval of its accuracy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GroupScore {
    #[serde(flatten)]
    pub metrics: Metrics,
    pub accuracy_ci95: (f64, f64),
}

impl GroupScore {
    fn of(predicted: &[u8], labels: &[u8]) -> Self {
        let metrics = Metrics::from_labels(predicted, labels);
        let correct = metrics.tp + metrics.tn;
        GroupScore {
            metrics,
            accuracy_ci95: sft_eval::wilson_interval(correct, metrics.n),
        }
    }
}

/// An item the classifier got wrong.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Miss {
    /// Its position among the evaluated items (0-based).
    pub index: usize,
    pub id: Option<String>,
    pub template: Option<String>,
    pub kind: Option<String>,
    /// The hand label; the classifier said the other.
    pub label: u8,
    /// The classifier's probability of label 1.
    pub prob: f32,
    pub context: String,
    pub text: String,
}

/// Where a classifier errs on labelled items: the scores over all of them, per template and per
/// kind (only the items that name one), and the misclassified items in file order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Breakdown {
    #[serde(flatten)]
    pub all: GroupScore,
    pub by_template: BTreeMap<String, GroupScore>,
    pub by_kind: BTreeMap<String, GroupScore>,
    pub misclassified: Vec<Miss>,
}

/// Groups the predictions of [`evaluate`] (same order as `items`) by template and by kind.
pub fn breakdown(items: &[Labelled], preds: &[(u8, f32)]) -> Breakdown {
    let predicted: Vec<u8> = preds.iter().map(|p| p.0).collect();
    let labels: Vec<u8> = items.iter().map(|l| l.label).collect();
    let group = |key: fn(&Labelled) -> Option<&String>| {
        let mut groups = BTreeMap::<String, (Vec<u8>, Vec<u8>)>::new();
        for ((item, &p), &y) in items.iter().zip(&predicted).zip(&labels) {
            if let Some(k) = key(item) {
                let g = groups.entry(k.clone()).or_default();
                g.0.push(p);
                g.1.push(y);
            }
        }
        groups
            .into_iter()
            .map(|(k, (p, y))| (k, GroupScore::of(&p, &y)))
            .collect()
    };
    let misclassified = items
        .iter()
        .zip(preds)
        .enumerate()
        .filter(|(_, (item, p))| p.0 != item.label)
        .map(|(index, (item, p))| Miss {
            index,
            id: item.id.clone(),
            template: item.template.clone(),
            kind: item.kind.clone(),
            label: item.label,
            prob: p.1,
            context: item.context.clone(),
            text: item.text.clone(),
        })
        .collect();
    Breakdown {
        all: GroupScore::of(&predicted, &labels),
        by_template: group(|l| l.template.as_ref()),
        by_kind: group(|l| l.kind.as_ref()),
        misclassified,
    }
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
        assert_eq!(items[0].template, None);
        assert_eq!(select_split(items, Some("test")).len(), 1);
        for (bad, needle) in [
            ("{\"answer\":\"b\",\"label\":2}", "label"),
            ("{\"answer\":\"b\"}", "label"),
            ("{\"label\":1}", "answer"),
            ("{\"answer\":3,\"label\":1}", "answer"),
            ("[1]", "object"),
            ("{\"answer\":\"b\",\"label\":1,\"template\":3}", "template"),
        ] {
            std::fs::write(&p, format!("{{\"answer\":\"ok\",\"label\":0}}\n{bad}\n")).unwrap();
            let e = read_labelled(&p, JUDGE_KEYS).unwrap_err().to_string();
            assert!(e.contains("x.jsonl:2") && e.contains(needle), "{e}");
        }
    }

    fn item(template: &str, kind: &str, label: u8) -> Labelled {
        Labelled {
            context: format!("{template} {kind}"),
            text: format!("text {label}"),
            label,
            split: None,
            id: Some(format!("ifs-{template}")),
            template: Some(template.into()),
            kind: Some(kind.into()),
        }
    }

    /// Per-template and per-kind confusion and the misclassified items, against counts worked
    /// out by hand: raw has 1 error of 3 (a false positive), chat 1 of 2 (a false negative);
    /// full has the false positive (1 of 3 wrong), partial the false negative (1 of 2).
    #[test]
    fn breakdown_counts_each_group_and_lists_the_misses() {
        let items = vec![
            item("raw", "full", 0),
            item("raw", "full", 1),
            item("raw", "partial", 0),
            item("chat", "full", 1),
            item("chat", "partial", 1),
        ];
        let preds = [(1, 0.9), (1, 0.8), (0, 0.1), (1, 0.7), (0, 0.4)];
        let b = breakdown(&items, &preds);
        let m = |g: &GroupScore| (g.metrics.tp, g.metrics.fp, g.metrics.tn, g.metrics.fn_);
        assert_eq!(m(&b.all), (2, 1, 1, 1));
        assert_eq!(m(&b.by_template["raw"]), (1, 1, 1, 0));
        assert_eq!(m(&b.by_template["chat"]), (1, 0, 0, 1));
        assert_eq!(m(&b.by_kind["full"]), (2, 1, 0, 0));
        assert_eq!(m(&b.by_kind["partial"]), (0, 0, 1, 1));
        assert_eq!(b.by_template.len(), 2);
        let missed: Vec<(usize, u8, &str)> = b
            .misclassified
            .iter()
            .map(|x| (x.index, x.label, x.template.as_deref().unwrap()))
            .collect();
        assert_eq!(missed, vec![(0, 0, "raw"), (4, 1, "chat")]);
        assert_eq!(b.misclassified[1].prob, 0.4);
        // 3 of 5 right: the Wilson interval of 0.6 at n = 5 is (0.2307, 0.8824).
        let (lo, hi) = b.all.accuracy_ci95;
        assert!(
            (lo - 0.2307).abs() < 1e-3 && (hi - 0.8824).abs() < 1e-3,
            "{lo} {hi}"
        );
        // The JSON keeps the overall scores at the top level, as before.
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["accuracy"], 0.6);
        assert_eq!(v["fn"], 1);
        assert_eq!(v["by_kind"]["partial"]["tn"], 1);
        // Items that name no template or kind are counted overall only.
        let mut plain = items.clone();
        plain
            .iter_mut()
            .for_each(|l| (l.template, l.kind) = (None, None));
        let b = breakdown(&plain, &preds);
        assert!(b.by_template.is_empty() && b.by_kind.is_empty());
        assert_eq!(b.misclassified.len(), 2);
    }
}
