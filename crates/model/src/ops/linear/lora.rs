//! LoRA on a frozen linear layer as one graph node.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;

use super::frozen::*;
use crate::ops::composed;
use crate::ops::dropout::dropout_mask;
use crate::ops::dropout::DropoutKey;
use crate::ops::route::{route, Op, Route};
use crate::quant::SharedQuant;

/// LoRA on a frozen linear layer as one graph node:
/// `y = x W^T + scale * (x A^T) B^T`, with `W` (out, in) frozen, `A` (r, in) and `B` (out, r)
/// usually `Var`s. The backward gives `dx`, `dA`, `dB` (each only when its input tracks a
/// gradient) and never a dW.
///
/// `A` and `B` are f32 or f64; `x` and `W` share their dtype, or are bf16/f16 with f32
/// adapters (PEFT keeps adapters of half-precision models in f32): the base product and the
/// update are then summed in f32 and rounded once. `dropout_mask` (x's shape, in the adapters'
/// dtype, already scaled by 1 / keep) multiplies the adapter's input only, as PEFT's
/// `lora_dropout` does; it is a constant. [`lora_linear_with`] takes the mask as a
/// [`DropoutKey`] instead: it is drawn where it is used and redrawn in the backward, never
/// kept.
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
    let dropout = match dropout_mask {
        Some(m) => LoraDropout::Mask(m),
        None => LoraDropout::Off,
    };
    lora_linear_with(x, w, a, b, scale, dropout, packs)
}

/// The dropout on a LoRA adapter's input.
#[derive(Clone, Copy, Debug)]
pub enum LoraDropout<'a> {
    Off,
    /// A mask of x's shape in the adapters' dtype, scaled by 1 / keep.
    Mask(&'a Tensor),
    /// The counter-based mask of this key with drop probability `p` (see [`dropout_mask`]).
    Key {
        key: DropoutKey,
        p: f64,
    },
}

/// [`lora_linear_packed`] with any [`LoraDropout`].
pub fn lora_linear_with(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: LoraDropout<'_>,
    packs: Packs<'_>,
) -> Result<Tensor> {
    lora_linear_base(x, w, None, a, b, scale, dropout, packs)
}

/// QLoRA: [`lora_linear_with`] over a quantized base (`w` is the layer's stand-in for its
/// shape and dtype). On the CPU one fused node, whose base product and input gradient run
/// tile by tile over the blocks (no dropout mask or adapter input is kept for the backward);
/// elsewhere the composed reference over the dequantized weight.
pub fn lora_linear_quant(
    x: &Tensor,
    w: &Tensor,
    q: &SharedQuant,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: LoraDropout<'_>,
) -> Result<Tensor> {
    if q.dims() != w.dims2()? {
        bail!(
            "lora_linear: blocks of {:?} for a layer of {:?}",
            q.dims(),
            w.dims()
        );
    }
    lora_linear_base(x, w, Some(q), a, b, scale, dropout, (None, None))
}

#[allow(clippy::too_many_arguments)]
fn lora_linear_base(
    x: &Tensor,
    w: &Tensor,
    quant: Option<&SharedQuant>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: LoraDropout<'_>,
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
        && linear_dtypes_ok(x.dtype(), w.dtype(), x.device())
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
    let dropout = match dropout {
        LoraDropout::Off => Dropout::Off,
        LoraDropout::Mask(mask) => {
            if mask.shape() != x.shape() || mask.dtype() != ct {
                bail!(
                    "lora_linear: dropout mask {:?} {:?}, expected {ct:?} {:?}",
                    mask.dtype(),
                    mask.dims(),
                    x.dims()
                );
            }
            Dropout::Mask(mask.contiguous()?)
        }
        LoraDropout::Key { p, .. } if p <= 0.0 => Dropout::Off,
        LoraDropout::Key { key, p } => {
            crate::ops::dropout::threshold(p)?;
            Dropout::Key { key, p }
        }
    };
    let quant_composed =
        quant.is_some() && (!crate::ops::cpu_kernels(x.device()) || ct != DType::F32);
    if route(Op::LoraLinear, x.device(), x.dtype()) == Route::Composed || quant_composed {
        let mask = dropout.mask(x.dims(), ct, x.device())?;
        return match quant {
            // The base through the quantized product (on a GPU its dequantization kernel; its
            // backward keeps the blocks, never a dense weight), the adapter composed.
            Some(q) => {
                let base = crate::ops::quant_linear(x, q)?;
                let xc = x.to_dtype(ct)?;
                let xd = match &mask {
                    Some(m) => (xc * m.to_dtype(ct)?)?,
                    None => xc,
                };
                let delta = composed::linear(&composed::linear(&xd, a)?, b)?.affine(scale, 0.0)?;
                base + delta.to_dtype(x.dtype())?
            }
            None => composed::lora_linear(x, w, a, b, scale, mask.as_ref()),
        };
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: if quant.is_some() {
                w.clone()
            } else {
                w.contiguous()?
            },
            quant: quant.cloned(),
            scale,
            dropout,
            pack: packs.0.cloned(),
            grad_pack: packs.1.cloned(),
        },
    )
}

/// The op's dropout: a given mask, or a key to draw it from where it is used.
#[derive(Clone)]
pub(crate) enum Dropout {
    Off,
    Mask(Tensor),
    Key { key: DropoutKey, p: f64 },
}

impl Dropout {
    /// The mask as a tensor of `dims` in `dtype` on `dev` (`None` without dropout).
    pub(crate) fn mask(
        &self,
        dims: &[usize],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        match self {
            Dropout::Off => Ok(None),
            Dropout::Mask(m) => Ok(Some(m.reshape(dims)?)),
            Dropout::Key { key, p } => dropout_mask(*key, dims, *p, dtype, dev).map(Some),
        }
    }
}

struct LoraLinear {
    /// The frozen base weight (out, in), contiguous; with `quant`, the layer's stand-in.
    w: Tensor,
    /// QLoRA: the base weight's blocks (the CPU kernel only).
    quant: Option<SharedQuant>,
    scale: f64,
    /// The adapter input's dropout.
    pub(crate) dropout: Dropout,
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
        if let Some(q) = &self.quant {
            let CpuStorage::F32(x) = xc else {
                bail!("lora_linear: a quantized base needs f32 adapters");
            };
            let mut y = vec![0f32; m * n];
            super::quantized::product(q, x, m, false, &mut y)?;
            return Ok(CpuStorage::F32(y));
        }
        let (ws, lw) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            bail!("lora_linear: the base weight is not on the CPU");
        };
        if sx.dtype() == DType::BF16 {
            let x = cont::<bf16>(sx, lx, "lora_linear")?;
            let w = cont::<bf16>(ws, lw, "lora_linear")?;
            if let Some(y) = packed_b(self.pack.as_ref(), w, (k, n), (1, k))?
                .and_then(|b| crate::ops::linear::packed_gemm::matmul(x, m, k, &b))
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
        if crate::ops::emu::active() {
            use crate::ops::emu::EmuStorage;
            let (x, a, b) = (
                EmuStorage::upload(sx)?,
                EmuStorage::upload(sa)?,
                EmuStorage::upload(sb)?,
            );
            let (out, shape) = gpu::forward(self, (&x, lx), (&a, la), (&b, lb))?;
            return Ok((out.to_cpu()?, shape));
        }
        let (n, kw) = self.w.dims2()?;
        let (m, k, lx, shape) = rows_view(lx, n, "lora_linear")?;
        if kw != k {
            bail!("lora_linear: W (.., {kw}) and x (.., {k}) differ");
        }
        let ct = sa.dtype();
        let r = la.dims()[0];
        let xc = storage_as(sx, &lx, ct)?;
        let base = self.base_product(sx, &lx, &xc, ct, (m, n, k))?;
        // The adapter's input: x, or x times the dropout mask (drawn here from its key).
        let drawn = match &self.dropout {
            Dropout::Key { key, p } => Some(dropout_mask(
                *key,
                &[m, k],
                *p,
                ct,
                &self.w.device().clone(),
            )?),
            _ => None,
        };
        let mask = match &self.dropout {
            Dropout::Mask(t) => Some(t),
            _ => drawn.as_ref(),
        };
        let xd = match mask {
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
        let h = adapter_matmul_t(&xd, sa, la, (m, r, k))?;
        let delta = adapter_matmul_t(&h, sb, lb, (m, n, r))?;
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
            (CpuStorage::F32(y), DType::BF16) => {
                CpuStorage::BF16(crate::ops::linear::packed_gemm::to_bf16(y))
            }
            (_, dt) => out.to_dtype(&Layout::contiguous((m, n)), dt)?,
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(self, (sx, lx), (sa, la), (sb, lb))
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
        if crate::ops::gpu_kernels(x.device()) {
            return gpu::backward(self, (&x, &a, &b), grad, (need_x, need_a, need_b));
        }
        let ct = a.dtype();
        let g = grad.contiguous()?;
        let m = g.elem_count() / n.max(1);
        let g = g.reshape((m, n))?;
        let gc = g.to_dtype(ct)?;
        // The adapter's input, with dropout applied, in the adapters' dtype.
        let xc = x.reshape((m, k))?.to_dtype(ct)?;
        let mask = self.dropout.mask(&[m, k], ct, x.device())?;
        let xd = match &mask {
            Some(mk) => zip_par(&xc, mk, Zip::Mul)?,
            None => xc,
        };
        // The scale goes on the thin (m, r) products, not on (m, k) ones.
        let gb = f32_mm(&gc, &b)?.affine(self.scale, 0.0)?; // (m, r)
        let dx = if need_x {
            let d_in = f32_mm(&gb, &a)?;
            let d_in = match &mask {
                Some(mk) => zip_par(&d_in, mk, Zip::Mul)?,
                None => d_in,
            };
            let base = if let Some(q) = &self.quant {
                super::quantized::quant_linear_t(&gc, q)?
            } else if !g.device().is_cpu() {
                // The device's matmul in the base's dtype (cuBLAS: f32 accumulation).
                g.matmul(&self.w)?.to_dtype(ct)?
            } else if g.dtype() == DType::BF16 || self.w.dtype() == DType::BF16 {
                match bf16_times_w_f32(
                    &cast_from_f32(&g, DType::BF16)?,
                    &self.w,
                    self.grad_pack.as_ref(),
                )? {
                    Some(t) => t,
                    None => gc.matmul(&self.w.to_dtype(ct)?)?,
                }
            } else {
                f32_mm(&gc, &self.w.to_dtype(ct)?)?
            };
            Some(cast_from_f32(&zip_par(&base, &d_in, Zip::Add)?, x.dtype())?.reshape(x.dims())?)
        } else {
            None
        };
        let da = if need_a {
            Some(f32_mm(&gb.t()?, &xd)?)
        } else {
            None
        };
        let db = if need_b {
            let h = f32_mm(&xd, &a.t()?)?; // (m, r)
                                           // dB^T = h^T · g: r rows against g's n columns read as they are (g^T · h would
                                           // copy g transposed and fill a third of each 32-column panel).
            let dbt = f32_mm(&h.t()?, &gc)?;
            Some(dbt.t()?.contiguous()?.affine(self.scale, 0.0)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// `x (m, k) · W^T` for an adapter `W` (n, k): f32 through the f32 kernel `SFT_CPU_KERNELS`
/// chose (W read transposed as it is), else (portable, f64) [`cpu_matmul_t`].
fn adapter_matmul_t(
    x: &CpuStorage,
    sw: &CpuStorage,
    lw: &Layout,
    (m, n, k): (usize, usize, usize),
) -> Result<CpuStorage> {
    if let (CpuStorage::F32(xv), CpuStorage::F32(_)) = (x, sw) {
        let w = cont::<f32>(sw, lw, "lora_linear")?;
        let mut y = vec![0f32; m * n];
        let kernels = crate::ops::linear::packed_gemm::kernels()?;
        // B[kk, j] = W[j, kk].
        if crate::ops::linear::packed_gemm::gemm_f32_slices(
            kernels,
            &mut y,
            n,
            (m, n, k),
            xv,
            (k, 1),
            w,
            (1, k),
            true,
        ) {
            return Ok(CpuStorage::F32(y));
        }
    }
    cpu_matmul_t(x, &Layout::contiguous((m, k)), sw, lw, (m, n, k), None)
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

/// The CUDA path, for a GPU or the emulated one: the device's matrix product for the products
/// (cuBLAS on a GPU; the base in the activations' dtype, the adapter in f32 as PEFT keeps it),
/// `sft-kernels/src/elementwise.cu` for the steps around them (the dropout drawn inside the
/// kernels that read x, never stored).
mod gpu {
    use candle_core::{
        bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
    };

    use super::{rows_view, Dropout, LoraLinear};
    use crate::ops::emu::EmuStorage;
    use crate::ops::launch::{self, Arg, GpuStorage, In, Launch, MaskArg, Module};

    /// The kernels' view of a LoRA dropout: none, a Philox key, or a given f32 mask (its
    /// address; the returned storage keeps that mask alive through the launch).
    fn mask_arg<S: GpuStorage>(
        dev: &S,
        dropout: &Dropout,
    ) -> Result<(Arg, Option<S>, Option<Tensor>)> {
        let none = MaskArg {
            seed: 0,
            mask: 0,
            stream: 0,
            thr: 0,
            inv: 1.0,
            mode: 0,
        };
        let (m, keep, keep_t) = match dropout {
            Dropout::Off => (none, None, None),
            Dropout::Key { key, p } => {
                let (thr, inv) = crate::ops::dropout::threshold(*p)?;
                let arg = MaskArg {
                    seed: key.seed,
                    stream: key.stream,
                    thr,
                    inv,
                    mode: 1,
                    ..none
                };
                (arg, None, None)
            }
            Dropout::Mask(m) => {
                let m = m.to_dtype(DType::F32)?.contiguous()?;
                let (p, keep) = dev.tensor_ptr(&m)?;
                let Arg::Ptr { addr, .. } = p else {
                    bail!("lora_linear: the mask's address")
                };
                let arg = MaskArg {
                    mask: addr,
                    mode: 2,
                    ..none
                };
                (arg, keep, Some(m))
            }
        };
        Ok((Arg::of_struct("MaskArg", &m), keep, keep_t))
    }

    /// `xd = f32(x) * mask` into a new f32 storage.
    fn adapter_input<S: GpuStorage>(dropout: &Dropout, (x, lx): In<'_, S>) -> Result<S> {
        launch::contiguous(lx, "lora_linear")?;
        let n = lx.shape().elem_count();
        let (m, _keep, _keep_t) = mask_arg(x, dropout)?;
        let out = x.alloc(DType::F32, n)?;
        let name = format!("lora_input_{}", launch::suffix(x.dtype())?);
        x.launch(
            Launch::new(Module::Elementwise, name, launch::grid(n.div_ceil(4)))
                .args([x.ptr(lx)?, out.base()?])
                .arg(n as i64)
                .arg(m),
        )?;
        Ok(out)
    }

    pub fn forward<S: GpuStorage>(
        op: &LoraLinear,
        (x, lx): In<'_, S>,
        (a, la): In<'_, S>,
        (b, lb): In<'_, S>,
    ) -> Result<(S, Shape)> {
        let (n, kw) = op.w.dims2()?;
        let (m, k, lxv, shape) = rows_view(lx, n, "lora_linear")?;
        if kw != k || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            bail!("lora_linear: x (.., {k}) with W (.., {kw}) and f32 adapters expected");
        }
        if op.w.dtype() != x.dtype() {
            bail!(
                "lora_linear: x {:?} and W {:?} differ",
                x.dtype(),
                op.w.dtype()
            );
        }
        let r = la.dims()[0];
        let base = x.with_tensor(&op.w, |ws, lw| {
            x.matmul(ws, (1, m, n, k), &lxv, &lw.transpose(0, 1)?)
        })?;
        let xd = adapter_input(&op.dropout, (x, &lxv))?;
        let h = xd.matmul(
            a,
            (1, m, r, k),
            &Layout::contiguous((m, k)),
            &la.transpose(0, 1)?,
        )?;
        let delta = h.matmul(
            b,
            (1, m, n, r),
            &Layout::contiguous((m, r)),
            &lb.transpose(0, 1)?,
        )?;
        let out = x.alloc(x.dtype(), m * n)?;
        let name = format!("lora_add_{}", launch::suffix(x.dtype())?);
        x.launch(
            Launch::new(Module::Elementwise, name, launch::grid(m * n))
                .args([base.base()?, delta.base()?, out.base()?])
                .arg((m * n) as i64)
                .arg(op.scale as f32),
        )?;
        Ok((out, shape))
    }

    /// dx, dA, dB at the tensor level: the device's products, two fused element-wise kernels.
    pub fn backward(
        op: &LoraLinear,
        (x, a, b): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
        (need_x, need_a, need_b): (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = op.w.dims2()?;
        let g = grad.contiguous()?;
        let m = g.elem_count() / n.max(1);
        let g = g.reshape((m, n))?;
        let gc = g.to_dtype(DType::F32)?;
        // The scale goes on the thin (m, r) product.
        let gb = gc.matmul(b)?.affine(op.scale, 0.0)?;
        let dx = if need_x {
            let base = g.matmul(&op.w)?;
            let d_in = gb.matmul(a)?;
            let dx = base.apply_op2_no_bwd(&d_in, &LoraDx(op.dropout.clone()))?;
            Some(dx.reshape(x.dims())?)
        } else {
            None
        };
        let (da, db) = if need_a || need_b {
            let xd = x
                .reshape((m, k))?
                .apply_op1_no_bwd(&LoraInput(op.dropout.clone()))?;
            let da = need_a.then(|| gb.t()?.matmul(&xd)).transpose()?;
            let db = if need_b {
                let h = xd.matmul(&a.t()?)?;
                Some(gc.t()?.matmul(&h)?.affine(op.scale, 0.0)?)
            } else {
                None
            };
            (da, db)
        } else {
            (None, None)
        };
        Ok((dx, da, db))
    }

    /// `dx = dx_base + mask * d_in`, in dx_base's dtype.
    fn lora_dx<S: GpuStorage>(
        dropout: &Dropout,
        (base, lb): In<S>,
        (d_in, ld): In<S>,
    ) -> Result<(S, Shape)> {
        launch::contiguous(lb, "lora dx")?;
        launch::contiguous(ld, "lora dx")?;
        let n = lb.shape().elem_count();
        let (m, _keep, _keep_t) = mask_arg(base, dropout)?;
        let out = base.alloc(base.dtype(), n)?;
        let name = format!("lora_dx_{}", launch::suffix(base.dtype())?);
        base.launch(
            Launch::new(Module::Elementwise, name, launch::grid(n.div_ceil(4)))
                .args([base.ptr(lb)?, d_in.ptr(ld)?, out.base()?])
                .arg(n as i64)
                .arg(m),
        )?;
        Ok((out, lb.shape().clone()))
    }

    /// `f32(x) * mask` as an op (the backward's adapter input).
    struct LoraInput(Dropout);

    impl CustomOp1 for LoraInput {
        fn name(&self) -> &'static str {
            "sft-lora-input"
        }

        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            // Reached only on the emulated GPU (the CPU's backward has its own path).
            let x = EmuStorage::upload(s)?;
            Ok((
                adapter_input(&self.0, (&x, l))?.to_cpu()?,
                l.shape().clone(),
            ))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            Ok((adapter_input(&self.0, (s, l))?, l.shape().clone()))
        }
    }

    /// `dx = dx_base + mask * d_in`, in dx_base's dtype.
    struct LoraDx(Dropout);

    impl CustomOp2 for LoraDx {
        fn name(&self) -> &'static str {
            "sft-lora-dx"
        }

        fn cpu_fwd(
            &self,
            base: &CpuStorage,
            lb: &Layout,
            d_in: &CpuStorage,
            ld: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            // Reached only on the emulated GPU (the CPU's backward has its own path).
            let (b, d) = (EmuStorage::upload(base)?, EmuStorage::upload(d_in)?);
            let (out, shape) = lora_dx(&self.0, (&b, lb), (&d, ld))?;
            Ok((out.to_cpu()?, shape))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            base: &candle_core::CudaStorage,
            lb: &Layout,
            d_in: &candle_core::CudaStorage,
            ld: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            lora_dx(&self.0, (base, lb), (d_in, ld))
        }
    }
}
