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
    {
        return quant_linear_composed(x, w);
    }
    x.contiguous()?.apply_op1(QuantLinear {
        w: w.clone(),
        transposed: false,
    })
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

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        if self.transposed {
            "quant_linear_t"
        } else {
            "quant_linear"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
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
