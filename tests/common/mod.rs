//! Helpers shared by the integration tests that run the `sft` binary.
#![allow(dead_code)] // each test file uses its own subset
use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `sft` binary of this workspace, built (incrementally) once per test process.
pub fn sft_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // The profile this test was built in, whose folder holds the binary.
        let profile: &[&str] = if cfg!(debug_assertions) {
            &[]
        } else {
            &["--release"]
        };
        let status = std::process::Command::new(env!("CARGO"))
            .arg("build")
            .args(profile)
            .args(["-q", "-p", "sft-cli", "--bin", "sft"])
            .current_dir(root())
            .status()
            .expect("running cargo build for the sft binary");
        assert!(status.success(), "cargo build -p sft-cli failed");
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/sft
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("sft");
        assert!(bin.is_file(), "{} not found after building", bin.display());
        bin
    })
    .clone()
}

/// The test models' cache: `$SFT_CACHE`, else `~/.cache/sft` (scripts/fetch-test-models.sh).
pub fn cache_root() -> PathBuf {
    match std::env::var_os("SFT_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sft"),
    }
}

/// A file of `tests/fixtures` (written by scripts/make-fixtures).
pub fn fixture_path(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The JSON of the last stdout line of a command that must have succeeded.
pub fn json_last(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.trim().lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line {last:?}: {e}"))
}
