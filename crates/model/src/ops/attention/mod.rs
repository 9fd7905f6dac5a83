//! Multi-head attention with grouped K/V heads: the training op (forward, and a backward that
//! recomputes the probabilities instead of keeping them) and the decoding path over a KV cache
//! (`decode`). The rooms: `mask` (additive masks and causal key ranges), `node` (the graph
//! nodes and what they keep), `full` (the entry points and the CPU forward and backward),
//! `decode`, CPU kernels in `cpu`, the CUDA launch in `cuda` (flash-attention's scheme; a GPU or the emulated one).
pub(crate) mod cpu;
mod cuda;
pub(crate) mod decode;
pub(crate) mod full;
pub(crate) mod mask;
mod node;

pub use decode::{attention_cached, attention_cached_with};
pub use full::{attention, attention_with};
pub use mask::{AttnMask, KeyRanges};
