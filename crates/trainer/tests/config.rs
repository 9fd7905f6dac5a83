//! Config parsing: every shipped config loads; every error names its field (and line).
use sft_trainer::config::Config;
use std::path::Path;

const BASE: &str = "run:
  name: t
model:
  source: some/folder
data:
  sources:
    - path: data.jsonl
train:
  max_steps: 10
  lr: 0.001
";

fn err(yaml: &str, overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_yaml(yaml, "cfg.yaml", &o)
        .unwrap_err()
        .to_string()
}

#[test]
fn shipped_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for name in ["quickstart.yaml", "groovy.yaml", "groovy-13b.yaml"] {
        let cfg = Config::load(&root.join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!cfg.run.name.is_empty());
    }
}

#[test]
fn type_error_names_the_path_and_the_line() {
    let yaml = BASE.replace("lr: 0.001", "lr: fast");
    let e = err(&yaml, &[]);
    assert!(e.starts_with("cfg.yaml: train.lr: "), "{e}");
    assert!(e.contains("line 10"), "{e}");
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    let yaml = BASE.replace("  lr: 0.001", "  lr: 0.001\n  learning_rate: 0.1");
    let e = err(&yaml, &[]);
    assert!(
        e.contains("train") && e.contains("unknown field `learning_rate`"),
        "{e}"
    );
}

#[test]
fn values_are_checked() {
    for (from, to, want) in [
        ("lr: 0.001", "lr: -1", "train.lr: expected a number > 0"),
        (
            "max_steps: 10",
            "max_steps: 10\n  micro_batch_size: 0",
            "train.micro_batch_size",
        ),
        (
            "source: some/folder",
            "source: some/folder\n  dtype: f8",
            "model.dtype",
        ),
        (
            "source: some/folder",
            "source: some/folder\n  device: tpu",
            "model.device",
        ),
    ] {
        let e = err(&BASE.replace(from, to), &[]);
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = err(
        &format!("{BASE}adapter:\n  r: 0\n  targets: [q_proj, qq_proj]\n"),
        &[],
    );
    assert!(e.contains("adapter.r: expected at least 1"), "{e}");
    assert!(e.contains("unknown module 'qq_proj'"), "{e}");
}

#[test]
fn overrides_apply_as_yaml_and_errors_name_them() {
    let o = vec![
        "train.lr=0.5".to_string(),
        "adapter.targets=[q_proj, v_proj]".to_string(),
        "eval.ifs.every_examples=32".to_string(),
    ];
    let cfg = Config::from_yaml(BASE, "cfg.yaml", &o).unwrap();
    assert_eq!(cfg.train.lr, 0.5);
    assert_eq!(cfg.adapter.targets, vec!["q_proj", "v_proj"]);
    assert_eq!(cfg.eval.ifs.every_examples, 32);
    let e = err(BASE, &["train.lr=fast"]);
    assert!(e.starts_with("--set train.lr=fast: train.lr"), "{e}");
    let e = err(BASE, &["train.lr"]);
    assert!(e.contains("expected key.path=value"), "{e}");
}

#[test]
fn eval_loss_patience_is_validated() {
    let e = err(BASE, &["early_stopping.eval_loss.patients=2"]);
    assert!(
        e.contains("early_stopping.eval_loss") && e.contains("unknown field `patients`"),
        "{e}"
    );
    let e = err(BASE, &["early_stopping.eval_loss.patience=2"]);
    assert!(
        e.contains("early_stopping.eval_loss.patience") && e.contains("eval.loss.every_examples"),
        "{e}"
    );
    let e = err(
        BASE,
        &[
            "eval.loss.every_examples=8",
            "early_stopping.eval_loss={patience: 2, min_delta: -1}",
        ],
    );
    assert!(e.contains("early_stopping.eval_loss.min_delta"), "{e}");
    let o: Vec<String> = [
        "eval.loss.every_examples=8",
        "early_stopping.eval_loss.patience=2",
    ]
    .map(String::from)
    .to_vec();
    let cfg = Config::from_yaml(BASE, "cfg.yaml", &o).unwrap();
    assert_eq!(cfg.early_stopping.eval_loss.patience, 2);
    // The plateau rule's keys stay where users know them.
    assert_eq!(cfg.early_stopping.plateau().patience, 3);
}

#[test]
fn tensorboard_is_on_by_default_and_takes_a_boolean() {
    let cfg = Config::from_yaml(BASE, "cfg.yaml", &[]).unwrap();
    assert!(cfg.logging.tensorboard);
    let off = format!("{BASE}logging:\n  tensorboard: false\n");
    assert!(
        !Config::from_yaml(&off, "cfg.yaml", &[])
            .unwrap()
            .logging
            .tensorboard
    );
    let bad = format!("{BASE}logging:\n  tensorboard: sometimes\n");
    let e = err(&bad, &[]);
    assert!(
        e.contains("logging.tensorboard") && e.contains("line 12"),
        "{e}"
    );
}

/// A config file's relative input paths are read from its folder; `--set` paths from the
/// working folder; what a run writes stays under the working folder.
#[test]
fn relative_paths_are_read_from_the_config_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("exp");
    std::fs::create_dir_all(folder.join("model")).unwrap();
    let text = BASE.replace("some/folder", "model")
        + "eval:\n  ifs:\n    items: items.jsonl\n    classifier: /abs/head\n";
    let cfg_path = folder.join("c.yaml");
    std::fs::write(&cfg_path, &text).unwrap();
    let cfg = Config::load(&cfg_path, &[]).unwrap();
    assert_eq!(cfg.base_dir.as_deref(), Some(folder.as_path()));
    assert_eq!(cfg.data.base_dir.as_deref(), Some(folder.as_path()));
    assert_eq!(Path::new(&cfg.model.source), folder.join("model"));
    assert_eq!(cfg.eval.ifs.items, Some(folder.join("items.jsonl")));
    assert_eq!(
        cfg.eval.ifs.classifier.as_deref(),
        Some(Path::new("/abs/head"))
    );
    assert_eq!(cfg.checkpoint.dir, Path::new("checkpoints"));
    // What the file says stays as written (a resume compares it).
    assert_eq!(cfg.data.sources[0].path.as_deref(), Some("data.jsonl"));

    let o = [
        "data.sources=[{path: d.jsonl}]",
        "eval.ifs.items=mine.jsonl",
    ]
    .map(String::from);
    let cfg = Config::load(&cfg_path, &o).unwrap();
    assert_eq!(cfg.data.base_dir, None);
    assert_eq!(cfg.eval.ifs.items.as_deref(), Some(Path::new("mine.jsonl")));
    assert_eq!(Path::new(&cfg.model.source), folder.join("model"));
}

/// An invalid value is blamed on the `--set` that gave it, not on the file.
#[test]
fn invalid_override_values_name_the_override() {
    let e = err(BASE, &["train.lr=-1"]);
    assert!(
        e.starts_with("--set train.lr=-1: train.lr: expected a number > 0"),
        "{e}"
    );
    // The file's own mistakes still name the file.
    let e = err(&BASE.replace("lr: 0.001", "lr: -1"), &["train.max_steps=3"]);
    assert!(e.starts_with("cfg.yaml: train.lr"), "{e}");
}

/// A misspelt key names its path once, with the line.
#[test]
fn a_typo_names_its_path_once() {
    let e = err(&BASE.replace("  lr: 0.001", "  grad_acum: 2"), &[]);
    assert!(
        e.starts_with("cfg.yaml: train.grad_acum: unknown field `grad_acum`"),
        "{e}"
    );
    assert!(e.contains("line 10"), "{e}");
}
