//! Benchmark of the data path: 100k synthetic gpt4all-shaped rows (JSONL and parquet) read,
//! templated, tokenized and cached, then loaded from the cache, then batched for one epoch.
//! Run through `scripts/bench/data/run.sh`.
//!
//! Usage: bench_data TOKENIZER_DIR [ROWS]
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sft_data::{build_dataset, BuildOptions, DataConfig, HubOptions, TokenizerFiles};

fn rows(n: usize) -> Vec<serde_json::Value> {
    let words = [
        "the", "model", "learns", "a", "format", "quickly", "when", "its", "data", "is", "clean",
        "and", "varied;", "answers", "should", "be", "helpful,", "short", "or", "long.", "Lists",
        "of", "code", "explain", "why", "rust", "python", "memory", "safety", "matters", "1.",
        "2.",
    ];
    let mut x = 42u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    (0..n)
        .map(|i| {
            // Prompts of 5-40 words, responses of 10-300 words: gpt4all-like lengths.
            let pl = 5 + next() % 36;
            let rl = 10 + next() % 291;
            let p: Vec<&str> = (0..pl).map(|_| words[next() % words.len()]).collect();
            let r: Vec<&str> = (0..rl).map(|_| words[next() % words.len()]).collect();
            json!({"prompt": format!("{} {}?", i, p.join(" ")), "response": r.join(" "), "source": "bench"})
        })
        .collect()
}

fn write_parquet(path: &Path, rows: &[serde_json::Value]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message s { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY response (UTF8); REQUIRED BYTE_ARRAY source (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for chunk in rows.chunks(10_000) {
        let mut rg = w.next_row_group().unwrap();
        for key in ["prompt", "response", "source"] {
            let mut col = rg.next_column().unwrap().unwrap();
            let vals: Vec<ByteArray> = chunk
                .iter()
                .map(|r| ByteArray::from(r[key].as_str().unwrap()))
                .collect();
            col.typed::<ByteArrayType>()
                .write_batch(&vals, None, None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tok_dir = args.get(1).expect("usage: bench_data TOKENIZER_DIR [ROWS]");
    let n: usize = args
        .get(2)
        .map(|s| s.parse().expect("ROWS"))
        .unwrap_or(100_000);
    let tok = TokenizerFiles::from_dir(Path::new(tok_dir)).expect("tokenizer folder");
    let dir = tempfile::tempdir().unwrap();
    let data = rows(n);
    let jsonl = dir.path().join("bench.jsonl");
    let mut text = String::new();
    for r in &data {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(&jsonl, text).unwrap();
    let parquet = dir.path().join("bench.parquet");
    write_parquet(&parquet, &data);
    let mb = |p: &Path| std::fs::metadata(p).unwrap().len() as f64 / 1e6;
    println!(
        "rows: {n}; jsonl {:.1} MB, parquet {:.1} MB; tokenizer {}; threads {}",
        mb(&jsonl),
        mb(&parquet),
        tok.tokenizer_json.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let opts = BuildOptions {
        cache_dir: Some(dir.path().join("cache")),
        hub: HubOptions::offline_at(dir.path().join("hub")),
        ..BuildOptions::default()
    };
    for (name, path) in [("jsonl", &jsonl), ("parquet", &parquet)] {
        let cfg = DataConfig::from_yaml(&format!(
            "sources: [{{path: {}}}]\ntemplate: alpaca_modified\nmax_length: 1024\neval_split: 0.01\nmax_batch_tokens: 8192",
            path.display()
        ))
        .unwrap();
        let t = Instant::now();
        let ds = build_dataset(&cfg, &tok, &opts).unwrap();
        let cold = t.elapsed().as_secs_f64();
        assert!(!ds.report.from_cache);
        let t = Instant::now();
        let warm = build_dataset(&cfg, &tok, &opts).unwrap();
        let cached = t.elapsed().as_secs_f64();
        assert!(warm.report.from_cache);
        let r = &ds.report;
        println!(
            "{name}: read+template+tokenize+cache {:.2} s = {:.0} rows/s ({} kept, {} tokens, {:.0} tokens/s, {} boundary retokenized); from cache {:.3} s = {:.0} rows/s",
            cold,
            n as f64 / cold,
            r.kept,
            r.tokens,
            r.tokens as f64 / cold,
            r.boundary_retokenized,
            cached,
            n as f64 / cached
        );
        if name == "jsonl" {
            let set = Arc::new(ds.train);
            for (label, bo) in [
                ("grouped", cfg.batch_options(16)),
                (
                    "packed",
                    DataConfig {
                        pack: true,
                        ..cfg.clone()
                    }
                    .batch_options(8),
                ),
            ] {
                let t = Instant::now();
                let mut b = sft_data::Batcher::new(set.clone(), ds.pad_id, bo).unwrap();
                let nb = b.batches_in_epoch(0);
                let (mut ex, mut real, mut slots) = (0usize, 0usize, 0usize);
                for _ in 0..nb {
                    let batch = b.next_batch();
                    ex += batch.num_examples();
                    real += batch.real_tokens;
                    slots += batch.rows * batch.seq_len;
                }
                let s = t.elapsed().as_secs_f64();
                println!(
                    "batches ({label}): one epoch of {ex} examples in {nb} batches, {:.2} s = {:.0} rows/s, padding {:.4}",
                    s,
                    ex as f64 / s,
                    1.0 - real as f64 / slots as f64
                );
            }
        }
    }
}
