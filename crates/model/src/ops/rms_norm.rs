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

/// The CUDA launches (kernels in `sft-kernels/src/norm.cu`), for a GPU or the emulated one.
mod gpu {
    use candle_core::{DType, Shape};

    use crate::ops::dispatch::same_dtype;
    use crate::ops::launch::{self, Cfg, GpuStorage, In, Launch, Module, Out};

    pub fn forward<S: GpuStorage>(norm: &super::RmsNorm, (x, lx): In<S>, (w, lw): In<S>) -> Out<S> {
        same_dtype("rms_norm", x.dtype(), w.dtype())?;
        launch::contiguous(lx, "rms_norm")?;
        let (rows, d) = super::rms_dims("rms_norm", lx, lw)?;
        let out = x.alloc(x.dtype(), rows * d)?;
        let name = format!("rms_norm_fwd_{}", launch::suffix(x.dtype())?);
        x.launch(
            Launch::new(Module::Norm, name, launch::rows(rows, d))
                .args([x.ptr(lx)?, w.ptr(lw)?, out.base()?])
                .arg(d as i32)
                .arg(norm.eps as f32),
        )?;
        Ok((out, lx.shape().clone()))
    }

    pub fn backward_x<S: GpuStorage>(
        norm: &super::RmsNormBwdX,
        (x, lx): In<S>,
        (w, lw): In<S>,
        (g, lg): In<S>,
    ) -> Out<S> {
        launch::contiguous(lx, "rms_norm bwd")?;
        launch::contiguous(lg, "rms_norm bwd")?;
        let (rows, d) = super::rms_dims("rms_norm bwd", lx, lw)?;
        let out = x.alloc(x.dtype(), rows * d)?;
        let name = format!("rms_norm_bwd_dx_{}", launch::suffix(x.dtype())?);
        x.launch(
            Launch::new(Module::Norm, name, launch::rows(rows, d))
                .args([x.ptr(lx)?, w.ptr(lw)?, g.ptr(lg)?, out.base()?])
                .arg(d as i32)
                .arg(norm.eps as f32),
        )?;
        Ok((out, lx.shape().clone()))
    }

    /// dw = sum over rows of g * x * rstd: per-row rstd, column sums over chunks of rows,
    /// then the chunks summed in a fixed order (deterministic, unlike atomics).
    pub fn backward_w<S: GpuStorage>(
        norm: &super::RmsNormBwdW,
        (x, lx): In<S>,
        (g, lg): In<S>,
    ) -> Out<S> {
        launch::contiguous(lx, "rms_norm bwd")?;
        launch::contiguous(lg, "rms_norm bwd")?;
        let d = lx.dims().last().copied().unwrap_or(1);
        let rows = lx.shape().elem_count() / d.max(1);
        let sfx = launch::suffix(x.dtype())?;
        let rstd = x.alloc(DType::F32, rows)?;
        let (xp, gp, rp) = (x.ptr(lx)?, g.ptr(lg)?, rstd.base()?);
        x.launch(
            Launch::new(
                Module::Norm,
                format!("rms_norm_rstd_{sfx}"),
                launch::rows(rows, d),
            )
            .args([xp.clone(), rp.clone()])
            .arg(d as i32)
            .arg(norm.eps as f32),
        )?;
        let per_chunk = 64usize;
        let chunks = rows.div_ceil(per_chunk).max(1);
        let partial = x.alloc(DType::F32, chunks * d)?;
        let pp = partial.base()?;
        let cfg = Cfg {
            grid: [d.div_ceil(128) as u32, chunks as u32, 1],
            block: [128, 1, 1],
            shared: 0,
        };
        x.launch(
            Launch::new(Module::Norm, format!("rms_norm_dw_partial_{sfx}"), cfg)
                .args([xp, gp, rp, pp.clone()])
                .arg(rows as i32)
                .arg(d as i32)
                .arg(per_chunk as i32),
        )?;
        let out = x.alloc(x.dtype(), d)?;
        x.launch(
            Launch::new(Module::Norm, format!("sum_chunks_{sfx}"), launch::grid(d))
                .args([pp, out.base()?])
                .arg(chunks as i32)
                .arg(d as i32),
        )?;
        Ok((out, Shape::from(d)))
    }
}
