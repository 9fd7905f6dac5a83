//! SwiGLU's `silu(gate) * up`, forward and backward in one pass each.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CustomOp2, CustomOp3, Result, Shape, Tensor};
use half::{bf16, f16};
use num_traits::One;
use rayon::prelude::*;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
#[cfg(target_arch = "x86_64")]
use crate::ops::cpu::simd::has_avx2;
use crate::ops::cpu::{In, Out};
use crate::ops::dispatch::{kernels, same_dtype, Acc, Elem};
use crate::ops::route::{route, Op, Route};

/// `silu(gate) * up`, the SwiGLU activation; `gate` and `up` have the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if route(Op::SiluMul, gate.device(), gate.dtype()) == Route::Composed {
        return composed::silu_mul(gate, up);
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
fn sigmoid<A: Acc>(x: A) -> A {
    (A::one() + (-x).fexp()).recip()
}

/// The row loops of [`silu_mul`] and its backward: the generic loop, or AVX2 for f32.
pub(crate) trait SiluMulRow: Elem {
    /// One row of [`silu_mul`].
    fn silu_mul_row(o: &mut [Self], g: &[Self], u: &[Self]) {
        silu_mul_row_body(o, g, u)
    }
    /// One row of [`silu_mul`]'s backward.
    fn silu_mul_bwd_row(dg: &mut [Self], du: &mut [Self], g: &[Self], u: &[Self], dy: &[Self]) {
        silu_mul_bwd_row_body(dg, du, g, u, dy)
    }
}

impl SiluMulRow for f64 {}
impl SiluMulRow for bf16 {}
impl SiluMulRow for f16 {}

impl SiluMulRow for f32 {
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
}

fn silu_mul_fwd<T: SiluMulRow>(_: &SiluMul, (sg, lg): In, (su, lu): In) -> Out {
    same_dtype("silu_mul", sg.dtype(), su.dtype())?;
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
    kernels! {"sft-silu-mul", "silu_mul", silu_mul_fwd, gpu::forward, 2}

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

fn silu_mul_bwd<T: SiluMulRow>(_: &SiluMulBwd, (sg, lg): In, (su, lu): In, (sd, ld): In) -> Out {
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
    kernels! {"sft-silu-mul-bwd", "silu_mul bwd", silu_mul_bwd, gpu::backward, 3}
}

#[inline(always)]
pub(crate) fn silu_mul_row_body<T: Elem>(o: &mut [T], g: &[T], u: &[T]) {
    for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
        let gv = gv.to_a();
        *o = T::from_a(gv * sigmoid(gv) * uv.to_a());
    }
}

#[inline(always)]
pub(crate) fn silu_mul_bwd_row_body<T: Elem>(
    dg: &mut [T],
    du: &mut [T],
    g: &[T],
    u: &[T],
    dy: &[T],
) {
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
pub(crate) unsafe fn silu_mul_row_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    silu_mul_row_body(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul_bwd_row_avx2(
    dg: &mut [f32],
    du: &mut [f32],
    g: &[f32],
    u: &[f32],
    dy: &[f32],
) {
    silu_mul_bwd_row_body(dg, du, g, u, dy)
}

/// The CUDA launches (kernels in `sft-kernels/src/elementwise.cu`), for a GPU or the emulated
/// one.
mod gpu {
    use candle_core::{Result, Shape};

    use crate::ops::dispatch::same_dtype;
    use crate::ops::launch::{self, GpuStorage, In, Module, Out};

    pub fn forward<S: GpuStorage>(_: &super::SiluMul, g: In<S>, u: In<S>) -> Out<S> {
        same_dtype("silu_mul", g.0.dtype(), u.0.dtype())?;
        Ok((
            elementwise("silu_mul_fwd", &[g, u], 1)?,
            g.1.shape().clone(),
        ))
    }

    /// d gate and d up stacked as (2, ...).
    pub fn backward<S: GpuStorage>(_: &super::SiluMulBwd, g: In<S>, u: In<S>, dy: In<S>) -> Out<S> {
        let out = elementwise("silu_mul_bwd", &[g, u, dy], 2)?;
        let mut dims = vec![2];
        dims.extend_from_slice(g.1.dims());
        Ok((out, Shape::from(dims)))
    }

    /// An element-wise kernel `name_<dtype>(inputs..., out, n)` writing `outputs * n` elements.
    fn elementwise<S: GpuStorage>(name: &str, inputs: &[In<S>], outputs: usize) -> Result<S> {
        let n = inputs[0].1.shape().elem_count();
        let cfg = launch::grid(n);
        launch::launch_simple(
            Module::Elementwise,
            name,
            inputs,
            outputs * n,
            cfg,
            (n as i64).into(),
        )
    }
}
