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
//!   `CustomOp` with its CPU kernel, its CUDA launch (behind the `cuda` feature; the CUDA C++
//!   source is in the `sft-kernels` crate) and its backward;
//! - [`dispatch`]: the one dtype dispatch (`by_dtype!` over [`dispatch::Elem`]: f32, f64, bf16,
//!   f16; half types compute in f32 and round once, f64 computes in f64 for the
//!   finite-difference tests);
//! - `cpu/`: AVX2 loops (runtime-detected) and the row-parallel helpers;
//! - [`composed`]: each op written with candle's tensor ops, the reference of the tests and the
//!   fallback where no kernel exists;
//! - [`route`]: the routing table below.
//!
//! # The contract of each op
//! | op | inputs | saved for backward | gradients |
//! |---|---|---|---|
//! | [`rms_norm`] | x (..., d), w (d) | x, w (the 1/rms is recomputed) | dx, dw (when tracked) |
//! | [`softmax_last_dim`] | x | y | dx |
//! | [`rope`] | x (b, h, t, d), cos/sin (t or b·t, d/2) | nothing (cos/sin) | dx |
//! | [`silu_mul`] | gate, up | gate, up | dgate, dup |
//! | [`frozen_linear`] | x, W (frozen) | W | dx only (never a dW) |
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
use candle_core::{DType, Device};

mod attention;
pub mod composed;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dispatch;
mod dropout;
mod linear;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use attention::{
    attention, attention_cached, attention_cached_with, attention_with, AttnMask, KeyRanges,
};
pub use cross_entropy::cross_entropy;
pub use dropout::{dropout_mask, DropoutKey};
pub(crate) use linear::packed_gemm;
pub use linear::{
    frozen_linear, frozen_linear_packed, lora_linear, lora_linear_packed, lora_linear_with,
    LoraDropout, Packs, WeightPack, PACKED_F32_MAX_ROWS,
};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::silu_mul;

/// The ops of this module, as the routing table names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    RmsNorm,
    Softmax,
    Rope,
    SiluMul,
    FrozenLinear,
    LoraLinear,
    Attention,
    CrossEntropy,
    Dropout,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::RmsNorm,
        Op::Softmax,
        Op::Rope,
        Op::SiluMul,
        Op::FrozenLinear,
        Op::LoraLinear,
        Op::Attention,
        Op::CrossEntropy,
        Op::Dropout,
    ];

    /// The name used by `SFT_OPS_COMPOSED` (`rms_norm`, `attention`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::Softmax => "softmax",
            Op::Rope => "rope",
            Op::SiluMul => "silu_mul",
            Op::FrozenLinear => "frozen_linear",
            Op::LoraLinear => "lora_linear",
            Op::Attention => "attention",
            Op::CrossEntropy => "cross_entropy",
            Op::Dropout => "dropout",
        }
    }
}

/// What runs an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The op's own kernel for the tensor's device (CPU or CUDA): a `CustomOp`.
    Kernel,
    /// The composed reference ([`composed`]): candle's tensor ops, a backward on every device.
    Composed,
}

/// Ops with a CUDA kernel. An op missing here runs composed on CUDA: adding a kernel is a line
/// in this table (and its `cuda_fwd`).
#[cfg(feature = "cuda")]
const CUDA_KERNELS: &[Op] = &[
    Op::RmsNorm,
    Op::Softmax,
    Op::Rope,
    Op::SiluMul,
    Op::FrozenLinear,
    Op::LoraLinear,
    Op::Attention,
    Op::CrossEntropy,
    Op::Dropout,
];

/// The routing table: which implementation runs `op` on `dev` for inputs of `dtype`. CPU ops
/// all have kernels; on CUDA, the ops of `CUDA_KERNELS` for f32, bf16 and f16 (an op may still
/// send a shape its kernel does not take to the composed form, e.g. attention's head widths);
/// elsewhere (Metal) everything is composed.
/// `SFT_OPS_COMPOSED=rms_norm,attention` (or `all`) sends ops to the composed reference on
/// every device (to rule a kernel out when chasing a numerical difference), and tests can do
/// the same for one thread with [`with_composed`].
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn route(op: Op, dev: &Device, dtype: DType) -> Route {
    if forced_composed(op) {
        return Route::Composed;
    }
    let kernel = match dev {
        Device::Cpu => true,
        // The CUDA kernels take f32, bf16 and f16 (f64 runs composed).
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => CUDA_KERNELS.contains(&op) && cuda::supported(dtype),
        _ => false,
    };
    if kernel {
        Route::Kernel
    } else {
        Route::Composed
    }
}

thread_local! {
    static FORCE_COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every op of this thread sent to its composed reference (the CUDA fallbacks,
/// testable on the CPU).
pub fn with_composed<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCE_COMPOSED.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(FORCE_COMPOSED.with(|c| c.replace(true)));
    f()
}

fn forced_composed(op: Op) -> bool {
    if FORCE_COMPOSED.with(|c| c.get()) {
        return true;
    }
    static ENV: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = ENV.get_or_init(|| {
        std::env::var("SFT_OPS_COMPOSED")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    });
    names.iter().any(|n| n == "all" || n == op.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ops_route_to_kernels_unless_forced() {
        for op in Op::ALL {
            assert_eq!(route(op, &Device::Cpu, DType::F32), Route::Kernel, "{op:?}");
            assert_eq!(
                with_composed(|| route(op, &Device::Cpu, DType::BF16)),
                Route::Composed,
                "{op:?}"
            );
        }
        // The override ends with the closure.
        assert_eq!(route(Op::Rope, &Device::Cpu, DType::F32), Route::Kernel);
    }
}
