//! Softmax over the last dimension (a fully masked row gives zeros), forward and backward.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::{Float, Zero};

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::dispatch::{by_dtype, Acc, Elem};
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::rows("softmax_fwd", &[(s, l)])?, l.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            gpu::rows("softmax_bwd", &[(s1, l1), (s2, l2)])?,
            l1.shape().clone(),
        ))
    }
}

/// The CUDA launches (kernels in `sft-kernels/src/norm.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Layout, Result};

    use crate::ops::cuda::{self, Module};

    /// A one-block-per-row kernel `name_<dtype>(inputs..., out, d)` over the first input's
    /// rows.
    pub fn rows(name: &str, inputs: &[(&CudaStorage, &Layout)]) -> Result<CudaStorage> {
        let (x, lx) = inputs[0];
        let d = lx.dims().last().copied().unwrap_or(1);
        let n = lx.shape().elem_count();
        let dev = x.device();
        let mut ptrs = vec![];
        for (s, l) in inputs {
            cuda::contiguous(l, name)?;
            ptrs.push(cuda::ptr(s, l)?);
        }
        let out = cuda::new_storage(dev, x.dtype(), n)?;
        let op = cuda::base(&out)?;
        let d32 = d as i32;
        let f = cuda::func(
            dev,
            Module::Norm,
            &format!("{name}_{}", cuda::suffix(x.dtype())?),
        )?;
        cuda::launch(&f, cuda::rows(n / d.max(1), d), |b| {
            for p in &ptrs {
                b.arg(p);
            }
            b.arg(&op).arg(&d32);
        })?;
        Ok(out)
    }
}
