//! The TensorBoard event files a run writes, read back by TensorBoard's own reader (the
//! `tensorboard` PyPI package's EventAccumulator, in the venv that scripts/test.sh makes with
//! scripts/fetch-tensorboard-venv.sh): the same values as metrics.jsonl, every step once after
//! a crash and a resume, the evaluators' answers as text, and nothing when turned off.
mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The venv's python, or None (with a message) when it is absent and the run is not one of
/// scripts/test.sh's, which sets SFT_REQUIRE_TENSORBOARD=1 after making the venv.
fn tensorboard_python() -> Option<PathBuf> {
    let venvs = sft_classifier::encoder::cache_root().join("venvs");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&venvs)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tensorboard-"))
                && p.join(".complete").is_file()
        })
        .collect();
    found.sort();
    if let Some(v) = found.pop() {
        return Some(v.join("bin/python"));
    }
    let msg = format!(
        "no TensorBoard venv under {}: run scripts/fetch-tensorboard-venv.sh (scripts/test.sh does)",
        venvs.display()
    );
    if std::env::var_os("SFT_REQUIRE_TENSORBOARD").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn reader() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_tensorboard.py")
}

/// What TensorBoard's reader holds for a folder: tag → [(step, value)] and tag → [(step, text)].
#[derive(Debug, PartialEq)]
struct Board {
    scalars: BTreeMap<String, Vec<(u64, f32)>>,
    texts: BTreeMap<String, Vec<(u64, String)>>,
}

fn parse_board(line: &str) -> Board {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let pairs = |key: &str| -> BTreeMap<String, Vec<(u64, Value)>> {
        v[key]
            .as_object()
            .unwrap()
            .iter()
            .map(|(tag, list)| {
                let l = list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_u64().unwrap(), p[1].clone()))
                    .collect();
                (tag.clone(), l)
            })
            .collect()
    };
    Board {
        scalars: pairs("scalars")
            .into_iter()
            .map(|(t, l)| {
                let l = l
                    .into_iter()
                    .map(|(s, x)| (s, x.as_f64().unwrap() as f32))
                    .collect();
                (t, l)
            })
            .collect(),
        texts: pairs("texts")
            .into_iter()
            .map(|(t, l)| {
                let l = l
                    .into_iter()
                    .map(|(s, x)| (s, x.as_str().unwrap().to_string()))
                    .collect();
                (t, l)
            })
            .collect(),
    }
}

fn read_board(python: &Path, dir: &Path, extra: &[&str]) -> Board {
    let out = Command::new(python)
        .arg(reader())
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert_ok(&out);
    parse_board(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
}

/// The scalars metrics.jsonl says TensorBoard must show: a training line's numbers under
/// `train/<key>` with `train/tokens_per_s` = tokens / seconds; an evaluation line's under
/// `eval/<key>` (`eval_loss` as `eval/loss`); as f32.
fn expected(run: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut want: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for line in text.lines() {
        let r: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let step = r["step"].as_u64().unwrap();
        let mut push = |tag: String, x: f64| want.entry(tag).or_default().push((step, x as f32));
        match r.get("eval").and_then(Value::as_str) {
            None => {
                for (k, v) in &r {
                    if k != "step" {
                        push(format!("train/{k}"), v.as_f64().unwrap());
                    }
                }
                let tps = r["tokens"].as_f64().unwrap() / r["seconds"].as_f64().unwrap();
                push("train/tokens_per_s".into(), tps);
            }
            Some(_) => {
                for (k, v) in &r {
                    if !["step", "examples", "eval"].contains(&k.as_str()) {
                        let k = if k == "eval_loss" { "loss" } else { k.as_str() };
                        push(format!("eval/{k}"), v.as_f64().unwrap());
                    }
                }
            }
        }
    }
    want
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("tfevents")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn event_files_hold_the_metrics_once_across_a_crash_and_a_resume() {
    let Some(python) = tensorboard_python() else {
        return;
    };
    let (t, cfg) = tiny_run("tensorboard_events.yaml", &[]);
    let run = t.path().join("ck/r");

    // A crash inside step 6's checkpoint write: steps 5 and 6 (and their evaluations) are
    // logged, the latest checkpoint is step 4's.
    let out = train(&cfg, &[], &[("SFT_TEST_FAIL_CHECKPOINT_AT_STEP", "6")]);
    assert!(!out.status.success());
    assert_eq!(event_files(&run).len(), 1);
    let before = read_board(&python, &run, &[]);
    assert_eq!(before.scalars, expected(&run), "before the resume");
    assert_eq!(before.scalars["train/loss"].last().unwrap().0, 6);

    // A TensorBoard that keeps watching the run folder across the resume.
    let mut live = Command::new(&python)
        .arg(reader())
        .arg(&run)
        .arg("--live")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut live_out = BufReader::new(live.stdout.take().unwrap());
    let mut first = String::new();
    live_out.read_line(&mut first).unwrap();
    assert_eq!(parse_board(&first), before);

    let out = train(&cfg, &["--resume"], &[]);
    assert_ok(&out);
    // The resume wrote a new file after the first one.
    assert_eq!(event_files(&run).len(), 2);
    let want = expected(&run);
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "eval/loss",
        "eval/ifs",
        "eval/ifs_full",
        "eval/ifs_partial",
        "eval/objecqa",
    ] {
        assert!(want.contains_key(tag), "{tag} in {:?}", want.keys());
    }
    assert_eq!(
        want["train/loss"].iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<u64>>()
    );

    // Read afresh, with and without TensorBoard's purge of orphaned steps: the same values as
    // metrics.jsonl, every step once (the first file no longer holds steps 5 and 6).
    let board = read_board(&python, &run, &[]);
    assert_eq!(board.scalars, want);
    assert_eq!(read_board(&python, &run, &["--no-purge"]).scalars, want);
    // The watching reader drops what it had loaded of steps 5 and 6 at the new file's
    // SessionLog.START, and ends with the same curves.
    live.stdin.take().unwrap().write_all(b"reload\n").unwrap();
    let mut second = String::new();
    live_out.read_line(&mut second).unwrap();
    assert!(live.wait().unwrap().success());
    assert_eq!(parse_board(&second).scalars, want, "the live reader");

    // The IFS and ObjecQA answers as text at each of their evaluations.
    let ifs_steps: Vec<u64> = want["eval/ifs"].iter().map(|p| p.0).collect();
    let texts = &board.texts["eval/ifs_responses"];
    assert_eq!(texts.iter().map(|p| p.0).collect::<Vec<_>>(), ifs_steps);
    for (step, text) in texts {
        let file = format!("evals/step-{step:06}/ifs-responses.jsonl");
        let answers = std::fs::read_to_string(run.join(&file)).unwrap();
        // Three instructions, each whole and as a fragment.
        assert_eq!(answers.lines().count(), 6);
        assert!(
            text.starts_with(&format!("6 answers at step {step} ({file})")),
            "{text}"
        );
        // A header, a rule and one row per answer, each row naming its instruction.
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 2 + answers.lines().count(), "{text}");
        for (row, a) in rows[2..].iter().zip(answers.lines()) {
            let a: Value = serde_json::from_str(a).unwrap();
            assert!(row.contains(a["id"].as_str().unwrap()), "{row} / {a}");
        }
    }
    let objecqa_steps: Vec<u64> = want["eval/objecqa"].iter().map(|p| p.0).collect();
    assert_eq!(
        board.texts["eval/objecqa_responses"]
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        objecqa_steps
    );
}

#[test]
fn tensorboard_false_writes_no_event_files() {
    let (t, cfg) = tiny_run("tensorboard_events.yaml", &[]);
    let quick = [
        "--set",
        "train.max_steps=2",
        "--set",
        "eval={loss: {every_examples: 0}}",
    ];
    let mut args = quick.to_vec();
    args.extend(["--set", "logging.tensorboard=false"]);
    let out = train(&cfg, &args, &[]);
    assert_ok(&out);
    let run = t.path().join("ck/r");
    assert!(run.join("metrics.jsonl").is_file());
    assert!(event_files(&run).is_empty(), "{:?}", event_files(&run));
    // On by default: the same run in another folder writes them.
    let mut args = quick.to_vec();
    args.extend(["--set", "run.name=on"]);
    let out = train(&cfg, &args, &[]);
    assert!(out.status.success());
    assert_eq!(event_files(&t.path().join("ck/on")).len(), 1);
    // A value that is not a boolean is refused with the field's path.
    let out = train(&cfg, &["--set", "logging.tensorboard=sometimes"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("logging.tensorboard"), "{stderr}");
}
