//! Sources, column mappings and bad input: every file kind gives the same examples, every
//! malformed row is counted by reason (or stops the run naming its file and line).
mod common;

use common::*;
use serde_json::json;
use sft_data::{build_dataset, DataError, TokenizerFiles};

fn tok(dir: &std::path::Path) -> TokenizerFiles {
    TokenizerFiles::from_dir(&byte_tokenizer(&dir.join("tok"))).unwrap()
}

#[test]
fn every_file_kind_gives_the_same_examples() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    std::fs::create_dir_all(&d).unwrap();
    let rows = gpt4all_rows(20, 1);
    write_jsonl(&d.join("a.jsonl"), &rows);
    std::fs::write(d.join("b.json"), serde_json::to_vec_pretty(&rows).unwrap()).unwrap();
    write_jsonl(&d.join("c.json"), &rows); // JSON lines named .json
    gpt4all_parquet(&d.join("d.parquet"), &rows, 6); // four row groups
    let cfg = config(
        &format!("  - path: {}/*", d.display()),
        "template: raw\ncache: false",
    );
    let ds = build_dataset(&cfg, &tok(dir.path()), &options(dir.path())).unwrap();
    assert_eq!(ds.files.len(), 4);
    assert_eq!(ds.report.rows_read, 80);
    assert_eq!(ds.report.kept, 80);
    assert!(ds.report.skipped.is_empty(), "{:?}", ds.report.skipped);
    for f in 1..4 {
        for i in 0..20 {
            assert_eq!(
                ds.train.get(i).ids,
                ds.train.get(f * 20 + i).ids,
                "file {f} row {i}"
            );
        }
    }
    // Origins name the file and place of each example.
    assert_eq!(
        ds.origin(ds.train.get(3).origin),
        format!("{}:4", d.join("a.jsonl").display())
    );
    assert_eq!(
        ds.origin(ds.train.get(23).origin),
        format!("{}: element 3", d.join("b.json").display())
    );
    assert_eq!(
        ds.origin(ds.train.get(43).origin),
        format!("{}:4", d.join("c.json").display())
    );
    assert_eq!(
        ds.origin(ds.train.get(73).origin),
        format!("{}: parquet row 13", d.join("d.parquet").display())
    );
    // Raw template: the prompt tokens are <s> + the prompt's bytes.
    let p = rows[0]["prompt"].as_str().unwrap();
    let e = ds.train.get(0);
    assert_eq!(e.ids[0], BOS);
    assert_eq!(common_decode(dir.path(), &e.ids[1..e.prompt_len]), p);
}

fn common_decode(dir: &std::path::Path, ids: &[u32]) -> String {
    let enc = sft_data::Encoder::load(&tok(dir), None).unwrap();
    enc.decode(ids).unwrap()
}

#[test]
fn column_mappings() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_jsonl(
        &p.join("alpaca.jsonl"),
        &[
            json!({"instruction": "Sum", "input": "2 and 3", "output": "5"}),
            json!({"instruction": "Hi", "input": "", "output": "Hello"}),
        ],
    );
    write_jsonl(
        &p.join("named.jsonl"),
        &[json!({"q": "Why?", "ans": "Because.", "ctx": "Sky"})],
    );
    write_jsonl(
        &p.join("chat.jsonl"),
        &[
            json!({"messages": [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                               {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]}),
        ],
    );
    chat_parquet(
        &p.join("chat.parquet"),
        &[
            vec![("system", "S"), ("user", "Q"), ("assistant", "A")],
            vec![("user", "Q2"), ("assistant", "A2")],
        ],
    );
    let sources = format!(
        "  - path: {0}/alpaca.jsonl\n  - path: {0}/named.jsonl\n    columns: {{prompt: q, response: ans, input: ctx}}\n  - path: {0}/chat.jsonl\n  - path: {0}/chat.parquet\n    columns: {{messages: messages}}",
        p.display()
    );
    let cfg = config(&sources, "template: alpaca_instruction\ncache: false");
    let ds = build_dataset(&cfg, &tok(p), &options(p)).unwrap();
    assert_eq!(ds.report.kept, 6, "{:?}", ds.report);
    let enc = sft_data::Encoder::load(&tok(p), None).unwrap();
    let text = |i: usize| {
        let e = ds.train.get(i);
        (
            enc.decode(&e.ids[1..e.prompt_len]).unwrap(),
            enc.decode(e.trained()).unwrap(),
        )
    };
    assert_eq!(
        text(0),
        (
            "### Instruction:\nSum\n\n### Input:\n2 and 3\n\n### Response:\n".into(),
            "5</s>".into()
        )
    );
    assert_eq!(
        text(1),
        (
            "### Instruction:\nHi\n\n### Response:\n".into(),
            "Hello</s>".into()
        )
    );
    assert_eq!(
        text(2),
        (
            "### Instruction:\nWhy?\n\n### Input:\nSky\n\n### Response:\n".into(),
            "Because.</s>".into()
        )
    );
    assert_eq!(
        text(3),
        (
            "### Instruction:\nU1\n\n### Response:\nA1\n\n### Instruction:\nU2\n\n### Response:\n"
                .into(),
            "A2</s>".into()
        )
    );
    assert_eq!(
        text(4),
        (
            "S\n\n### Instruction:\nQ\n\n### Response:\n".into(),
            "A</s>".into()
        )
    );
    assert_eq!(text(5).1, "A2</s>".to_string());
}

#[test]
fn bad_rows_are_counted_by_reason_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"prompt\": \"ok\", \"response\": \"fine\"}\n");
    bytes.extend_from_slice(b"this is not json\n");
    bytes.extend_from_slice(b"{\"prompt\": \"p\", \"response\": \"caf\xe9\"}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"p\"}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"p\", \"response\": 5}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"p\", \"response\": \"\"}\n");
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(b"[1, 2]\n");
    bytes.extend_from_slice(b"{\"prompt\": \"\", \"response\": \"r\"}\n");
    bytes.extend_from_slice(b"{\"prompt\": \"ok 2\", \"response\": \"fine 2\"}");
    let bad = p.join("bad.jsonl");
    std::fs::write(&bad, &bytes).unwrap();
    let src = format!("  - path: {}", bad.display());
    let ds = build_dataset(&config(&src, "cache: false"), &tok(p), &options(p)).unwrap();
    let r = &ds.report;
    assert_eq!(r.rows_read, 9);
    assert_eq!(r.kept, 2);
    let want: std::collections::BTreeMap<String, u64> = [
        ("not_json", 1),
        ("invalid_utf8", 1),
        ("missing_field", 1),
        ("non_string_field", 1),
        ("empty_response", 1),
        ("not_object", 1),
        ("empty_instruction", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(r.skipped, want);
    let at = |line: usize, why: &str| format!("{}:{line}: {why}", bad.display());
    for (line, why) in [
        (2, "not_json"),
        (3, "invalid_utf8"),
        (4, "missing_field"),
        (5, "non_string_field"),
        (6, "empty_response"),
        (8, "not_object"),
        (9, "empty_instruction"),
    ] {
        assert!(
            r.bad_row_samples
                .iter()
                .any(|s| s.starts_with(&at(line, why))),
            "{line} {why}: {:?}",
            r.bad_row_samples
        );
    }
    // The same file under `on_bad_row: fail` stops at line 2.
    let err = build_dataset(
        &config(&src, "cache: false\non_bad_row: fail"),
        &tok(p),
        &options(p),
    )
    .unwrap_err();
    match &err {
        DataError::BadRow { origin, reason, .. } => {
            assert_eq!(origin.to_string(), format!("{}:2", bad.display()));
            assert_eq!(reason, "not_json");
        }
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("bad.jsonl:2"), "{err}");
    // Each kind alone stops the run at its line.
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    for (i, why) in [
        (2usize, "invalid_utf8"),
        (3, "missing_field"),
        (4, "non_string_field"),
        (5, "empty_response"),
        (7, "not_object"),
    ] {
        let one = p.join(format!("one{i}.jsonl"));
        let mut b = lines[0].to_vec();
        b.push(b'\n');
        b.extend_from_slice(lines[i]);
        std::fs::write(&one, b).unwrap();
        let src = format!("  - path: {}", one.display());
        let err = build_dataset(
            &config(&src, "cache: false\non_bad_row: fail"),
            &tok(p),
            &options(p),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{}:2: bad row ({why})", one.display())),
            "{msg}"
        );
    }
}

#[test]
fn bad_parquet_rows_name_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let s = |t: &str| Some(t.as_bytes().to_vec());
    // Unannotated byte arrays: text when valid UTF-8, a bad row otherwise.
    let f = p.join("raw.parquet");
    write_parquet(
        &f,
        &[
            ("prompt", vec![s("a"), s("b"), s("c"), s("d")]),
            (
                "response",
                vec![s("x"), Some(vec![0x63, 0xff]), None, s("w")],
            ),
        ],
        false,
        2,
    );
    let src = format!("  - path: {}", f.display());
    let ds = build_dataset(&config(&src, "cache: false"), &tok(p), &options(p)).unwrap();
    assert_eq!(ds.report.rows_read, 4);
    assert_eq!(ds.report.kept, 2);
    assert_eq!(ds.report.skipped.get("invalid_utf8"), Some(&1));
    assert_eq!(ds.report.skipped.get("missing_field"), Some(&1));
    assert!(
        ds.report
            .bad_row_samples
            .iter()
            .any(|m| m.starts_with(&format!("{}: parquet row 1: invalid_utf8", f.display()))),
        "{:?}",
        ds.report.bad_row_samples
    );
    assert!(ds
        .report
        .bad_row_samples
        .iter()
        .any(|m| m.starts_with(&format!("{}: parquet row 2: missing_field", f.display()))));
    let err = build_dataset(
        &config(&src, "cache: false\non_bad_row: fail"),
        &tok(p),
        &options(p),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}: parquet row 1: bad row (invalid_utf8)",
            f.display()
        )),
        "{err}"
    );

    // Invalid UTF-8 in a column annotated as UTF-8: the record reader fails the row and every
    // later row of its row group; those are counted, the next row group is read.
    let f = p.join("utf8.parquet");
    write_parquet(
        &f,
        &[
            ("prompt", vec![s("a"), s("b"), s("c"), s("d"), s("e")]),
            (
                "response",
                vec![s("x"), Some(vec![0xff]), s("y"), s("v"), s("w")],
            ),
        ],
        true,
        3,
    );
    let src = format!("  - path: {}", f.display());
    let ds = build_dataset(&config(&src, "cache: false"), &tok(p), &options(p)).unwrap();
    assert_eq!(
        (ds.report.rows_read, ds.report.kept),
        (5, 3),
        "{:?}",
        ds.report
    );
    assert_eq!(ds.report.skipped.get("invalid_utf8"), Some(&2));
    let samples = &ds.report.bad_row_samples;
    assert!(
        samples[0].starts_with(&format!("{}: parquet row 1: invalid_utf8", f.display())),
        "{samples:?}"
    );
    assert!(
        samples[1].starts_with(&format!("{}: parquet row 2: invalid_utf8", f.display())),
        "{samples:?}"
    );
    let kept: Vec<u64> = (0..3)
        .map(|i| ds.train.get(i).origin.1 & ((1 << 62) - 1))
        .collect();
    assert_eq!(kept, vec![0, 3, 4]);
}

#[test]
fn malformed_json_array_is_a_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let f = p.join("broken.json");
    std::fs::write(
        &f,
        "[\n {\"prompt\": \"a\", \"response\": \"b\"},\n {\"prompt\": \n",
    )
    .unwrap();
    let src = format!("  - path: {}", f.display());
    let err = build_dataset(&config(&src, "cache: false"), &tok(p), &options(p)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken.json") && msg.contains("line 4"),
        "{msg}"
    );
    let err = build_dataset(
        &config(&format!("  - path: {}/nothing-*.jsonl", p.display()), ""),
        &tok(p),
        &options(p),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no file matches"), "{err}");
}

#[test]
fn filters_max_chars_and_max_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let f = p.join("d.jsonl");
    write_jsonl(
        &f,
        &[
            json!({"prompt": "short", "response": "yes"}),
            json!({"prompt": "x".repeat(50), "response": "y".repeat(60)}),
            json!({"prompt": "q", "response": "r"}),
        ],
    );
    let src = format!("  - path: {}", f.display());
    let ds = build_dataset(
        &config(&src, "cache: false\nmax_chars: 100\non_bad_row: fail"),
        &tok(p),
        &options(p),
    )
    .unwrap();
    assert_eq!((ds.report.rows_read, ds.report.kept), (3, 2));
    assert_eq!(ds.report.skipped.get("over_max_chars"), Some(&1));
    let ds = build_dataset(
        &config(&src, "cache: false\nmax_rows: 2"),
        &tok(p),
        &options(p),
    )
    .unwrap();
    assert_eq!((ds.report.rows_read, ds.report.kept), (2, 2));
}

/// Writes a hub cache folder the way hf-hub lays it out, with a train and a test parquet file.
fn hub_cache(root: &std::path::Path, rows: &[serde_json::Value]) -> std::path::PathBuf {
    let repo = root.join("datasets--nomic-ai--gpt4all-j-prompt-generations");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/v1.3-groovy"), commit).unwrap();
    let blob = repo.join("blobs/3f1a");
    gpt4all_parquet(&blob, rows, 4);
    std::os::unix::fs::symlink(
        "../../../blobs/3f1a",
        snap.join("train-00000-of-00001.parquet"),
    )
    .unwrap();
    gpt4all_parquet(&snap.join("test-00000-of-00001.parquet"), &rows[..3], 4);
    std::fs::write(snap.join("../README.md"), "# card").unwrap();
    repo
}

#[test]
fn hub_dataset_from_an_offline_cache() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let rows = gpt4all_rows(10, 7);
    hub_cache(&p.join("hub"), &rows);
    let src = "  - hub: nomic-ai/gpt4all-j-prompt-generations\n    revision: v1.3-groovy\n    split: train";
    let ds = build_dataset(&config(src, "cache: false"), &tok(p), &options(p)).unwrap();
    assert_eq!(ds.files.len(), 1);
    assert!(
        ds.files[0].ends_with("data/train-00000-of-00001.parquet"),
        "{:?}",
        ds.files
    );
    assert_eq!((ds.report.rows_read, ds.report.kept), (10, 10));
    let src_test = src.replace("split: train", "split: test");
    let ds = build_dataset(&config(&src_test, "cache: false"), &tok(p), &options(p)).unwrap();
    assert_eq!(ds.report.rows_read, 3);
    // A revision the cache lacks: the error says which and where.
    let err = build_dataset(
        &config(&src.replace("v1.3-groovy", "v1.2-jazzy"), "cache: false"),
        &tok(p),
        &options(p),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("v1.2-jazzy") && msg.contains("refs"), "{msg}");
}
