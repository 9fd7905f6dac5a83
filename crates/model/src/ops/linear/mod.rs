//! Linear layers: the frozen linear (`x W^T`, whose backward never builds a dW), weights packed
//! once for the CPU kernels (`packed_gemm`), and the fused LoRA linear (`lora`).
mod frozen;
mod lora;
pub(crate) mod packed_gemm;
mod quantized;
pub use frozen::{frozen_linear, frozen_linear_packed, Packs, WeightPack, PACKED_F32_MAX_ROWS};
pub use lora::{lora_linear, lora_linear_packed, lora_linear_quant, lora_linear_with, LoraDropout};
pub use packed_gemm::gemm_f32_slices;
pub use quantized::{quant_has_gpu_kernel, quant_linear, quant_linear_composed};

#[cfg(test)]
mod tests;
