//! The shipped heads: their goals on held-out data, their provenance, their rebuild, and the
//! save/load round trip of a freshly trained head.
mod common;

use std::sync::Arc;

use candle_core::Device;
use sft_classifier::classifier::{Classifier, DEFAULT_JUDGE_HEAD, DEFAULT_TONE_HEAD};
use sft_classifier::eval::{
    breakdown, eval_judge_file, eval_tone_file, evaluate, read_labelled, TONE_KEYS,
};
use sft_classifier::train::{self, tone_dataset, PairSource, Task, TrainConfig};
use sft_classifier::{Judge, ToneClassifier};
use sha2::{Digest, Sha256};

fn config(name: &str) -> TrainConfig {
    let cfg =
        TrainConfig::from_yaml_file(common::workspace().join("configs/classifier").join(name))
            .unwrap();
    // Paths in the configs are relative to the repository root.
    std::env::set_current_dir(common::workspace()).unwrap();
    cfg
}

fn sha256(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The shipped head was trained on the data files as they are now.
fn assert_fresh(c: &Classifier) {
    let training = c.meta().training.as_ref().unwrap();
    for d in &training.data {
        let source = d.source.strip_prefix("validation: ").unwrap_or(&d.source);
        let path = source.split(" (split").next().unwrap();
        assert_eq!(
            sha256(&common::workspace().join(path)),
            d.sha256,
            "{path} changed since the `{}` head was trained: run scripts/train-classifier-heads.sh",
            c.meta().task
        );
    }
}

#[test]
fn tone_head_reaches_its_goal_on_the_held_out_split() {
    let cfg = config("tone.yaml");
    let tone = ToneClassifier::default_embedded(common::encoder()).unwrap();
    assert_fresh(tone.classifier());
    let ds = tone_dataset(cfg.tone.as_ref().unwrap()).unwrap();
    assert!(ds.heldout.len() > 1000);
    let (m, _) = evaluate(tone.classifier(), &ds.heldout).unwrap();
    eprintln!("tone held-out: {m:?}");
    // The paper's classifier reports 0.970; the head shipped before real outputs joined its
    // training data reached 0.972, and no retraining may fall below that.
    assert!(m.accuracy >= 0.972, "{m:?}");
    // The metadata reports what the head does.
    let recorded = tone.classifier().meta().metrics["heldout"];
    assert_eq!(
        (m.tp, m.fp, m.tn, m.fn_),
        (recorded.tp, recorded.fp, recorded.tn, recorded.fn_)
    );
}

/// Real model outputs: 240 responses of SmolLM2-135M-Instruct to the first 30 bundled IFS
/// instructions (full and fragment) under four prompt templates, labelled by hand
/// (`crates/ifs/assets/real_outputs_README.md`).
const REAL_OUTPUTS: &str = "crates/ifs/assets/smollm2_outputs_labelled.jsonl";

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The real-output set is what its README says it is, and stays out of the recipe's data: it
/// is no source of the config, and no source file (every line, whatever its split) holds its
/// full instructions or its responses. Its instructions `ifs-0001` ... `ifs-0016` are those of
/// the hand-labelled train split (the quickstart's responses, 32 tokens; a short one can be the
/// same text, as a rewrite both runs gave), so it is no longer held out from the head as a
/// whole; the file itself is no labelled source.
#[test]
fn real_output_set_is_complete_and_held_out() {
    let items = json_lines(&common::workspace().join(REAL_OUTPUTS));
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

    let cfg = config("tone.yaml");
    let mut sources = String::new();
    for src in &cfg.tone.as_ref().unwrap().sources {
        let PairSource::Path { path, .. } = src else {
            panic!("the tone config reads the hub: {src:?}");
        };
        assert!(
            !path.ends_with(REAL_OUTPUTS),
            "the labelled set is a training source"
        );
        for v in json_lines(&common::workspace().join(path)) {
            for field in [
                "prompt",
                "instruction",
                "question",
                "input",
                "response",
                "answer",
            ] {
                if let Some(s) = v[field].as_str() {
                    sources.push_str(s);
                    sources.push('\n');
                }
            }
        }
    }
    assert!(sources.len() > 100_000, "the sources were not read");
    for src in &cfg.tone.as_ref().unwrap().labelled {
        assert!(
            !src.path.ends_with(REAL_OUTPUTS),
            "the labelled set is a training source"
        );
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

/// A regression guard on the shipped tone head: 209/240 = 0.871 when the set was written;
/// 230/240 = 0.958 with the head retrained on the widened recipe (answers as lists, quoting,
/// short; requirement text as a next instruction). The floor is 0.95, the goal (two
/// more errors than measured still pass, three fail). Never lower it to make a change pass.
#[test]
fn tone_head_on_real_smollm2_outputs() {
    let tone = ToneClassifier::default_embedded(common::encoder()).unwrap();
    let m = eval_tone_file(&tone, common::workspace().join(REAL_OUTPUTS)).unwrap();
    eprintln!("tone on real SmolLM2 outputs: {m:?}");
    assert_eq!(m.n, 240);
    assert!(
        m.accuracy >= 0.95,
        "tone classifier accuracy on real SmolLM2 outputs fell to {:.4} (floor 0.95): {m:?}",
        m.accuracy
    );
}

/// Real outputs split by instruction (`crates/classifier/data/real_outputs/README.md`): the
/// test split, SmolLM2-135M-Instruct under four templates and at two of the quickstart's
/// checkpoints, labelled by hand.
const REAL_TEST: &str = "crates/classifier/data/real_outputs/test.jsonl";
const REAL_TRAIN: &str = "crates/classifier/data/real_outputs/train.jsonl";
const REAL_VALIDATION: &str = "crates/classifier/data/real_outputs/validation.jsonl";

/// The test split is what its README says: every template and both kinds, at least 300
/// responses; no instruction is in two of the test, train and validation splits; the tone
/// config trains on the train split and validates on the validation split, never the test.
#[test]
fn real_output_test_split_is_complete_and_split_by_instruction() {
    let test = json_lines(&common::workspace().join(REAL_TEST));
    let mut per_group = std::collections::BTreeMap::<(String, String), usize>::new();
    let mut test_ids = std::collections::BTreeSet::new();
    for it in &test {
        for k in [
            "id",
            "template",
            "kind",
            "instruction",
            "response",
            "checkpoint",
        ] {
            assert!(it[k].is_string(), "{k} in {it}");
        }
        assert!(matches!(it["label"].as_u64(), Some(0 | 1)), "{it}");
        assert_eq!(it["split"], "test", "{it}");
        let kind = it["kind"].as_str().unwrap().to_string();
        assert!(kind == "full" || kind == "partial", "{it}");
        *per_group
            .entry((it["template"].as_str().unwrap().to_string(), kind))
            .or_default() += 1;
        test_ids.insert(it["id"].as_str().unwrap().to_string());
    }
    assert!(test.len() >= 300, "{}", test.len());
    for t in [
        "raw",
        "alpaca_modified",
        "alpaca_modified_nl",
        "chat_template",
    ] {
        for k in ["full", "partial"] {
            let n = per_group.get(&(t.to_string(), k.to_string())).copied();
            assert!(n >= Some(38), "{t} {k}: {n:?}");
        }
    }
    let ids_of = |path: &str, split: &str| {
        let lines = json_lines(&common::workspace().join(path));
        assert!(!lines.is_empty(), "{path}");
        lines
            .iter()
            .map(|it| {
                assert_eq!(it["split"], split, "{it}");
                it["id"].as_str().unwrap().to_string()
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let train_ids = ids_of(REAL_TRAIN, "train");
    let validation_ids = ids_of(REAL_VALIDATION, "validation");
    for (a, b, ids_a, ids_b) in [
        ("test", "train", &test_ids, &train_ids),
        ("test", "validation", &test_ids, &validation_ids),
        ("train", "validation", &train_ids, &validation_ids),
    ] {
        let both: Vec<_> = ids_a.intersection(ids_b).collect();
        assert!(both.is_empty(), "in both {a} and {b}: {both:?}");
    }
    let tone = config("tone.yaml").tone.unwrap();
    let paths = |v: &[train::LabelledSource]| -> Vec<String> {
        v.iter().map(|s| s.path.display().to_string()).collect()
    };
    assert_eq!(paths(&tone.labelled), [REAL_TRAIN]);
    assert_eq!(paths(&tone.validation), [REAL_VALIDATION]);
}

/// A regression guard on the shipped tone head over the real test split. The first test split
/// (`ifs-0031` … `ifs-0068`) judged five heads and had its errors read, so it became part of the
/// validation split; the split here is a fresh one (`ifs-0197` … `ifs-0234`, the same six
/// settings), labelled before any head met it and scored once by the head chosen on the
/// validation split: 424/456 = 0.930 (95% Wilson 0.903-0.950); the head shipped before it
/// scores 421/456 there. Two more errors than measured still pass, three fail.
/// Never lower it to make a change pass.
#[test]
fn tone_head_on_the_real_output_test_split() {
    let tone = ToneClassifier::default_embedded(common::encoder()).unwrap();
    let items = read_labelled(common::workspace().join(REAL_TEST), TONE_KEYS).unwrap();
    let (_, preds) = evaluate(tone.classifier(), &items).unwrap();
    let b = breakdown(&items, &preds);
    eprintln!(
        "tone on the real test split: {:?}; per template {:?}",
        b.all, b.by_template
    );
    let m = b.all.metrics;
    assert_eq!(m.n, REAL_TEST_N);
    let correct = m.tp + m.tn;
    assert!(
        correct + 2 >= REAL_TEST_CORRECT,
        "tone accuracy on the real test split fell to {correct}/{} (measured {REAL_TEST_CORRECT}): {:?}",
        m.n,
        b.all
    );
}

/// The size of the real test split and the shipped head's correct answers on it, as measured.
/// A retrained head that does better raises `REAL_TEST_CORRECT`.
const REAL_TEST_N: usize = 456;
const REAL_TEST_CORRECT: usize = 424;

#[test]
fn judge_head_reaches_its_goal_on_the_test_split() {
    let cfg = config("judge.yaml");
    let judge = Judge::default_embedded(common::encoder()).unwrap();
    assert_fresh(judge.classifier());
    let m = eval_judge_file(&judge, &cfg.judge.as_ref().unwrap().path, Some("test")).unwrap();
    eprintln!("judge test: {m:?}");
    assert!(m.n > 200 && m.accuracy >= 0.9, "{m:?}");
}

#[test]
fn judge_rebuild_matches_the_shipped_head() {
    let mut cfg = config("judge.yaml");
    let dir = tempfile::tempdir().unwrap();
    cfg.output = dir.path().join("judge.safetensors");
    let report = train::run(&cfg, &Device::Cpu).unwrap();
    let shipped = Judge::default_embedded(common::encoder()).unwrap();
    let want = shipped.classifier().meta().metrics["heldout"];
    let got = report.heldout.unwrap();
    assert_eq!(
        (got.tp, got.fp, got.tn, got.fn_),
        (want.tp, want.fp, want.tn, want.fn_)
    );
    // The rebuilt head gives the shipped head's probabilities.
    let rebuilt = Judge::load(common::encoder(), &report.output).unwrap();
    let qa: Vec<(String, String)> = vec![
        (
            "Which season is best?".into(),
            "Summer, no question.".into(),
        ),
        (
            "Which season is best?".into(),
            "It depends on what you enjoy; each has its charms.".into(),
        ),
    ];
    let (a, b) = (rebuilt.predict(&qa).unwrap(), shipped.predict(&qa).unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!((x.1 - y.1).abs() < 1e-3, "{a:?} vs {b:?}");
    }
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn heads_check_their_task_and_round_trip() {
    let enc = common::encoder();
    assert!(Judge::from_head_bytes(enc.clone(), DEFAULT_TONE_HEAD).is_err());
    assert!(ToneClassifier::from_head_bytes(enc.clone(), DEFAULT_JUDGE_HEAD).is_err());
    let tone = ToneClassifier::default_embedded(enc.clone())
        .unwrap()
        .into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = tone.save(dir.path()).unwrap();
    assert!(path.ends_with("head.safetensors"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["task"], "ifs-tone");
    assert_eq!(json["features"], "tone");
    let back = ToneClassifier::load(enc.clone(), dir.path()).unwrap();
    let texts: Vec<String> = vec![
        "The capital of France is Paris.".into(),
        "of France? The capital is Paris.".into(),
        "".into(),
        "### Instruction:\nName three colours.\n\n### Response:".into(),
    ];
    let a = ToneClassifier::default_embedded(enc)
        .unwrap()
        .predict(&texts)
        .unwrap();
    let b = back.predict(&texts).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 0, 0, 0]);
}

#[test]
fn a_small_tone_run_writes_a_loadable_head_and_its_held_out_split() {
    let dir = tempfile::tempdir().unwrap();
    let bundled =
        std::fs::read_to_string(common::workspace().join("configs/data/bundled.jsonl")).unwrap();
    let pairs: String = bundled.lines().take(40).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("pairs.jsonl"), pairs).unwrap();
    let yaml = format!(
        "task: ifs-tone\noutput: {out}\nfeatures: tone\nhead: {{kind: logistic}}\noptimizer: {{steps: 60}}\ntone:\n  sources:\n    - path: {pairs}\n  heldout_fraction: 0.25\n  heldout_out: {ho}\n",
        out = dir.path().join("h.safetensors").display(),
        pairs = dir.path().join("pairs.jsonl").display(),
        ho = dir.path().join("heldout.jsonl").display(),
    );
    std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
    let cfg = TrainConfig::from_yaml_file(dir.path().join("c.yaml")).unwrap();
    assert_eq!(cfg.task, Task::IfsTone);
    let report = train::run(&cfg, &Device::Cpu).unwrap();
    assert!(report.train.accuracy > 0.9, "{report:?}");
    assert!(report.validation.is_none());

    // Hand-labelled lines join the training examples `repeat` times; validation lines are
    // scored apart and recorded.
    let labelled: String = (0..3)
        .map(|i| format!("{{\"instruction\": \"Name a colour.\", \"response\": \"Blue, number {i}.\", \"label\": 1, \"split\": \"train\"}}\n"))
        .chain(std::iter::once("{\"instruction\": \"x\", \"response\": \"held\", \"label\": 0, \"split\": \"other\"}\n".to_string()))
        .collect();
    std::fs::write(dir.path().join("real.jsonl"), labelled).unwrap();
    let mut with_real = cfg.clone();
    with_real.output = dir.path().join("h2.safetensors");
    let tone = with_real.tone.as_mut().unwrap();
    let real = dir.path().join("real.jsonl");
    tone.labelled = vec![train::LabelledSource {
        path: real.clone(),
        split: Some("train".into()),
        repeat: 2,
    }];
    tone.validation = vec![train::LabelledSource {
        path: real,
        split: None,
        repeat: 1,
    }];
    let report2 = train::run(&with_real, &Device::Cpu).unwrap();
    assert_eq!(report2.n_train, report.n_train + 6);
    assert_eq!(report2.n_heldout, report.n_heldout);
    assert_eq!(report2.validation.unwrap().n, 4);
    let c2 = Classifier::load(Arc::clone(&common::encoder()), &report2.output).unwrap();
    assert_eq!(c2.meta().metrics["validation"].n, 4);
    let counts = &c2.meta().training.as_ref().unwrap().counts;
    assert_eq!(counts["train/labelled_1"], 6);
    assert_eq!(counts["validation/labelled_0"], 1);
    let c = Classifier::load(Arc::clone(&common::encoder()), &report.output).unwrap();
    assert_eq!(c.meta().training.as_ref().unwrap().n_train, report.n_train);
    let heldout = sft_classifier::eval::read_labelled(
        dir.path().join("heldout.jsonl"),
        sft_classifier::eval::TONE_KEYS,
    )
    .unwrap();
    assert_eq!(heldout.len(), report.n_heldout);
    let (m, _) = evaluate(&c, &heldout).unwrap();
    assert_eq!(m.accuracy, report.heldout.unwrap().accuracy);

    // The encoder's top layer fine-tuned with the head: the file carries the LoRA factors, and
    // the head loaded through candle's BERT with them merged scores the held-out split as the
    // training forward did.
    let mut tuned = cfg.clone();
    tuned.output = dir.path().join("h3.safetensors");
    tuned.finetune = Some(sft_classifier::FinetuneConfig {
        layers: 1,
        rank: 2,
        epochs: 4,
        batch_size: 16,
        lr: 0.003,
        head_lr: 0.003,
        ..Default::default()
    });
    let report3 = train::run(&tuned, &Device::Cpu).unwrap();
    // Better than the majority class (0.53 of these 199 lines).
    assert!(report3.train.accuracy > 0.7, "{report3:?}");
    let c3 = Classifier::load(Arc::clone(&common::encoder()), &report3.output).unwrap();
    assert_eq!(c3.meta().finetune, tuned.finetune);
    assert!(!Arc::ptr_eq(c3.encoder(), &common::encoder()));
    let (m3, _) = evaluate(&c3, &heldout).unwrap();
    let want = report3.heldout.unwrap();
    assert_eq!(
        (m3.tp, m3.fp, m3.tn, m3.fn_),
        (want.tp, want.fp, want.tn, want.fn_)
    );
    let texts = vec!["The capital of France is Paris.".to_string()];
    let e_tuned = c3.encoder().embed(&texts).unwrap();
    let e_frozen = common::encoder().embed(&texts).unwrap();
    let moved = (e_tuned - e_frozen)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 1e-4,
        "fine-tuning left the encoder as it was"
    );
}
