//! sft-model: the LLaMA architecture in candle, for training and for generation.
//!
//! Owns everything about the network itself: `config.json` parsing, weight loading (local
//! Hugging Face folders, the hub, GGUF import), the forward pass with padding masks and a
//! response-only loss, LoRA adapters in PEFT's format, fused ops that carry a backward, and
//! batched generation with a KV cache. It knows nothing of datasets, optimizers or evaluators.
pub mod config;
pub mod cpu_features;
pub mod device;
pub mod generate;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod memory;
pub mod ops;
pub mod quant;

pub mod runtime;
pub mod safe_path;
pub mod save;
#[cfg(test)]
pub(crate) mod testing;
