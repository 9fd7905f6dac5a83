//! `sft data inspect`: counts, the trained tokens marked (on stderr), and the counts as JSON on
//! stdout, on a run config over a small file with bad rows, with SmolLM2's tokenizer.
mod common;
use common::*;
use std::path::PathBuf;

fn write_config(dir: &std::path::Path, data: &std::path::Path, extra: &str) -> PathBuf {
    let model = cache_root().join("models/smollm2-135m-instruct");
    assert!(
        model.join("tokenizer.json").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh first",
        model.display()
    );
    let cfg = dir.join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "run: {{name: inspect-test}}\nmodel: {{source: {}}}\ndata:\n  sources: [{{path: {}}}]\n  template: alpaca_modified\n  max_length: 48\n  cache: false\n{extra}train: {{epochs: 1, micro_batch_size: 2}}\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn inspect_prints_counts_examples_and_a_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let long = "word ".repeat(80);
    std::fs::write(
        &data,
        format!(
            "{{\"prompt\": \"Name a colour.\", \"response\": \"Blue.\"}}\n\
             not json\n\
             {{\"prompt\": \"Say hi\", \"response\": \"\"}}\n\
             {{\"prompt\": \"Count to three.\", \"response\": \"One, two, three.\"}}\n\
             {{\"prompt\": \"Ramble.\", \"response\": \"{long}\"}}\n\
             {{\"prompt\": \"Hi\"}}\n"
        ),
    )
    .unwrap();
    let cfg = write_config(dir.path(), &data, "");
    let out = std::process::Command::new(sft_binary())
        .args(["data", "inspect", "--config"])
        .arg(&cfg)
        .args(["--n", "2", "--json"])
        .output()
        .unwrap();
    let last = json_last(&out);
    // The JSON on stdout, the report for people on stderr.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let text = String::from_utf8(out.stderr).unwrap();
    let keys: Vec<&str> = last
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "kept",
            "padding_ratio",
            "rows_read",
            "skipped",
            "tokens",
            "truncated"
        ]
    );
    assert_eq!(last["rows_read"], 6);
    assert_eq!(last["kept"], 2);
    assert_eq!(last["truncated"], 1);
    assert_eq!(
        last["skipped"],
        serde_json::json!({"empty_response": 1, "missing_field": 1, "not_json": 1, "over_max_length": 1})
    );
    assert!(last["tokens"].as_u64().unwrap() > 10);
    // The two kept examples fill one micro-batch of 2, padded to the longer: the padding
    // ratio is (long - short) / (2 long). The lengths are counted here with the tokenizer
    // itself, from the rendered prompt and the trained text the command prints.
    let tok = tokenizers::Tokenizer::from_file(
        cache_root().join("models/smollm2-135m-instruct/tokenizer.json"),
    )
    .unwrap();
    let mut lens = Vec::new();
    for block in text.split("\n--- example ").skip(1) {
        let (head, body) = block.split_once('\n').unwrap();
        let printed: usize = head
            .split("; ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no token count in `{head}`"));
        let (prompt, rest) = body.split_once('⟦').unwrap();
        let trained = rest.split_once('⟧').unwrap().0;
        let count = |t: &str| tok.encode(t, false).unwrap().get_ids().len();
        let n = count(prompt) + count(trained);
        assert_eq!(n, printed, "{head}: {prompt:?} + {trained:?}");
        lens.push(n);
    }
    assert_eq!(lens.len(), 2, "{text}");
    assert_eq!(
        lens.iter().sum::<usize>() as u64,
        last["tokens"].as_u64().unwrap()
    );
    let (long, short) = (lens[0].max(lens[1]), lens[0].min(lens[1]));
    assert!(
        long > short,
        "{lens:?}: equal lengths would not test the ratio"
    );
    let want = (long - short) as f64 / (2 * long) as f64;
    let pad = last["padding_ratio"].as_f64().unwrap();
    assert!(
        (pad - want).abs() < 1e-12,
        "padding {pad}, expected {want} from {lens:?}"
    );
    // The examples: the prompt as the template renders it, the response and EOS marked.
    assert!(
        text.contains("Name a colour.### Response:⟦Blue.<|im_end|>⟧"),
        "{text}"
    );
    assert!(
        text.contains("Count to three.### Response:⟦One, two, three.<|im_end|>⟧"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}:2: not_json", data.display())),
        "{text}"
    );

    // Under `on_bad_row: fail` the command stops at line 2 and says where.
    let cfg = write_config(dir.path(), &data, "  on_bad_row: fail\n");
    let out = std::process::Command::new(sft_binary())
        .args(["data", "inspect", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: bad row (not_json)", data.display())),
        "{err}"
    );
}
