//! `x W^T` over a frozen weight kept quantized ([`crate::quant::QuantWeight`]): QLoRA's base
//! product. The weight is dequantized a tile of rows at a time into a buffer of about 1 MiB,
//! multiplied there (the `gemm` crate's SIMD kernels), and the buffer reused: no dense copy of
//! the layer exists at any time. The backward is the same product the other way round
//! (`dY W`, tile by tile, accumulated), so it never builds a dW either.
use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::route::{route, Op, Route};
use crate::quant::{QuantWeight, SharedQuant};

/// Bytes of f32 one dequantized tile holds (rows of the weight, at least [`MIN_TILE_ROWS`]).
const TILE_BYTES: usize = 1 << 20;
const MIN_TILE_ROWS: usize = 32;

/// `y = x W^T` for a quantized frozen `W` (out, in): `x` (..., in) f32, bf16 or f16 ->
/// (..., out) in x's dtype, products summed in f32 over the dequantized values (which hold
/// the model dtype's values). Its backward gives dx only.
pub fn quant_linear(x: &Tensor, w: &SharedQuant) -> Result<Tensor> {
    let (n, k) = w.dims();
    let dims = x.dims();
    if dims.last() != Some(&k) {
        bail!("quant_linear: x {dims:?} does not end in in_features {k} of W ({n}, {k})");
    }
    if route(Op::QuantLinear, x.device(), x.dtype()) == Route::Composed
        || !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        || (gpu_path(x.device()) && !gpu::has_kernel(w))
    {
        return quant_linear_composed(x, w);
    }
    x.contiguous()?.apply_op1(QuantLinear {
        w: w.clone(),
        transposed: false,
    })
}

/// Whether a GPU dequantizes this weight's blocks itself (NF4, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
/// Q6_K); the other GGML types run composed there (dequantized on the host for each product).
pub fn quant_has_gpu_kernel(w: &QuantWeight) -> bool {
    gpu::has_kernel(w)
}

/// Whether the product runs through the CUDA path: on a GPU, or on the emulated one.
fn gpu_path(dev: &candle_core::Device) -> bool {
    dev.is_cuda() || (dev.is_cpu() && crate::ops::emu::active())
}

/// The composed reference: the whole weight dequantized (in the model's dtype), then candle's
/// matmul in x's dtype. For the tests, and for devices without the kernel.
pub fn quant_linear_composed(x: &Tensor, w: &QuantWeight) -> Result<Tensor> {
    let dense = w.dequantize(x.device())?.to_dtype(x.dtype())?;
    composed::linear(x, &dense)
}

/// `g W` (g ends in out_features): the input gradient of the quantized product, no graph.
pub(crate) fn quant_linear_t(g: &Tensor, w: &SharedQuant) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&QuantLinear {
        w: w.clone(),
        transposed: true,
    })
}

struct QuantLinear {
    w: SharedQuant,
    /// `false`: `x W^T` (x ends in in_features); `true`: `g W` (g ends in out_features).
    transposed: bool,
}

impl QuantLinear {
    fn name_str(&self) -> &'static str {
        if self.transposed {
            "quant_linear_t"
        } else {
            "quant_linear"
        }
    }
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        if self.transposed {
            "quant_linear_t"
        } else {
            "quant_linear"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if crate::ops::emu::active() && gpu::has_kernel(&self.w) {
            let x = crate::ops::emu::EmuStorage::upload(s)?;
            let (out, shape) = gpu::forward(self, &candle_core::Device::Cpu, (&x, l))?;
            return Ok((out.to_cpu()?, shape));
        }
        let (n, k) = self.w.dims();
        let (k_in, k_out) = if self.transposed { (n, k) } else { (k, n) };
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k_in) {
            bail!("{}: input {dims:?} does not end in {k_in}", self.name());
        }
        let m = l.shape().elem_count() / k_in.max(1);
        let x: Cow<'_, [f32]> = match s {
            CpuStorage::F32(_) => Cow::Borrowed(cont::<f32>(s, l, self.name())?),
            CpuStorage::BF16(_) => Cow::Owned(
                cont::<bf16>(s, l, self.name())?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            ),
            CpuStorage::F16(_) => Cow::Owned(
                cont::<f16>(s, l, self.name())?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            ),
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        let mut y = vec![0f32; m * k_out];
        product(&self.w, &x, m, self.transposed, &mut y)?;
        if let Some(d) = dims.last_mut() {
            *d = k_out;
        }
        let out = match s.dtype() {
            DType::BF16 => CpuStorage::BF16(y.iter().map(|v| bf16::from_f32(*v)).collect()),
            DType::F16 => CpuStorage::F16(y.iter().map(|v| f16::from_f32(*v)).collect()),
            _ => CpuStorage::F32(y),
        };
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dev = candle_core::Device::Cuda(s.device().clone());
        gpu::forward(self, &dev, (s, l))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?.apply_op1(QuantLinear {
            w: self.w.clone(),
            transposed: !self.transposed,
        })?;
        Ok(Some(g))
    }
}

/// Rows of the weight per dequantized tile.
fn tile_rows(n: usize, k: usize) -> usize {
    (TILE_BYTES / 4 / k.max(1)).max(MIN_TILE_ROWS).min(n.max(1))
}

/// `y (m, n) = x (m, k) W^T`, or with `transposed` `y (m, k) = x (m, n) W`, tile by tile.
pub(crate) fn product(
    w: &QuantWeight,
    x: &[f32],
    m: usize,
    transposed: bool,
    y: &mut [f32],
) -> Result<()> {
    let (n, k) = w.dims();
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let tile = tile_rows(n, k);
    let mut buf = vec![0f32; tile * k];
    for r0 in (0..n).step_by(tile) {
        let r1 = (r0 + tile).min(n);
        let tn = r1 - r0;
        let b = &mut buf[..tn * k];
        // Rows in parallel (8 per task): NF4 and the k-quants decode at a few GB/s per core.
        b.par_chunks_mut(8 * k)
            .enumerate()
            .try_for_each(|(i, chunk)| {
                let s = r0 + 8 * i;
                w.dequantize_rows(s, s + chunk.len() / k, chunk)
            })?;
        // SAFETY: every pointer and stride below stays inside `x`, `b` and `y`, whose lengths
        // are (m, k | n), (tn, k) and (m, n | k).
        unsafe {
            if !transposed {
                // y[:, r0..r1] = x · tile^T; tile^T (k, tn) has element (kk, j) at j * k + kk.
                gemm::gemm(
                    m,
                    tn,
                    k,
                    y.as_mut_ptr().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            } else {
                // y += x[:, r0..r1] · tile; summed over the tiles in a fixed order.
                gemm::gemm(
                    m,
                    k,
                    tn,
                    y.as_mut_ptr(),
                    1,
                    k as isize,
                    r0 > 0,
                    x.as_ptr().add(r0),
                    1,
                    n as isize,
                    b.as_ptr(),
                    1,
                    k as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }
    Ok(())
}

/// The CUDA path, for a GPU or the emulated one: the layer dequantized on the device by
/// `sft-kernels/src/quant.cu` into a buffer of the activations' dtype, then the device's matrix
/// product (cuBLAS on a GPU). The dense buffer lives for this one product and is freed with
/// it, as bitsandbytes does on a GPU; the blocks stay on the device from the first product on.
mod gpu {
    use candle_core::quantized::GgmlDType;
    use candle_core::{bail, DType, Device, Layout, Result, Shape};

    use super::QuantLinear;
    use crate::ops::launch::{self, Arg, GpuStorage, In, Launch, Module};
    use crate::quant::QuantWeight;

    /// GGML's type number of the blocks `quant.cu` dequantizes.
    fn ggml_type(ty: GgmlDType) -> Option<i32> {
        match ty {
            GgmlDType::Q4_0 => Some(2),
            GgmlDType::Q4_1 => Some(3),
            GgmlDType::Q8_0 => Some(8),
            GgmlDType::Q4K => Some(12),
            GgmlDType::Q5K => Some(13),
            GgmlDType::Q6K => Some(14),
            _ => None,
        }
    }

    /// Whether `quant.cu` dequantizes this weight's format (the others run composed).
    pub(crate) fn has_kernel(w: &QuantWeight) -> bool {
        w.nf4().is_some() || w.ggml().is_some_and(|(ty, _)| ggml_type(ty).is_some())
    }

    /// `round_to` of the kernels: the model dtype the values are rounded through.
    fn round_to(dt: DType) -> i32 {
        match dt {
            DType::BF16 => 1,
            DType::F16 => 2,
            _ => 0,
        }
    }

    /// The whole weight (n, k) dequantized into a new storage of `dt` on `like`'s device.
    pub fn dequantize<S: GpuStorage>(
        w: &QuantWeight,
        device: &Device,
        like: &S,
        dt: DType,
    ) -> Result<S> {
        let (n, k) = w.dims();
        let total = n * k;
        let out = like.alloc(dt, total)?;
        let parts = w.device_blocks(device)?;
        let mut keep = Vec::new();
        let mut ptr = |i: usize| -> Result<Arg> {
            let (a, kept) = like.tensor_ptr(&parts[i])?;
            keep.push(kept);
            Ok(a)
        };
        let suffix = launch::suffix(dt)?;
        let launch = if let Some(q) = w.nf4() {
            let (packed, absmax, q2, absmax2, codes) =
                (ptr(0)?, ptr(1)?, ptr(2)?, ptr(3)?, ptr(4)?);
            let (dq, offset) = match q.nested() {
                Some((_, _, offset)) => (1, offset),
                None => (0, 0.0),
            };
            Launch::new(
                Module::Quant,
                format!("nf4_dequant_{suffix}"),
                launch::grid(total.div_ceil(2)),
            )
            .args([packed, absmax, q2, absmax2])
            .arg(Arg::F32(offset))
            .arg(Arg::I32(dq))
            .arg(codes)
            .arg(out.base()?)
            .arg(Arg::I64(total as i64))
            .arg(Arg::I32(round_to(w.dtype())))
        } else {
            let Some((ty, _)) = w.ggml() else {
                bail!("quant_linear: a weight with neither NF4 nor GGML blocks")
            };
            let Some(code) = ggml_type(ty) else {
                bail!("quant_linear: no GPU dequantization of {ty:?} blocks")
            };
            let blocks = total / ty.block_size();
            let kernel = if ty.block_size() == 256 {
                "kquant_dequant"
            } else {
                "ggml_dequant"
            };
            Launch::new(
                Module::Quant,
                format!("{kernel}_{suffix}"),
                launch::grid(blocks),
            )
            .arg(ptr(0)?)
            .arg(Arg::I32(code))
            .arg(out.base()?)
            .arg(Arg::I64(blocks as i64))
            .arg(Arg::I32(round_to(w.dtype())))
        };
        like.launch(launch)?;
        drop(keep);
        Ok(out)
    }

    /// `x W^T` (or, transposed, `g W`) on the device.
    pub fn forward<S: GpuStorage>(
        op: &QuantLinear,
        device: &Device,
        (x, lx): In<'_, S>,
    ) -> Result<(S, Shape)> {
        let (n, k) = op.w.dims();
        let (k_in, k_out) = if op.transposed { (n, k) } else { (k, n) };
        let mut dims = lx.dims().to_vec();
        if dims.last() != Some(&k_in) {
            bail!("{}: input {dims:?} does not end in {k_in}", op.name_str());
        }
        launch::contiguous(lx, op.name_str())?;
        let m = lx.shape().elem_count() / k_in.max(1);
        let dense = dequantize(&op.w, device, x, x.dtype())?;
        let lxm = Layout::contiguous_with_offset((m, k_in), lx.start_offset());
        let wl = Layout::contiguous((n, k));
        let out = if op.transposed {
            // (m, n) · W (n, k)
            x.matmul(&dense, (1, m, k, n), &lxm, &wl)?
        } else {
            // (m, k) · W^T (k, n)
            x.matmul(&dense, (1, m, n, k), &lxm, &wl.transpose(0, 1)?)?
        };
        if let Some(d) = dims.last_mut() {
            *d = k_out;
        }
        Ok((out, Shape::from(dims)))
    }
}
