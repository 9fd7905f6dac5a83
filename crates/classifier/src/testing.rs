//! Helpers of this crate's unit tests.

/// A file `name` holding `text` in a new temporary folder (removed when the guard drops).
pub fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    (dir, p)
}
