//! The one dtype dispatch of the ops: [`Elem`] ties each storage type (f32, f64, bf16, f16) to
//! the float type its arithmetic runs in (f32 for the half types, rounded once at the end), and
//! `by_dtype!` calls a kernel generic over [`Elem`] with the Rust type of a tensor's dtype.
//! Per-type fast paths (AVX2 loops for f32) hang off the trait's provided methods.
use candle_core::{bail, CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};
use num_traits::Float;

use super::cpu::cont;
use super::cpu::simd::*;

/// The arithmetic dtype of attention on `dt` inputs: f64 for f64, else f32.
pub(crate) fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The float type a kernel's arithmetic runs in: f32, or f64 (the finite-difference tests).
pub(crate) trait Acc:
    Float + Send + Sync + 'static + std::iter::Sum + std::ops::AddAssign
{
    /// `exp` for the inner loops: f64 uses the library's; f32 an inlined polynomial (Cephes'
    /// `expf`: range reduction by ln 2, degree-6 polynomial, within 2 ulp), since a call into
    /// libm per element was 6% of a training step (softmax, cross-entropy, SiLU).
    fn fexp(self) -> Self;
    /// `x = exp(x - max)` over a row, returning the row's new sum (a softmax's inner loop).
    fn exp_shift_sum(row: &mut [Self], max: Self) -> Self;
    /// An `f64` constant in this type.
    fn of_f64(v: f64) -> Self;
    /// Storage for a vector of this type.
    fn store(v: Vec<Self>) -> CpuStorage;
    /// A contiguous slice of storage of this type.
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [Self]>;
}

impl Acc for f64 {
    #[inline(always)]
    fn of_f64(v: f64) -> f64 {
        v
    }

    fn store(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f64]> {
        cont::<f64>(s, l, op)
    }

    #[inline(always)]
    fn fexp(self) -> f64 {
        self.exp()
    }

    fn exp_shift_sum(row: &mut [f64], max: f64) -> f64 {
        row.iter_mut().fold(0.0, |sum, x| {
            *x = (*x - max).exp();
            sum + *x
        })
    }
}

impl Acc for f32 {
    #[inline(always)]
    fn of_f64(v: f64) -> f32 {
        v as f32
    }

    fn store(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        cont::<f32>(s, l, op)
    }

    #[inline(always)]
    fn fexp(self) -> f32 {
        exp_f32(self)
    }

    fn exp_shift_sum(row: &mut [f32], max: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_shift_sum_avx2(row, max) };
        }
        exp_shift_sum_f32(row, max)
    }
}

/// A storage element and the float type its arithmetic runs in.
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    type A: Acc;
    /// A 16-bit type: arithmetic runs in f32 and results are rounded once.
    const HALF: bool;
    fn to_a(self) -> Self::A;
    fn from_a(a: Self::A) -> Self;
    /// An `f64` constant in the arithmetic type.
    #[inline(always)]
    fn a(v: f64) -> Self::A {
        Self::A::of_f64(v)
    }
    /// Storage for a vector of the arithmetic type (f32 or f64).
    fn store_a(v: Vec<Self::A>) -> CpuStorage {
        Self::A::store(v)
    }
    /// A contiguous slice of arithmetic-type storage.
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [Self::A]> {
        Self::A::slice(s, l, op)
    }
    /// A contiguous slice as the arithmetic type: borrowed for f32 and f64, converted for the
    /// half types.
    fn acc_slice(v: &[Self]) -> std::borrow::Cow<'_, [Self::A]>;
    /// Arithmetic-type results as this type's storage (rounded once for the half types).
    fn store_from_a(v: Vec<Self::A>) -> CpuStorage;
    /// `sum(exp(x - shift))` over a row (cross-entropy's logsumexp).
    fn sum_exp_shift(row: &[Self], shift: Self::A) -> Self::A {
        row.iter().map(|&v| (v.to_a() - shift).fexp()).sum()
    }
    /// `out = scale * exp(x - shift)` (cross-entropy's backward).
    fn exp_shift_scale(out: &mut [Self], x: &[Self], shift: Self::A, scale: Self::A) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = Self::from_a(scale * (v.to_a() - shift).fexp());
        }
    }
}

impl Elem for f32 {
    fn acc_slice(v: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(v)
    }
    fn store_from_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn sum_exp_shift(row: &[f32], shift: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { sum_exp_shift_avx2(row, shift) };
        }
        sum_exp_shift_f32(row, shift)
    }
    fn exp_shift_scale(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_shift_scale_avx2(out, x, shift, scale) };
        }
        exp_shift_scale_f32(out, x, shift, scale)
    }
    const HALF: bool = false;
    type A = f32;
    #[inline(always)]
    fn to_a(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_a(a: f32) -> Self {
        a
    }
}
impl Elem for f64 {
    fn acc_slice(v: &[f64]) -> std::borrow::Cow<'_, [f64]> {
        std::borrow::Cow::Borrowed(v)
    }
    fn store_from_a(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    const HALF: bool = false;
    type A = f64;
    #[inline(always)]
    fn to_a(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_a(a: f64) -> Self {
        a
    }
}
impl Elem for bf16 {
    fn acc_slice(v: &[bf16]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Owned(v.iter().map(|x| x.to_a()).collect())
    }
    fn store_from_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::BF16(super::linear::packed_gemm::to_bf16(&v))
    }
    const HALF: bool = true;
    type A = f32;
    #[inline(always)]
    fn to_a(self) -> f32 {
        // Exact, and inlined (half's conversion goes through a per-call feature check).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_a(a: f32) -> Self {
        bf16::from_bits(super::linear::packed_gemm::round_bf16(a.to_bits()))
    }
}
impl Elem for f16 {
    fn acc_slice(v: &[f16]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect())
    }
    fn store_from_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F16(v.into_iter().map(f16::from_f32).collect())
    }
    const HALF: bool = true;
    type A = f32;
    #[inline(always)]
    fn to_a(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_a(a: f32) -> Self {
        f16::from_f32(a)
    }
}

/// Calls `$f::<T>(args)` with `T` the Rust type of a float dtype.
macro_rules! by_dtype {
    ($dt:expr, $name:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dt {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            dt => candle_core::bail!(
                "{}: unsupported dtype {dt:?} (expected f32, f64, bf16 or f16)",
                $name
            ),
        }
    };
}
pub(crate) use by_dtype;

/// The `name`, `cpu_fwd` and `cuda_fwd` of a candle `CustomOp1/2/3` impl, from the op's two
/// kernels: `kernels!("sft-op", "op", cpu_kernel, cuda_kernel, inputs)` with `inputs` 1, 2 or
/// 3. `cpu_kernel::<T>(op, (storage, layout), ...)` is generic over [`Elem`] and called for the
/// first input's dtype (`by_dtype!`, `"op"` naming it in errors); `cuda_kernel(op, (storage,
/// layout), ...)` runs on the device. Both return the output and its shape. The impl keeps its
/// `bwd`, so an op's wiring is one line and its kernels are plain functions. `cuda_kernel` is
/// generic over the device's storage ([`crate::ops::launch::GpuStorage`]): it runs on a GPU
/// from `cuda_fwd`, and on the emulated GPU from `cpu_fwd` when [`crate::ops::emu::active`]
/// (the CPU storages copied to the emulator's memory and the result back).
macro_rules! kernels {
    ($name:literal, $label:literal, $cpu:ident, $cuda:path, 1) => {
        $crate::ops::dispatch::kernels!(@ $name, $label, $cpu, $cuda, (s1, l1));
    };
    ($name:literal, $label:literal, $cpu:ident, $cuda:path, 2) => {
        $crate::ops::dispatch::kernels!(@ $name, $label, $cpu, $cuda, (s1, l1), (s2, l2));
    };
    ($name:literal, $label:literal, $cpu:ident, $cuda:path, 3) => {
        $crate::ops::dispatch::kernels!(
            @ $name, $label, $cpu, $cuda, (s1, l1), (s2, l2), (s3, l3)
        );
    };
    (@ $name:literal, $label:literal, $cpu:ident, $cuda:path,
        ($s1:ident, $l1:ident) $(, ($s:ident, $l:ident))*) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            $s1: &candle_core::CpuStorage,
            $l1: &candle_core::Layout,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout,)*
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            if $crate::ops::emu::active() {
                let $s1 = &$crate::ops::emu::EmuStorage::upload($s1)?;
                $(let $s = &$crate::ops::emu::EmuStorage::upload($s)?;)*
                let (out, shape) = $cuda(self, ($s1, $l1) $(, ($s, $l))*)?;
                return Ok((out.to_cpu()?, shape));
            }
            let dt = candle_core::backend::BackendStorage::dtype($s1);
            $crate::ops::dispatch::by_dtype!(dt, $label, $cpu(self, ($s1, $l1) $(, ($s, $l))*))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $s1: &candle_core::CudaStorage,
            $l1: &candle_core::Layout,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout,)*
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $cuda(self, ($s1, $l1) $(, ($s, $l))*)
        }
    };
}
pub(crate) use kernels;

pub(crate) fn same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
    if a != b {
        bail!("{op}: dtype mismatch, {a:?} and {b:?}");
    }
    Ok(())
}
