//! `metrics.jsonl`: one JSON object per line, one line per optimizer step and per evaluation,
//! flushed as written so a killed run keeps every line it logged. With `logging.tensorboard`,
//! every line is mirrored into TensorBoard event files beside it ([`crate::tensorboard`]).
use crate::tensorboard::{self, TensorBoardLog};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
    tensorboard: Option<TensorBoardLog>,
}

impl MetricsLog {
    /// Open for appending. On resume, lines past `keep_until_step` (logged after the checkpoint
    /// being resumed, and so about to be logged again) are dropped first; so are the events
    /// past it in the folder's TensorBoard files, and a new event file is started when
    /// `tensorboard` is on.
    pub fn open(
        path: &Path,
        keep_until_step: Option<u64>,
        tensorboard: bool,
    ) -> std::io::Result<Self> {
        if let Some(limit) = keep_until_step {
            if path.exists() {
                let kept: Vec<String> = BufReader::new(File::open(path)?)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= limit)
                    })
                    .collect();
                let tmp = path.with_extension("jsonl.tmp");
                let mut f = File::create(&tmp)?;
                for l in kept {
                    writeln!(f, "{l}")?;
                }
                f.sync_all()?;
                std::fs::rename(&tmp, path)?;
            }
        } else if path.exists() {
            std::fs::remove_file(path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        tensorboard::reconcile(dir, keep_until_step)?;
        let tensorboard = if tensorboard {
            Some(TensorBoardLog::create(dir, keep_until_step)?)
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensorboard,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> std::io::Result<()> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        // The curves are a view of metrics.jsonl: a failure there is reported, not fatal.
        if let Some(tb) = &mut self.tensorboard {
            if let Err(e) = tb.write(record) {
                tracing::warn!(
                    "tensorboard: cannot write {}: {e}; no more TensorBoard events in this run \
                     (metrics.jsonl goes on)",
                    tb.path().display()
                );
                self.tensorboard = None;
            }
        }
        Ok(())
    }

    /// Every record in a metrics file (for plots and `sft runs`).
    pub fn read_all(path: &Path) -> std::io::Result<Vec<Map<String, Value>>> {
        Ok(BufReader::new(File::open(path)?)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Map<String, Value>>(&l).ok())
            .collect())
    }
}
