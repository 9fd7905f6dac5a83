//! Each op written with candle's tensor ops: the reference the kernels are tested against, and
//! the fallback where [`super::route`] finds no kernel (a device without one, a shape a CUDA
//! kernel does not take, or `SFT_OPS_COMPOSED`). candle records a backward for every op used
//! here, on every device. Each function computes in the same precision as its kernel (f32 for
//! half inputs, f64 for f64) and returns the same dtype, so a fallback never changes the dtype
//! plan of the model around it.
use candle_core::{DType, Result, Tensor, D};

use super::attention::mask::AttnMask;
use super::dispatch::compute_dtype;

/// `t` in `dt`, itself when it already is.
fn cast(t: &Tensor, dt: DType) -> Result<Tensor> {
    if t.dtype() == dt {
        Ok(t.clone())
    } else {
        t.to_dtype(dt)
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, normalised in f32 for half inputs.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ct = compute_dtype(x.dtype());
    let xc = cast(x, ct)?;
    let ms = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(ms + eps as f64)?.sqrt()?)?;
    cast(&y.broadcast_mul(&cast(w, ct)?)?, x.dtype())
}

/// Softmax over the last dimension in f32 (f64 for f64); a row that is entirely `-inf` gives
/// zeros, as the kernels do (candle's softmax gives NaN there).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let ct = compute_dtype(x.dtype());
    let xc = cast(x, ct)?;
    // A fully masked row's max is -inf; the largest finite value makes `x - max` -inf there
    // (exp 0) and changes nothing elsewhere.
    let max = xc
        .max_keepdim(D::Minus1)?
        .clamp(f32::MIN as f64, f64::INFINITY)?
        .detach();
    let e = xc.broadcast_sub(&max)?.exp()?;
    let sum = e
        .sum_keepdim(D::Minus1)?
        .clamp(f32::MIN_POSITIVE as f64, f64::INFINITY)?;
    cast(&e.broadcast_div(&sum)?, x.dtype())
}

/// The rotary embedding (see [`super::rope`]): `cos`, `sin` (t, d/2) or (b, t, d/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (cos, sin) = (cast(cos, x.dtype())?, cast(sin, x.dtype())?);
    let (cos, sin) = if cos.rank() == 3 {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    } else {
        (cos, sin)
    };
    let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
    let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `silu(gate) * up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// `x W^T` for `x` (..., k) and `W` (n, k).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)
}

/// Grouped-query attention (see [`super::attention`]) in f32 (f64 for f64), returned in q's
/// dtype as (b, t, heads * head_dim).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttnMask>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let ct = compute_dtype(q.dtype());
    let n_rep = nh / nkv;
    let qc = (cast(q, ct)?.contiguous()? * scale)?.reshape((b, nkv, n_rep * t, hd))?;
    let kc = cast(k, ct)?;
    let vc = cast(v, ct)?.contiguous()?;
    let scores = qc.matmul(&kc.t()?)?.reshape((b, nh, t, s))?;
    let scores = match mask {
        Some(AttnMask::Additive(m)) => scores.broadcast_add(&cast(m, ct)?)?,
        Some(AttnMask::Ranges(r)) => scores.broadcast_add(&r.to_additive(ct, q.device())?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.reshape((b, nkv, n_rep * t, s))?;
    let out = probs
        .matmul(&vc)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?;
    cast(&out, q.dtype())
}

/// Per-row cross-entropy (see [`super::cross_entropy`]): max-shifted log-sum-exp in f32 (f64
/// for f64), 0 for rows whose label is `ignore`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore: i64) -> Result<Tensor> {
    let logits = cast(logits, compute_dtype(logits.dtype()))?;
    let labels = labels.to_dtype(DType::I64)?;
    let keep = labels.ne(ignore)?;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?;
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let picked = logits.gather(&safe.unsqueeze(1)?, 1)?;
    let loss = (lse - picked)?.squeeze(1)?;
    keep.where_cond(&loss, &loss.zeros_like()?)
}

/// LoRA (see [`super::lora_linear`]): `x W^T + scale * (dropout(x) A^T) B^T`, the adapter path
/// in the adapters' dtype, the sum in x's dtype.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let base = linear(x, w)?;
    let xc = cast(x, a.dtype())?;
    let xd = match mask {
        Some(m) => (xc * cast(m, a.dtype())?)?,
        None => xc,
    };
    let delta = linear(&linear(&xd, a)?, b)?.affine(scale, 0.0)?;
    base + cast(&delta, x.dtype())?
}
