//! Differentiable building blocks of the forward pass: fused kernels with a backward, and the
//! one place that decides which implementation runs an op on a device.
//!
//! candle-nn's fused ops (`rms_norm`, `softmax_last_dim`, `rope`) are applied without a backward:
//! the gradient silently stops at them (see `docs/candle-training.md`). Every op here is a candle
//! `CustomOp` recorded with `apply_opN`, so the graph stays intact, and its `bwd` runs fused
//! kernels too.
//!
//! # Layout
//! - one file per op (`rms_norm.rs`, `rope.rs`, `swiglu.rs`, `softmax.rs`, `cross_entropy.rs`,
//!   `linear/` for the frozen and LoRA linears, `attention/` for training and decoding
//!   attention, `dropout.rs` for the counter-based dropout mask): the public function, the
//!   `CustomOp` with its CPU kernel, its CUDA launch (device-neutral: the same code runs on a
//!   GPU with the `cuda` feature and on the emulated GPU; the CUDA C++ source is in the
//!   `sft-kernels` crate) and its backward;
//! - `launch.rs`: the launch description both devices run and the checks made before either
//!   does; `cuda.rs` the GPU's side, `emu.rs` the emulated GPU's (`SFT_KERNELS=emu`,
//!   [`with_emulated`]);
//! - [`dispatch`]: the one dtype dispatch (`by_dtype!` over [`dispatch::Elem`]: f32, f64, bf16,
//!   f16; half types compute in f32 and round once, f64 computes in f64 for the
//!   finite-difference tests);
//! - `cpu/`: AVX2 loops (runtime-detected) and the row-parallel helpers;
//! - [`composed`]: each op written with candle's tensor ops, the reference of the tests and the
//!   fallback where no kernel exists;
//! - `route.rs`: the routing table ([`route`], [`Op`], [`Route`], [`with_composed`]).
//!
//! # The contract of each op
//! | op | inputs | saved for backward | gradients |
//! |---|---|---|---|
//! | [`rms_norm`] | x (..., d), w (d) | x, w (the 1/rms is recomputed) | dx, dw (when tracked) |
//! | [`softmax_last_dim`] | x | y | dx |
//! | [`rope`] | x (b, h, t, d), cos/sin (t or b·t, d/2) | nothing (cos/sin) | dx |
//! | [`silu_mul`] | gate, up | gate, up | dgate, dup |
//! | [`frozen_linear`] | x, W (frozen) | W | dx only (never a dW) |
//! | [`quant_linear`] | x, W (quantized, frozen) | W's blocks | dx only, tile by tile |
//! | [`lora_linear`] | x, W (frozen), A, B, dropout | x, A, B (the mask is redrawn) | dx, dA, dB |
//! | [`attention`] | q, k, v, mask | q, k, v (the probabilities are recomputed) | dq, dk, dv |
//! | [`cross_entropy`] | logits (n, V), labels (n) | logits, the per-row losses | dlogits |
//!
//! Masks of [`attention`] are [`AttnMask`]: an additive (b or 1, 1, t, s) tensor, or key ranges
//! per query (causal, with padding or packed segments): query `i` of row `b` sees keys
//! `start[b][i] ..= past + i`. Packed sequences (several examples in one row, flash-attention's
//! varlen `cu_seqlens`) are key ranges whose start is the first position of each example; the
//! CPU and CUDA kernels take the ranges, the composed reference the additive form.
//!
//! Gradients are only computed for inputs that can carry one (`Tensor::track_op`): a frozen
//! RMSNorm weight costs nothing in backward.
mod attention;
pub mod composed;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dispatch;
mod dropout;
pub mod emu;
mod launch;
mod linear;
mod rms_norm;
mod rope;
mod route;
mod softmax;
mod swiglu;

pub use attention::{
    attention, attention_cached, attention_cached_with, attention_with, AttnMask, KeyRanges,
};
pub use cross_entropy::cross_entropy;
pub use dropout::{dropout_mask, DropoutKey};
pub use emu::{kernels_setting, with_emulated, KernelsSetting};
pub use linear::{
    frozen_linear, frozen_linear_packed, gemm_f32_slices, lora_linear, lora_linear_packed,
    lora_linear_quant, lora_linear_with, quant_has_gpu_kernel, quant_linear, quant_linear_composed,
    LoraDropout, Packs, WeightPack, PACKED_F32_MAX_ROWS,
};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use route::{cpu_kernels, gpu_kernels, route, with_composed, Op, Route};
pub use softmax::softmax_last_dim;
pub use swiglu::silu_mul;
