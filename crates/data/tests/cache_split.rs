//! The tokenized-data cache and the held-out split.
mod common;

use common::*;
use sft_data::{build_dataset, TokenizerFiles};

struct Env {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    data: std::path::PathBuf,
    tok: TokenizerFiles,
}

fn env(n: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("d.jsonl");
    write_jsonl(&data, &gpt4all_rows(n, 3));
    let tok = TokenizerFiles::from_dir(&byte_tokenizer(&root.join("tok"))).unwrap();
    Env {
        _dir: dir,
        root,
        data,
        tok,
    }
}

impl Env {
    fn build(&self, extra: &str) -> sft_data::Dataset {
        let cfg = config(&format!("  - path: {}", self.data.display()), extra);
        build_dataset(&cfg, &self.tok, &options(&self.root)).unwrap()
    }
}

#[test]
fn the_second_build_comes_from_the_cache() {
    let e = env(50);
    let a = e.build("eval_split: 5");
    assert!(!a.report.from_cache);
    let b = e.build("eval_split: 5");
    assert!(b.report.from_cache);
    assert_eq!(a.train, b.train);
    assert_eq!(a.eval, b.eval);
    assert_eq!(a.report.cache_key, b.report.cache_key);
    let mut ra = a.report.clone();
    ra.from_cache = true;
    assert_eq!(ra, b.report);
    // The split and batching are applied after the cache: changing them reuses it.
    assert!(
        e.build("eval_split: 0.2\nseed: 4\npack: true")
            .report
            .from_cache
    );
    // What shapes the tokens changes the key.
    for extra in [
        "template: chatml",
        "max_length: 40",
        "truncation: cut\nmax_length: 40",
        "max_chars: 100",
        "on_bad_row: fail",
        "eos_token: <|im_end|>",
    ] {
        let d = e.build(extra);
        assert!(!d.report.from_cache, "{extra}");
        assert_ne!(d.report.cache_key, a.report.cache_key, "{extra}");
        assert!(e.build(extra).report.from_cache, "{extra}");
    }
    // Editing the data file changes the key.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_jsonl(&e.data, &gpt4all_rows(51, 3));
    let c = e.build("eval_split: 5");
    assert!(!c.report.from_cache);
    assert_eq!(c.report.kept, 51);
    // `cache: false` neither reads nor writes.
    assert!(!e.build("eval_split: 5\ncache: false").report.from_cache);
}

#[test]
fn a_damaged_entry_is_rebuilt() {
    let e = env(20);
    let a = e.build("");
    let entry = e.root.join("cache").join(&a.report.cache_key);
    let tokens = entry.join("tokens.u32");
    let len = std::fs::metadata(&tokens).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tokens)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    let b = e.build("");
    assert!(!b.report.from_cache);
    assert_eq!(a.train, b.train);
    assert!(
        e.build("").report.from_cache,
        "the rebuilt entry replaced the damaged one"
    );
}

#[test]
fn the_held_out_split_is_seeded_and_disjoint() {
    let e = env(40);
    let all = e.build("").train;
    for (extra, k) in [("eval_split: 0.1", 4usize), ("eval_split: 7", 7)] {
        let a = e.build(extra);
        assert_eq!((a.eval.len(), a.train.len()), (k, 40 - k));
        assert_eq!(
            (a.report.eval_examples, a.report.train_examples),
            (k as u64, 40 - k as u64)
        );
        let b = e.build(extra);
        assert_eq!(a.eval, b.eval);
        // Disjoint, and together the whole set.
        let mut origins: Vec<u64> = a
            .train
            .origins
            .iter()
            .chain(&a.eval.origins)
            .map(|o| o.1)
            .collect();
        origins.sort_unstable();
        assert_eq!(origins, all.origins.iter().map(|o| o.1).collect::<Vec<_>>());
        let other = e.build(&format!("{extra}\nseed: 1"));
        assert_ne!(a.eval.origins, other.eval.origins);
    }
    let cfg = config(&format!("  - path: {}", e.data.display()), "eval_split: 40");
    let err = build_dataset(&cfg, &e.tok, &options(&e.root)).unwrap_err();
    assert!(err.to_string().contains("eval_split"), "{err}");
}
