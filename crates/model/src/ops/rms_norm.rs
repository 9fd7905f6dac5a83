//! RMSNorm over the last dimension, forward and backward.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::cpu::{In, Out};
use crate::ops::dispatch::{kernels, same_dtype, Elem};
use crate::ops::route::{route, Op, Route};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// `x`: (..., d); `weight`: (d). Half types normalise in f32 and round once.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if route(Op::RmsNorm, x.device(), x.dtype()) == Route::Composed {
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

fn rms_fwd<T: Elem>(op: &RmsNorm, (sx, lx): In, (sw, lw): In) -> Out {
    same_dtype("rms_norm", sx.dtype(), sw.dtype())?;
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
    kernels! {"sft-rms-norm", "rms_norm", rms_fwd, gpu::forward, 2}

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

fn rms_bwd_x<T: Elem>(op: &RmsNormBwdX, (sx, lx): In, (sw, lw): In, (sg, lg): In) -> Out {
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
    kernels! {"sft-rms-norm-bwd-x", "rms_norm bwd", rms_bwd_x, gpu::backward_x, 3}
}

/// dw = sum over rows of g * xhat.
struct RmsNormBwdW {
    eps: f64,
}

fn rms_bwd_w<T: Elem>(op: &RmsNormBwdW, (sx, lx): In, (sg, lg): In) -> Out {
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
    kernels! {"sft-rms-norm-bwd-w", "rms_norm bwd", rms_bwd_w, gpu::backward_w, 2}
}

/// The CUDA launches (kernels in `sft-kernels/src/norm.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Shape};

    use crate::ops::cuda::{self, In, Module, Out};
    use crate::ops::dispatch::same_dtype;

    pub fn forward(norm: &super::RmsNorm, (x, lx): In, (w, lw): In) -> Out {
        same_dtype("rms_norm", x.dtype(), w.dtype())?;
        cuda::contiguous(lx, "rms_norm")?;
        let (rows, d) = super::rms_dims("rms_norm", lx, lw)?;
        let dev = x.device();
        let out = cuda::new_storage(dev, x.dtype(), rows * d)?;
        let f = cuda::func(
            dev,
            Module::Norm,
            &format!("rms_norm_fwd_{}", cuda::suffix(x.dtype())?),
        )?;
        let (xp, wp, op) = (cuda::ptr(x, lx)?, cuda::ptr(w, lw)?, cuda::base(&out)?);
        let (d32, e) = (d as i32, norm.eps as f32);
        cuda::launch(&f, cuda::rows(rows, d), |b| {
            b.arg(&xp).arg(&wp).arg(&op).arg(&d32).arg(&e);
        })?;
        Ok((out, lx.shape().clone()))
    }

    pub fn backward_x(norm: &super::RmsNormBwdX, (x, lx): In, (w, lw): In, (g, lg): In) -> Out {
        cuda::contiguous(lx, "rms_norm bwd")?;
        cuda::contiguous(lg, "rms_norm bwd")?;
        let (rows, d) = super::rms_dims("rms_norm bwd", lx, lw)?;
        let dev = x.device();
        let out = cuda::new_storage(dev, x.dtype(), rows * d)?;
        let name = format!("rms_norm_bwd_dx_{}", cuda::suffix(x.dtype())?);
        let f = cuda::func(dev, Module::Norm, &name)?;
        let (xp, wp, gp, op) = (
            cuda::ptr(x, lx)?,
            cuda::ptr(w, lw)?,
            cuda::ptr(g, lg)?,
            cuda::base(&out)?,
        );
        let (d32, e) = (d as i32, norm.eps as f32);
        cuda::launch(&f, cuda::rows(rows, d), |b| {
            b.arg(&xp).arg(&wp).arg(&gp).arg(&op).arg(&d32).arg(&e);
        })?;
        Ok((out, lx.shape().clone()))
    }

    /// dw = sum over rows of g * x * rstd: per-row rstd, column sums over chunks of rows,
    /// then the chunks summed in a fixed order (deterministic, unlike atomics).
    pub fn backward_w(norm: &super::RmsNormBwdW, (x, lx): In, (g, lg): In) -> Out {
        cuda::contiguous(lx, "rms_norm bwd")?;
        cuda::contiguous(lg, "rms_norm bwd")?;
        let d = lx.dims().last().copied().unwrap_or(1);
        let rows = lx.shape().elem_count() / d.max(1);
        let dev = x.device();
        let sfx = cuda::suffix(x.dtype())?;
        let rstd = cuda::new_storage(dev, DType::F32, rows)?;
        let (xp, gp, rp) = (cuda::ptr(x, lx)?, cuda::ptr(g, lg)?, cuda::base(&rstd)?);
        let (d32, e) = (d as i32, norm.eps as f32);
        let f = cuda::func(dev, Module::Norm, &format!("rms_norm_rstd_{sfx}"))?;
        cuda::launch(&f, cuda::rows(rows, d), |b| {
            b.arg(&xp).arg(&rp).arg(&d32).arg(&e);
        })?;
        let per_chunk = 64usize;
        let chunks = rows.div_ceil(per_chunk).max(1);
        let partial = cuda::new_storage(dev, DType::F32, chunks * d)?;
        let pp = cuda::base(&partial)?;
        let (rows32, pc32, ch32) = (rows as i32, per_chunk as i32, chunks as i32);
        let f = cuda::func(dev, Module::Norm, &format!("rms_norm_dw_partial_{sfx}"))?;
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(128) as u32, chunks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        cuda::launch(&f, cfg, |b| {
            b.arg(&xp)
                .arg(&gp)
                .arg(&rp)
                .arg(&pp)
                .arg(&rows32)
                .arg(&d32)
                .arg(&pc32);
        })?;
        let out = cuda::new_storage(dev, x.dtype(), d)?;
        let op = cuda::base(&out)?;
        let f = cuda::func(dev, Module::Norm, &format!("sum_chunks_{sfx}"))?;
        cuda::launch(&f, cuda::grid(d), |b| {
            b.arg(&pp).arg(&op).arg(&ch32).arg(&d32);
        })?;
        Ok((out, Shape::from(d)))
    }
}
