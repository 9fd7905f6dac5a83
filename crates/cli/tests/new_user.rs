//! What a new user meets first, with the release binaries: every command of the README's table
//! runs (from any folder, not only the repository root), ordinary mistakes get a clear message,
//! and the outputs behave when redirected or piped: JSON on stdout, text on stderr without
//! colour codes, a closed pipe ends the command quietly.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn sft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft"))
}

fn sft_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft-train"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that a command failed, and returns its stderr.
fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stderr(out)
}

/// A prompts file for `sft score`/`generate`.
fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, "{\"prompt\": \"Name a colour.\"}\n").unwrap();
    p
}

/// The embedded default, shortened onto `model` (IFS off, two steps), run from `cwd`.
fn short_default_run(cwd: &Path, model: &Path) -> Output {
    sft_train()
        .current_dir(cwd)
        .args(["--set", &format!("model.source={}", model.display())])
        .args(["--set", "train.max_examples=16"])
        .args(["--set", "eval.ifs.every_examples=0"])
        .args(["--set", "eval.loss.every_examples=0"])
        .args(["--set", "logging.plots=false"])
        .args(["--set", "logging.tensorboard=false"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// A finished run's folder as `sft runs` reads it, without training: a summary and a metrics
/// line.
fn fake_run(dir: &Path) -> PathBuf {
    let run = dir.join("checkpoints/demo");
    std::fs::create_dir_all(run.join("step-000002")).unwrap();
    let summary = serde_json::json!({
        "status": "finished",
        "stop_reason": "finished: max_examples reached",
        "format_infusion_checkpoint": null,
        "chosen_checkpoint": "step-000002",
    });
    std::fs::write(run.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"step\": 2, \"examples\": 16, \"loss\": 1.5}\n",
    )
    .unwrap();
    run
}

#[test]
fn objecqa_scores_a_model() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let out_dir = t.path().join("oq");
    let out = sft()
        .args(["objecqa", "--model"])
        .arg(&model)
        .args(["--limit", "2", "--max-new-tokens", "4", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let v = json_last(&out);
    assert_eq!(v["n"], 2, "{v}");
    let score = v["objecqa"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{v}");
    let answers = std::fs::read_to_string(out_dir.join("objecqa-answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 2, "{answers}");

    // Its defaults are eval.objecqa's.
    let help = stdout(&sft().args(["objecqa", "--help"]).output().unwrap());
    for want in ["[default: 64]", "[default: 16]", "--limit"] {
        assert!(help.contains(want), "no {want} in\n{help}");
    }
}

#[test]
fn the_embedded_default_runs_outside_the_repository() {
    let away = tempfile::tempdir().unwrap();
    let out = sft_train()
        .arg("--dry-run")
        .current_dir(away.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_ok(&out);
    let model = tiny_model(away.path());
    let out = short_default_run(away.path(), &model);
    assert_ok(&out);
    let summary = away.path().join("checkpoints/quickstart/summary.json");
    assert!(summary.is_file(), "{}", stderr(&out));
}

#[test]
fn a_config_reads_its_data_from_its_own_folder() {
    let away = tempfile::tempdir().unwrap();
    // The repository's own config, from elsewhere.
    let out = sft()
        .current_dir(away.path())
        .args(["data", "inspect", "--json", "--config"])
        .arg(repo().join("configs/quickstart.yaml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(json_last(&out)["rows_read"], 582);

    // A user's config with its data beside it, run from the folder above.
    let cfg_dir = away.path().join("mine");
    std::fs::create_dir(&cfg_dir).unwrap();
    let rows: String = (0..4)
        .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"response\": \"{i}.\"}}\n"))
        .collect();
    std::fs::write(cfg_dir.join("rows.jsonl"), rows).unwrap();
    let text = |data: &str| {
        format!(
            "run: {{name: mine}}\nmodel: {{source: {}}}\ndata:\n  sources: [{{path: {data}}}]\n  \
             cache: false\ntrain: {{epochs: 1}}\n",
            smollm2().display()
        )
    };
    std::fs::write(cfg_dir.join("c.yaml"), text("rows.jsonl")).unwrap();
    let inspect = |cfg: &str| {
        sft()
            .current_dir(away.path())
            .args(["data", "inspect", "--json", "--config", cfg])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    assert_eq!(json_last(&inspect("mine/c.yaml"))["rows_read"], 4);

    // A missing file: the error names the folder searched.
    std::fs::write(cfg_dir.join("bad.yaml"), text("nothere.jsonl")).unwrap();
    let err = failed(&inspect("mine/bad.yaml"));
    assert!(err.contains("nothere.jsonl"), "{err}");
    let folder = cfg_dir.canonicalize().unwrap();
    assert!(
        err.contains(&folder.display().to_string()) || err.contains("mine"),
        "the error does not name the folder searched: {err}"
    );
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let out = sft()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(prompts(t.path()))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("INFO"), "nothing was logged: {err}");
    assert!(
        !out.stderr.contains(&0x1b),
        "escape codes in redirected stderr: {err:?}"
    );
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let t = tempfile::tempdir().unwrap();
    let run = fake_run(t.path());
    let model = tiny_model(t.path());
    let input = prompts(t.path());
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        Stdio::from(writer)
    };
    let runs = sft()
        .args(["runs", "show", "--json"])
        .arg(&run)
        .stdout(closed())
        .output()
        .unwrap();
    let score = sft()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .env("RUST_LOG", "warn")
        .stdout(closed())
        .output()
        .unwrap();
    for (what, out) in [("runs show --json", runs), ("score", score)] {
        let err = stderr(&out);
        assert!(
            out.status.success() && !err.contains("panicked") && !err.contains("Broken pipe"),
            "sft {what} on a closed pipe: {:?}: {err}",
            out.status
        );
    }
}

#[test]
fn runs_show_and_list() {
    let t = tempfile::tempdir().unwrap();
    let run = fake_run(t.path());
    let out = sft().args(["runs", "show"]).arg(&run).output().unwrap();
    assert_ok(&out);
    let text = stderr(&out) + &stdout(&out);
    for (label, value) in [
        ("stop_reason", "finished: max_examples reached"),
        ("chosen_checkpoint", "step-000002"),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(value))
            .unwrap_or_else(|| panic!("no {value} in {text}"));
        assert!(
            line.contains(&format!("{label} ")),
            "label and value run together: {line}"
        );
    }
    // The results as JSON on stdout, the table for people on stderr.
    let out = sft()
        .current_dir(t.path())
        .args(["runs", "list", "--json"])
        .output()
        .unwrap();
    let v = json_last(&out);
    assert_eq!(v[0]["name"], "demo", "{v}");
    assert_eq!(v[0]["steps"], 2, "{v}");
}

#[test]
fn results_go_to_stdout_as_json_and_text_to_stderr() {
    let t = tempfile::tempdir().unwrap();
    let out = sft()
        .args(["init-random", "--config-json"])
        .arg(repo().join("tests/data/tiny-llama-config.json"))
        .arg("--out")
        .arg(t.path().join("m"))
        .arg("--tokenizer")
        .arg(smollm2())
        .output()
        .unwrap();
    let v = json_last(&out);
    assert!(v["out"].as_str().unwrap().ends_with('m'), "{v}");
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));

    // Without --json, `data inspect` is for people: nothing on stdout.
    let out = sft()
        .args(["data", "inspect", "--config"])
        .arg(repo().join("configs/quickstart.yaml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(stderr(&out).contains("rows read"), "{}", stderr(&out));
}

#[test]
fn a_run_folder_is_taken_as_its_chosen_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    assert_ok(&short_default_run(t.path(), &model));
    let run = t.path().join("checkpoints/quickstart");
    let out = sft()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&run)
        .arg("--input")
        .arg(prompts(t.path()))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let v = json_last(&out);
    assert!(v["mean_next_token_loss"].is_number(), "{v}");
    assert!(
        stderr(&out).contains("step-000002"),
        "which checkpoint was used is not said: {}",
        stderr(&out)
    );
    // merge-lora takes it too, and answers in JSON.
    let merged = t.path().join("merged");
    let out = sft()
        .args(["merge-lora", "--base"])
        .arg(&model)
        .arg("--adapter")
        .arg(&run)
        .arg("--out")
        .arg(&merged)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let v = json_last(&out);
    assert_eq!(v["merged_modules"], 14, "{v}");
    assert!(merged.join("config.json").is_file());

    // A folder that is neither says so.
    let out = sft()
        .args(["score", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(t.path())
        .arg("--input")
        .arg(prompts(t.path()))
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("not an adapter folder"), "{err}");
}

#[test]
fn one_gguf_under_two_names_is_imported_once() {
    let gguf =
        sft_classifier::encoder::cache_root().join("downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        gguf.display()
    );
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let input = prompts(t.path());
    let mut tokens = Vec::new();
    for name in ["a.gguf", "b.gguf"] {
        let copy = t.path().join(name);
        if std::fs::hard_link(&gguf, &copy).is_err() {
            std::fs::copy(&gguf, &copy).unwrap();
        }
        let out = sft()
            .args(["score", "--model"])
            .arg(&copy)
            .arg("--input")
            .arg(&input)
            .env("SFT_CACHE", &cache)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        tokens.push(json_last(&out)["input_ids"].clone());
    }
    assert_eq!(tokens[0], tokens[1]);
    let folders: Vec<_> = std::fs::read_dir(cache.join("models/gguf"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
}

#[test]
fn a_cache_name_is_a_model() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    std::fs::create_dir_all(cache.join("models")).unwrap();
    let model = tiny_model(t.path());
    std::fs::rename(&model, cache.join("models/tiny")).unwrap();
    let out = sft()
        .args(["score", "--model", "cache:tiny", "--input"])
        .arg(prompts(t.path()))
        .env("SFT_CACHE", &cache)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(json_last(&out)["input_ids"].is_array());
}

#[test]
fn an_empty_prompts_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let empty = t.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    for cmd in [&["score"][..], &["generate", "--max-new-tokens", "2"]] {
        let out = sft()
            .args(cmd)
            .arg("--model")
            .arg(&model)
            .arg("--input")
            .arg(&empty)
            .output()
            .unwrap();
        let err = failed(&out);
        assert!(
            err.contains("empty.jsonl") && err.contains("no prompt"),
            "{err}"
        );
    }
}

#[test]
fn version_and_help() {
    let out = sft_train().arg("--version").output().unwrap();
    assert_ok(&out);
    assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")));
    // Every option in the short help says what it is for.
    for cmd in [
        &["objecqa"][..],
        &["objecqa", "judge", "eval"],
        &["runs", "show"],
        &["runs", "list"],
        &["ifs"],
        &["score"],
        &["generate"],
        &["data", "inspect"],
        &["merge-lora"],
        &["init-random"],
        &["classifier", "eval"],
        &["train"],
    ] {
        let out = sft().args(cmd).arg("-h").output().unwrap();
        assert_ok(&out);
        let help = stdout(&out);
        let lines: Vec<&str> = help.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        for (i, line) in lines.iter().enumerate() {
            let l = line.trim_start();
            if !l.starts_with('-') {
                continue;
            }
            // The help on the same line, or (when clap moves it) indented on the next.
            let inline = l.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
            let below = lines.get(i + 1).is_some_and(|n| {
                !n.trim().is_empty() && !n.trim_start().starts_with('-') && indent(n) > indent(line)
            });
            assert!(
                inline || below,
                "`sft {}`: no help for `{l}`",
                cmd.join(" ")
            );
        }
    }
}

#[test]
fn config_errors_name_their_source() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("q.yaml");
    std::fs::write(
        &cfg,
        "run: {name: q}\nmodel: {source: x}\ndata: {sources: [{path: d.jsonl}]}\ntrain:\n  grad_acum: 2\n",
    )
    .unwrap();
    let err = failed(&train(&cfg, &["--dry-run"], &[]));
    assert!(err.contains("train.grad_acum"), "{err}");
    assert!(
        !err.contains("train: unknown"),
        "the section is said twice: {err}"
    );
    assert!(err.contains("line 5"), "{err}");

    let out = sft_train()
        .args(["--dry-run", "--set", "train.lr=-1"])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("--set train.lr=-1"), "{err}");
    assert!(
        !err.contains("embedded"),
        "blamed on the embedded config: {err}"
    );
}

#[test]
fn ifs_says_where_it_wrote() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let out = sft()
        .current_dir(t.path())
        .args(["ifs", "--model"])
        .arg(&model)
        .args(["--limit", "1", "--max-new-tokens", "2"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let v = json_last(&out);
    let written = t.path().join("ifs-tiny-model/ifs-responses.jsonl");
    assert!(written.is_file());
    assert_eq!(
        v["responses"].as_str().map(Path::new),
        Some(Path::new("ifs-tiny-model/ifs-responses.jsonl")),
        "{v}"
    );
    assert!(
        stderr(&out).contains("ifs-tiny-model/ifs-responses.jsonl"),
        "{}",
        stderr(&out)
    );
}
