//! sft-tensorboard: TensorBoard event files written from Rust, with no TensorFlow and no
//! build-time `protoc`.
//!
//! An event file (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`) is a sequence of records
//! in TensorFlow's record framing:
//!
//! ```text
//! u64 little-endian: length of data
//! u32 little-endian: masked CRC-32C of those 8 length bytes
//! data:              an `Event` protobuf (tensorflow/core/util/event.proto)
//! u32 little-endian: masked CRC-32C of data
//! ```
//!
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). The first event
//! of a file carries `file_version = "brain.Event:2"`. The protobuf messages ([`proto`]) are
//! hand-written `prost` structs holding only the fields written here, with TensorFlow's field
//! numbers; readers skip what they do not know.
//!
//! What is written: scalars as `simple_value` (an f32, as every TensorBoard version and reader
//! understands it), text as a rank-0 string tensor tagged for the `text` plugin (markdown), and
//! `SessionLog.START` events that mark a restart.
//!
//! Restarts: a resumed run appends a *new* event file, as TensorBoard expects; the directory
//! reader loads a folder's event files in name order, and [`EventWriter::create`] names the new
//! file so that it sorts after those already there. [`keep_until`] rewrites the existing files
//! without the events past the step being resumed from (they were logged after that
//! checkpoint and are about to be logged again), so that no reader sees a step twice; and the
//! new file starts with `SessionLog.START` at the first step to come, on which TensorBoard
//! itself purges what it already loaded from those steps on (a TensorBoard that was watching
//! while the run went past its checkpoint).
use prost::Message;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The hand-written subset of TensorFlow's `Event`, `Summary`, `SessionLog` and `TensorProto`.
pub mod proto {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "event::What", tags = "3, 5, 7")]
        pub what: Option<event::What>,
    }

    pub mod event {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum What {
            #[prost(string, tag = "3")]
            FileVersion(String),
            #[prost(message, tag = "5")]
            Summary(super::Summary),
            #[prost(message, tag = "7")]
            SessionLog(super::SessionLog),
        }
    }

    /// `tensorflow.SessionLog`; `status` is the `SessionStatus` enum.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(string, tag = "2")]
        pub checkpoint_path: String,
        #[prost(string, tag = "3")]
        pub msg: String,
    }

    /// `SessionLog.SessionStatus.START`.
    pub const SESSION_START: i32 = 1;

    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// `tensorflow.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
        #[prost(oneof = "value::Kind", tags = "2, 8")]
        pub value: Option<value::Kind>,
    }

    pub mod value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(float, tag = "2")]
            SimpleValue(f32),
            #[prost(message, tag = "8")]
            Tensor(super::TensorProto),
        }
    }

    /// `tensorflow.SummaryMetadata`; `data_class` is the `DataClass` enum.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
        #[prost(string, tag = "2")]
        pub display_name: String,
        #[prost(string, tag = "3")]
        pub summary_description: String,
        #[prost(int32, tag = "4")]
        pub data_class: i32,
    }

    /// `DataClass.DATA_CLASS_TENSOR`.
    pub const DATA_CLASS_TENSOR: i32 = 2;

    /// `tensorflow.SummaryMetadata.PluginData`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    /// `tensorflow.TensorProto`; `dtype` is the `DataType` enum.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShapeProto>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    /// `DataType.DT_STRING`.
    pub const DT_STRING: i32 = 7;

    /// `tensorflow.TensorShapeProto` (no dimensions: a scalar).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<Dim>,
    }

    /// `tensorflow.TensorShapeProto.Dim`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }
}

use proto::{event::What, value::Kind, Event, Summary};

/// The prefix of every event file's name.
pub const FILE_PREFIX: &str = "events.out.tfevents.";
const FILE_VERSION: &str = "brain.Event:2";

/// Whether TensorBoard treats a file name as an event file (it looks for `tfevents`).
pub fn is_event_file(name: &str) -> bool {
    name.contains("tfevents")
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its masked CRC, the data, its masked CRC.
pub fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of a file's bytes, each as (its byte range in `bytes`, its data), up to the first
/// one that is torn (cut short by a kill) or fails its checksums; nothing after it is trusted.
pub fn decode_records(bytes: &[u8]) -> Vec<(std::ops::Range<usize>, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            break;
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| (at + 12).checked_add(l))
            .and_then(|e| e.checked_add(4))
            .filter(|e| *e <= bytes.len())
        else {
            break;
        };
        let data = &bytes[at + 12..end - 4];
        let crc = u32::from_le_bytes(bytes[end - 4..end].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            break;
        }
        out.push((at..end, data));
        at = end;
    }
    out
}

/// Every event of an event file that reads back whole (see [`decode_records`]).
pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    let bytes = fs::read(path)?;
    decode_records(&bytes)
        .into_iter()
        .map(|(_, data)| {
            Event::decode(data).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: an event does not decode: {e}", path.display()),
                )
            })
        })
        .collect()
}

/// The event files in `dir`, in name order (the order TensorBoard reads them in).
pub fn event_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let e = e?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                if is_event_file(&name) && !name.starts_with('.') && e.file_type()?.is_file() {
                    out.push(e.path());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

/// Delete every event file in `dir` (a fresh run in a folder that held an older one's).
pub fn remove_all(dir: &Path) -> io::Result<usize> {
    let files = event_files(dir)?;
    for f in &files {
        fs::remove_file(f)?;
    }
    Ok(files.len())
}

/// Rewrite the event files in `dir` without the events whose step is past `step` (and without
/// a torn last record); a file left with nothing but its version record is deleted. Each file
/// is replaced atomically (written aside, then renamed). Returns how many events were dropped.
pub fn keep_until(dir: &Path, step: i64) -> io::Result<usize> {
    let mut dropped = 0;
    for path in event_files(dir)? {
        let bytes = fs::read(&path)?;
        let records = decode_records(&bytes);
        let mut kept = Vec::with_capacity(bytes.len());
        let mut kept_content = false;
        for (range, data) in &records {
            // A record that does not decode as an Event is someone else's: keep it.
            let ev = Event::decode(*data).ok();
            if ev.as_ref().is_some_and(|e| e.step > step) {
                dropped += 1;
                continue;
            }
            if !ev.is_some_and(|e| matches!(e.what, Some(What::FileVersion(_)))) {
                kept_content = true;
            }
            kept.extend_from_slice(&bytes[range.clone()]);
        }
        if !kept_content {
            fs::remove_file(&path)?;
        } else if kept.len() != bytes.len() {
            // The temporary name has no "tfevents": no reader takes it for an event file.
            let tmp = dir.join(".sft-tensorboard-rewrite.tmp");
            fs::write(&tmp, &kept)?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &path)?;
        }
    }
    Ok(dropped)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let h = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let h: String = h
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// The seconds field of an event file's name (`events.out.tfevents.<seconds>.…`).
fn name_seconds(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(FILE_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A name for a new event file in `dir` that sorts after every event file already there: the
/// seconds field is the clock's, or one past the newest file's when that is not later (two
/// starts within a second, or a clock that went back).
fn new_file_name(dir: &Path, seconds: u64, host: &str, pid: u32) -> io::Result<PathBuf> {
    let existing = event_files(dir)?;
    let newest = existing.iter().filter_map(|p| name_seconds(p)).max();
    let name = |s: u64, n: u32| dir.join(format!("{FILE_PREFIX}{s:010}.{host}.{pid}.{n}"));
    let after_all = |p: &Path| existing.iter().all(|e| e.file_name() < p.file_name());
    let later = newest.map_or(seconds, |s| seconds.max(s + 1));
    for s in [seconds, later] {
        for n in 0..10 {
            let p = name(s, n);
            if after_all(&p) {
                return Ok(p);
            }
        }
    }
    // Only names this crate did not write can sort after `later`: a name unused, at least.
    let mut n = 0;
    while name(later, n).exists() {
        n += 1;
    }
    Ok(name(later, n))
}

/// Appends events to one new event file, each record written whole and flushed at once, so a
/// killed run keeps everything up to its last event (a torn last record is skipped by readers).
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named to sort after the files already
    /// there, starting with the file-version event.
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = new_file_name(dir, now() as u64, &hostname(), std::process::id())?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = Self { path, file };
        w.write_event(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event.
    pub fn write_event(&mut self, event: &Event) -> io::Result<()> {
        self.file
            .write_all(&encode_record(&event.encode_to_vec()))?;
        self.file.flush()
    }

    /// One event holding several scalars at `step`.
    pub fn scalars<'a>(
        &mut self,
        step: i64,
        values: impl IntoIterator<Item = (&'a str, f32)>,
    ) -> io::Result<()> {
        let value = values
            .into_iter()
            .map(|(tag, v)| proto::Value {
                tag: tag.to_string(),
                metadata: None,
                value: Some(Kind::SimpleValue(v)),
            })
            .collect();
        self.summary(step, Summary { value })
    }

    /// Markdown text at `step`, shown by TensorBoard's Text tab under `tag`.
    pub fn text(&mut self, step: i64, tag: &str, markdown: &str) -> io::Result<()> {
        let value = proto::Value {
            tag: tag.to_string(),
            metadata: Some(proto::SummaryMetadata {
                plugin_data: Some(proto::PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
                data_class: proto::DATA_CLASS_TENSOR,
                ..Default::default()
            }),
            value: Some(Kind::Tensor(proto::TensorProto {
                dtype: proto::DT_STRING,
                tensor_shape: Some(proto::TensorShapeProto::default()),
                string_val: vec![markdown.as_bytes().to_vec()],
            })),
        };
        self.summary(step, Summary { value: vec![value] })
    }

    /// `SessionLog.START` at `step`: TensorBoard drops the events it holds from `step` on.
    pub fn session_start(&mut self, step: i64) -> io::Result<()> {
        self.write_event(&Event {
            wall_time: now(),
            step,
            what: Some(What::SessionLog(proto::SessionLog {
                status: proto::SESSION_START,
                ..Default::default()
            })),
        })
    }

    fn summary(&mut self, step: i64, summary: Summary) -> io::Result<()> {
        self.write_event(&Event {
            wall_time: now(),
            step,
            what: Some(What::Summary(summary)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars_of(events: &[Event]) -> Vec<(i64, String, f32)> {
        let mut out = Vec::new();
        for e in events {
            if let Some(What::Summary(s)) = &e.what {
                for v in &s.value {
                    if let Some(Kind::SimpleValue(x)) = v.value {
                        out.push((e.step, v.tag.clone(), x));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn masked_crc_matches_tensorflow() {
        // The CRC-32C check value of "123456789" is 0xe3069283 (RFC 3720, B.4); masked, it is
        // 0xc78ab0e5 (what TensorBoard's own `masked_crc32c` gives).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        // An empty record: length 0, then the CRCs.
        let r = encode_record(b"");
        assert_eq!(r.len(), 16);
        assert_eq!(&r[..8], &[0u8; 8]);
    }

    #[test]
    fn written_events_read_back_and_a_torn_tail_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(t.path()).unwrap();
        w.scalars(1, [("train/loss", 2.5f32), ("train/lr", 1e-4)])
            .unwrap();
        w.text(1, "eval/ifs_responses", "| a |\n| - |\n| b |")
            .unwrap();
        w.scalars(2, [("train/loss", 2.0f32)]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        assert_eq!(
            scalars_of(&events),
            vec![
                (1, "train/loss".into(), 2.5),
                (1, "train/lr".into(), 1e-4),
                (2, "train/loss".into(), 2.0)
            ]
        );
        // Cut the last record short, as a kill mid-write would: the rest reads back.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 3);
        // A flipped byte inside a record's data fails its checksum: reading stops there.
        let mut bytes = fs::read(&path).unwrap();
        let second = decode_records(&bytes)[1].0.clone();
        bytes[second.start + 14] ^= 0x40;
        assert_eq!(decode_records(&bytes).len(), 1);
    }

    #[test]
    fn a_new_file_sorts_after_the_existing_ones() {
        let t = tempfile::tempdir().unwrap();
        // A file from "the future" (a clock that went back, or a start in the same second).
        let future = t
            .path()
            .join(format!("{FILE_PREFIX}4000000000.zzz.99999.0"));
        fs::write(&future, b"").unwrap();
        let name = new_file_name(t.path(), 1_700_000_000, "host", 7).unwrap();
        assert!(name.file_name() > future.file_name(), "{name:?}");
        let w = EventWriter::create(t.path()).unwrap();
        assert!(w.path().file_name() > future.file_name());
        // Two writers in the same second and process still get distinct, ordered files.
        let a = EventWriter::create(t.path()).unwrap();
        let b = EventWriter::create(t.path()).unwrap();
        assert!(a.path() < b.path());
    }

    #[test]
    fn keep_until_drops_the_steps_past_a_checkpoint() {
        let t = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(t.path()).unwrap();
        for s in 1..=5 {
            w.scalars(s, [("train/loss", s as f32)]).unwrap();
        }
        let first = w.path().to_path_buf();
        // A torn tail too.
        let mut f = OpenOptions::new().append(true).open(&first).unwrap();
        f.write_all(&encode_record(b"partial")[..9]).unwrap();
        drop(w);
        assert_eq!(keep_until(t.path(), 3).unwrap(), 2);
        let steps: Vec<i64> = scalars_of(&read_events(&first).unwrap())
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        assert_eq!(decode_records(&fs::read(&first).unwrap()).len(), 4);
        // Nothing left but the version record: the file goes.
        let mut w = EventWriter::create(t.path()).unwrap();
        w.scalars(9, [("train/loss", 9.0)]).unwrap();
        let second = w.path().to_path_buf();
        drop(w);
        keep_until(t.path(), 3).unwrap();
        assert!(!second.exists());
        assert_eq!(event_files(t.path()).unwrap(), vec![first.clone()]);
        assert_eq!(remove_all(t.path()).unwrap(), 1);
        assert!(event_files(t.path()).unwrap().is_empty());
    }
}
