//! RMSNorm over the last dimension, forward and backward.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;

use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::dispatch::{by_dtype, same_dtype, Elem};
use crate::ops::{composed, route, Op, Route};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// `x`: (..., d); `weight`: (d). Half types normalise in f32 and round once.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if route(Op::RmsNorm, x.device()) == Route::Composed {
        return composed::rms_norm(x, weight, eps);
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
