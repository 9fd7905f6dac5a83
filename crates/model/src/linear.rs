//! A linear layer `y = x W^T (+ b)` whose base weight is frozen or trainable, with an optional
//! LoRA adapter as PEFT defines it: `y = base(x) + scale * B(A(dropout(x)))`.
//!
//! - A frozen base weight (a plain tensor) goes through [`ops::frozen_linear`], whose backward
//!   computes only the input gradient: no dW is ever built for it.
//! - A trainable base weight (a candle `Var`, full fine-tuning) uses a plain matmul, so its
//!   gradient flows (and a tied `lm_head` shares its embedding's `Var`).
//! - A quantized base weight (QLoRA: [`crate::quant`]) goes through [`ops::quant_linear`],
//!   dequantized tile by tile inside the product; `weight` is then a zero-stride stand-in that
//!   carries only the shape, dtype and device (no dense copy exists).
//! - LoRA's A (r, in) and B (out, r) are `Var`s in f32 (f64 for an f64 model) whatever the base
//!   dtype, as PEFT keeps adapters of half-precision models in float32; the adapter's output is
//!   cast to the base output's dtype before the sum.
use std::sync::Mutex;

use candle_core::{DType, Module, Result, Tensor, Var};

use crate::ops::{self, DropoutKey, LoraDropout};

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out_features, in_features), as stored on the hub.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLayer>,
    /// The base weight's quantized blocks (QLoRA); `weight` is then a stand-in.
    pub quant: Option<crate::quant::SharedQuant>,
    pack: PackCache,
}

/// The packed copies of a frozen bf16 weight (the forward's, and the backward's once a
/// gradient flows through it), tagged with the tensor they were made from (a replaced `weight`
/// is never served a stale pack).
#[derive(Default)]
struct PackCache(Mutex<Option<PackEntry>>);

#[derive(Clone)]
struct PackEntry {
    id: candle_core::TensorId,
    fwd: ops::WeightPack,
    grad: Option<ops::WeightPack>,
}

impl Clone for PackCache {
    fn clone(&self) -> Self {
        Self(Mutex::new(self.0.lock().ok().and_then(|g| g.clone())))
    }
}

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.lock().map(|g| g.is_some()).unwrap_or(false);
        f.debug_struct("PackCache")
            .field("packed", &packed)
            .finish()
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quant: None,
            pack: PackCache::default(),
        }
    }

    /// A frozen base layer over quantized blocks. `weight` becomes a zero-stride stand-in of
    /// shape (out, in) in the model's dtype on `device`: it allocates nothing.
    pub fn quantized(
        q: crate::quant::SharedQuant,
        bias: Option<Tensor>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let weight = Tensor::zeros((), q.dtype(), device)?.broadcast_as(q.dims())?;
        Ok(Self {
            weight,
            bias,
            lora: None,
            quant: Some(q),
            pack: PackCache::default(),
        })
    }

    /// The packed copies of a frozen weight on a CPU that runs the kernels, made on first use
    /// and kept (one more copy of the weights; for bf16 a second one for the backward when `x`
    /// carries a gradient): packing per call cost as much as the product when decoding, and
    /// about 5% of a bf16 training step. An f32 weight is packed on its first product of at
    /// most [`ops::PACKED_F32_MAX_ROWS`] rows (the only ones its pack serves): training alone
    /// never makes one.
    fn packs_for(&self, x: &Tensor) -> Result<(Option<ops::WeightPack>, Option<ops::WeightPack>)> {
        let f32_rows = self.weight.dtype() == DType::F32
            && x.dtype() == DType::F32
            && x.elem_count() / self.in_features().max(1) <= ops::PACKED_F32_MAX_ROWS;
        // Nothing to pack where no kernel runs (checked first: this runs on every forward).
        if self.weight.is_variable()
            || !self.weight.device().is_cpu()
            || !ops::WeightPack::supported(self.weight.dtype())
        {
            return Ok((None, None));
        }
        let Ok(mut slot) = self.pack.0.lock() else {
            return Ok((None, None));
        };
        let need_grad = x.track_op();
        let entry = match slot.take() {
            Some(e) if e.id == self.weight.id() => Some(e),
            _ if self.weight.dtype() == DType::F32 && !f32_rows => None,
            _ => ops::WeightPack::new(&self.weight)?.map(|fwd| PackEntry {
                id: self.weight.id(),
                fwd,
                grad: None,
            }),
        };
        let Some(mut entry) = entry else {
            return Ok((None, None));
        };
        // Only bf16 weights have a backward pack (see `WeightPack::new_for_grad`).
        if need_grad && entry.grad.is_none() && self.weight.dtype() == DType::BF16 {
            entry.grad = ops::WeightPack::new_for_grad(&self.weight)?;
        }
        let out = (Some(entry.fwd.clone()), entry.grad.clone());
        *slot = Some(entry);
        Ok(out)
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// The base layer alone (no adapter).
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let y = if let Some(q) = &self.quant {
            ops::quant_linear(x, q)?
        } else if self.weight.is_variable() {
            // A differentiable cast when activations are f32 and weights bf16 (CPU).
            let w = if self.weight.dtype() == x.dtype() {
                self.weight.clone()
            } else {
                self.weight.to_dtype(x.dtype())?
            };
            x.broadcast_matmul(&w.t()?)?
        } else {
            let (fwd, grad) = self.packs_for(x)?;
            ops::frozen_linear_packed(x, &self.weight, (fwd.as_ref(), grad.as_ref()))?
        };
        add_bias(y, self.bias.as_ref())
    }

    /// The tensors of this layer that carry a gradient: the weight and bias when they are
    /// `Var`s (full fine-tuning), the adapter's A and B.
    pub fn trainable(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = [Some(&self.weight), self.bias.as_ref()]
            .into_iter()
            .flatten()
            .filter(|t| t.is_variable())
            .cloned()
            .collect();
        if let Some(l) = &self.lora {
            out.push(l.a.as_tensor().clone());
            out.push(l.b.as_tensor().clone());
        }
        out
    }

    /// `W + scale * B A` in the base weight's dtype (computed in f32 or f64), or `W` itself
    /// without an adapter.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let base = self.dense_weight()?;
        match &self.lora {
            None => Ok(base),
            Some(l) => merge_weight(&base, l.a.as_tensor(), l.b.as_tensor(), l.scale),
        }
    }

    /// The base weight as a dense tensor: `weight`, or the quantized blocks dequantized in the
    /// model's dtype (a whole copy: for merging and saving, never in a product).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => q.dequantize(self.weight.device()),
            None => Ok(self.weight.clone()),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(l) = &self.lora else {
            return self.forward_base(x);
        };
        if let Some(q) = &self.quant {
            // QLoRA: one fused node over the blocks (f32 adapters, the usual case).
            if l.a.dtype() == DType::F32 {
                let y = ops::lora_linear_quant(
                    x,
                    &self.weight,
                    q,
                    l.a.as_tensor(),
                    l.b.as_tensor(),
                    l.scale,
                    l.dropout(),
                )?;
                return add_bias(y, self.bias.as_ref());
            }
            let y = self.forward_base(x)?;
            let d = l.forward(x)?.to_dtype(y.dtype())?;
            return y + d;
        }
        // One fused graph node for a frozen base whose dtype matches the input: adapters in
        // the same f32/f64, or f32 adapters on a bf16/f16 base (on the CPU also with f32
        // activations on a bf16 base).
        let mixed =
            x.device().is_cpu() && (x.dtype(), self.weight.dtype()) == (DType::F32, DType::BF16);
        let fused = !self.weight.is_variable()
            && (self.weight.dtype() == x.dtype() || mixed)
            && matches!(
                (x.dtype(), l.a.dtype()),
                (DType::F32, DType::F32)
                    | (DType::F64, DType::F64)
                    | (DType::BF16 | DType::F16, DType::F32)
            );
        if fused {
            let (fwd, grad) = self.packs_for(x)?;
            let y = ops::lora_linear_with(
                x,
                &self.weight,
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
                l.dropout(),
                (fwd.as_ref(), grad.as_ref()),
            )?;
            return add_bias(y, self.bias.as_ref());
        }
        let y = self.forward_base(x)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let d = l.forward(x)?;
                let d = if d.dtype() == y.dtype() {
                    d
                } else {
                    d.to_dtype(y.dtype())?
                };
                y + d
            }
        }
    }
}

/// `y + bias` (bias cast to y's dtype: a bf16 bias with f32 activations).
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) if b.dtype() == y.dtype() => y.broadcast_add(b),
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// `w + scale * b a`, computed in f32 (f64 when `w` is f64) and returned in `w`'s dtype.
pub fn merge_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let ct = if w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let delta = b
        .to_dtype(ct)?
        .matmul(&a.to_dtype(ct)?)?
        .affine(scale, 0.0)?;
    if delta.dims() != w.dims() {
        candle_core::bail!(
            "LoRA update B A has shape {:?}, the base weight {:?}",
            delta.dims(),
            w.dims()
        );
    }
    (w.to_dtype(ct)? + delta)?.to_dtype(w.dtype())
}

/// One LoRA adapter on a linear layer.
pub struct LoraLayer {
    /// (r, in_features)
    pub a: Var,
    /// (out_features, r)
    pub b: Var,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Probability of zeroing an input element of the adapter path in training mode.
    pub dropout: f64,
    /// `Some` in training mode: the seed of this forward's dropout masks.
    key: Mutex<Option<DropoutKey>>,
}

impl Clone for LoraLayer {
    fn clone(&self) -> Self {
        Self {
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
            dropout: self.dropout,
            key: Mutex::new(self.key()),
        }
    }
}

impl std::fmt::Debug for LoraLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraLayer")
            .field("a", &self.a.dims())
            .field("b", &self.b.dims())
            .field("scale", &self.scale)
            .field("dropout", &self.dropout)
            .finish()
    }
}

impl LoraLayer {
    pub fn new(a: Var, b: Var, scale: f64, dropout: f64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout,
            key: Mutex::new(None),
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    fn key(&self) -> Option<DropoutKey> {
        *self.key.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Training mode with dropout masks drawn from `seed` (a counter-based generator: the mask
    /// is a function of the seed and the element's index, the same on every device), or
    /// evaluation mode (`None`).
    pub fn set_training(&self, seed: Option<u64>) {
        *self.key.lock().unwrap_or_else(|e| e.into_inner()) =
            seed.map(|seed| DropoutKey { seed, stream: 0 });
    }

    pub fn is_training(&self) -> bool {
        self.key().is_some()
    }

    /// The dropout of this forward: off without dropout or in evaluation mode.
    pub fn dropout(&self) -> LoraDropout<'static> {
        match self.key() {
            Some(key) if self.dropout > 0.0 => LoraDropout::Key {
                key,
                p: self.dropout,
            },
            _ => LoraDropout::Off,
        }
    }

    /// `scale * B A dropout(x)`, in the adapter's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = self.a.dtype();
        let x = if x.dtype() == dt {
            x.clone()
        } else {
            x.to_dtype(dt)?
        };
        let x = match self.dropout_mask(&x)? {
            Some(mask) => (x * mask)?,
            None => x,
        };
        let h = x.broadcast_matmul(&self.a.as_tensor().t()?)?;
        h.broadcast_matmul(&self.b.as_tensor().t()?)?
            .affine(self.scale, 0.0)
    }

    /// The dropout mask for an input like `x` (keep with probability 1 - p, scaled by
    /// 1 / (1 - p)), in the adapter's dtype; `None` without dropout or in evaluation mode.
    pub fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self.dropout() {
            LoraDropout::Key { key, p } => {
                ops::dropout_mask(key, x.dims(), p, self.a.dtype(), x.device()).map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn is_packed(l: &Linear) -> bool {
        l.pack.0.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// A frozen f32 weight is packed by its first short product (never by a long one), the
    /// pack's results follow the weight, and a replaced weight is not served the old pack.
    #[test]
    fn f32_weights_are_packed_for_short_products_and_never_stale() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (24, 32), &dev).unwrap();
        let mut lin = Linear::new(w.clone(), None);
        let long = Tensor::randn(0f32, 1.0, (ops::PACKED_F32_MAX_ROWS + 1, 32), &dev).unwrap();
        lin.forward(&long).unwrap();
        assert!(!is_packed(&lin), "a long product made a pack");
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32), &dev).unwrap();
        let diff = |y: &Tensor, w: &Tensor| -> f32 {
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let (y, want): (Vec<f32>, Vec<f32>) = (
                y.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            y.iter()
                .zip(&want)
                .fold(0f32, |d, (a, b)| d.max((a - b).abs()))
        };
        let y = lin.forward(&x).unwrap();
        assert_eq!(
            is_packed(&lin),
            crate::ops::WeightPack::supported(candle_core::DType::F32)
        );
        assert!(diff(&y, &w) < 1e-5);
        let w2 = (&w * 2.0).unwrap();
        lin.weight = w2.clone();
        let y2 = lin.forward(&x).unwrap();
        assert!(diff(&y2, &w2) < 1e-5, "served a stale pack");
    }
}
