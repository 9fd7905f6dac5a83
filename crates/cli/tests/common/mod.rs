//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)] // each test file uses its own subset
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fetched SmolLM2-135M-Instruct folder (`scripts/fetch-test-models.sh`).
pub fn smollm2() -> PathBuf {
    let m = sft_classifier::encoder::cache_root().join("models/smollm2-135m-instruct");
    assert!(
        m.join("model.safetensors").is_file() && m.join("tokenizer.json").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        m.display()
    );
    m
}

/// The config `tests/configs/NAME` for a run under `dir`: `{model}`, `{data}` (the bundled
/// examples), `{ck}` (`dir/ck`) and each `{key}` of `vars` filled in.
pub fn config_text(name: &str, dir: &Path, model: &Path, vars: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(name);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let data = repo().join("configs/data/bundled.jsonl");
    let fixed = [
        ("model", model.display().to_string()),
        ("data", data.display().to_string()),
        ("ck", dir.join("ck").display().to_string()),
    ];
    let extra = vars.iter().map(|(k, v)| (*k, v.to_string()));
    for (key, value) in fixed.into_iter().chain(extra) {
        text = text.replace(&format!("{{{key}}}"), &value);
    }
    text
}

/// [`config_text`] written to `dir/NAME`.
pub fn config_file(name: &str, dir: &Path, model: &Path, vars: &[(&str, &str)]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, config_text(name, dir, model, vars)).unwrap();
    p
}

/// A temporary folder with a tiny model in it and the config `tests/configs/NAME` for it
/// ([`config_file`]): the folder's guard and the config file.
pub fn tiny_run(name: &str, vars: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let cfg = config_file(name, t.path(), &model, vars);
    (t, cfg)
}

/// A tiny random LLaMA with SmolLM2's tokenizer, written under `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    random_model(
        &repo().join("tests/data/tiny-llama-config.json"),
        &dir.join("tiny-model"),
    )
}

/// A random LLaMA of the config `config_json` with SmolLM2's tokenizer, written to `out`.
pub fn random_model(config_json: &Path, out: &Path) -> PathBuf {
    let st = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args(["init-random", "--config-json"])
        .arg(config_json)
        .arg("--out")
        .arg(out)
        .arg("--tokenizer")
        .arg(smollm2())
        .status()
        .unwrap();
    assert!(st.success());
    out.to_path_buf()
}

/// Asserts that a command succeeded, showing its stderr where it did not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON on the last line of a command that must have succeeded.
pub fn json_last(out: &Output) -> Value {
    assert_ok(out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

/// `sft-train --config CFG EXTRA...` with these environment variables, quietly logged.
pub fn train(cfg: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft-train"));
    c.arg("--config")
        .arg(cfg)
        .args(extra)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// `sft-train --config configs/quickstart.yaml` run from the repository root, its runs under
/// `dir`, on `model` (or the config's SmolLM2), with each of `sets` as a `--set` and `extra`
/// arguments after them; logged at info.
pub fn quickstart(dir: &Path, model: Option<&Path>, sets: &[&str], extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft-train"));
    c.current_dir(repo())
        .args(["--config", "configs/quickstart.yaml"]);
    c.arg("--set")
        .arg(format!("checkpoint.dir={}", dir.display()));
    if let Some(m) = model {
        c.arg("--set").arg(format!("model.source={}", m.display()));
    }
    for s in sets {
        c.args(["--set", s]);
    }
    c.args(extra).env("RUST_LOG", "info").output().unwrap()
}

/// Each metrics line's step, loss and held-out loss, as printed (exact bits).
pub fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!(
                "{}:{}:{}",
                v["step"],
                v.get("loss").unwrap_or(&Value::Null),
                v.get("eval_loss").unwrap_or(&Value::Null)
            )
        })
        .collect()
}
