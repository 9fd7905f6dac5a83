//! The one place that decides which implementation runs an op on a device: the op's kernel
//! (CPU, or CUDA where the table lists one) or its composed reference.
use candle_core::{DType, Device};

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
    QuantLinear,
}

impl Op {
    pub const ALL: [Op; 10] = [
        Op::RmsNorm,
        Op::Softmax,
        Op::Rope,
        Op::SiluMul,
        Op::FrozenLinear,
        Op::LoraLinear,
        Op::Attention,
        Op::CrossEntropy,
        Op::Dropout,
        Op::QuantLinear,
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
            Op::QuantLinear => "quant_linear",
        }
    }
}

/// What runs an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The op's own kernel for the tensor's device (CPU or CUDA): a `CustomOp`.
    Kernel,
    /// The composed reference ([`crate::ops::composed`]): candle's tensor ops, a backward on every device.
    Composed,
}

/// Ops with a CUDA kernel (all of them; the quantized linear sends the block formats its
/// dequantization kernel lacks to the composed form itself). An op for which this is false
/// runs composed on CUDA (and on the emulated GPU), so bisecting a kernel is one line here.
fn has_cuda_kernel(_op: Op) -> bool {
    true
}

/// The routing table: which implementation runs `op` on `dev` for inputs of `dtype`. CPU ops
/// all have kernels; on CUDA, the ops [`has_cuda_kernel`] names, for f32, bf16 and f16 (an op may still
/// send a shape its kernel does not take to the composed form, e.g. attention's head widths);
/// elsewhere (Metal) everything is composed. Under `SFT_KERNELS=emu` (or [`crate::ops::with_emulated`])
/// the CPU takes CUDA's row: its ops run the CUDA kernels on the emulated GPU.
/// `SFT_OPS_COMPOSED=rms_norm,attention` (or `all`) sends ops to the composed reference on
/// every device (to rule a kernel out when chasing a numerical difference), and tests can do
/// the same for one thread with [`with_composed`].
pub fn route(op: Op, dev: &Device, dtype: DType) -> Route {
    if forced_composed(op) {
        return Route::Composed;
    }
    // The CUDA kernels take f32, bf16 and f16 (f64 runs composed).
    let cuda = has_cuda_kernel(op) && super::launch::supported(dtype);
    let kernel = match dev {
        Device::Cpu if super::emu::active() => cuda,
        Device::Cpu => true,
        Device::Cuda(_) => cuda,
        _ => false,
    };
    if kernel {
        Route::Kernel
    } else {
        Route::Composed
    }
}

/// Whether ops on `dev` run the CUDA kernels' launches: on a GPU, or on the CPU through the
/// emulated GPU.
pub fn gpu_kernels(dev: &Device) -> bool {
    dev.is_cuda() || (dev.is_cpu() && super::emu::active())
}

/// Whether ops on `dev` run the CPU kernels (the CPU, not emulating a GPU).
pub fn cpu_kernels(dev: &Device) -> bool {
    dev.is_cpu() && !super::emu::active()
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

    #[test]
    fn emulated_gpu_takes_the_cuda_row() {
        crate::ops::with_emulated(|| {
            assert!(gpu_kernels(&Device::Cpu) && !cpu_kernels(&Device::Cpu));
            for op in Op::ALL.into_iter().filter(|&op| has_cuda_kernel(op)) {
                assert_eq!(
                    route(op, &Device::Cpu, DType::BF16),
                    Route::Kernel,
                    "{op:?}"
                );
                // f64 has no CUDA kernel: composed, as on a GPU.
                assert_eq!(
                    route(op, &Device::Cpu, DType::F64),
                    Route::Composed,
                    "{op:?}"
                );
            }
        });
        assert!(cpu_kernels(&Device::Cpu));
        assert_eq!(route(Op::Rope, &Device::Cpu, DType::F64), Route::Kernel);
    }
}
