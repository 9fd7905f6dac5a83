//! The frozen linear `x W^T` (its backward never builds a dW) and the weights packed once for
//! the CPU kernels.
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use half::bf16;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::route::{route, Op, Route};

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

/// A frozen weight `W` (n, k) packed once for the CPU's GEMM kernels (`cpu_features`), for
/// [`frozen_linear_packed`] and [`lora_linear_packed`]: when decoding, packing `W` on every
/// call costs as much as the product itself. bf16 weights serve every product; f32 weights
/// serve products of at most [`PACKED_F32_MAX_ROWS`] rows (decoding and prefill), where
/// candle's GEMM spends much of its time packing (examples/linear_gemm_bench: 2-6x faster at
/// 32 rows, level to 10% faster at 1024-4096).
#[derive(Clone, Debug)]
pub struct WeightPack(std::sync::Arc<crate::ops::linear::packed_gemm::PackedB>);

/// Rows of `x` up to which an f32 `x · W^T` uses (and a frozen f32 weight makes) a kept f32
/// pack: generation's products are below it, so f32 training with large batches keeps its
/// memory (the pack is a second copy of the weight) unless it also generates.
pub const PACKED_F32_MAX_ROWS: usize = 4096;

impl WeightPack {
    /// Whether a weight of this dtype can be packed on this CPU (the chosen kernels have one
    /// for it; false where `SFT_CPU_KERNELS` is refused, which the products then report).
    pub fn supported(dtype: DType) -> bool {
        use crate::cpu_features::{Bf16Kernel, F32Kernel};
        let Ok(k) = crate::cpu_features::kernels() else {
            return false;
        };
        match dtype {
            DType::BF16 => k.bf16 != Bf16Kernel::Portable,
            DType::F32 => k.f32 != F32Kernel::Portable,
            _ => false,
        }
    }

    /// `None` unless `w` is a bf16 (or f32) matrix on a CPU that runs the bf16 (or f32) kernel.
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        let kernels = crate::ops::linear::packed_gemm::kernels()?;
        // x · W^T: B[kk, j] = W[j, kk].
        if w.dtype() == DType::F32 {
            return Self::pack::<f32>(w, |wv, n, k| {
                crate::ops::linear::packed_gemm::PackedB::new_f32(wv, k, n, 1, k, kernels)
            });
        }
        Self::pack::<bf16>(w, |wv, n, k| {
            crate::ops::linear::packed_gemm::PackedB::new(wv, k, n, 1, k, kernels)
        })
    }

    /// The pack of the backward's product `grad · W` (B = W itself) for a bf16 `W`, `None` as
    /// in [`Self::new`] (and for f32: a backward has as many rows as the forward's batch).
    pub fn new_for_grad(w: &Tensor) -> Result<Option<Self>> {
        let kernels = crate::ops::linear::packed_gemm::kernels()?;
        Self::pack::<bf16>(w, |wv, n, k| {
            crate::ops::linear::packed_gemm::PackedB::new(wv, n, k, k, 1, kernels)
        })
    }

    fn pack<T: WithDType>(
        w: &Tensor,
        f: impl FnOnce(&[T], usize, usize) -> Option<crate::ops::linear::packed_gemm::PackedB>,
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
pub(super) fn packed_f32_matmul_t(
    x: &[f32],
    (m, n, k): (usize, usize, usize),
    pack: Option<&WeightPack>,
) -> Option<Vec<f32>> {
    let p = pack?;
    if !p.0.is_f32() || p.0.k() != k || p.0.n() != n || m > PACKED_F32_MAX_ROWS {
        return None;
    }
    crate::ops::linear::packed_gemm::matmul_f32(x, m, k, &p.0)
}

/// B (k × n, `B[kk, j] = w[kk * rs + j * cs]`) for the bf16 kernel: `pack` when it was made
/// for this product, else `w` packed for this call; `None` where the chosen kernels have no
/// bf16 kernel (an error where `SFT_CPU_KERNELS` is refused).
pub(super) fn packed_b<'a>(
    pack: Option<&'a WeightPack>,
    w: &[bf16],
    (k, n): (usize, usize),
    (rs, cs): (usize, usize),
) -> Result<Option<std::borrow::Cow<'a, crate::ops::linear::packed_gemm::PackedB>>> {
    let kernels = crate::ops::linear::packed_gemm::kernels()?;
    Ok(match pack {
        Some(p) if !p.0.is_f32() && p.0.k() == k && p.0.n() == n => {
            Some(std::borrow::Cow::Borrowed(&*p.0))
        }
        _ => crate::ops::linear::packed_gemm::PackedB::new(w, k, n, rs, cs, kernels)
            .map(std::borrow::Cow::Owned),
    })
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
    if route(Op::FrozenLinear, x.device(), x.dtype()) == Route::Composed {
        // A constant W records no gradient of its own.
        return composed::linear(x, &w.detach());
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
pub(super) fn rows_view(lx: &Layout, n: usize, op: &str) -> Result<(usize, usize, Layout, Shape)> {
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
pub(super) fn cpu_matmul_t(
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
    if let Some(y) = packed_b(pack, w, (k, n), (1, k))?
        .and_then(|b| crate::ops::linear::packed_gemm::matmul_to_bf16(x, m, k, &b))
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
pub(super) fn mixed_matmul_t(
    x: &[f32],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    pack: Option<&WeightPack>,
) -> Result<Vec<f32>> {
    let xb = crate::ops::linear::packed_gemm::to_bf16(&x[..m * k]);
    if let Some(y) = packed_b(pack, w, (k, n), (1, k))?
        .and_then(|b| crate::ops::linear::packed_gemm::matmul(&xb, m, k, &b))
    {
        return Ok(y);
    }
    // No bf16 kernel chosen (portable): the same rounding of x, then candle's f32 gemm.
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
pub(super) fn linear_dtypes_ok(x: DType, w: DType, dev: &candle_core::Device) -> bool {
    x == w || (dev.is_cpu() && x == DType::F32 && w == DType::BF16)
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
        if !linear_dtypes_ok(s1.dtype(), s2.dtype(), &candle_core::Device::Cpu) {
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
        if s1.dtype() != s2.dtype() {
            bail!(
                "frozen_linear: x {:?} and W {:?} differ (on a GPU activations take the weights' \
                 dtype)",
                s1.dtype(),
                s2.dtype()
            );
        }
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
    } else if w.elem_count() <= GRAD_PACK_MAX_ELEMS {
        f32_mm(&g, w)?
    } else {
        // A large weight (an LM head of 49152 x 576 is 113 MB in f32): our kernel would pack a
        // copy of it for every call, which raised a step's peak memory by about that much.
        g.matmul(w)?
    };
    dx.reshape(x_dims)
}

/// The largest f32 weight (in elements) whose input gradient `grad · W` goes through our
/// kernel, which packs W for each call: 16 Mi elements (64 MB), so SmolLM2's projections and a
/// 7B's attention projections; larger ones (LM heads, a 7B's MLP) go to candle's matmul.
const GRAD_PACK_MAX_ELEMS: usize = 1 << 24;

/// `a (m, k) · b (k, n)` for 2-D tensors, no gradient recorded: f32 on the CPU through the f32
/// kernel `SFT_CPU_KERNELS` chose (any strides: transposed views are read as they are, B packed
/// for this product), otherwise (portable, f64, another device) candle's matmul.
pub(super) fn f32_mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use crate::ops::linear::packed_gemm::{gemm_f32_slices, kernels};
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 2;
    if !f32_cpu(a) || !f32_cpu(b) {
        return a.matmul(b);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        bail!("matmul: ({m}, {k}) · ({k2}, {n})");
    }
    let mut c = vec![0f32; m * n];
    let done = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (
            candle_core::Storage::Cpu(CpuStorage::F32(av)),
            candle_core::Storage::Cpu(CpuStorage::F32(bv)),
        ) = (&*sa, &*sb)
        else {
            bail!("matmul: f32 CPU tensors without f32 CPU storage");
        };
        let (sta, stb) = (la.stride(), lb.stride());
        gemm_f32_slices(
            kernels()?,
            &mut c,
            n,
            (m, n, k),
            &av[la.start_offset()..],
            (sta[0], sta[1]),
            &bv[lb.start_offset()..],
            (stb[0], stb[1]),
            true,
        )
    };
    if done {
        Tensor::from_vec(c, (m, n), a.device())
    } else {
        a.detach().matmul(&b.detach())
    }
}

/// An f32 tensor in `dt`, with the fast bf16 rounding on the CPU (candle's conversion calls
/// the `half` crate once per element). No gradient is recorded.
pub(super) fn cast_from_f32(t: &Tensor, dt: DType) -> Result<Tensor> {
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
            CpuStorage::BF16(crate::ops::linear::packed_gemm::to_bf16(v)),
            l.shape().clone(),
        ))
    }
}

/// `g (m, n) · W (n, k)` for bf16 on the CPU through the bf16 kernel, when one was chosen.
fn bf16_times_w(g: &Tensor, w: &Tensor, pack: Option<&WeightPack>) -> Result<Option<Tensor>> {
    let Some(t) = bf16_times_w_f32(g, w, pack)? else {
        return Ok(None);
    };
    Ok(Some(cast_from_f32(&t, DType::BF16)?))
}

/// `g (m, n) · W (n, k)` for bf16 through the bf16 kernel, as f32 (not rounded).
pub(super) fn bf16_times_w_f32(
    g: &Tensor,
    w: &Tensor,
    pack: Option<&WeightPack>,
) -> Result<Option<Tensor>> {
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
    let Some(dx) = packed_b(pack, wv, (n, k), (k, 1))?
        .and_then(|b| crate::ops::linear::packed_gemm::matmul(gv, m, n, &b))
    else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(dx, (m, k), g.device())?))
}
