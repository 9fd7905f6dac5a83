//! Where a row came from: its file and its place in it (line, array element or parquet row).
use std::fmt;
use std::path::PathBuf;

/// Where a row sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// 1-based line of a JSON-lines file.
    Line(u64),
    /// 0-based element of a JSON array.
    Element(u64),
    /// 0-based row of a parquet file.
    Row(u64),
}

impl Loc {
    /// The place as one number (the kind in the top two bits), for compact storage.
    pub fn encode(self) -> u64 {
        match self {
            Loc::Line(n) => n,
            Loc::Element(n) => n | (1 << 62),
            Loc::Row(n) => n | (2 << 62),
        }
    }

    pub fn decode(code: u64) -> Loc {
        let n = code & ((1 << 62) - 1);
        match code >> 62 {
            1 => Loc::Element(n),
            2 => Loc::Row(n),
            _ => Loc::Line(n),
        }
    }
}

/// A row's file and place, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    pub loc: Loc,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match self.loc {
            Loc::Line(n) => write!(f, "{p}:{n}"),
            Loc::Element(n) => write!(f, "{p}: element {n}"),
            Loc::Row(n) => write!(f, "{p}: parquet row {n}"),
        }
    }
}
