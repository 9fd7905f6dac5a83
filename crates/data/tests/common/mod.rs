//! Helpers of the sft-data integration tests: a tiny byte-level BPE tokenizer written to disk,
//! the cached MiniLM / SmolLM2 tokenizers, and writers for JSONL and parquet files.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::{json, Value};

/// GPT-2's byte-to-unicode table: printable stand-ins for the 256 bytes.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Ids of the test tokenizer's special tokens.
pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const IM_END: u32 = 258;
pub const IM_START: u32 = 259;

/// A lossless byte-level BPE tokenizer (every byte a token, plus the merges `a b` → `ab` and
/// `Ġ t` → `Ġt`) with a Llama-like post-processor that puts `<s>` first, `</s>` as EOS.
/// The `a b` merge lets a test put a token across the prompt/response boundary.
pub fn byte_tokenizer(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    // Special tokens live in the model vocabulary too, as in real tokenizers (ids contiguous).
    for (id, t) in [
        (BOS, "<s>"),
        (EOS, "</s>"),
        (IM_END, "<|im_end|>"),
        (IM_START, "<|im_start|>"),
    ] {
        vocab.insert(t.into(), json!(id));
    }
    vocab.insert("ab".into(), json!(260));
    vocab.insert("Ġt".into(), json!(261));
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(BOS, "<s>"), added(EOS, "</s>"), added(IM_END, "<|im_end|>"), added(IM_START, "<|im_start|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": ["a b", "Ġ t"]}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tok).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}"#,
    )
    .unwrap();
    dir.to_path_buf()
}

/// Ids of a text under the byte tokenizer, for texts without `ab` or ` t` (no merges apply).
pub fn bytes_ids(text: &str) -> Vec<u32> {
    assert!(!text.contains("ab") && !text.contains(" t"));
    text.bytes().map(u32::from).collect()
}

fn cache_root() -> PathBuf {
    std::env::var_os("SFT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sft"))
}

/// A cached test model's folder; panics naming the fetch script when absent.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = cache_root().join("models").join(name);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh first",
        dir.join("tokenizer.json").display()
    );
    dir
}

pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// `n` gpt4all-shaped rows with varied lengths.
pub fn gpt4all_rows(n: usize, seed: u64) -> Vec<Value> {
    let words = [
        "the", "model", "learns", "format", "quickly", "when", "data", "is", "clean", "and",
        "varied", "answers", "should", "be", "helpful", "short", "or", "long", "lists", "code",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    (0..n)
        .map(|i| {
            let pl = 3 + next() % 12;
            let rl = 2 + next() % 40;
            let p: Vec<&str> = (0..pl).map(|_| words[next() % words.len()]).collect();
            let r: Vec<&str> = (0..rl).map(|_| words[next() % words.len()]).collect();
            json!({"prompt": format!("Q{i}: {}?", p.join(" ")), "response": format!("R{i}. {}.", r.join(" ")), "source": "synthetic"})
        })
        .collect()
}

/// A parquet file of string columns (nullable; `utf8` annotates them as UTF-8 strings), with
/// `row_group` rows per row group.
pub fn write_parquet(
    path: &Path,
    columns: &[(&str, Vec<Option<Vec<u8>>>)],
    utf8: bool,
    row_group: usize,
) {
    let fields: Vec<String> = columns
        .iter()
        .map(|(name, _)| {
            if utf8 {
                format!("OPTIONAL BYTE_ARRAY {name} (UTF8);")
            } else {
                format!("OPTIONAL BYTE_ARRAY {name};")
            }
        })
        .collect();
    let schema = Arc::new(
        parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let n = columns[0].1.len();
    let mut start = 0;
    while start < n {
        let end = (start + row_group).min(n);
        let mut rg = writer.next_row_group().unwrap();
        let mut c = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            let vals = &columns[c].1[start..end];
            let data: Vec<ByteArray> = vals
                .iter()
                .flatten()
                .map(|v| ByteArray::from(v.clone()))
                .collect();
            let defs: Vec<i16> = vals.iter().map(|v| v.is_some() as i16).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&data, Some(&defs), None)
                .unwrap();
            col.close().unwrap();
            c += 1;
        }
        rg.close().unwrap();
        start = end;
    }
    writer.close().unwrap();
}

/// gpt4all rows as parquet columns.
pub fn gpt4all_parquet(path: &Path, rows: &[Value], row_group: usize) {
    let col = |k: &str| -> Vec<Option<Vec<u8>>> {
        rows.iter()
            .map(|r| {
                r.get(k)
                    .and_then(|v| v.as_str())
                    .map(|s| s.as_bytes().to_vec())
            })
            .collect()
    };
    write_parquet(
        path,
        &[
            ("prompt", col("prompt")),
            ("response", col("response")),
            ("source", col("source")),
        ],
        true,
        row_group,
    );
}

/// A parquet file with a `messages` column: list<struct<role, content>>, one conversation a row.
pub fn chat_parquet(path: &Path, convs: &[Vec<(&str, &str)>]) {
    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED group messages (LIST) { REPEATED group list { \
             REQUIRED group element { REQUIRED BYTE_ARRAY role (UTF8); REQUIRED BYTE_ARRAY content (UTF8); } } } }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().build());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    for which in 0..2 {
        let mut col = rg.next_column().unwrap().unwrap();
        let (mut data, mut defs, mut reps) = (vec![], vec![], vec![]);
        for conv in convs {
            for (k, m) in conv.iter().enumerate() {
                data.push(ByteArray::from(if which == 0 { m.0 } else { m.1 }));
                defs.push(1);
                reps.push(if k == 0 { 0 } else { 1 });
            }
        }
        col.typed::<ByteArrayType>()
            .write_batch(&data, Some(&defs), Some(&reps))
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

/// A data config over the given sources (YAML list items), with extra YAML lines.
pub fn config(sources: &str, extra: &str) -> sft_data::DataConfig {
    sft_data::DataConfig::from_yaml(&format!("sources:\n{sources}\n{extra}")).unwrap()
}

/// Build options that never touch the network and cache into `dir`.
pub fn options(dir: &Path) -> sft_data::BuildOptions {
    sft_data::BuildOptions {
        cache_dir: Some(dir.join("cache")),
        hub: sft_data::HubOptions::offline_at(dir.join("hub")),
        chunk: 7,
    }
}
