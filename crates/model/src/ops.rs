//! Differentiable building blocks of the forward pass, as fused CPU kernels with a backward.
//!
//! candle-nn's fused ops (`rms_norm`, `softmax_last_dim`, `rope`) are applied without a backward:
//! the gradient silently stops at them. Every op here is a candle `CustomOp` recorded with
//! `apply_opN`, so the graph stays intact, and its `bwd` runs fused CPU kernels too.
//!
//! - Kernels exist for f32, f64, bf16 and f16; half types compute in f32 and round once. f64
//!   computes in f64, which is what the finite-difference tests use.
//! - Inputs are made contiguous by the wrappers (a no-op when they already are), except the `x`
//!   of [`rope`], which may be any strided (b, h, t, d) view with a unit last stride (e.g. the
//!   transpose of a (b, t, h, d) projection) and saves a copy that way.
//! - Work is split over rows with rayon once a tensor is large enough to pay for it.
//! - On other devices (CUDA, behind the `cuda` feature) the wrappers fall back to candle's
//!   composed ops, which carry a backward on every device; only [`frozen_linear`] and
//!   [`cross_entropy`] are custom there too (`frozen_linear` runs the device's matmul,
//!   `cross_entropy` is composed).
//! - Gradients are only computed for inputs that can carry one (`Tensor::track_op`): a frozen
//!   RMSNorm weight costs nothing in backward.
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Tensor, WithDType, D,
};
use half::{bf16, f16};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// Element types and helpers
// ---------------------------------------------------------------------------------------------

/// `exp` for the kernels' inner loops: f64 uses the library's; f32 an inlined polynomial
/// (Cephes' `expf`: range reduction by ln 2, degree-6 polynomial, within 2 ulp), since a call
/// into libm per element was 6% of a training step (softmax, cross-entropy, SiLU).
pub(crate) trait FastExp: Copy {
    fn fexp(self) -> Self;
    /// `x = exp(x - max)` over a row, returning the row's new sum (a softmax's inner loop).
    fn exp_shift_sum(row: &mut [Self], max: Self) -> Self;
}

impl FastExp for f64 {
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

impl FastExp for f32 {
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

/// Two loops so the compiler vectorizes the exponentials (the sum keeps 8 lanes of partial
/// sums, a fixed order).
#[inline(always)]
fn exp_shift_sum_f32(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_sum_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_shift_sum_f32(row, max)
}

#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding and subtracting 1.5 * 2^23 (no libm call, vectorizable).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // 2^n: n is in -126..=127 after the clamp, a normal exponent.
    let y = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0 // exp(-inf) = 0 exactly (masked attention scores)
    } else if x > 88.0 {
        f32::INFINITY
    } else if x.is_nan() {
        f32::NAN
    } else {
        y
    }
}

/// A storage element and the float type its arithmetic runs in.
trait Elem: WithDType + Copy + Send + Sync {
    type A: Float + FastExp + Send + Sync + std::iter::Sum + std::ops::AddAssign;
    /// A 16-bit type: arithmetic runs in f32 and results are rounded once.
    const HALF: bool;
    fn to_a(self) -> Self::A;
    fn from_a(a: Self::A) -> Self;
    /// An `f64` constant in the arithmetic type.
    fn a(v: f64) -> Self::A;
    /// Storage for a vector of the arithmetic type (f32 or f64).
    fn store_a(v: Vec<Self::A>) -> CpuStorage;
    /// A contiguous slice of arithmetic-type storage.
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [Self::A]>;
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
    /// One row of [`silu_mul`].
    fn silu_mul_row(o: &mut [Self], g: &[Self], u: &[Self]) {
        silu_mul_row_body(o, g, u)
    }
    /// One row of [`silu_mul`]'s backward.
    fn silu_mul_bwd_row(dg: &mut [Self], du: &mut [Self], g: &[Self], u: &[Self], dy: &[Self]) {
        silu_mul_bwd_row_body(dg, du, g, u, dy)
    }
}

#[inline(always)]
fn silu_mul_row_body<T: Elem>(o: &mut [T], g: &[T], u: &[T]) {
    for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
        let gv = gv.to_a();
        *o = T::from_a(gv * sigmoid(gv) * uv.to_a());
    }
}

#[inline(always)]
fn silu_mul_bwd_row_body<T: Elem>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) {
    for (((dgv, duv), (&gv, &uv)), &yv) in dg
        .iter_mut()
        .zip(du.iter_mut())
        .zip(g.iter().zip(u))
        .zip(dy)
    {
        let (gv, uv, yv) = (gv.to_a(), uv.to_a(), yv.to_a());
        let s = sigmoid(gv);
        *dgv = T::from_a(yv * uv * s * (T::A::one() + gv * (T::A::one() - s)));
        *duv = T::from_a(yv * gv * s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_row_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    silu_mul_row_body(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_bwd_row_avx2(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    silu_mul_bwd_row_body(dg, du, g, u, dy)
}

/// The f32 loops of [`Elem::sum_exp_shift`] and [`Elem::exp_shift_scale`], vectorized with AVX2
/// where the CPU has it (the crate is built for baseline x86-64).
#[inline(always)]
fn sum_exp_shift_f32(row: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += exp_f32(v - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp_f32(v - shift)).sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn exp_shift_scale_f32(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scale * exp_f32(v - shift);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_shift_avx2(row: &[f32], shift: f32) -> f32 {
    sum_exp_shift_f32(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_scale_avx2(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
    exp_shift_scale_f32(out, x, shift, scale)
}

/// Whether the AVX2 + FMA loops run here.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn a(v: f64) -> f32 {
        v as f32
    }
    fn store_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        cont::<f32>(s, l, op)
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
    fn silu_mul_row(o: &mut [f32], g: &[f32], u: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { silu_mul_row_avx2(o, g, u) };
        }
        silu_mul_row_body(o, g, u)
    }
    fn silu_mul_bwd_row(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { silu_mul_bwd_row_avx2(dg, du, g, u, dy) };
        }
        silu_mul_bwd_row_body(dg, du, g, u, dy)
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
    #[inline(always)]
    fn a(v: f64) -> f64 {
        v
    }
    fn store_a(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f64]> {
        cont::<f64>(s, l, op)
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
    #[inline(always)]
    fn a(v: f64) -> f32 {
        v as f32
    }
    fn store_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        cont::<f32>(s, l, op)
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
        bf16::from_bits(crate::packed_gemm::round_bf16(a.to_bits()))
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn a(v: f64) -> f32 {
        v as f32
    }
    fn store_a(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn a_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        cont::<f32>(s, l, op)
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
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            dt => bail!("{}: unsupported dtype {dt:?} (expected f32, f64, bf16 or f16)", $name),
        }
    };
}

/// The contiguous slice a layout describes.
fn cont<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            l.stride()
        ),
    }
}

fn same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
    if a != b {
        bail!("{op}: dtype mismatch, {a:?} and {b:?}");
    }
    Ok(())
}

/// Below this many elements a kernel runs on the calling thread.
const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Runs `f(row_index, out_row)` over the `d`-wide rows of `out`, in parallel when large.
fn for_rows<T: Send, F>(out: &mut [T], d: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Send + Sync,
{
    if d == 0 {
        return;
    }
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_mut(d).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let min_rows = (PAR_MIN_ELEMS / 4 / d).max(1);
        out.par_chunks_mut(d)
            .enumerate()
            .with_min_len(min_rows)
            .for_each(|(i, r)| f(i, r));
    }
}

/// Sums `f(row_index, acc)` contributions of `rows` rows into a `d`-vector, in parallel when large.
fn sum_rows<A, F>(rows: usize, d: usize, f: F) -> Vec<A>
where
    A: Float + Send + Sync + std::ops::AddAssign,
    F: Fn(usize, &mut [A]) + Send + Sync,
{
    let chunk = if rows * d < PAR_MIN_ELEMS {
        rows.max(1)
    } else {
        (PAR_MIN_ELEMS / 4 / d.max(1)).max(1)
    };
    let n_chunks = rows.div_ceil(chunk);
    let partial = |c: usize| {
        let mut acc = vec![A::zero(); d];
        for i in c * chunk..((c + 1) * chunk).min(rows) {
            f(i, &mut acc);
        }
        acc
    };
    let add = |mut a: Vec<A>, b: Vec<A>| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        a
    };
    if n_chunks <= 1 {
        partial(0)
    } else {
        (0..n_chunks)
            .into_par_iter()
            .map(partial)
            .reduce(|| vec![A::zero(); d], add)
    }
}

fn storage<T: Elem>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// `x`: (..., d); `weight`: (d). Half types normalise in f32 and round once.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::rms_norm_slow(x, weight, eps);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f64 })
}

struct RmsNorm {
    eps: f64,
}

fn rms_dims(op: &str, lx: &Layout, lw: &Layout) -> Result<(usize, usize)> {
    let d = lx.dims().last().copied().unwrap_or(1);
    if lw.dims() != [d] {
        bail!("{op}: weight shape {:?}, expected [{d}]", lw.dims());
    }
    Ok((lx.shape().elem_count() / d.max(1), d))
}

#[inline(always)]
fn inv_rms<T: Elem>(row: &[T], eps: T::A) -> T::A {
    let d = T::a(row.len() as f64);
    let ss: T::A = row.iter().map(|&v| v.to_a() * v.to_a()).sum();
    (ss / d + eps).sqrt().recip()
}

fn rms_fwd<T: Elem>(
    op: &RmsNorm,
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (_, d) = rms_dims("rms_norm", lx, lw)?;
    let x = cont::<T>(sx, lx, "rms_norm")?;
    let w = cont::<T>(sw, lw, "rms_norm")?;
    let eps = T::a(op.eps);
    let mut out = vec![T::zero(); x.len()];
    for_rows(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let r = inv_rms(xr, eps);
        for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
            *o = T::from_a(xv.to_a() * r * wv.to_a());
        }
    });
    Ok((storage(out), lx.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "sft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype("rms_norm", s1.dtype(), s2.dtype())?;
        by_dtype!(s1.dtype(), "rms_norm", rms_fwd(self, s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &grad, &RmsNormBwdX { eps: self.eps })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &RmsNormBwdW { eps: self.eps })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// dx = r * (g*w - xhat * mean(g*w*xhat)), with xhat = x * r.
struct RmsNormBwdX {
    eps: f64,
}

fn rms_bwd_x<T: Elem>(
    op: &RmsNormBwdX,
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
    sg: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (_, d) = rms_dims("rms_norm bwd", lx, lw)?;
    let x = cont::<T>(sx, lx, "rms_norm bwd")?;
    let w = cont::<T>(sw, lw, "rms_norm bwd")?;
    let g = cont::<T>(sg, lg, "rms_norm bwd")?;
    let eps = T::a(op.eps);
    let dn = T::a(d as f64);
    let mut out = vec![T::zero(); x.len()];
    for_rows(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let gr = &g[i * d..(i + 1) * d];
        let r = inv_rms(xr, eps);
        let dot: T::A = xr
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((&xv, &gv), &wv)| gv.to_a() * wv.to_a() * xv.to_a())
            .sum();
        // mean(g*w*xhat) = r * dot / d; the xhat factor brings another r.
        let c = dot * r * r / dn;
        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = T::from_a(r * (gv.to_a() * wv.to_a() - xv.to_a() * c));
        }
    });
    Ok((storage(out), lx.shape().clone()))
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "sft-rms-norm-bwd-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(
            s1.dtype(),
            "rms_norm bwd",
            rms_bwd_x(self, s1, l1, s2, l2, s3, l3)
        )
    }
}

/// dw = sum over rows of g * xhat.
struct RmsNormBwdW {
    eps: f64,
}

fn rms_bwd_w<T: Elem>(
    op: &RmsNormBwdW,
    sx: &CpuStorage,
    lx: &Layout,
    sg: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let d = lx.dims().last().copied().unwrap_or(1);
    let x = cont::<T>(sx, lx, "rms_norm bwd")?;
    let g = cont::<T>(sg, lg, "rms_norm bwd")?;
    let eps = T::a(op.eps);
    let rows = x.len() / d.max(1);
    let acc = sum_rows::<T::A, _>(rows, d, |i, acc| {
        let xr = &x[i * d..(i + 1) * d];
        let gr = &g[i * d..(i + 1) * d];
        let r = inv_rms(xr, eps);
        for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
            *a += gv.to_a() * xv.to_a() * r;
        }
    });
    let out: Vec<T> = acc.into_iter().map(T::from_a).collect();
    Ok((storage(out), Shape::from(d)))
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "sft-rms-norm-bwd-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "rms_norm bwd", rms_bwd_w(self, s1, l1, s2, l2))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax
// ---------------------------------------------------------------------------------------------

/// Softmax over the last dimension. A row that is entirely `-inf` (a fully masked query)
/// gives zeros instead of NaN.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

fn softmax_fwd<T: Elem>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let d = l.dims().last().copied().unwrap_or(1);
    let x = cont::<T>(s, l, "softmax")?;
    let mut out = vec![T::zero(); x.len()];
    for_rows(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let max = xr
            .iter()
            .fold(T::A::neg_infinity(), |m, &v| m.max(v.to_a()));
        if max == T::A::neg_infinity() {
            return; // stays zero
        }
        let mut sum = T::A::zero();
        if T::HALF {
            // Recompute exp when scaling so a half-precision result is rounded only once.
            for &v in xr {
                sum += (v.to_a() - max).fexp();
            }
            let inv = sum.recip();
            for (o, &v) in o.iter_mut().zip(xr) {
                *o = T::from_a((v.to_a() - max).fexp() * inv);
            }
        } else {
            for (o, &v) in o.iter_mut().zip(xr) {
                let e = (v.to_a() - max).fexp();
                sum += e;
                *o = T::from_a(e);
            }
            let inv = sum.recip();
            for o in o.iter_mut() {
                *o = T::from_a(o.to_a() * inv);
            }
        }
    });
    Ok((storage(out), l.shape().clone()))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "sft-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s.dtype(), "softmax", softmax_fwd(s, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y * (g - sum(g * y)).
struct SoftmaxBwd;

fn softmax_bwd<T: Elem>(
    sy: &CpuStorage,
    ly: &Layout,
    sg: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let d = ly.dims().last().copied().unwrap_or(1);
    let y = cont::<T>(sy, ly, "softmax bwd")?;
    let g = cont::<T>(sg, lg, "softmax bwd")?;
    let mut out = vec![T::zero(); y.len()];
    for_rows(&mut out, d, |i, o| {
        let yr = &y[i * d..(i + 1) * d];
        let gr = &g[i * d..(i + 1) * d];
        let dot: T::A = yr.iter().zip(gr).map(|(&a, &b)| a.to_a() * b.to_a()).sum();
        for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
            *o = T::from_a(yv.to_a() * (gv.to_a() - dot));
        }
    });
    Ok((storage(out), ly.shape().clone()))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "sft-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "softmax bwd", softmax_bwd(s1, l1, s2, l2))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------------------------

/// Rotary embedding, non-interleaved (GPT-NeoX / Hugging Face LLaMA layout):
/// `out[i] = x[i] cos[i] - x[i + d/2] sin[i]`, `out[i + d/2] = x[i + d/2] cos[i] + x[i] sin[i]`.
///
/// `x`: (b, heads, t, head_dim), any strides with a unit last stride; `cos`, `sin`:
/// (t, head_dim / 2) shared by the batch, or (b, t, head_dim / 2) per sequence (left-padded
/// batches, where positions differ per row). The output is contiguous. `cos` and `sin` are
/// treated as constants (no gradient).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return if cos.rank() == 3 {
            rope_composed(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)
        };
    }
    let x = if x.stride().last() == Some(&1) {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// The composed form of [`rope`] for per-sequence (b, t, d/2) tables on non-CPU devices.
fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `inverse` rotates by the opposite angle (sin negated): the transpose, used by backward.
struct Rope {
    inverse: bool,
}

fn rope_fwd<T: Elem>(
    op: &Rope,
    sx: &CpuStorage,
    lx: &Layout,
    sc: &CpuStorage,
    lc: &Layout,
    ss: &CpuStorage,
    ls: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (b, h, t, d) = match lx.dims() {
        &[b, h, t, d] => (b, h, t, d),
        dims => bail!("rope: x must be (b, heads, t, head_dim), got {dims:?}"),
    };
    if d % 2 != 0 {
        bail!("rope: head_dim {d} must be even");
    }
    let d2 = d / 2;
    let per_batch = match lc.dims() {
        &[ct, cd] if ct == t && cd == d2 => false,
        &[cb, ct, cd] if cb == b && ct == t && cd == d2 => true,
        dims => bail!("rope: cos must be ({t}, {d2}) or ({b}, {t}, {d2}), got {dims:?}"),
    };
    if ls.dims() != lc.dims() {
        bail!("rope: sin {:?} and cos {:?} differ", ls.dims(), lc.dims());
    }
    let xs = sx.as_slice::<T>()?;
    let cos = cont::<T>(sc, lc, "rope")?;
    let sin = cont::<T>(ss, ls, "rope")?;
    let st = lx.stride();
    if st[3] != 1 {
        bail!("rope: x needs a unit last stride, got {st:?}");
    }
    let (sb, sh, stt, off) = (st[0], st[1], st[2], lx.start_offset());
    let sign = if op.inverse {
        -T::A::one()
    } else {
        T::A::one()
    };
    let mut out = vec![T::zero(); b * h * t * d];
    for_rows(&mut out, d, |row, o| {
        let ti = row % t;
        let hi = (row / t) % h;
        let bi = row / (t * h);
        let src = off + bi * sb + hi * sh + ti * stt;
        let xr = &xs[src..src + d];
        let crow = if per_batch { bi * t + ti } else { ti };
        let c = &cos[crow * d2..(crow + 1) * d2];
        let s = &sin[crow * d2..(crow + 1) * d2];
        let (o1, o2) = o.split_at_mut(d2);
        for i in 0..d2 {
            let (x1, x2) = (xr[i].to_a(), xr[i + d2].to_a());
            let (cv, sv) = (c[i].to_a(), s[i].to_a() * sign);
            o1[i] = T::from_a(x1 * cv - x2 * sv);
            o2[i] = T::from_a(x2 * cv + x1 * sv);
        }
    });
    Ok((storage(out), Shape::from((b, h, t, d))))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "sft-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype("rope", s1.dtype(), s2.dtype())?;
        same_dtype("rope", s1.dtype(), s3.dtype())?;
        by_dtype!(s1.dtype(), "rope", rope_fwd(self, s1, l1, s2, l2, s3, l3))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's transpose is the rotation by the opposite angle.
        let grad = if grad.stride().last() == Some(&1) {
            grad.clone()
        } else {
            grad.contiguous()?
        };
        let dx = grad.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

/// `silu(gate) * up`, the SwiGLU activation; `gate` and `up` have the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return candle_nn::ops::silu(gate)? * up;
    }
    if gate.shape() != up.shape() {
        bail!(
            "silu_mul: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

#[inline(always)]
fn sigmoid<A: Float + FastExp>(x: A) -> A {
    (A::one() + (-x).fexp()).recip()
}

fn silu_mul_fwd<T: Elem>(
    sg: &CpuStorage,
    lg: &Layout,
    su: &CpuStorage,
    lu: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = cont::<T>(sg, lg, "silu_mul")?;
    let u = cont::<T>(su, lu, "silu_mul")?;
    let d = lg.dims().last().copied().unwrap_or(1);
    let mut out = vec![T::zero(); g.len()];
    for_rows(&mut out, d, |i, o| {
        T::silu_mul_row(o, &g[i * d..(i + 1) * d], &u[i * d..(i + 1) * d]);
    });
    Ok((storage(out), lg.shape().clone()))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "sft-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype("silu_mul", s1.dtype(), s2.dtype())?;
        by_dtype!(s1.dtype(), "silu_mul", silu_mul_fwd(s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes both gradients into a (2, ...) tensor; each is a contiguous view.
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulBwd)?;
        let dgate = gate.track_op().then(|| both.get(0)).transpose()?;
        let dup = up.track_op().then(|| both.get(1)).transpose()?;
        Ok((dgate, dup))
    }
}

/// d gate = grad * up * s * (1 + g (1 - s)), d up = grad * g * s, stacked as (2, ...).
struct SiluMulBwd;

fn silu_mul_bwd<T: Elem>(
    sg: &CpuStorage,
    lg: &Layout,
    su: &CpuStorage,
    lu: &Layout,
    sd: &CpuStorage,
    ld: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = cont::<T>(sg, lg, "silu_mul bwd")?;
    let u = cont::<T>(su, lu, "silu_mul bwd")?;
    let dy = cont::<T>(sd, ld, "silu_mul bwd")?;
    let n = g.len();
    let d = lg.dims().last().copied().unwrap_or(1);
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    let kernel = |i: usize, dg: &mut [T], du: &mut [T]| {
        let r = i * d..(i + 1) * d;
        T::silu_mul_bwd_row(dg, du, &g[r.clone()], &u[r.clone()], &dy[r]);
    };
    if n < PAR_MIN_ELEMS || d == 0 {
        dg.chunks_mut(d.max(1))
            .zip(du.chunks_mut(d.max(1)))
            .enumerate()
            .for_each(|(i, (a, b))| kernel(i, a, b));
    } else {
        dg.par_chunks_mut(d)
            .zip(du.par_chunks_mut(d))
            .enumerate()
            .with_min_len((PAR_MIN_ELEMS / 4 / d).max(1))
            .for_each(|(i, (a, b))| kernel(i, a, b));
    }
    let mut dims = vec![2];
    dims.extend_from_slice(lg.dims());
    Ok((storage(out), Shape::from(dims)))
}

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "sft-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(
            s1.dtype(),
            "silu_mul bwd",
            silu_mul_bwd(s1, l1, s2, l2, s3, l3)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen linear and the fused LoRA linear
// ---------------------------------------------------------------------------------------------

/// `y = x W^T` for a frozen `W` (out, in): the backward returns only the input gradient
/// `grad · W` and never computes a gradient for `W`, so a frozen base layer costs neither the
/// memory nor the FLOPs of a dW. `x`: (..., in) -> (..., out), one graph node (no reshapes).
/// Refuses a `Var` weight (it would silently get no gradient): trainable weights use a plain
/// matmul.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_linear_packed(x, w, (None, None))
}

/// The forward and backward packs of a frozen bf16 weight, when there are.
pub type Packs<'a> = (Option<&'a WeightPack>, Option<&'a WeightPack>);

/// A frozen weight `W` (n, k) packed once for the CPU's AVX-512 kernels, for
/// [`frozen_linear_packed`] and [`lora_linear_packed`]: when decoding, packing `W` on every
/// call costs as much as the product itself. bf16 weights serve every product; f32 weights
/// serve products of at most [`PACKED_F32_MAX_ROWS`] rows (decoding and prefill), where
/// candle's GEMM spends much of its time packing (examples/linear_gemm_bench: 2-6x faster at
/// 32 rows, level to 10% faster at 1024-4096).
#[derive(Clone, Debug)]
pub struct WeightPack(std::sync::Arc<crate::packed_gemm::PackedB>);

/// Rows of `x` up to which an f32 `x · W^T` uses (and a frozen f32 weight makes) a kept f32
/// pack: generation's products are below it, so f32 training with large batches keeps its
/// memory (the pack is a second copy of the weight) unless it also generates.
pub const PACKED_F32_MAX_ROWS: usize = 4096;

impl WeightPack {
    /// Whether a weight of this dtype can be packed on this CPU (its kernel runs here).
    pub fn supported(dtype: DType) -> bool {
        match dtype {
            DType::BF16 => crate::packed_gemm::available(),
            DType::F32 => crate::packed_gemm::available_f32(),
            _ => false,
        }
    }

    /// `None` unless `w` is a bf16 (or f32) matrix on a CPU that runs the bf16 (or f32) kernel.
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        // x · W^T: B[kk, j] = W[j, kk].
        if w.dtype() == DType::F32 {
            return Self::pack::<f32>(w, |wv, n, k| {
                crate::packed_gemm::PackedB::new_f32(wv, k, n, 1, k)
            });
        }
        Self::pack::<bf16>(w, |wv, n, k| {
            crate::packed_gemm::PackedB::new(wv, k, n, 1, k)
        })
    }

    /// The pack of the backward's product `grad · W` (B = W itself) for a bf16 `W`, `None` as
    /// in [`Self::new`] (and for f32: a backward has as many rows as the forward's batch).
    pub fn new_for_grad(w: &Tensor) -> Result<Option<Self>> {
        Self::pack::<bf16>(w, |wv, n, k| {
            crate::packed_gemm::PackedB::new(wv, n, k, k, 1)
        })
    }

    fn pack<T: WithDType>(
        w: &Tensor,
        f: impl FnOnce(&[T], usize, usize) -> Option<crate::packed_gemm::PackedB>,
    ) -> Result<Option<Self>> {
        if w.dtype() != T::DTYPE || !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        let (ws, lw) = w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            return Ok(None);
        };
        let wv = cont::<T>(ws, lw, "pack")?;
        Ok(f(wv, n, k).map(|p| Self(std::sync::Arc::new(p))))
    }
}

/// `x (m, k) · W^T` through a kept f32 pack of `W` (n, k), when there is one for this product
/// and `m` is small enough (see [`WeightPack`]).
fn packed_f32_matmul_t(
    x: &[f32],
    (m, n, k): (usize, usize, usize),
    pack: Option<&WeightPack>,
) -> Option<Vec<f32>> {
    let p = pack?;
    if !p.0.is_f32() || p.0.k() != k || p.0.n() != n || m > PACKED_F32_MAX_ROWS {
        return None;
    }
    crate::packed_gemm::matmul_f32(x, m, k, &p.0)
}

/// B (k × n, `B[kk, j] = w[kk * rs + j * cs]`) for the bf16 kernel: `pack` when it was made
/// for this product, else `w` packed for this call; `None` where the kernel does not run.
fn packed_b<'a>(
    pack: Option<&'a WeightPack>,
    w: &[bf16],
    (k, n): (usize, usize),
    (rs, cs): (usize, usize),
) -> Option<std::borrow::Cow<'a, crate::packed_gemm::PackedB>> {
    match pack {
        Some(p) if !p.0.is_f32() && p.0.k() == k && p.0.n() == n => {
            Some(std::borrow::Cow::Borrowed(&*p.0))
        }
        _ => crate::packed_gemm::PackedB::new(w, k, n, rs, cs).map(std::borrow::Cow::Owned),
    }
}

/// [`frozen_linear`] with `W` already packed (`packs` must come from this `w`: the forward's
/// [`WeightPack::new`] and the backward's [`WeightPack::new_for_grad`]).
pub fn frozen_linear_packed(x: &Tensor, w: &Tensor, packs: Packs<'_>) -> Result<Tensor> {
    if w.is_variable() {
        bail!("frozen_linear: the weight is a Var; trainable weights need a plain matmul");
    }
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        bail!("frozen_linear: x {dims:?} does not end in in_features {k} of W ({n}, {k})");
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        FrozenLinear {
            pack: packs.0.cloned(),
            grad_pack: packs.1.cloned(),
        },
    )
}

struct FrozenLinear {
    pack: Option<WeightPack>,
    grad_pack: Option<WeightPack>,
}

/// The (m, k) view of a contiguous (..., k) input and the output shape (..., n).
fn rows_view(lx: &Layout, n: usize, op: &str) -> Result<(usize, usize, Layout, Shape)> {
    let dims = lx.dims();
    let Some(&k) = dims.last() else {
        bail!("{op}: x must have at least one dimension");
    };
    let Some((start, _)) = lx.contiguous_offsets() else {
        bail!("{op}: x must be contiguous");
    };
    let m = lx.shape().elem_count() / k.max(1);
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = n;
    Ok((
        m,
        k,
        Layout::contiguous_with_offset((m, k), start),
        Shape::from(out),
    ))
}

/// `x (m, k) · W^T` where `W` is (n, k), for any float dtype (bf16 through f32 gemm: candle's
/// CPU matmul has no bf16 kernel).
fn cpu_matmul_t(
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
    (m, n, k): (usize, usize, usize),
    pack: Option<&WeightPack>,
) -> Result<CpuStorage> {
    let lwt = lw.transpose(0, 1)?;
    if sx.dtype() == DType::F32 && sw.dtype() == DType::BF16 {
        return Ok(CpuStorage::F32(mixed_matmul_t(
            cont::<f32>(sx, lx, "matmul")?,
            cont::<bf16>(sw, lw, "matmul")?,
            (m, n, k),
            pack,
        )?));
    }
    if sx.dtype() == DType::F32 && sw.dtype() == DType::F32 {
        if let Some(y) = packed_f32_matmul_t(cont::<f32>(sx, lx, "matmul")?, (m, n, k), pack) {
            return Ok(CpuStorage::F32(y));
        }
    }
    if sx.dtype() != DType::BF16 {
        return sx.matmul(sw, (1, m, n, k), lx, &lwt);
    }
    let x = cont::<bf16>(sx, lx, "matmul")?;
    let w = cont::<bf16>(sw, lw, "matmul")?;
    // x · W^T: B[kk, j] = W[j, kk].
    if let Some(y) = packed_b(pack, w, (k, n), (1, k))
        .and_then(|b| crate::packed_gemm::matmul_to_bf16(x, m, k, &b))
    {
        return Ok(CpuStorage::BF16(y));
    }
    let xf = CpuStorage::F32(x.iter().map(|v| v.to_f32()).collect());
    let wf = CpuStorage::F32(w.iter().map(|v| v.to_f32()).collect());
    let lwt = Layout::contiguous((n, k)).transpose(0, 1)?;
    let y = xf.matmul(&wf, (1, m, n, k), &Layout::contiguous((m, k)), &lwt)?;
    let y = y.as_slice::<f32>()?;
    Ok(CpuStorage::BF16(
        y.iter().map(|&v| bf16::from_f32(v)).collect(),
    ))
}

/// `x (m, k) · W^T` for an f32 `x` and a bf16 `W` (n, k), in f32: `x` is rounded to bf16 and
/// the products are summed in f32, as `torch.autocast` does on the CPU. This is how a bf16
/// model runs on the CPU (see `Llama`): bf16 weights, f32 activations.
fn mixed_matmul_t(
    x: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    pack: Option<&WeightPack>,
) -> Result<Vec<f32>> {
    let xb = crate::packed_gemm::to_bf16(&x[..m * k]);
    if let Some(y) =
        packed_b(pack, w, (k, n), (1, k)).and_then(|b| crate::packed_gemm::matmul(&xb, m, k, &b))
    {
        return Ok(y);
    }
    // No AVX512-BF16 here: the same rounding of x, then candle's f32 gemm.
    let xf = CpuStorage::F32(xb.iter().map(|v| v.to_f32()).collect());
    let wf = CpuStorage::F32(w[..n * k].iter().map(|v| v.to_f32()).collect());
    let lwt = Layout::contiguous((n, k)).transpose(0, 1)?;
    match xf.matmul(&wf, (1, m, n, k), &Layout::contiguous((m, k)), &lwt)? {
        CpuStorage::F32(y) => Ok(y),
        _ => bail!("mixed matmul: candle returned another dtype"),
    }
}

/// Whether `frozen_linear` / `lora_linear` take this (x, W) dtype pair: equal, or the CPU's
/// mixed f32 activations with bf16 weights.
fn linear_dtypes_ok(x: DType, w: DType) -> bool {
    x == w || (x == DType::F32 && w == DType::BF16)
}

fn w_dims(lw: &Layout, k: usize, op: &str) -> Result<usize> {
    match lw.dims() {
        &[n, k2] if k2 == k => Ok(n),
        d => bail!("{op}: W {d:?} does not match x (.., {k})"),
    }
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "sft-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !linear_dtypes_ok(s1.dtype(), s2.dtype()) {
            bail!(
                "frozen_linear: x {:?} and W {:?} (equal dtypes, or f32 x with bf16 W)",
                s1.dtype(),
                s2.dtype()
            );
        }
        let n = l2.dims().first().copied().unwrap_or(0);
        let (m, k, lx, shape) = rows_view(l1, n, "frozen_linear")?;
        w_dims(l2, k, "frozen_linear")?;
        Ok((
            cpu_matmul_t(s1, &lx, s2, l2, (m, n, k), self.pack.as_ref())?,
            shape,
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = l2.dims().first().copied().unwrap_or(0);
        let (m, k, lx, shape) = rows_view(l1, n, "frozen_linear")?;
        w_dims(l2, k, "frozen_linear")?;
        let out = s1.matmul(s2, (1, m, n, k), &lx, &l2.transpose(0, 1)?)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad_times_w(grad, w, x.dims(), self.grad_pack.as_ref())?),
            None,
        ))
    }
}

/// `grad (..., n) · W (n, k)` reshaped to `x_dims` (..., k).
fn grad_times_w(
    grad: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    pack: Option<&WeightPack>,
) -> Result<Tensor> {
    let n = w.dim(0)?;
    let g = grad.contiguous()?;
    let g = g.reshape((g.elem_count() / n.max(1), n))?;
    let dx = if w.dtype() == DType::BF16 && g.dtype() == DType::F32 && w.device().is_cpu() {
        // Mixed (f32 activations, bf16 weights): the gradient is rounded to bf16 for the
        // product, as in the forward.
        match bf16_times_w_f32(&cast_from_f32(&g, DType::BF16)?, w, pack)? {
            Some(dx) => dx,
            None => g.matmul(&w.to_dtype(DType::F32)?)?,
        }
    } else if w.dtype() == DType::BF16 && w.device().is_cpu() {
        if let Some(dx) = bf16_times_w(&g, w, pack)? {
            return dx.reshape(x_dims);
        }
        g.to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)?
    } else {
        g.matmul(w)?
    };
    dx.reshape(x_dims)
}

/// An f32 tensor in `dt`, with the fast bf16 rounding on the CPU (candle's conversion calls
/// the `half` crate once per element). No gradient is recorded.
fn cast_from_f32(t: &Tensor, dt: DType) -> Result<Tensor> {
    if t.dtype() == dt {
        return Ok(t.clone());
    }
    if t.dtype() == DType::F32 && dt == DType::BF16 && t.device().is_cpu() {
        return t.contiguous()?.apply_op1_no_bwd(&CastBf16);
    }
    t.to_dtype(dt)
}

struct CastBf16;

impl CustomOp1 for CastBf16 {
    fn name(&self) -> &'static str {
        "sft-cast-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = cont::<f32>(s, l, "cast to bf16")?;
        Ok((
            CpuStorage::BF16(crate::packed_gemm::to_bf16(v)),
            l.shape().clone(),
        ))
    }
}

/// `g (m, n) · W (n, k)` for bf16 on the CPU through the AVX512-BF16 kernel, when it runs here.
fn bf16_times_w(g: &Tensor, w: &Tensor, pack: Option<&WeightPack>) -> Result<Option<Tensor>> {
    let Some(t) = bf16_times_w_f32(g, w, pack)? else {
        return Ok(None);
    };
    Ok(Some(cast_from_f32(&t, DType::BF16)?))
}

/// `g (m, n) · W (n, k)` for bf16 through the AVX512-BF16 kernel, as f32 (not rounded).
fn bf16_times_w_f32(g: &Tensor, w: &Tensor, pack: Option<&WeightPack>) -> Result<Option<Tensor>> {
    let (m, n) = g.dims2()?;
    let (n2, k) = w.dims2()?;
    if n != n2 {
        bail!("grad (.., {n}) and W ({n2}, {k}) do not match");
    }
    let w = w.contiguous()?;
    let (gs, gl) = g.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(gs), candle_core::Storage::Cpu(ws)) = (&*gs, &*ws) else {
        return Ok(None);
    };
    let gv = cont::<bf16>(gs, gl, "frozen_linear bwd")?;
    let wv = cont::<bf16>(ws, wl, "frozen_linear bwd")?;
    // B[kk, j] = W[kk, j]: row stride k.
    let Some(dx) =
        packed_b(pack, wv, (n, k), (k, 1)).and_then(|b| crate::packed_gemm::matmul(gv, m, n, &b))
    else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(dx, (m, k), g.device())?))
}

/// LoRA on a frozen linear layer as one graph node:
/// `y = x W^T + scale * (x A^T) B^T`, with `W` (out, in) frozen, `A` (r, in) and `B` (out, r)
/// usually `Var`s. The backward gives `dx`, `dA`, `dB` (each only when its input tracks a
/// gradient) and never a dW.
///
/// `A` and `B` are f32 or f64; `x` and `W` share their dtype, or are bf16/f16 with f32
/// adapters (PEFT keeps adapters of half-precision models in f32): the base product and the
/// update are then summed in f32 and rounded once. `dropout_mask` (x's shape, in the adapters'
/// dtype, already scaled by 1 / keep) multiplies the adapter's input only, as PEFT's
/// `lora_dropout` does; it is a constant.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_mask: Option<&Tensor>,
) -> Result<Tensor> {
    lora_linear_packed(x, w, a, b, scale, dropout_mask, (None, None))
}

/// [`lora_linear`] with the base weight already packed (`pack` must come from this `w`).
pub fn lora_linear_packed(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout_mask: Option<&Tensor>,
    packs: Packs<'_>,
) -> Result<Tensor> {
    if w.is_variable() {
        bail!("lora_linear: the base weight is a Var; LoRA needs a frozen base");
    }
    let (n, k) = w.dims2()?;
    let (r, ka) = a.dims2()?;
    if ka != k || b.dims() != [n, r] {
        bail!(
            "lora_linear: A {:?} and B {:?} do not fit W ({n}, {k})",
            a.dims(),
            b.dims()
        );
    }
    if x.dims().last() != Some(&k) {
        bail!("lora_linear: x {:?} does not end in {k}", x.dims());
    }
    let ct = a.dtype();
    let dtypes_ok = b.dtype() == ct
        && linear_dtypes_ok(x.dtype(), w.dtype())
        && match ct {
            DType::F64 => x.dtype() == DType::F64,
            DType::F32 => matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16),
            _ => false,
        };
    if !dtypes_ok {
        bail!(
            "lora_linear: x {:?}, W {:?}, A {:?}, B {:?}: adapters must be f32 or f64, x and W \
             their dtype or (with f32 adapters) bf16/f16",
            x.dtype(),
            w.dtype(),
            a.dtype(),
            b.dtype()
        );
    }
    if let Some(mask) = dropout_mask {
        if mask.shape() != x.shape() || mask.dtype() != ct {
            bail!(
                "lora_linear: dropout mask {:?} {:?}, expected {ct:?} {:?}",
                mask.dtype(),
                mask.dims(),
                x.dims()
            );
        }
    }
    if !x.device().is_cpu() {
        let base = frozen_linear(x, w)?;
        let xc = x.to_dtype(ct)?;
        let xd = match dropout_mask {
            Some(mask) => (xc * mask)?,
            None => xc,
        };
        let h = xd.broadcast_matmul(&a.t()?)?;
        let delta = h.broadcast_matmul(&b.t()?)?.affine(scale, 0.0)?;
        return base + delta.to_dtype(x.dtype())?;
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?,
            scale,
            mask: dropout_mask.map(|m| m.contiguous()).transpose()?,
            pack: packs.0.cloned(),
            grad_pack: packs.1.cloned(),
        },
    )
}

struct LoraLinear {
    /// The frozen base weight (out, in), contiguous.
    w: Tensor,
    scale: f64,
    /// The adapter input's dropout mask (x's shape, adapter dtype, scaled), contiguous.
    mask: Option<Tensor>,
    pack: Option<WeightPack>,
    grad_pack: Option<WeightPack>,
}

/// A contiguous storage converted to `dt` (borrowed when it already is).
fn storage_as<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    dt: DType,
) -> Result<std::borrow::Cow<'a, CpuStorage>> {
    if s.dtype() == dt && l.start_offset() == 0 && l.is_contiguous() {
        Ok(std::borrow::Cow::Borrowed(s))
    } else {
        Ok(std::borrow::Cow::Owned(s.to_dtype(l, dt)?))
    }
}

impl LoraLinear {
    /// `x W^T` in the compute dtype `ct` (f32 or f64), `x` as (m, k).
    fn base_product(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        xc: &CpuStorage,
        ct: DType,
        (m, n, k): (usize, usize, usize),
    ) -> Result<CpuStorage> {
        let (ws, lw) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            bail!("lora_linear: the base weight is not on the CPU");
        };
        if sx.dtype() == DType::BF16 {
            let x = cont::<bf16>(sx, lx, "lora_linear")?;
            let w = cont::<bf16>(ws, lw, "lora_linear")?;
            if let Some(y) = packed_b(self.pack.as_ref(), w, (k, n), (1, k))
                .and_then(|b| crate::packed_gemm::matmul(x, m, k, &b))
            {
                return Ok(CpuStorage::F32(y));
            }
        }
        if sx.dtype() == DType::F32 && ws.dtype() == DType::BF16 {
            let x = cont::<f32>(sx, lx, "lora_linear")?;
            let w = cont::<bf16>(ws, lw, "lora_linear")?;
            return Ok(CpuStorage::F32(mixed_matmul_t(
                x,
                w,
                (m, n, k),
                self.pack.as_ref(),
            )?));
        }
        if let CpuStorage::F32(x) = xc {
            if ws.dtype() == DType::F32 {
                if let Some(y) = packed_f32_matmul_t(x, (m, n, k), self.pack.as_ref()) {
                    return Ok(CpuStorage::F32(y));
                }
            }
        }
        let wc = storage_as(ws, lw, ct)?;
        let lwc = Layout::contiguous((n, k)).transpose(0, 1)?;
        xc.matmul(&wc, (1, m, n, k), &Layout::contiguous((m, k)), &lwc)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "sft-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, kw) = self.w.dims2()?;
        let (m, k, lx, shape) = rows_view(lx, n, "lora_linear")?;
        if kw != k {
            bail!("lora_linear: W (.., {kw}) and x (.., {k}) differ");
        }
        let ct = sa.dtype();
        let r = la.dims()[0];
        let xc = storage_as(sx, &lx, ct)?;
        let base = self.base_product(sx, &lx, &xc, ct, (m, n, k))?;
        // The adapter's input: x, or x times the dropout mask.
        let xd = match &self.mask {
            None => xc,
            Some(mask) => {
                let (ms, ml) = mask.storage_and_layout();
                let candle_core::Storage::Cpu(ms) = &*ms else {
                    bail!("lora_linear: the dropout mask is not on the CPU");
                };
                let xd = match (&*xc, ms) {
                    (CpuStorage::F32(x), CpuStorage::F32(_)) => {
                        let mv = cont::<f32>(ms, ml, "lora_linear")?;
                        CpuStorage::F32(x.iter().zip(mv).map(|(a, b)| a * b).collect())
                    }
                    (CpuStorage::F64(x), CpuStorage::F64(_)) => {
                        let mv = cont::<f64>(ms, ml, "lora_linear")?;
                        CpuStorage::F64(x.iter().zip(mv).map(|(a, b)| a * b).collect())
                    }
                    _ => bail!("lora_linear: dropout mask dtype {:?}", ms.dtype()),
                };
                std::borrow::Cow::Owned(xd)
            }
        };
        let h = cpu_matmul_t(&xd, &Layout::contiguous((m, k)), sa, la, (m, r, k), None)?;
        let delta = cpu_matmul_t(&h, &Layout::contiguous((m, r)), sb, lb, (m, n, r), None)?;
        let out = match (base, delta) {
            (CpuStorage::F32(mut y), CpuStorage::F32(d)) => {
                let s = self.scale as f32;
                axpy_rows(&mut y, &d, n, |y, d| *y += s * d);
                CpuStorage::F32(y)
            }
            (CpuStorage::F64(mut y), CpuStorage::F64(d)) => {
                let s = self.scale;
                axpy_rows(&mut y, &d, n, |y, d| *y += s * d);
                CpuStorage::F64(y)
            }
            (y, _) => bail!("lora_linear: unsupported dtype {:?}", y.dtype()),
        };
        let out = match (&out, sx.dtype()) {
            (_, dt) if dt == ct => out,
            (CpuStorage::F32(y), DType::BF16) => CpuStorage::BF16(crate::packed_gemm::to_bf16(y)),
            (_, dt) => out.to_dtype(&Layout::contiguous((m, n)), dt)?,
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = self.w.dims2()?;
        let (need_x, need_a, need_b) = (x.track_op(), a.track_op(), b.track_op());
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let ct = a.dtype();
        let g = grad.contiguous()?;
        let m = g.elem_count() / n.max(1);
        let g = g.reshape((m, n))?;
        let gc = g.to_dtype(ct)?;
        // The adapter's input, with dropout applied, in the adapters' dtype.
        let xc = x.reshape((m, k))?.to_dtype(ct)?;
        let mask = self
            .mask
            .as_ref()
            .map(|mk| mk.reshape((m, k)))
            .transpose()?;
        let xd = match &mask {
            Some(mk) => zip_par(&xc, mk, Zip::Mul)?,
            None => xc,
        };
        // The scale goes on the thin (m, r) products, not on (m, k) ones.
        let gb = gc.matmul(&b)?.affine(self.scale, 0.0)?; // (m, r)
        let dx = if need_x {
            let d_in = gb.matmul(&a)?;
            let d_in = match &mask {
                Some(mk) => zip_par(&d_in, mk, Zip::Mul)?,
                None => d_in,
            };
            let base = if g.dtype() == DType::BF16 || self.w.dtype() == DType::BF16 {
                match bf16_times_w_f32(
                    &cast_from_f32(&g, DType::BF16)?,
                    &self.w,
                    self.grad_pack.as_ref(),
                )? {
                    Some(t) => t,
                    None => gc.matmul(&self.w.to_dtype(ct)?)?,
                }
            } else {
                gc.matmul(&self.w.to_dtype(ct)?)?
            };
            Some(cast_from_f32(&zip_par(&base, &d_in, Zip::Add)?, x.dtype())?.reshape(x.dims())?)
        } else {
            None
        };
        let da = if need_a {
            Some(gb.t()?.matmul(&xd)?)
        } else {
            None
        };
        let db = if need_b {
            let h = xd.matmul(&a.t()?)?; // (m, r)
            Some(gc.t()?.matmul(&h)?.affine(self.scale, 0.0)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// The element-wise operation of [`zip_par`].
#[derive(Clone, Copy)]
enum Zip {
    Add,
    Mul,
}

/// `a + b` or `a * b` for two tensors of one shape; for f32 on the CPU in parallel over rows
/// (candle's binary ops run on the calling thread here, see `runtime`), otherwise through
/// candle. No gradient is recorded (for use inside backward passes).
fn zip_par(a: &Tensor, b: &Tensor, op: Zip) -> Result<Tensor> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !a.device().is_cpu() {
        let (a, b) = (a.detach(), b.detach());
        return match op {
            Zip::Add => a + b,
            Zip::Mul => a * b,
        };
    }
    if a.shape() != b.shape() {
        bail!("zip_par: shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let mut y = a.flatten_all()?.to_vec1::<f32>()?;
    let bc = b.contiguous()?;
    let (bs, bl) = bc.storage_and_layout();
    let candle_core::Storage::Cpu(bs) = &*bs else {
        bail!("zip_par: not on the CPU");
    };
    let bv = cont::<f32>(bs, bl, "zip_par")?;
    let n = a.dims().last().copied().unwrap_or(1).max(1);
    match op {
        Zip::Add => axpy_rows(&mut y, bv, n, |y, d| *y += d),
        Zip::Mul => axpy_rows(&mut y, bv, n, |y, d| *y *= d),
    }
    Tensor::from_vec(y, a.shape(), a.device())
}

/// `f(y, d)` over two equally long buffers, in parallel over `n`-wide rows when large.
fn axpy_rows<T: Copy + Send + Sync, F: Fn(&mut T, T) + Send + Sync>(
    y: &mut [T],
    d: &[T],
    n: usize,
    f: F,
) {
    for_rows(y, n, |i, row| {
        for (yv, &dv) in row.iter_mut().zip(&d[i * n..(i + 1) * n]) {
            f(yv, dv);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Fused attention
// ---------------------------------------------------------------------------------------------

/// Multi-head attention with grouped K/V heads as one graph node:
/// `out = softmax(scale * Q K^T + mask) V`, returned as (b, t, heads * head_dim), the layout the
/// output projection takes (no transpose or copy nodes around it).
///
/// `q`: (b, heads, t, head_dim); `k`, `v`: (b, kv_heads, s, head_dim), `heads` a multiple of
/// `kv_heads` (query head h reads kv head h / (heads / kv_heads)); any layouts. `mask`:
/// additive, (b or 1, 1, t, s), a constant (`-inf` masks; a fully masked row gives zeros).
/// Half-precision inputs are computed in f32 (softmax included, as transformers does) and the
/// output rounded once. The backward recomputes the probabilities instead of keeping them, so
/// the graph holds no (t × s) tensor per layer.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (heads a multiple of kv heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} differ in dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    let ct = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mask = match mask {
        None => None,
        Some(m) => {
            check_mask(m, (b, t, s), "attention")?;
            Some(m.to_dtype(ct)?.contiguous()?)
        }
    };
    if !q.device().is_cpu() {
        return attention_composed(q, k, v, mask.as_ref(), scale);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention { mask, scale },
    )
}

/// An additive attention mask must be (b or 1, 1, t, s).
fn check_mask(m: &Tensor, (b, t, s): (usize, usize, usize), op: &str) -> Result<()> {
    let d = m.dims();
    if !(d.len() == 4 && (d[0] == b || d[0] == 1) && d[1] == 1 && d[2] == t && d[3] == s) {
        bail!("{op}: mask {d:?}, expected ({b} or 1, 1, {t}, {s})");
    }
    Ok(())
}

/// The same computation from candle's ops (other devices).
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let ct = mask
        .map(|m| m.dtype())
        .unwrap_or(if q.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        });
    let n_rep = nh / nkv;
    let q = (q.to_dtype(ct)?.contiguous()? * scale)?.reshape((b, nkv, n_rep * t, hd))?;
    let k = k.to_dtype(ct)?;
    let v = v.to_dtype(ct)?.contiguous()?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.reshape((b, nkv, n_rep * t, s))?;
    probs
        .matmul(&v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

struct Attention {
    /// Additive mask (b or 1, 1, t, s) in the compute dtype, contiguous.
    mask: Option<Tensor>,
    scale: f64,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

impl AttnDims {
    fn n_rep(&self) -> usize {
        self.nh / self.nkv
    }
}

/// A float type gemm and the attention kernels run in.
trait AttnFloat:
    Float + FastExp + Send + Sync + 'static + std::iter::Sum + std::ops::AddAssign
{
    /// One query row against `s` keys of a kv group (`kg`, `vg`: `s` rows of the row's
    /// width): `o = softmax(scale * kg q + m) vg`, with `p` as scratch of `s`.
    #[allow(clippy::too_many_arguments)]
    fn decode_row(
        q: &[Self],
        kg: &[Self],
        vg: &[Self],
        m: Option<&[Self]>,
        scale: Self,
        p: &mut [Self],
        o: &mut [Self],
    ) {
        decode_row_body(q, kg, vg, m, scale, p, o)
    }
}
impl AttnFloat for f32 {
    fn decode_row(
        q: &[f32],
        kg: &[f32],
        vg: &[f32],
        m: Option<&[f32]>,
        scale: f32,
        p: &mut [f32],
        o: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && q.len().is_multiple_of(8) {
            // SAFETY: the CPU has AVX2 and FMA; rows are a multiple of 8 wide.
            return unsafe { decode_row_f32_avx2(q, kg, vg, m, scale, p, o) };
        }
        decode_row_body(q, kg, vg, m, scale, p, o)
    }
}
impl AttnFloat for f64 {}

/// `C = [C +] A · B` on raw strided matrices, single-threaded (callers split the work).
/// Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: AttnFloat>(
    c: *mut T,
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    beta: T,
) {
    // k = 0 (a block with no allowed key) adds nothing; callers' buffers start at zero.
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::one(),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A pointer that may cross threads: every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// One kv group's task in the attention backward: its index and its dq, dk, dv slices.
type GroupGrads<'a, T> = (((usize, &'a mut [T]), &'a mut [T]), &'a mut [T]);

/// `a · b` with 8 partial sums (a fixed order the compiler can vectorize).
#[inline(always)]
fn dot_lanes<T: AttnFloat>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
            *l += x * y;
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// Query rows per block of [`key_blocks`].
const ATTN_BLOCK: usize = 64;

/// Blocks `(t0, t1, c)` of query positions `t0..t1` (block `i` starts at `i * ATTN_BLOCK`)
/// whose mask rows allow no key at or after `c`: a causal mask needs only the lower-left part of Q K^T, about half of it, so every
/// product below runs on `c` keys instead of `s`. Without a mask, `c = s`.
fn key_blocks<T: AttnFloat>(
    d: AttnDims,
    bi: usize,
    mask: Option<(&[T], usize)>,
) -> Vec<(usize, usize, usize)> {
    let (t, s) = (d.t, d.s);
    (0..t)
        .step_by(ATTN_BLOCK)
        .map(|t0| {
            let t1 = (t0 + ATTN_BLOCK).min(t);
            let c = match mask {
                None => s,
                Some((m, mb)) => (t0..t1)
                    .map(|tq| {
                        let mrow = &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..s];
                        mrow.iter()
                            .rposition(|&v| v != T::neg_infinity())
                            .map_or(0, |j| j + 1)
                    })
                    .max()
                    .unwrap_or(0),
            };
            (t0, t1, c)
        })
        .collect()
}

/// `P = softmax(scale * Q_g K_g^T + mask)` for kv group (bi, g): (n_rep * t, s) row-major.
/// Only the columns before each block's key limit are written (`p` must hold zeros beyond).
#[allow(clippy::too_many_arguments)]
fn attn_probs<T: AttnFloat>(
    d: AttnDims,
    (bi, g): (usize, usize),
    q: &[T],
    k: &[T],
    mask: Option<(&[T], usize)>,
    blocks: &[(usize, usize, usize)],
    scale: T,
    p: &mut [T],
) {
    let (rows, s, hd, t) = (d.n_rep() * d.t, d.s, d.hd, d.t);
    let qg = &q[(bi * d.nh + g * d.n_rep()) * t * hd..][..rows * hd];
    let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
    for r in 0..d.n_rep() {
        for &(t0, t1, c) in blocks {
            let i0 = r * t + t0;
            // SAFETY: rows i0..i0 + (t1 - t0) of qg (hd wide) and of p (s wide), c <= s rows
            // of kg.
            unsafe {
                mm(
                    p[i0 * s..].as_mut_ptr(),
                    s,
                    (t1 - t0, c, hd),
                    qg[i0 * hd..].as_ptr(),
                    (hd, 1),
                    kg.as_ptr(),
                    (1, hd),
                    false,
                    scale,
                );
            }
        }
    }
    for (i, row) in p.chunks_exact_mut(s).enumerate() {
        let tq = i % t;
        let row = &mut row[..blocks[tq / ATTN_BLOCK].2];
        if let Some((m, mb)) = mask {
            let mrow = &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..row.len()];
            row.iter_mut().zip(mrow).for_each(|(x, &mv)| *x += mv);
        }
        let max = row.iter().fold(T::neg_infinity(), |a, &x| a.max(x));
        if max == T::neg_infinity() {
            row.iter_mut().for_each(|x| *x = T::zero());
            continue;
        }
        let sum = T::exp_shift_sum(row, max);
        let inv = sum.recip();
        row.iter_mut().for_each(|x| *x = *x * inv);
    }
}

fn attn_fwd<T: AttnFloat>(
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<(&[T], usize)>,
    scale: T,
) -> Vec<T> {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let mut out = vec![T::zero(); d.b * t * nh * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let groups: Vec<(usize, usize)> = (0..d.b)
        .flat_map(|bi| (0..d.nkv).map(move |g| (bi, g)))
        .collect();
    // The key limits depend on the batch row only, not on the kv group.
    let row_blocks: Vec<_> = (0..d.b).map(|bi| key_blocks(d, bi, mask)).collect();
    let run = |&(bi, g): &(usize, usize)| {
        let blocks = &row_blocks[bi];
        let mut p = vec![T::zero(); n_rep * t * s];
        attn_probs(d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for &(t0, t1, c) in blocks {
                // Rows tq of head h land at out[bi, tq, h, :], nh * hd apart.
                // SAFETY: each (bi, h) writes its own t x hd elements of `out`.
                unsafe {
                    mm(
                        out_ptr.get().add(((bi * t + t0) * nh + h) * hd),
                        nh * hd,
                        (t1 - t0, hd, c),
                        p[(r * t + t0) * s..].as_ptr(),
                        (s, 1),
                        vg.as_ptr(),
                        (hd, 1),
                        false,
                        T::one(),
                    );
                }
            }
        }
    };
    if d.b * nh * t * s * hd < 1 << 18 {
        groups.iter().for_each(run);
    } else {
        groups.par_iter().for_each(run);
    }
    out
}

/// Query positions up to which [`attention_cached`] runs its direct loops; longer blocks (a
/// prefill) go through [`attention`]'s matrix products.
const DECODE_MAX_T: usize = 4;

/// Attention of `t` new positions over a KV cache, forward only (generation):
/// `out = softmax(scale * Q K^T + mask) V` as (b, t, heads * head_dim), like [`attention`].
///
/// `q`: (b, heads, t, head_dim). `k_cache`, `v_cache`: (b, kv_heads, capacity, head_dim)
/// contiguous buffers whose first `s` positions hold keys and values. `mask`: additive,
/// (b or 1, 1, t, s). Decoding steps (`t` of a few positions, f32 or f64 on the CPU) read the
/// cache in place with one task per kv group (its keys stay in cache for the group's query
/// heads): a matrix-product call per head costs more than the work at these sizes, and copying
/// the cache's first `s` positions out would move the whole cache every step. Longer blocks and
/// other devices take [`attention`] on the narrowed cache.
pub fn attention_cached(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    s: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, cap, hdk) = k_cache.dims4()?;
    let direct = q.device().is_cpu()
        && t <= DECODE_MAX_T
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k_cache.dtype() == q.dtype()
        && v_cache.dtype() == q.dtype()
        && k_cache.is_contiguous()
        && v_cache.is_contiguous()
        && v_cache.dims() == k_cache.dims()
        && bk == b
        && hdk == hd
        && s <= cap
        && nkv > 0
        && nh % nkv == 0;
    if !direct {
        let (k, v) = (k_cache.narrow(2, 0, s)?, v_cache.narrow(2, 0, s)?);
        return attention(q, &k, &v, mask, scale);
    }
    if let Some(m) = mask {
        check_mask(m, (b, t, s), "attention_cached")?;
    }
    let mask = mask
        .map(|m| m.to_dtype(q.dtype())?.contiguous())
        .transpose()?;
    q.contiguous()?
        .apply_op3_no_bwd(k_cache, v_cache, &CachedAttention { mask, scale, s })
}

/// [`attention_cached`]'s direct path as an op (forward only): q, then the whole K and V
/// caches, of which the first `s` positions are read.
struct CachedAttention {
    /// Additive mask (b or 1, 1, t, s) in q's dtype, contiguous.
    mask: Option<Tensor>,
    scale: f64,
    s: usize,
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "sft-cached-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, nh, t, hd) = lq.shape().dims4()?;
        let (_, nkv, cap, _) = lk.shape().dims4()?;
        let d = AttnDims {
            b,
            nh,
            nkv,
            t,
            s: self.s,
            hd,
        };
        let shape = Shape::from((b, t, nh * hd));
        let op = "attention_cached";
        Ok(match sq.dtype() {
            DType::F32 => {
                let (q, k, v) = (cont(sq, lq, op)?, cont(sk, lk, op)?, cont(sv, lv, op)?);
                let out = with_mask(self.mask.as_ref(), |m| {
                    decode_attention_slices(d, cap, q, k, v, m, self.scale as f32)
                })?;
                (CpuStorage::F32(out), shape)
            }
            DType::F64 => {
                let (q, k, v) = (cont(sq, lq, op)?, cont(sk, lk, op)?, cont(sv, lv, op)?);
                let out = with_mask(self.mask.as_ref(), |m| {
                    decode_attention_slices(d, cap, q, k, v, m, self.scale)
                })?;
                (CpuStorage::F64(out), shape)
            }
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        })
    }
}

/// [`attention_cached`]'s direct loops on slices: one task per (batch row, kv group).
fn decode_attention_slices<T: AttnFloat>(
    d: AttnDims,
    cap: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<(&[T], usize)>,
    scale: T,
) -> Vec<T> {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let mut out = vec![T::zero(); d.b * t * nh * hd];
    // Task (bi, g) writes heads g * n_rep.. of every position of row bi: (t, n_rep * hd)
    // strided pieces, so the tasks get raw pointers.
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (bi, g) = (task / d.nkv, task % d.nkv);
        let kg = &k[(bi * d.nkv + g) * cap * hd..][..s * hd];
        let vg = &v[(bi * d.nkv + g) * cap * hd..][..s * hd];
        let mut p = vec![T::zero(); s];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for tq in 0..t {
                let qrow = &q[((bi * nh + h) * t + tq) * hd..][..hd];
                let mrow =
                    mask.map(|(m, mb)| &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..s]);
                // SAFETY: (bi, tq, h) is written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add(((bi * t + tq) * nh + h) * hd),
                        hd,
                    )
                };
                T::decode_row(qrow, kg, vg, mrow, scale, &mut p, dst);
            }
        }
    };
    let tasks = d.b * d.nkv;
    if tasks * n_rep * t * s * hd < 1 << 15 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    out
}

/// [`decode_row_body`] for f32 rows a multiple of 8 wide, with fused multiply-adds (Rust does
/// not contract `a * b + c` on its own) and four accumulators in the dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_row_f32_avx2(
    q: &[f32],
    kg: &[f32],
    vg: &[f32],
    m: Option<&[f32]>,
    scale: f32,
    p: &mut [f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let s = p.len();
    assert!(kg.len() >= s * hd && vg.len() >= s * hd && o.len() == hd && hd.is_multiple_of(8));
    let (qp, kp, vp, op) = (q.as_ptr(), kg.as_ptr(), vg.as_ptr(), o.as_mut_ptr());
    let mut max = f32::NEG_INFINITY;
    for j in 0..s {
        let mj = m.map_or(0.0, |m| m[j]);
        if mj == f32::NEG_INFINITY {
            p[j] = mj;
            continue;
        }
        let kj = kp.add(j * hd);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= hd {
            for (a, lane) in acc.iter_mut().enumerate() {
                let off = i + 8 * a;
                *lane = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(off)),
                    _mm256_loadu_ps(kj.add(off)),
                    *lane,
                );
            }
            i += 32;
        }
        while i < hd {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(qp.add(i)),
                _mm256_loadu_ps(kj.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_movehdup_ps(v));
        p[j] = scale * _mm_cvtss_f32(v) + mj;
        max = max.max(p[j]);
    }
    o.iter_mut().for_each(|x| *x = 0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    // The portable loop, inlined here under AVX2 (`f32::exp_shift_sum` would dispatch again).
    let inv = exp_shift_sum_f32(p, max).recip();
    for (j, &pj) in p.iter().enumerate() {
        if pj == 0.0 {
            continue;
        }
        let w = _mm256_set1_ps(pj * inv);
        let vj = vp.add(j * hd);
        for i in (0..hd).step_by(8) {
            let acc = _mm256_loadu_ps(op.add(i));
            _mm256_storeu_ps(
                op.add(i),
                _mm256_fmadd_ps(w, _mm256_loadu_ps(vj.add(i)), acc),
            );
        }
    }
}

#[inline(always)]
fn decode_row_body<T: AttnFloat>(
    qrow: &[T],
    kg: &[T],
    vg: &[T],
    mrow: Option<&[T]>,
    scale: T,
    p: &mut [T],
    o: &mut [T],
) {
    let hd = qrow.len();
    let mut max = T::neg_infinity();
    for (j, (pj, kj)) in p.iter_mut().zip(kg.chunks_exact(hd)).enumerate() {
        let m = mrow.map_or(T::zero(), |m| m[j]);
        *pj = if m == T::neg_infinity() {
            m
        } else {
            scale * dot_lanes(qrow, kj) + m
        };
        max = max.max(*pj);
    }
    o.iter_mut().for_each(|x| *x = T::zero());
    if max == T::neg_infinity() {
        // A fully masked row gives zeros, as in [`attention`].
        return;
    }
    let inv = T::exp_shift_sum(p, max).recip();
    for (&pj, vj) in p.iter().zip(vg.chunks_exact(hd)) {
        if pj != T::zero() {
            let w = pj * inv;
            o.iter_mut().zip(vj).for_each(|(x, &vv)| *x += w * vv);
        }
    }
}

/// Gradients of q, k and v (in the compute type), laid out as q, k, v.
#[allow(clippy::too_many_arguments)]
fn attn_bwd<T: AttnFloat>(
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<(&[T], usize)>,
    scale: T,
    dout: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let rows = n_rep * t;
    let row_blocks: Vec<_> = (0..d.b).map(|bi| key_blocks(d, bi, mask)).collect();
    let mut dq = vec![T::zero(); d.b * nh * t * hd];
    let mut dk = vec![T::zero(); d.b * d.nkv * s * hd];
    let mut dv = vec![T::zero(); d.b * d.nkv * s * hd];
    let run = |(((gi, dq_g), dk_g), dv_g): GroupGrads<'_, T>| {
        let (bi, g) = (gi / d.nkv, gi % d.nkv);
        let blocks = &row_blocks[bi];
        let mut p = vec![T::zero(); rows * s];
        attn_probs(d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let qg = &q[(bi * nh + g * n_rep) * t * hd..][..rows * hd];
        let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        let mut dp = vec![T::zero(); rows * s];
        // dV, dK and dQ accumulate over blocks into these zeroed buffers.
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for &(t0, t1, c) in blocks {
                let i0 = r * t + t0;
                let dor = dout[((bi * t + t0) * nh + h) * hd..].as_ptr();
                // SAFETY: dO rows of head h are nh * hd apart; rows i0.. of p and dp hold
                // t1 - t0 rows of s; c <= s.
                unsafe {
                    // dP_r = dO_r V^T
                    mm(
                        dp[i0 * s..].as_mut_ptr(),
                        s,
                        (t1 - t0, c, hd),
                        dor,
                        (nh * hd, 1),
                        vg.as_ptr(),
                        (1, hd),
                        false,
                        T::one(),
                    );
                    // dV += P_r^T dO_r
                    mm(
                        dv_g.as_mut_ptr(),
                        hd,
                        (c, hd, t1 - t0),
                        p[i0 * s..].as_ptr(),
                        (1, s),
                        dor,
                        (nh * hd, 1),
                        true,
                        T::one(),
                    );
                }
            }
        }
        // dS = P (dP - rowsum(dP P)), in place in dp (zero where P is, past the key limit).
        for (i, (dpr, pr)) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)).enumerate() {
            let c = blocks[(i % t) / ATTN_BLOCK].2;
            let (dpr, pr) = (&mut dpr[..c], &pr[..c]);
            let dot = dot_lanes(dpr, pr);
            dpr.iter_mut()
                .zip(pr)
                .for_each(|(x, &pv)| *x = pv * (*x - dot));
        }
        for r in 0..n_rep {
            for &(t0, t1, c) in blocks {
                let i0 = r * t + t0;
                // SAFETY: as above; dq_g is rows x hd, dk_g s x hd.
                unsafe {
                    // dQ = scale dS K
                    mm(
                        dq_g[i0 * hd..].as_mut_ptr(),
                        hd,
                        (t1 - t0, hd, c),
                        dp[i0 * s..].as_ptr(),
                        (s, 1),
                        kg.as_ptr(),
                        (hd, 1),
                        false,
                        scale,
                    );
                    // dK += scale dS^T Q
                    mm(
                        dk_g.as_mut_ptr(),
                        hd,
                        (c, hd, t1 - t0),
                        dp[i0 * s..].as_ptr(),
                        (1, s),
                        qg[i0 * hd..].as_ptr(),
                        (hd, 1),
                        true,
                        scale,
                    );
                }
            }
        }
    };
    if d.b * nh * t * s * hd < 1 << 18 {
        dq.chunks_mut(rows * hd)
            .enumerate()
            .zip(dk.chunks_mut(s * hd))
            .zip(dv.chunks_mut(s * hd))
            .for_each(run);
    } else {
        dq.par_chunks_mut(rows * hd)
            .enumerate()
            .zip(dk.par_chunks_mut(s * hd))
            .zip(dv.par_chunks_mut(s * hd))
            .for_each(run);
    }
    (dq, dk, dv)
}

impl Attention {
    fn dims(lq: &Layout, lk: &Layout) -> Result<AttnDims> {
        let (b, nh, t, hd) = lq.shape().dims4()?;
        let (_, nkv, s, _) = lk.shape().dims4()?;
        Ok(AttnDims {
            b,
            nh,
            nkv,
            t,
            s,
            hd,
        })
    }

    fn with_mask<T: WithDType, R>(&self, f: impl FnOnce(Option<(&[T], usize)>) -> R) -> Result<R> {
        with_mask(self.mask.as_ref(), f)
    }
}

/// An attention mask as a slice of the compute type and its batch size, passed to `f`.
fn with_mask<T: WithDType, R>(
    mask: Option<&Tensor>,
    f: impl FnOnce(Option<(&[T], usize)>) -> R,
) -> Result<R> {
    match mask {
        None => Ok(f(None)),
        Some(m) => {
            let (ms, ml) = m.storage_and_layout();
            let candle_core::Storage::Cpu(ms) = &*ms else {
                bail!("attention: the mask is not on the CPU");
            };
            let mv = cont::<T>(ms, ml, "attention mask")?;
            Ok(f(Some((mv, ml.dims()[0]))))
        }
    }
}

/// Contiguous float data as a Vec of the compute type (f32, or f64 for f64).
fn to_compute_f32(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<std::borrow::Cow<'static, [f32]>> {
    Ok(std::borrow::Cow::Owned(match s.dtype() {
        DType::BF16 => cont::<bf16>(s, l, op)?.iter().map(|v| v.to_a()).collect(),
        DType::F16 => cont::<f16>(s, l, op)?.iter().map(|v| v.to_f32()).collect(),
        DType::F32 => cont::<f32>(s, l, op)?.to_vec(),
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    }))
}

/// f32 results in the storage dtype `dt`.
fn from_compute_f32(v: Vec<f32>, dt: DType) -> CpuStorage {
    match dt {
        DType::BF16 => CpuStorage::BF16(crate::packed_gemm::to_bf16(&v)),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sft-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Self::dims(lq, lk)?;
        let shape = Shape::from((d.b, d.t, d.nh * d.hd));
        if sq.dtype() == DType::F64 {
            let (q, k, v) = (
                cont::<f64>(sq, lq, "attention")?,
                cont::<f64>(sk, lk, "attention")?,
                cont::<f64>(sv, lv, "attention")?,
            );
            let out = self.with_mask::<f64, _>(|m| attn_fwd(d, q, k, v, m, self.scale))?;
            return Ok((CpuStorage::F64(out), shape));
        }
        let q = to_compute_f32(sq, lq, "attention")?;
        let k = to_compute_f32(sk, lk, "attention")?;
        let v = to_compute_f32(sv, lv, "attention")?;
        let out = self.with_mask::<f32, _>(|m| attn_fwd(d, &q, &k, &v, m, self.scale as f32))?;
        Ok((from_compute_f32(out, sq.dtype()), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grads = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionBwd {
                mask: self.mask.clone(),
                scale: self.scale,
                grad,
            },
        )?;
        // The backward op returns dq, dk, dv concatenated, flattened.
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = grads.narrow(0, 0, nq)?.reshape(q.dims())?;
        let dk = grads.narrow(0, nq, nk)?.reshape(k.dims())?;
        let dv = grads.narrow(0, nq + nk, nk)?.reshape(v.dims())?;
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

/// The backward of [`Attention`] as one op: dq, dk and dv concatenated into one flat tensor.
struct AttentionBwd {
    mask: Option<Tensor>,
    scale: f64,
    /// d out, (b, t, heads * head_dim), contiguous.
    grad: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "sft-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Attention::dims(lq, lk)?;
        let (gs, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            bail!("attention bwd: the gradient is not on the CPU");
        };
        let attn = Attention {
            mask: self.mask.clone(),
            scale: self.scale,
        };
        let total = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        if sq.dtype() == DType::F64 {
            let (q, k, v) = (
                cont::<f64>(sq, lq, "attention bwd")?,
                cont::<f64>(sk, lk, "attention bwd")?,
                cont::<f64>(sv, lv, "attention bwd")?,
            );
            let g = cont::<f64>(gs, gl, "attention bwd")?;
            let (dq, dk, dv) =
                attn.with_mask::<f64, _>(|m| attn_bwd(d, q, k, v, m, self.scale, g))?;
            let mut all = dq;
            all.extend(dk);
            all.extend(dv);
            return Ok((CpuStorage::F64(all), Shape::from(total)));
        }
        let q = to_compute_f32(sq, lq, "attention bwd")?;
        let k = to_compute_f32(sk, lk, "attention bwd")?;
        let v = to_compute_f32(sv, lv, "attention bwd")?;
        let g = to_compute_f32(gs, gl, "attention bwd")?;
        let (dq, dk, dv) =
            attn.with_mask::<f32, _>(|m| attn_bwd(d, &q, &k, &v, m, self.scale as f32, &g))?;
        let mut all = dq;
        all.extend(dk);
        all.extend(dv);
        Ok((from_compute_f32(all, sq.dtype()), Shape::from(total)))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Per-row cross-entropy `logsumexp(logits[i]) - logits[i, labels[i]]`, fused (no softmax
/// tensor is kept). `logits`: (n, vocab) float; `labels`: (n) u32 or i64. Rows whose label
/// equals `ignore_index` give 0 and no gradient. The result is (n) in f32 (f64 for f64
/// logits): sum it and divide by the number of counted tokens. Labels out of range are an
/// error.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if labels.dims() != [n] {
        bail!(
            "cross_entropy: labels {:?}, expected [{n}] for logits ({n}, {v})",
            labels.dims()
        );
    }
    if !logits.device().is_cpu() {
        return cross_entropy_composed(logits, labels, ignore_index);
    }
    logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, CrossEntropy { ignore_index })
}

fn cross_entropy_composed(logits: &Tensor, labels: &Tensor, ignore: i64) -> Result<Tensor> {
    let out_dt = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(out_dt)?;
    let labels = labels.to_dtype(DType::I64)?;
    let keep = labels.ne(ignore)?;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?;
    let lse = logits.exp()?.sum_keepdim(1)?.log()?; // composed fallback: not max-shifted
    let picked = logits.gather(&safe.unsqueeze(1)?, 1)?;
    let loss = (lse - picked)?.squeeze(1)?;
    keep.where_cond(&loss, &loss.zeros_like()?)
}

struct CrossEntropy {
    ignore_index: i64,
}

fn labels_i64(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    Ok(match s.dtype() {
        DType::U32 => cont::<u32>(s, l, "cross_entropy")?
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DType::I64 => cont::<i64>(s, l, "cross_entropy")?.to_vec(),
        dt => bail!("cross_entropy: labels must be u32 or i64, got {dt:?}"),
    })
}

fn check_labels(labels: &[i64], v: usize, ignore: i64) -> Result<()> {
    if let Some((i, &bad)) = labels
        .iter()
        .enumerate()
        .find(|(_, &y)| y != ignore && (y < 0 || y as usize >= v))
    {
        bail!("cross_entropy: label {bad} at row {i} is outside the vocabulary 0..{v}");
    }
    Ok(())
}

#[inline(always)]
fn logsumexp<T: Elem>(row: &[T]) -> T::A {
    let max = row
        .iter()
        .fold(T::A::neg_infinity(), |m, &v| m.max(v.to_a()));
    max + T::sum_exp_shift(row, max).ln()
}

fn ce_fwd<T: Elem>(
    op: &CrossEntropy,
    sx: &CpuStorage,
    lx: &Layout,
    sy: &CpuStorage,
    ly: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (n, v) = lx.shape().dims2()?;
    let x = cont::<T>(sx, lx, "cross_entropy")?;
    let labels = labels_i64(sy, ly)?;
    check_labels(&labels, v, op.ignore_index)?;
    let row_loss = |i: usize| -> T::A {
        let y = labels[i];
        if y == op.ignore_index {
            return T::A::zero();
        }
        let r = &x[i * v..(i + 1) * v];
        logsumexp(r) - r[y as usize].to_a()
    };
    let losses: Vec<T::A> = if n * v < PAR_MIN_ELEMS {
        (0..n).map(row_loss).collect()
    } else {
        (0..n).into_par_iter().map(row_loss).collect()
    };
    let out = T::store_a(losses);
    Ok((out, Shape::from(n)))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "sft-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => ce_fwd::<f32>(self, s1, l1, s2, l2),
            DType::F64 => ce_fwd::<f64>(self, s1, l1, s2, l2),
            DType::BF16 => ce_fwd::<bf16>(self, s1, l1, s2, l2),
            DType::F16 => ce_fwd::<f16>(self, s1, l1, s2, l2),
            dt => bail!("cross_entropy: unsupported logits dtype {dt:?}"),
        }
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = logits.apply_op3_no_bwd(
            labels,
            &grad,
            &CrossEntropyBwd {
                ignore_index: self.ignore_index,
                losses: res.detach().contiguous()?,
            },
        )?;
        Ok((Some(dx), None))
    }
}

/// d logits[i] = grad[i] * (softmax(logits[i]) - onehot(labels[i])), zero for ignored rows.
struct CrossEntropyBwd {
    ignore_index: i64,
    /// The forward's per-row losses: `lse = loss + logits[label]` without another exp pass.
    losses: Tensor,
}

fn ce_bwd<T: Elem>(
    op: &CrossEntropyBwd,
    sx: &CpuStorage,
    lx: &Layout,
    sy: &CpuStorage,
    ly: &Layout,
    sg: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (_, v) = lx.shape().dims2()?;
    let x = cont::<T>(sx, lx, "cross_entropy bwd")?;
    let labels = labels_i64(sy, ly)?;
    let g = T::a_slice(sg, lg, "cross_entropy bwd")?;
    let (ls, ll) = op.losses.storage_and_layout();
    let candle_core::Storage::Cpu(ls) = &*ls else {
        bail!("cross_entropy bwd: the losses are not on the CPU");
    };
    let losses = T::a_slice(ls, ll, "cross_entropy bwd")?;
    let mut out = vec![T::zero(); x.len()];
    for_rows(&mut out, v, |i, o| {
        let y = labels[i];
        if y == op.ignore_index {
            return;
        }
        let r = &x[i * v..(i + 1) * v];
        let lse = losses[i] + r[y as usize].to_a();
        let gi = g[i];
        T::exp_shift_scale(o, r, lse, gi);
        let y = y as usize;
        o[y] = T::from_a(gi * ((r[y].to_a() - lse).fexp() - T::A::one()));
    });
    Ok((storage(out), lx.shape().clone()))
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "sft-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => ce_bwd::<f32>(self, s1, l1, s2, l2, s3, l3),
            DType::F64 => ce_bwd::<f64>(self, s1, l1, s2, l2, s3, l3),
            DType::BF16 => ce_bwd::<bf16>(self, s1, l1, s2, l2, s3, l3),
            DType::F16 => ce_bwd::<f16>(self, s1, l1, s2, l2, s3, l3),
            dt => bail!("cross_entropy bwd: unsupported logits dtype {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The fused attention skips the keys a causal mask rules out, block by block (64 query
    /// rows each); over several blocks, with padding, it must equal the composed graph, values
    /// and gradients.
    #[test]
    fn blocked_causal_attention_matches_the_composed_graph() {
        let dev = candle_core::Device::Cpu;
        let (b, nh, nkv, t, hd, pad) = (2, 4, 2, 150, 8, 37);
        let mut m = vec![0f64; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j < pad && j != i) {
                        m[(bi * t + i) * t + j] = f64::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &dev).unwrap();
        let var = |h| candle_core::Var::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let run = |f: &dyn Fn() -> Tensor| {
            let y = f();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y];
            for x in [&q, &k, &v] {
                out.push(g.get(x.as_tensor()).unwrap().clone());
            }
            out
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = run(&|| attention(qt, kt, vt, Some(&mask), scale).unwrap());
        let composed = run(&|| attention_composed(qt, kt, vt, Some(&mask), scale).unwrap());
        for (i, (a, c)) in fused.iter().zip(&composed).enumerate() {
            let d = (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-9, "output/grad {i}: max difference {d}");
        }
    }

    /// The f32 backward of the LoRA linear (its element-wise steps run in parallel, off
    /// candle) agrees with the f64 one (candle's ops), dropout mask included.
    #[test]
    fn lora_backward_in_f32_matches_f64() {
        let dev = candle_core::Device::Cpu;
        let (m, k, n, r) = (6, 48, 40, 4);
        let x = Tensor::randn(0f64, 1.0, (2, m / 2, k), &dev).unwrap();
        let w = Tensor::randn(0f64, 0.1, (n, k), &dev).unwrap();
        let a = Tensor::randn(0f64, 0.1, (r, k), &dev).unwrap();
        let b = Tensor::randn(0f64, 0.1, (n, r), &dev).unwrap();
        let keep: Vec<f64> = (0..m * k)
            .map(|i| [0.0, 1.25][(i * 7 % 5 != 0) as usize])
            .collect();
        let mask = Tensor::from_vec(keep, (2, m / 2, k), &dev).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (2, m / 2, n), &dev).unwrap();
        let grads = |dt: DType| -> Vec<Vec<f64>> {
            let v = |t: &Tensor| candle_core::Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap();
            let (xv, av, bv) = (v(&x), v(&a), v(&b));
            let y = lora_linear(
                xv.as_tensor(),
                &w.to_dtype(dt).unwrap(),
                av.as_tensor(),
                bv.as_tensor(),
                2.0,
                Some(&mask.to_dtype(dt).unwrap()),
            )
            .unwrap();
            let g = (y * probe.to_dtype(dt).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [xv, av, bv]
                .iter()
                .map(|v| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect()
        };
        for (g32, g64) in grads(DType::F32).iter().zip(grads(DType::F64)) {
            for (p, q) in g32.iter().zip(&g64) {
                assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }

    /// A kept f32 pack serves f32 products of up to PACKED_F32_MAX_ROWS rows (frozen and LoRA
    /// linears, forward and input gradient) with candle's results to rounding; longer products
    /// go to candle unchanged (bit-identical).
    #[test]
    fn f32_packs_serve_short_products() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (40, 64), &dev).unwrap();
        let a = Tensor::randn(0f32, 0.1, (4, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, (40, 4), &dev).unwrap();
        let pack = WeightPack::new(&w).unwrap();
        assert_eq!(pack.is_some(), crate::packed_gemm::available_f32());
        assert!(WeightPack::new_for_grad(&w).unwrap().is_none());
        let vals = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let close = |x: &[f32], y: &[f32], what: &str| {
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 1e-5 * (1.0 + q.abs()), "{what}: {p} vs {q}");
            }
        };
        for rows in [3, PACKED_F32_MAX_ROWS + 1] {
            let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
            let plain = vals(frozen_linear(&x, &w).unwrap());
            let packed = vals(frozen_linear_packed(&x, &w, (pack.as_ref(), None)).unwrap());
            let lora = vals(lora_linear(&x, &w, &a, &b, 2.0, None).unwrap());
            let lora_packed =
                vals(lora_linear_packed(&x, &w, &a, &b, 2.0, None, (pack.as_ref(), None)).unwrap());
            if rows > PACKED_F32_MAX_ROWS {
                assert_eq!(plain, packed, "long products stay with candle");
                assert_eq!(lora, lora_packed);
            } else {
                close(&packed, &plain, "frozen_linear");
                close(&lora_packed, &lora, "lora_linear");
            }
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let r = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
            let dx = |packs: Packs<'_>| {
                let y = frozen_linear_packed(xv.as_tensor(), &w, packs).unwrap();
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                vals(g.get(xv.as_tensor()).unwrap().clone())
            };
            close(
                &dx((pack.as_ref(), None)),
                &dx((None, None)),
                "input gradient",
            );
        }
    }

    /// A packed weight gives bit-identical results to packing per call, for bf16 and for f32
    /// activations (the CPU's mixed mode), in the frozen and the LoRA linear.
    #[test]
    fn packed_weights_give_the_same_products() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (40, 64), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let a = Tensor::randn(0f32, 0.1, (4, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, (40, 4), &dev).unwrap();
        let pack = WeightPack::new(&w).unwrap();
        assert_eq!(pack.is_some(), crate::packed_gemm::available());
        for dt in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let bits = |t: Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let plain = bits(frozen_linear(&x, &w).unwrap());
            let packed = bits(frozen_linear_packed(&x, &w, (pack.as_ref(), None)).unwrap());
            assert_eq!(plain, packed, "frozen_linear {dt:?}");
            // The backward's pack: dx through a Var input.
            let grad_pack = WeightPack::new_for_grad(&w).unwrap();
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, 5, 40), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let dx = |packs: Packs<'_>| {
                let y = frozen_linear_packed(xv.as_tensor(), &w, packs).unwrap();
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                bits(g.get(xv.as_tensor()).unwrap().clone())
            };
            assert_eq!(
                dx((None, None)),
                dx((pack.as_ref(), grad_pack.as_ref())),
                "frozen_linear backward {dt:?}"
            );
            let plain = bits(lora_linear(&x, &w, &a, &b, 2.0, None).unwrap());
            let packed =
                bits(lora_linear_packed(&x, &w, &a, &b, 2.0, None, (pack.as_ref(), None)).unwrap());
            assert_eq!(plain, packed, "lora_linear {dt:?}");
        }
    }
}
