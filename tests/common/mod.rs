//! Helpers shared by the integration tests that run the `sft` binary.
#![allow(dead_code)] // each test file uses its own subset
use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `sft` binary of this workspace, built (incrementally) once per test process.
pub fn sft_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "-q", "-p", "sft-cli", "--bin", "sft"])
            .current_dir(root())
            .status()
            .expect("running cargo build for the sft binary");
        assert!(status.success(), "cargo build -p sft-cli failed");
        // target/release/deps/<test>-<hash> -> target/release/sft
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("sft");
        assert!(bin.is_file(), "{} not found after building", bin.display());
        bin
    })
    .clone()
}

/// `sft classifier eval --input FILE`: its output, and the JSON of its last line when it
/// succeeded.
pub fn classifier_eval(input: &Path) -> (std::process::Output, Option<serde_json::Value>) {
    let out = std::process::Command::new(sft_binary())
        .args(["classifier", "eval", "--input"])
        .arg(input)
        .output()
        .unwrap();
    let last = out
        .status
        .success()
        .then(|| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .lines()
                .last()
                .map(String::from)
        })
        .flatten()
        .map(|l| serde_json::from_str(&l).expect("the last line is JSON"));
    (out, last)
}
