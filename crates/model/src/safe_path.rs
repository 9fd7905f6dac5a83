//! Files named by something we did not write ourselves (a checkpoint's `trainer_state.json`, a
//! model folder's shard index, a shared checkpoint or model folder) are opened only when they
//! are regular files inside that folder: a plain relative name (no `..`, no absolute path), no
//! symlink that leads out of the folder, no device, FIFO or socket (which could make a read
//! hang or read something other than a file).
use std::path::{Component, Path, PathBuf};

/// A file that may not be read, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct UnsafePath {
    pub path: PathBuf,
    pub reason: String,
}

/// `name` as a relative path of plain components (`a.safetensors`, `sub/b.json`), else why not.
pub fn plain_relative(name: &str) -> Result<&Path, String> {
    if name.is_empty() {
        return Err("an empty file name; expected a plain relative name".into());
    }
    if name.contains('\0') || name.contains('\\') {
        return Err(format!(
            "`{name}` holds a NUL or a backslash; expected a plain relative name"
        ));
    }
    let p = Path::new(name);
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => {
                return Err(format!(
                    "`{name}` contains `..`; expected a plain relative name inside the folder"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{name}` is an absolute path; expected a plain relative name inside the folder"
                ))
            }
            Component::CurDir => {
                return Err(format!(
                    "`{name}` contains `.`; expected a plain relative name"
                ))
            }
        }
    }
    Ok(p)
}

/// The path of the regular file `name` inside `root`, after checking that `name` is a plain
/// relative name and that the file it leads to (symlinks followed) is a regular file inside
/// `root` or inside one of `also_inside` (a hub snapshot's `blobs` folder).
pub fn file_inside(
    root: &Path,
    name: &str,
    also_inside: &[PathBuf],
) -> Result<PathBuf, UnsafePath> {
    let joined = root.join(name);
    let fail = |reason: String| UnsafePath {
        path: joined.clone(),
        reason,
    };
    plain_relative(name).map_err(&fail)?;
    let real = std::fs::canonicalize(&joined).map_err(|e| fail(e.to_string()))?;
    let roots = std::iter::once(root.to_path_buf()).chain(also_inside.iter().cloned());
    let mut inside = false;
    for r in roots {
        if let Ok(r) = std::fs::canonicalize(&r) {
            if real.starts_with(&r) && real != r {
                inside = true;
                break;
            }
        }
    }
    if !inside {
        return Err(fail(format!(
            "leads to {} (through a symlink), outside {}; expected a file inside the folder",
            real.display(),
            root.display()
        )));
    }
    let meta = std::fs::metadata(&real).map_err(|e| fail(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(fail(format!(
            "is not a regular file ({}); expected a regular file",
            kind_of(&meta.file_type())
        )));
    }
    Ok(joined)
}

/// Where a model folder's files may lead: the folder itself, and for a hub cache snapshot
/// (`models--org--name/snapshots/<commit>`) the repository's `blobs` folder, which hf-hub's
/// snapshot symlinks point into.
pub fn model_folder_roots(dir: &Path) -> Vec<PathBuf> {
    let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut extra = Vec::new();
    if let Some(snapshots) = real.parent() {
        if snapshots.file_name().is_some_and(|n| n == "snapshots") {
            if let Some(repo) = snapshots.parent() {
                extra.push(repo.join("blobs"));
            }
        }
    }
    extra
}

/// A model folder's file `name`, checked with [`file_inside`] (hub snapshots may lead into
/// their `blobs`).
pub fn model_file(dir: &Path, name: &str) -> Result<PathBuf, UnsafePath> {
    file_inside(dir, name, &model_folder_roots(dir))
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_only() {
        assert!(plain_relative("model.safetensors").is_ok());
        assert!(plain_relative("sub/a.json").is_ok());
        for bad in ["", "../x", "a/../../x", "/etc/passwd", "./a", "a\\b"] {
            assert!(plain_relative(bad).is_err(), "{bad}");
        }
        assert!(plain_relative("../../x").unwrap_err().contains(".."));
        assert!(plain_relative("/dev/zero")
            .unwrap_err()
            .contains("absolute path"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_devices_and_fifos_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.bin"), b"a").unwrap();
        std::fs::write(t.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("a.bin", root.join("in")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("zero")).unwrap();
        std::os::unix::fs::symlink(t.path(), root.join("updir")).unwrap();
        assert_eq!(
            file_inside(&root, "a.bin", &[]).unwrap(),
            root.join("a.bin")
        );
        assert!(
            file_inside(&root, "in", &[]).is_ok(),
            "a symlink inside is fine"
        );
        let e = file_inside(&root, "out", &[]).unwrap_err().to_string();
        assert!(e.contains("outside") && e.contains("out"), "{e}");
        assert!(file_inside(&root, "updir/outside", &[]).is_err());
        assert!(file_inside(&root, "zero", &[]).is_err());
        let e = file_inside(&root, "sub", &[]).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Allowed elsewhere when the caller says so (a hub snapshot's blobs).
        assert!(file_inside(&root, "out", &[t.path().to_path_buf()]).is_ok());
    }
}
