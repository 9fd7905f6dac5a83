//! The shipped tone classifier on real model outputs: 240 responses of SmolLM2-135M-Instruct to
//! the first 30 bundled IFS instructions (full and fragment) under four prompt templates,
//! labelled by hand (`crates/ifs/assets/smollm2_outputs_labelled.jsonl`, documented in
//! `crates/ifs/assets/real_outputs_README.md`). A regression guard: 209/240 = 0.871 when the set
//! was written; 230/240 = 0.958 with the head retrained on the widened recipe (answers as lists,
//! quoting, short; requirement text as a next instruction), rounded down to 0.01, which is the
//! issue's goal of 0.95. Never lower it to make a change pass.
mod common;
use common::*;

const SET: &str = "crates/ifs/assets/smollm2_outputs_labelled.jsonl";
/// Accuracy floor: 0.9583 measured, rounded down to 0.95 (the goal; two more errors
/// than measured still pass, three fail).
const MIN_ACCURACY: f64 = 0.95;

fn lines(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The set is what its README says it is, and stays out of the classifier's training data.
#[test]
fn smollm2_set_is_complete_and_held_out() {
    let items = lines(SET);
    assert_eq!(items.len(), 240);
    let mut per_template = std::collections::BTreeMap::<String, [usize; 2]>::new();
    for it in &items {
        for k in ["id", "template", "kind", "instruction", "response"] {
            assert!(it[k].is_string(), "{k} in {it}");
        }
        assert!(matches!(it["label"].as_u64(), Some(0 | 1)), "{it}");
        let kind = it["kind"].as_str().unwrap();
        assert!(kind == "full" || kind == "partial", "{it}");
        per_template
            .entry(it["template"].as_str().unwrap().to_string())
            .or_default()[(kind == "partial") as usize] += 1;
    }
    let templates: Vec<&str> = per_template.keys().map(String::as_str).collect();
    assert_eq!(templates, ["alpaca", "alpaca_modified", "chatml", "raw"]);
    assert!(
        per_template.values().all(|c| *c == [30, 30]),
        "{per_template:?}"
    );

    // Held out: the tone config does not read it, and no training source holds its
    // instructions or responses.
    let config = std::fs::read_to_string(root().join("configs/classifier/tone.yaml")).unwrap();
    assert!(
        !config.contains("smollm2_outputs"),
        "the labelled set is in the training config"
    );
    let mut sources = String::new();
    for path in [
        "configs/data/bundled.jsonl",
        "crates/objecqa/assets/judge.jsonl",
    ] {
        for v in lines(path) {
            for field in ["prompt", "response", "question", "answer"] {
                if let Some(s) = v[field].as_str() {
                    sources.push_str(s);
                    sources.push('\n');
                }
            }
        }
    }
    for it in items.iter().filter(|it| it["kind"] == "full") {
        let inst = it["instruction"].as_str().unwrap();
        assert!(!sources.contains(inst), "{inst:?} is in the training data");
    }
    for it in &items {
        let resp = it["response"].as_str().unwrap().trim();
        if resp.len() > 40 {
            assert!(!sources.contains(resp), "{resp:?} is in the training data");
        }
    }
}

#[test]
fn shipped_tone_classifier_on_real_smollm2_outputs() {
    let (out, last) = classifier_eval(&root().join(SET));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let last = last.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(last["n"], 240, "{stdout}");
    let acc = last["accuracy"].as_f64().unwrap();
    assert!(
        acc >= MIN_ACCURACY,
        "tone classifier accuracy on real SmolLM2 outputs fell to {acc:.4} (floor {MIN_ACCURACY}): {stdout}"
    );
}
