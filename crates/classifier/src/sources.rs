//! Instruction/response pairs for the tone recipe: JSONL files in the common shapes, and
//! OpenAssistant/oasst1 (each conversation's first prompt and its best-ranked reply, as the
//! paper uses it) from its parquet files, read locally or through hf-hub.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One instruction and the response an assistant gave to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub instruction: String,
    pub response: String,
}

/// Field names tried, in order, for the instruction and the response of a JSONL line.
pub const INSTRUCTION_KEYS: &[&str] = &["prompt", "instruction", "question"];
pub const RESPONSE_KEYS: &[&str] = &["response", "output", "answer", "completion"];

/// Reads pairs from a JSONL file: `{"prompt"|"instruction"|"question": ..,
/// "response"|"output"|"answer"|"completion": .., "input"?: ..}` (a non-empty `input` is
/// appended to the instruction after a blank line). Blank lines are skipped; a line that is not
/// such an object is an error naming the file and line. Pairs with an empty side are dropped.
pub fn read_pairs_jsonl(path: impl AsRef<Path>) -> Result<Vec<Pair>> {
    read_pairs_jsonl_split(path, None)
}

/// [`read_pairs_jsonl`], keeping only the lines whose `"split"` field is `split` (when given).
pub fn read_pairs_jsonl_split(path: impl AsRef<Path>, split: Option<&str>) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for_each_object(path.as_ref(), |obj, err| {
        let field = |keys: &[&str]| -> Result<String> {
            for k in keys {
                if let Some(v) = obj.get(*k) {
                    return v
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(format!("field `{k}` must be a string")));
                }
            }
            Err(err(format!("expected one of the fields {keys:?}")))
        };
        if let Some(want) = split {
            if obj.get("split").and_then(|v| v.as_str()) != Some(want) {
                return Ok(());
            }
        }
        let mut instruction = field(INSTRUCTION_KEYS)?;
        let response = field(RESPONSE_KEYS)?;
        if let Some(input) = obj.get("input").and_then(|v| v.as_str()) {
            if !input.trim().is_empty() {
                instruction = format!("{instruction}\n\n{input}");
            }
        }
        if instruction.trim().is_empty() || response.trim().is_empty() {
            return Ok(());
        }
        pairs.push(Pair {
            instruction,
            response,
        });
        Ok(())
    })?;
    Ok(pairs)
}

/// Calls `f` with each JSON object of a JSONL file and a function that makes an error naming
/// the file and line; blank lines are skipped, a line that is not a JSON object is an error.
pub(crate) fn for_each_object(
    path: &Path,
    mut f: impl FnMut(
        &serde_json::Map<String, serde_json::Value>,
        &dyn Fn(String) -> Error,
    ) -> Result<()>,
) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        f(obj, &err)?;
    }
    Ok(())
}

/// The hub id of OpenAssistant's first release.
pub const OASST1: &str = "OpenAssistant/oasst1";

struct Message {
    parent: Option<String>,
    text: String,
    role: String,
    lang: String,
    rank: Option<f64>,
}

/// First prompts and their best reply from an oasst1 parquet file (its message table:
/// `message_id`, `parent_id`, `text`, `role`, `lang`, `rank`). The reply of lowest `rank`
/// wins (unranked ones last, then by id); `lang` keeps only that language (the encoder is
/// English). Deleted messages are skipped when the column says so.
pub fn oasst1_pairs_from_parquet(path: impl AsRef<Path>, lang: Option<&str>) -> Result<Vec<Pair>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let perr = |row: usize, msg: String| Error::Line {
        path: path.to_path_buf(),
        line: row,
        msg,
    };
    let reader = SerializedFileReader::new(file).map_err(|e| perr(0, e.to_string()))?;
    let mut messages: HashMap<String, Message> = HashMap::new();
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| perr(0, e.to_string()))?;
    for (r, row) in rows.enumerate() {
        let row = row.map_err(|e| perr(r + 1, e.to_string()))?;
        let mut id = None;
        let mut m = Message {
            parent: None,
            text: String::new(),
            role: String::new(),
            lang: String::new(),
            rank: None,
        };
        let mut deleted = false;
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("message_id", Field::Str(s)) => id = Some(s.clone()),
                ("parent_id", Field::Str(s)) => m.parent = Some(s.clone()),
                ("text", Field::Str(s)) => m.text = s.clone(),
                ("role", Field::Str(s)) => m.role = s.clone(),
                ("lang", Field::Str(s)) => m.lang = s.clone(),
                ("rank", Field::Double(v)) => m.rank = Some(*v),
                ("rank", Field::Float(v)) => m.rank = Some(*v as f64),
                ("rank", Field::Long(v)) => m.rank = Some(*v as f64),
                ("rank", Field::Int(v)) => m.rank = Some(*v as f64),
                ("deleted", Field::Bool(b)) => deleted = *b,
                _ => {}
            }
        }
        let id = id.ok_or_else(|| perr(r + 1, "missing string column `message_id`".into()))?;
        if !deleted {
            messages.insert(id, m);
        }
    }
    // Best reply per parent.
    let mut best: HashMap<&str, (&str, &Message)> = HashMap::new();
    for (id, m) in &messages {
        let Some(parent) = m.parent.as_deref() else {
            continue;
        };
        if m.role != "assistant" || m.text.trim().is_empty() {
            continue;
        }
        let key = |id: &str, m: &Message| (m.rank.unwrap_or(f64::INFINITY), id.to_string());
        match best.get(parent) {
            Some((bid, bm)) if key(bid, bm) <= key(id, m) => {}
            _ => {
                best.insert(parent, (id.as_str(), m));
            }
        }
    }
    let mut roots: Vec<(&String, &Message)> = messages
        .iter()
        .filter(|(_, m)| m.parent.is_none() && m.role == "prompter")
        .filter(|(_, m)| lang.is_none_or(|l| m.lang == l))
        .collect();
    roots.sort_by(|a, b| a.0.cmp(b.0));
    Ok(roots
        .into_iter()
        .filter(|(_, m)| !m.text.trim().is_empty())
        .filter_map(|(id, m)| {
            best.get(id.as_str()).map(|(_, reply)| Pair {
                instruction: m.text.clone(),
                response: reply.text.clone(),
            })
        })
        .collect())
}

/// Downloads oasst1's train split through hf-hub (cached as hf-hub does) and reads its pairs.
pub fn oasst1_pairs_from_hub(revision: Option<&str>, lang: Option<&str>) -> Result<Vec<Pair>> {
    use hf_hub::{api::sync::Api, Repo, RepoType};
    let api = Api::new().map_err(|e| Error::Hub(e.to_string()))?;
    let repo = match revision {
        Some(rev) => Repo::with_revision(OASST1.into(), RepoType::Dataset, rev.into()),
        None => Repo::new(OASST1.into(), RepoType::Dataset),
    };
    let repo = api.repo(repo);
    let info = repo
        .info()
        .map_err(|e| Error::Hub(format!("{OASST1}: {e}")))?;
    let mut files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.starts_with("data/train") && f.ends_with(".parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Hub(format!("{OASST1}: no data/train*.parquet file")));
    }
    let mut pairs = Vec::new();
    for f in files {
        let local: PathBuf = repo
            .get(&f)
            .map_err(|e| Error::Hub(format!("{OASST1}/{f}: {e}")))?;
        pairs.extend(oasst1_pairs_from_parquet(&local, lang)?);
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_common_shapes_and_names_bad_lines() {
        let (_dir, p) = crate::testing::temp_file(
            "a.jsonl",
            concat!(
                "{\"prompt\": \"Hi?\", \"response\": \"Hello.\"}\n",
                "\n",
                "{\"instruction\": \"Sum\", \"input\": \"1 2\", \"output\": \"3\"}\n",
                "{\"question\": \"Q\", \"answer\": \"\"}\n",
            ),
        );
        let pairs = read_pairs_jsonl(&p).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].instruction, "Sum\n\n1 2");
        assert_eq!(pairs[1].response, "3");

        std::fs::write(
            &p,
            "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"prompt\": 3}\n",
        )
        .unwrap();
        let e = read_pairs_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:2") && e.contains("prompt"), "{e}");
        std::fs::write(&p, "{\"prompt\": \"x\"}\n").unwrap();
        let e = read_pairs_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("response"), "{e}");
        std::fs::write(&p, "not json\n").unwrap();
        assert!(read_pairs_jsonl(&p).unwrap_err().to_string().contains(":1"));
    }

    /// Writes a small oasst1-shaped message table with the parquet crate.
    fn write_oasst(path: &Path) {
        use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let schema = "message schema {
            REQUIRED BYTE_ARRAY message_id (UTF8);
            OPTIONAL BYTE_ARRAY parent_id (UTF8);
            REQUIRED BYTE_ARRAY text (UTF8);
            REQUIRED BYTE_ARRAY role (UTF8);
            REQUIRED BYTE_ARRAY lang (UTF8);
            OPTIONAL DOUBLE rank;
        }";
        // id, parent, text, role, lang, rank
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            &'a str,
            &'a str,
            &'a str,
            Option<f64>,
        );
        let rows: &[Row] = &[
            ("a", None, "What is 2+2?", "prompter", "en", None),
            ("a1", Some("a"), "It is 5.", "assistant", "en", Some(1.0)),
            ("a2", Some("a"), "2+2 is 4.", "assistant", "en", Some(0.0)),
            ("a2x", Some("a2"), "Why?", "prompter", "en", None),
            ("b", None, "Wie spät ist es?", "prompter", "de", None),
            ("b1", Some("b"), "Zwölf.", "assistant", "de", None),
            ("c", None, "Unanswered", "prompter", "en", None),
        ];
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let file = std::fs::File::create(path).unwrap();
        let mut w =
            SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::new())).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let columns: Vec<Vec<Option<&str>>> = vec![
            rows.iter().map(|r: &Row| Some(r.0)).collect(),
            rows.iter().map(|r: &Row| r.1).collect(),
            rows.iter().map(|r: &Row| Some(r.2)).collect(),
            rows.iter().map(|r: &Row| Some(r.3)).collect(),
            rows.iter().map(|r: &Row| Some(r.4)).collect(),
        ];
        for (i, col) in columns.iter().enumerate() {
            let vals: Vec<ByteArray> = col.iter().flatten().map(|s| ByteArray::from(*s)).collect();
            let defs: Vec<i16> = col.iter().map(|v| v.is_some() as i16).collect();
            let mut cw = rg.next_column().unwrap().unwrap();
            let defs = if i == 1 { Some(defs.as_slice()) } else { None };
            cw.typed::<ByteArrayType>()
                .write_batch(&vals, defs, None)
                .unwrap();
            cw.close().unwrap();
        }
        let ranks: Vec<f64> = rows.iter().filter_map(|r| r.5).collect();
        let defs: Vec<i16> = rows.iter().map(|r| r.5.is_some() as i16).collect();
        let mut cw = rg.next_column().unwrap().unwrap();
        cw.typed::<DoubleType>()
            .write_batch(&ranks, Some(&defs), None)
            .unwrap();
        cw.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn oasst1_first_prompts_with_their_best_reply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.parquet");
        write_oasst(&p);
        let en = oasst1_pairs_from_parquet(&p, Some("en")).unwrap();
        assert_eq!(
            en,
            vec![Pair {
                instruction: "What is 2+2?".into(),
                response: "2+2 is 4.".into()
            }]
        );
        let all = oasst1_pairs_from_parquet(&p, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].response, "Zwölf.");
    }
}
