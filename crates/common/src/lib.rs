//! sft-common: small pieces several crates share, written once.
//!
//! - [`mix`]: a seed derived from a run seed and two counters (splitmix64);
//! - `RawView` (feature `tensors`): a tensor's little-endian bytes as a safetensors `View`.
#[cfg(feature = "tensors")]
mod raw_view;
mod seed;

#[cfg(feature = "tensors")]
pub use raw_view::RawView;
pub use seed::mix;
