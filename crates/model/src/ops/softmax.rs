//! Softmax over the last dimension (a fully masked row gives zeros), forward and backward.
use candle_core::{CustomOp1, CustomOp2, Result, Tensor};
use num_traits::{Float, Zero};

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::cpu::{In, Out};
use crate::ops::dispatch::{kernels, Acc, Elem};
use crate::ops::route::{route, Op, Route};

/// Softmax over the last dimension. A row that is entirely `-inf` (a fully masked query)
/// gives zeros instead of NaN.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if route(Op::Softmax, x.device(), x.dtype()) == Route::Composed {
        return composed::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

fn softmax_fwd<T: Elem>(_: &Softmax, (s, l): In) -> Out {
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
    kernels! {"sft-softmax", "softmax", softmax_fwd, gpu::forward, 1}

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y * (g - sum(g * y)).
struct SoftmaxBwd;

fn softmax_bwd<T: Elem>(_: &SoftmaxBwd, (sy, ly): In, (sg, lg): In) -> Out {
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
    kernels! {"sft-softmax-bwd", "softmax bwd", softmax_bwd, gpu::backward, 2}
}

/// The CUDA launches (kernels in `sft-kernels/src/norm.cu`), for a GPU or the emulated one.
mod gpu {
    use crate::ops::launch::{self, GpuStorage, In, Module, Out};

    pub fn forward<S: GpuStorage>(_: &super::Softmax, x: In<S>) -> Out<S> {
        Ok((rows("softmax_fwd", &[x])?, x.1.shape().clone()))
    }

    pub fn backward<S: GpuStorage>(_: &super::SoftmaxBwd, y: In<S>, g: In<S>) -> Out<S> {
        Ok((rows("softmax_bwd", &[y, g])?, y.1.shape().clone()))
    }

    /// A one-block-per-row kernel `name_<dtype>(inputs..., out, d)` over the first input's
    /// rows.
    fn rows<S: GpuStorage>(name: &str, inputs: &[In<S>]) -> candle_core::Result<S> {
        let l = inputs[0].1;
        let d = l.dims().last().copied().unwrap_or(1);
        let n = l.shape().elem_count();
        let cfg = launch::rows(n / d.max(1), d);
        launch::launch_simple(Module::Norm, name, inputs, n, cfg, (d as i32).into())
    }
}
