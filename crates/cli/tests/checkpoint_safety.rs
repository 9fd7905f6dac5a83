//! Checkpoints from elsewhere cannot be turned against their user: a crafted
//! `trainer_state.json` (path traversal, absolute path, a device, an empty file list, a file a
//! resume loads left unlisted) or a symlink out of the checkpoint folder is refused with an error
//! naming the file, and nothing is trained. And `HF_TOKEN` never reaches the logs or the run
//! folder.
mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn sha256(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

/// Every path under `dir` with its size and modification time: what a refused resume must
/// leave as it was.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn crafted_checkpoints_are_refused_and_nothing_is_trained() {
    let (t, cfg) = tiny_run("checkpoint_safety.yaml", &[]);
    let out = train(&cfg, &[], &[]);
    assert_ok(&out);
    let run = t.path().join("ck/r");
    let ck = run.join("step-000002");
    let state_path = ck.join("trainer_state.json");
    let original = std::fs::read(&state_path).unwrap();
    let state: Value = serde_json::from_slice(&original).unwrap();
    let files = state["files"].as_object().unwrap().clone();
    assert!(files.contains_key("model.safetensors") && files.contains_key("optimizer.safetensors"));
    let secret = t.path().join("secret.txt");
    std::fs::write(&secret, "someone else's file").unwrap();
    let secret_sha = sha256(&secret);

    let with_files = |f: Value| {
        let mut s = state.clone();
        s["files"] = f;
        std::fs::write(&state_path, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
    };
    let plus = |k: &str, v: &str| {
        let mut f = files.clone();
        f.insert(k.to_string(), v.into());
        Value::Object(f)
    };
    let resume_more = ["--resume", "--set", "train.max_steps=4"];
    let refused = |what: &str, extra: &[&str], want: &[&str]| {
        let before = snapshot(&run);
        let out = train(&cfg, extra, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: not refused: {stderr}");
        for w in want {
            assert!(
                stderr.contains(w),
                "{what}: the error lacks `{w}`: {stderr}"
            );
        }
        assert_eq!(snapshot(&run), before, "{what}: the run folder changed");
        assert!(!run.join("step-000003").exists() && !run.join("step-000004").exists());
    };

    with_files(plus("../../secret.txt", &secret_sha));
    refused(
        "traversal",
        &resume_more,
        &["../../secret.txt", "contains `..`", "trainer_state.json"],
    );
    with_files(plus(secret.to_str().unwrap(), &secret_sha));
    refused(
        "absolute path",
        &resume_more,
        &["secret.txt", "absolute path"],
    );
    with_files(plus("/dev/zero", &secret_sha));
    refused("device", &resume_more, &["/dev/zero", "absolute path"]);
    with_files(serde_json::json!({}));
    refused("empty files", &resume_more, &["`files` is empty"]);
    let mut no_optim = files.clone();
    no_optim.remove("optimizer.safetensors");
    with_files(Value::Object(no_optim));
    refused(
        "unlisted optimizer",
        &resume_more,
        &["optimizer.safetensors", "does not list it"],
    );
    // The checkpoint folder named on the command line is checked the same way.
    with_files(plus("../../secret.txt", &secret_sha));
    let ck_arg = ck.to_str().unwrap();
    refused(
        "traversal, explicit folder",
        &["--resume", ck_arg, "--set", "train.max_steps=4"],
        &["../../secret.txt", "contains `..`"],
    );

    // The weights swapped for a link to an identical file outside: the hash matches, the link
    // is refused.
    std::fs::write(&state_path, &original).unwrap();
    let weights = ck.join("model.safetensors");
    let outside = t.path().join("outside.safetensors");
    std::fs::copy(&weights, &outside).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink(&outside, &weights).unwrap();
    refused(
        "symlink out",
        &resume_more,
        &["model.safetensors", "outside"],
    );
    std::fs::remove_file(&weights).unwrap();
    std::fs::copy(&outside, &weights).unwrap();

    // Untouched, the same checkpoint resumes and trains on.
    let out = train(&cfg, &resume_more, &[]);
    assert_ok(&out);
    assert!(run.join("step-000004").is_dir());
}

#[test]
fn hf_token_never_reaches_logs_or_the_run_folder() {
    const TOKEN: &str = "hf_sftTestTokenDoNotLeak0123456789";
    let (t, cfg) = tiny_run("checkpoint_safety.yaml", &[]);
    let out = train(
        &cfg,
        &[],
        &[("HF_TOKEN", TOKEN), ("RUST_LOG", "debug,tokenizers=warn")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The hub options are logged at debug level, with the token redacted.
    assert!(stderr.contains("<redacted>"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token is in stderr");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN));
    let mut stack = vec![t.path().join("ck")];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                assert!(
                    !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                    "the token is in {}",
                    p.display()
                );
                n += 1;
            }
        }
    }
    assert!(n >= 5, "only {n} files in the run folder");
}
