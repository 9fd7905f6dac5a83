//! Checkpoints that survive crashes: written into a temporary folder, checksummed, fsynced and
//! renamed into place, so a kill or a full disk mid-save leaves the previous checkpoint whole.
//! A torn or corrupted checkpoint is detected on load (SHA-256 of every file, kept in
//! `trainer_state.json`) and the previous one is used instead, with a warning.
//!
//! Layout: `<run>/step-000123/{adapter or weights, optimizer.safetensors, trainer_state.json,
//! tokenizer + config}`, with `<run>/latest` and `<run>/best` symlinks.
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sft_model::safe_path::file_inside;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
/// The optimizer's state in a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no usable checkpoint in {dir}{}", list_reasons(.reasons))]
    NoneUsable { dir: PathBuf, reasons: Vec<String> },
}

fn list_reasons(reasons: &[String]) -> String {
    reasons.iter().map(|r| format!("\n  skipped {r}")).collect()
}

/// The files a resume will read from a checkpoint folder (paths inside it); each must be listed
/// in the state's `files` and verified before anything is loaded.
pub type ResumeReads<'a> = &'a dyn Fn(&Path) -> Result<Vec<PathBuf>, String>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

/// The envelope written as `trainer_state.json`: the trainer's own state plus checksums.
#[derive(Serialize, Deserialize)]
struct Envelope<S> {
    format: u32,
    step: u64,
    /// SHA-256 of every other file in the checkpoint folder.
    files: BTreeMap<String, String>,
    state: S,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn fsync_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn files_of(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io(&d))? {
            let p = e.map_err(io(&d))?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where a test wants a save to die half-way (`SFT_TEST_FAIL_CHECKPOINT_AT_STEP=N`): the files
/// are written but the folder is never renamed into place, as after a kill mid-save.
fn injected_failure(step: u64) -> bool {
    std::env::var("SFT_TEST_FAIL_CHECKPOINT_AT_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(step)
}

/// Saves, lists, prunes and loads the checkpoints of one run folder.
pub struct Checkpoints {
    run_dir: PathBuf,
}

impl Checkpoints {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
        }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Write checkpoint `step`: `write_files` fills the folder (weights, optimizer, tokenizer),
    /// then the state goes in with the checksums and the folder is renamed into place.
    pub fn save<S: Serialize>(
        &self,
        step: u64,
        state: &S,
        write_files: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, CheckpointError> {
        fs::create_dir_all(&self.run_dir).map_err(io(&self.run_dir))?;
        let name = step_dir_name(step);
        let tmp = self.run_dir.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        write_files(&tmp).map_err(|message| CheckpointError::Invalid {
            path: tmp.clone(),
            message,
        })?;
        let mut files = BTreeMap::new();
        for p in files_of(&tmp)? {
            let rel = p
                .strip_prefix(&tmp)
                .map_err(|e| CheckpointError::Invalid {
                    path: p.clone(),
                    message: e.to_string(),
                })?
                .to_string_lossy()
                .into_owned();
            files.insert(rel, sha256_file(&p)?);
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&p))?;
        }
        let env = Envelope {
            format: 1,
            step,
            files,
            state,
        };
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&env).map_err(|e| CheckpointError::Invalid {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&state_path, json).map_err(io(&state_path))?;
        fs::File::open(&state_path)
            .and_then(|f| f.sync_all())
            .map_err(io(&state_path))?;
        fsync_dir(&tmp)?;
        if injected_failure(step) {
            return Err(CheckpointError::Invalid {
                path: tmp,
                message: "test hook: save interrupted before the rename".into(),
            });
        }
        let dst = self.run_dir.join(&name);
        if dst.exists() {
            let old = self.run_dir.join(format!(".old-{name}"));
            let _ = fs::remove_dir_all(&old);
            fs::rename(&dst, &old).map_err(io(&dst))?;
            fs::rename(&tmp, &dst).map_err(io(&dst))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&tmp, &dst).map_err(io(&dst))?;
        }
        fsync_dir(&self.run_dir)?;
        self.point("latest", &name)?;
        Ok(dst)
    }

    /// Atomically point `<run>/<link>` at `<run>/<target>` (a relative symlink).
    pub fn point(&self, link: &str, target: &str) -> Result<(), CheckpointError> {
        let tmp = self.run_dir.join(format!(".{link}.tmp"));
        let _ = fs::remove_file(&tmp);
        #[cfg(unix)]
        std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
        #[cfg(not(unix))]
        fs::write(&tmp, target).map_err(io(&tmp))?;
        let dst = self.run_dir.join(link);
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        Ok(())
    }

    /// The step checkpoints present, oldest first (temporary folders excluded).
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = fs::read_dir(&self.run_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                parse_step(&name).map(|s| (s, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Delete step checkpoints beyond the newest `keep_last`, except those in `pinned`.
    pub fn prune(&self, keep_last: usize, pinned: &[u64]) -> Result<Vec<u64>, CheckpointError> {
        let all = self.list();
        let cut = all.len().saturating_sub(keep_last);
        let mut removed = Vec::new();
        for (step, path) in &all[..cut] {
            if pinned.contains(step) {
                continue;
            }
            fs::remove_dir_all(path).map_err(io(path))?;
            removed.push(*step);
        }
        Ok(removed)
    }

    /// Read and verify one checkpoint folder: every file its state lists must be a regular file
    /// inside the folder (a plain relative name, no symlink leading out, no device) with the
    /// listed SHA-256, the list may not be empty, and every file `reads` says the resume will
    /// load must be among them.
    pub fn load<S: DeserializeOwned>(
        dir: &Path,
        reads: ResumeReads,
    ) -> Result<(u64, S), CheckpointError> {
        let invalid = |path: PathBuf, message: String| CheckpointError::Invalid { path, message };
        let unsafe_path = |e: sft_model::safe_path::UnsafePath| invalid(e.path, e.reason);
        let state_path = file_inside(dir, STATE_FILE, &[]).map_err(unsafe_path)?;
        let bytes = fs::read(&state_path).map_err(io(&state_path))?;
        let env: Envelope<S> = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(state_path.clone(), format!("unreadable state: {e}")))?;
        if env.files.is_empty() {
            return Err(invalid(
                state_path,
                "`files` is empty: nothing in the checkpoint can be verified; expected the \
                 SHA-256 of every file a resume loads"
                    .into(),
            ));
        }
        for (rel, want) in &env.files {
            let p = file_inside(dir, rel, &[]).map_err(|e| {
                invalid(
                    state_path.clone(),
                    format!("`files` names {}: {}", e.path.display(), e.reason),
                )
            })?;
            let got = sha256_file(&p)?;
            if &got != want {
                return Err(invalid(
                    p,
                    "checksum mismatch: the file is torn or corrupted".into(),
                ));
            }
        }
        let needed = reads(dir).map_err(|e| invalid(dir.to_path_buf(), e))?;
        for p in needed {
            let listed = p
                .strip_prefix(dir)
                .ok()
                .and_then(|r| r.to_str())
                .is_some_and(|r| env.files.contains_key(r));
            if !listed {
                return Err(invalid(
                    p,
                    format!(
                        "a resume loads this file, but {STATE_FILE}'s `files` does not list it; \
                         expected every loaded file listed with its SHA-256"
                    ),
                ));
            }
        }
        Ok((env.step, env.state))
    }

    /// The newest checkpoint that verifies, warning about each newer one that does not. A step
    /// folder that is a symlink leading out of the run folder is skipped.
    pub fn load_latest<S: DeserializeOwned>(
        &self,
        reads: ResumeReads,
    ) -> Result<(PathBuf, u64, S), CheckpointError> {
        let mut reasons = Vec::new();
        for (_, path) in self.list().into_iter().rev() {
            let loaded = self
                .check_step_folder(&path)
                .and_then(|()| Self::load::<S>(&path, reads));
            match loaded {
                Ok((step, s)) => return Ok((path, step, s)),
                Err(e) => {
                    tracing::warn!("skipping checkpoint {}: {e}", path.display());
                    reasons.push(format!("{}: {e}", path.display()));
                }
            }
        }
        Err(CheckpointError::NoneUsable {
            dir: self.run_dir.clone(),
            reasons,
        })
    }

    /// A step folder is a folder of the run, not a symlink to somewhere else.
    fn check_step_folder(&self, path: &Path) -> Result<(), CheckpointError> {
        let meta = fs::symlink_metadata(path).map_err(io(path))?;
        if meta.file_type().is_symlink() {
            let real = fs::canonicalize(path).map_err(io(path))?;
            let run = fs::canonicalize(&self.run_dir).map_err(io(&self.run_dir))?;
            if !real.starts_with(&run) {
                return Err(CheckpointError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "a symlink to {}, outside the run folder; expected a checkpoint folder",
                        real.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a resume of these test checkpoints loads.
    fn reads(d: &Path) -> Result<Vec<PathBuf>, String> {
        Ok(vec![d.join("weights.bin")])
    }

    fn save(c: &Checkpoints, step: u64, payload: &str) -> PathBuf {
        c.save(step, &payload.to_string(), |d| {
            fs::write(d.join("weights.bin"), payload).map_err(|e| e.to_string())
        })
        .unwrap()
    }

    #[test]
    fn save_list_prune_and_latest() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(t.path());
        for s in [10, 20, 30, 40] {
            save(&c, s, &format!("w{s}"));
        }
        assert_eq!(
            fs::read_link(t.path().join("latest")).unwrap(),
            Path::new("step-000040")
        );
        let removed = c.prune(2, &[10]).unwrap();
        assert_eq!(removed, vec![20]);
        let steps: Vec<u64> = c.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 30, 40]);
        let (_, step, st) = c.load_latest::<String>(&reads).unwrap();
        assert_eq!((step, st.as_str()), (40, "w40"));
    }

    #[test]
    fn corrupted_latest_falls_back_to_previous() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(t.path());
        save(&c, 1, "one");
        let p2 = save(&c, 2, "two");
        fs::write(p2.join("weights.bin"), "tw0").unwrap();
        let (path, step, st) = c.load_latest::<String>(&reads).unwrap();
        assert_eq!((step, st.as_str()), (1, "one"));
        assert!(path.ends_with("step-000001"));
        // A torn state file is detected as well.
        fs::write(p2.join(STATE_FILE), "{\"format\":1,").unwrap();
        assert!(Checkpoints::load::<String>(&p2, &reads).is_err());
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(t.path());
        save(&c, 5, "five");
        let err = c.save(6, &"six".to_string(), |_| Err("disk full".into()));
        assert!(err.is_err());
        let (_, step, _) = c.load_latest::<String>(&reads).unwrap();
        assert_eq!(step, 5);
        assert_eq!(
            fs::read_link(t.path().join("latest")).unwrap(),
            Path::new("step-000005")
        );
    }

    /// Rewrites the `files` of a checkpoint's state.
    fn set_files(dir: &Path, files: serde_json::Value) {
        let p = dir.join(STATE_FILE);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v["files"] = files;
        fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    fn refused(dir: &Path) -> String {
        Checkpoints::load::<String>(dir, &reads)
            .expect_err("the checkpoint must be refused")
            .to_string()
    }

    #[test]
    fn crafted_file_lists_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(&t.path().join("run"));
        let p = save(&c, 1, "one");
        let sha = sha256_file(&p.join("weights.bin")).unwrap();
        let secret = t.path().join("secret");
        fs::write(&secret, "not yours").unwrap();
        let secret_sha = sha256_file(&secret).unwrap();

        set_files(
            &p,
            serde_json::json!({"../../secret": secret_sha, "weights.bin": sha}),
        );
        let e = refused(&p);
        assert!(e.contains("..") && e.contains("secret"), "{e}");

        set_files(
            &p,
            serde_json::json!({ secret.to_str().unwrap(): secret_sha, "weights.bin": sha }),
        );
        let e = refused(&p);
        assert!(e.contains("absolute path"), "{e}");

        // Would hang hashing an endless device if it were opened.
        set_files(
            &p,
            serde_json::json!({"/dev/zero": sha, "weights.bin": sha}),
        );
        let e = refused(&p);
        assert!(
            e.contains("/dev/zero") && e.contains("absolute path"),
            "{e}"
        );

        set_files(&p, serde_json::json!({}));
        let e = refused(&p);
        assert!(e.contains("`files` is empty"), "{e}");

        // Listed files verify, but the one a resume loads is not among them.
        fs::write(p.join("notes.txt"), "x").unwrap();
        let notes_sha = sha256_file(&p.join("notes.txt")).unwrap();
        set_files(&p, serde_json::json!({"notes.txt": notes_sha}));
        let e = refused(&p);
        assert!(
            e.contains("weights.bin") && e.contains("does not list it"),
            "{e}"
        );

        set_files(&p, serde_json::json!({"weights.bin": sha}));
        assert!(Checkpoints::load::<String>(&p, &reads).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_checkpoint_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::new(&t.path().join("run"));
        let p = save(&c, 1, "one");
        // The loaded file itself replaced by a link to a file outside, with its hash.
        let outside = t.path().join("outside.bin");
        fs::write(&outside, "one").unwrap();
        fs::remove_file(p.join("weights.bin")).unwrap();
        std::os::unix::fs::symlink(&outside, p.join("weights.bin")).unwrap();
        let e = refused(&p);
        assert!(e.contains("weights.bin") && e.contains("outside"), "{e}");
        // A link to a device.
        fs::remove_file(p.join("weights.bin")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p.join("weights.bin")).unwrap();
        let e = refused(&p);
        assert!(e.contains("weights.bin"), "{e}");
        // A step folder that is a link to a checkpoint elsewhere is not resumed from.
        let t2 = tempfile::tempdir().unwrap();
        let other = Checkpoints::new(t2.path());
        let elsewhere = save(&other, 7, "seven");
        std::os::unix::fs::symlink(&elsewhere, c.run_dir().join("step-000009")).unwrap();
        let e = c.load_latest::<String>(&reads).err().unwrap().to_string();
        assert!(
            e.contains("step-000009") && e.contains("outside the run folder"),
            "{e}"
        );
    }
}
