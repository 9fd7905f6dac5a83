//! The evaluators inside `sft-train`: the shortened quickstart (LoRA on SmolLM2, IFS), the
//! plateau rule stopping a run and choosing its format-infusion checkpoint, and the ObjecQA
//! hook.
mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of an evaluator's answers file for the evaluation at `step`.
fn answers(run: &Path, step: &Value, file: &str) -> Vec<Value> {
    let p = run
        .join("evals")
        .join(format!("step-{:06}", step.as_u64().unwrap()))
        .join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The share of `lines` (of `kind`, if given) whose `flag` is true.
fn share(lines: &[Value], flag: &str, kind: Option<&str>) -> f64 {
    let sel: Vec<&Value> = lines
        .iter()
        .filter(|l| kind.is_none_or(|k| l["kind"] == k))
        .collect();
    assert!(!sel.is_empty(), "no {kind:?} lines");
    sel.iter().filter(|l| l[flag] == true).count() as f64 / sel.len() as f64
}

fn summary(run: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn shortened_quickstart_trains_lora_with_ifs() {
    let _ = smollm2();
    let t = tempfile::tempdir().unwrap();
    let out = quickstart(
        t.path(),
        None,
        &[
            "train.max_examples=48",
            "eval.ifs.every_examples=24",
            "eval.ifs.limit=6",
            "eval.ifs.max_new_tokens=16",
            "eval.loss={every_examples: 48, max_examples: 16}",
            "checkpoint.every_steps=3",
            "logging.progress=false",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = t.path().join("quickstart");
    let recs = records(&run);
    let losses: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 6, "{losses:?}");
    // The held-out loss (the same 16 examples) before training and after 48 examples.
    let held: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get("eval_loss")?.as_f64())
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held[1] < held[0] - 0.05,
        "the held-out loss falls: {held:?}"
    );
    // IFS at the start, at 24 and 48 examples, each with its full and partial scores.
    let ifs: Vec<&Value> = recs.iter().filter(|r| r["eval"] == "ifs").collect();
    assert!(ifs.len() >= 3, "{ifs:?}");
    // Each score is the share of answer-like responses in that evaluation's responses file
    // (6 full and 6 partial prompts), recomputed here.
    let mut at: Vec<u64> = Vec::new();
    for r in &ifs {
        let lines = answers(&run, &r["step"], "ifs-responses.jsonl");
        assert_eq!(lines.len(), 12, "{r}");
        for (k, kind) in [
            ("ifs", None),
            ("ifs_full", Some("full")),
            ("ifs_partial", Some("partial")),
        ] {
            let got = r[k].as_f64().unwrap_or(f64::NAN);
            let want = share(&lines, "answer_like", kind);
            assert!(
                (got - want).abs() < 1e-12,
                "{k} = {got}, the responses give {want}: {r}"
            );
        }
        let (lo, hi) = (
            r["ifs_ci_low"].as_f64().unwrap(),
            r["ifs_ci_high"].as_f64().unwrap(),
        );
        let ifs = r["ifs"].as_f64().unwrap();
        assert!(0.0 <= lo && lo <= ifs && ifs <= hi && hi <= 1.0, "{r}");
        at.push(r["examples"].as_u64().unwrap());
    }
    assert_eq!(&at[..3], &[0, 24, 48], "{ifs:?}");
    let s = summary(&run);
    assert_eq!(s["ifs_curve"].as_array().unwrap().len(), ifs.len());
    assert!(run.join("ifs.png").is_file() && run.join("loss.png").is_file());
    let responses =
        std::fs::read_to_string(run.join("evals/step-000000/ifs-responses.jsonl")).unwrap();
    assert_eq!(responses.lines().count(), 12);
    // The last checkpoint is a PEFT adapter.
    let last = std::fs::read_link(run.join("latest")).unwrap();
    let cp = run.join(last);
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(cp.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 16);
    let st = candle_core::safetensors::load(
        cp.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"));
    assert_eq!(st.len(), 30 * 7 * 2);
    for f in [
        "optimizer.safetensors",
        "trainer_state.json",
        "tokenizer.json",
    ] {
        assert!(cp.join(f).is_file(), "{f}");
    }
}

#[test]
fn plateau_rule_stops_the_run_and_keeps_the_format_infusion_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    // Threshold 0 and an unreachable min_delta: the evaluation at the start is the plateau's
    // beginning, the next one exhausts a patience of 1.
    let sets = [
        "run.name=plateau",
        "data.max_length=96",
        "train.max_examples=200",
        "train.micro_batch_size=4",
        "eval.ifs.every_examples=8",
        "eval.ifs.limit=3",
        "eval.ifs.max_new_tokens=4",
        "eval.loss.every_examples=0",
        "early_stopping={threshold: 0.0, min_delta: 2.0, patience: 1}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=1",
        "logging.progress=false",
    ];
    let out = quickstart(t.path(), Some(&model), &sets, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = t.path().join("plateau");
    let s = summary(&run);
    assert_eq!(s["status"], "stopped");
    assert!(
        s["stop_reason"].as_str().unwrap().contains("plateau"),
        "{s}"
    );
    assert_eq!(s["format_infusion_checkpoint"], "step-000000");
    assert_eq!(s["examples"], 8);
    assert_eq!(
        std::fs::read_link(run.join("format-infusion")).unwrap(),
        Path::new("step-000000")
    );
    // Pinned: pruning to keep_last = 1 kept it.
    assert!(run.join("step-000000/adapter_model.safetensors").is_file());
    assert!(stderr.contains("format-infusion checkpoint"), "{stderr}");
    // Resuming a stopped run does not train on.
    let out = quickstart(t.path(), Some(&model), &sets, &["--resume"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already stopped"));
    assert_eq!(summary(&run)["examples"], 8);
}

#[test]
fn objecqa_runs_at_its_own_cadence() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let out = quickstart(
        t.path(),
        Some(&model),
        &[
            "run.name=oq",
            "data.max_length=96",
            "train.max_examples=16",
            "train.micro_batch_size=4",
            "eval.ifs.every_examples=0",
            "eval.loss.every_examples=0",
            "eval.objecqa={every_examples: 8, limit: 4, max_new_tokens: 4, batch_size: 4}",
            "logging.progress=false",
        ],
        &[],
    );
    assert_ok(&out);
    let run = t.path().join("oq");
    let oq: Vec<Value> = records(&run)
        .into_iter()
        .filter(|r| r["eval"] == "objecqa")
        .collect();
    // At the start, at 8 and at 16 examples.
    assert_eq!(oq.len(), 3, "{oq:?}");
    // Each score is the share of answers judged objective in that evaluation's answers file.
    let mut at = Vec::new();
    for r in &oq {
        let lines = answers(&run, &r["step"], "objecqa-answers.jsonl");
        assert_eq!(lines.len(), 4, "{r}");
        let got = r["objecqa"].as_f64().unwrap_or(f64::NAN);
        let want = share(&lines, "objective", None);
        assert!(
            (got - want).abs() < 1e-12,
            "objecqa = {got}, the answers give {want}: {r}"
        );
        at.push(r["examples"].as_u64().unwrap());
    }
    assert_eq!(at, [0, 8, 16]);
    assert_eq!(summary(&run)["objecqa_curve"].as_array().unwrap().len(), 3);
    let answers =
        std::fs::read_to_string(run.join("evals/step-000002/objecqa-answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 4);
}

#[test]
fn sft_ifs_and_the_judge_eval_print_json_last() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args(["ifs", "--limit", "3", "--max-new-tokens", "4", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(t.path().join("ifs"))
        .output()
        .unwrap();
    let last = json_last(&out);
    for k in ["ifs", "ifs_full", "ifs_partial", "ci", "n"] {
        assert!(!last[k].is_null(), "{k}: {last}");
    }
    assert_eq!(last["n"], 6);
    assert_eq!(
        std::fs::read_to_string(t.path().join("ifs/ifs-responses.jsonl"))
            .unwrap()
            .lines()
            .count(),
        6
    );
    // The shipped judge on the held-out split of its labelled set: the goal is 0.9.
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .current_dir(repo())
        .args([
            "objecqa",
            "judge",
            "eval",
            "--input",
            "crates/objecqa/assets/judge.jsonl",
            "--split",
            "test",
        ])
        .output()
        .unwrap();
    let m = json_last(&out);
    assert!(m["accuracy"].as_f64().unwrap() >= 0.9, "{m}");
    assert!(m["f1"].as_f64().unwrap() > 0.85, "{m}");
}
