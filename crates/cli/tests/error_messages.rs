//! Error messages say their cause once. The CLI prints an error with its whole chain (`{:#}`);
//! a library error whose message already carries its cause must not also hand it on as its
//! `source`, or the cause is printed twice ("cannot read x.yaml: No such file or directory (os
//! error 2): No such file or directory (os error 2)"). Three commands that fail on a missing
//! file, each through a different library's error type.
use std::path::Path;
use std::process::Command;

/// Runs `sft ARGS`, which must fail; returns its stderr.
fn failing(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sft"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "sft {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// The message names `file` and says the OS's cause ("No such file or directory (os error 2)")
/// exactly once.
fn assert_cause_once(stderr: &str, file: &Path) {
    let enoent = std::fs::File::open("/nonexistent/sft-error-messages").unwrap_err();
    let cause = enoent.to_string();
    assert!(cause.contains("os error"), "{cause}");
    assert!(
        stderr.contains(&file.display().to_string()),
        "the message does not name {}: {stderr}",
        file.display()
    );
    assert_eq!(
        stderr.matches(&cause).count(),
        1,
        "the cause `{cause}` is not said exactly once: {stderr}"
    );
}

#[test]
fn train_with_a_missing_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("missing.yaml");
    let err = failing(&["train".as_ref(), "--config".as_ref(), config.as_os_str()]);
    assert!(err.contains("cannot read"), "{err}");
    assert_cause_once(&err, &config);
}

#[test]
fn classifier_eval_with_a_missing_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("labelled.jsonl");
    let err = failing(&[
        "classifier".as_ref(),
        "eval".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
    ]);
    assert_cause_once(&err, &input);
}

#[test]
fn merge_lora_with_a_missing_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("no-adapter");
    let out = dir.path().join("out");
    let err = failing(&[
        "merge-lora".as_ref(),
        "--base".as_ref(),
        dir.path().as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_cause_once(&err, &adapter);
}
