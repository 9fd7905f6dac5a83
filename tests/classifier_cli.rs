//! `sft classifier eval`: the shipped tone head on a small labelled file; the last line is JSON.
mod common;
use common::*;
use std::path::Path;

/// `sft classifier eval --input FILE`.
fn classifier_eval(input: &Path) -> std::process::Output {
    std::process::Command::new(sft_binary())
        .args(["classifier", "eval", "--input"])
        .arg(input)
        .output()
        .unwrap()
}

#[test]
fn classifier_eval_prints_metrics_as_json_last() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("eval.jsonl");
    let lines = [
        serde_json::json!({"instruction": "What is the capital of France?", "response": "The capital of France is Paris.", "label": 1}),
        serde_json::json!({"instruction": "How do plants make food?", "response": "Plants make food by photosynthesis: they use sunlight to turn water and carbon dioxide into sugar and oxygen.", "label": 1}),
        serde_json::json!({"instruction": "What is the capital", "response": "of France? The capital of France is Paris.", "label": 0}),
        serde_json::json!({"instruction": "Name a colour.", "response": "", "label": 0}),
        // Labelled 1 but a continuation: the classifier should say 0, a false negative.
        serde_json::json!({"instruction": "Tell me", "response": "about the moon.\n### Instruction:\nTell me about the sun.", "label": 1}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let out = classifier_eval(&input);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let last = json_last(&out);
    assert_eq!(last["n"], 5);
    assert_eq!(
        (last["tp"].as_u64(), last["fn"].as_u64()),
        (Some(2), Some(1)),
        "{stdout}"
    );
    assert_eq!(
        (last["tn"].as_u64(), last["fp"].as_u64()),
        (Some(2), Some(0)),
        "{stdout}"
    );
    assert!((last["accuracy"].as_f64().unwrap() - 0.8).abs() < 1e-9);
    assert!((last["recall"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    // No false positive: precision 2/2; F1 = 2PR / (P + R) = 2 * (2/3) / (5/3) = 0.8.
    assert!(
        (last["precision"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{stdout}"
    );
    assert!(
        (last["f1"].as_f64().unwrap() - 0.8).abs() < 1e-9,
        "{stdout}"
    );

    // A bad line is reported with its file and line.
    std::fs::write(&input, "{\"response\": \"x\", \"label\": 7}\n").unwrap();
    let out = classifier_eval(&input);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eval.jsonl:1") && err.contains("label"),
        "{err}"
    );
}
