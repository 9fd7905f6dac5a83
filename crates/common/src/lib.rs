//! sft-common: small pieces several crates share, written once.
//!
//! - [`mix`]: a seed derived from a run seed and two counters (splitmix64);
//! - [`mtime_nanos`]: a file's modification time as a cache key;
//! - [`sha256_hex`]: a content hash for cache keys;
//! - `RawView` (feature `tensors`): a tensor's little-endian bytes as a safetensors `View`.
#[cfg(feature = "tensors")]
mod raw_view;
mod seed;

#[cfg(feature = "tensors")]
pub use raw_view::RawView;
pub use seed::mix;

/// A file's modification time in nanoseconds since the Unix epoch (0 where the platform or the
/// file system keeps none): part of the keys that tell a cache its input changed.
pub fn mtime_nanos(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// The SHA-256 of `bytes` in lowercase hex: a cache key that depends on content only.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
