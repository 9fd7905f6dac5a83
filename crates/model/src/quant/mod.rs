//! Frozen base weights kept quantized, for QLoRA: LoRA adapters trained over linear layers whose
//! weights stay in 4 or 8 bits and are dequantized tile by tile inside each product
//! ([`crate::ops::quant_linear`]); no dense copy of a layer is kept.
//!
//! Formats:
//! - [`Quantize::Nf4`]: bitsandbytes' NF4 (blocks of 64 over the flattened weight, an f32
//!   absmax per block, two codes per byte, the first in the high nibble), optionally with the
//!   absmax itself quantized as bitsandbytes' double quantization does ([`nf4`]);
//! - [`Quantize::Q8_0`]: GGML's Q8_0 (blocks of 32, an f16 scale), quantized by candle;
//! - [`Quantize::Gguf`]: a GGUF file's own blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, ...),
//!   read from the file and never dequantized whole.
//!
//! GGML blocks are dequantized by candle's own block routines (`GgmlType::to_float`), the ones
//! the GGUF import uses, so a kept block gives exactly the value the import writes. Dequantized
//! values are rounded through the model's dtype, so a quantized layer computes what a dense
//! layer over the dequantized checkpoint (in that dtype) computes.
use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Device, Result, Tensor};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

pub mod nf4;

/// Which base linears a model keeps quantized, and how (`model.quantize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantize {
    /// Dense weights in the model's dtype.
    #[default]
    None,
    /// bitsandbytes' NF4 (blocks of 64, f32 absmax; `double_quant` quantizes the absmax).
    Nf4,
    /// GGML's Q8_0 (blocks of 32, f16 scale).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// A GGUF file's own blocks, as stored.
    Gguf,
}

impl Quantize {
    pub fn is_none(self) -> bool {
        self == Quantize::None
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantize::None => "none",
            Quantize::Nf4 => "nf4",
            Quantize::Q8_0 => "q8_0",
            Quantize::Gguf => "gguf",
        }
    }
}

/// Whether a tensor of the hub's LLaMA naming is a base linear that QLoRA quantizes: the
/// projections of attention and MLP. Embeddings, norms and the head stay in the compute dtype,
/// as bitsandbytes and PEFT leave them.
pub fn is_quantized_linear(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name.ends_with(".weight")
        && (name.contains(".self_attn.") || name.contains(".mlp."))
        && name.contains("_proj.")
}

/// A frozen (out, in) weight in quantized blocks.
pub struct QuantWeight {
    rows: usize,
    cols: usize,
    /// The model's dtype: dequantized values are rounded through it.
    dtype: DType,
    blocks: Blocks,
    /// The blocks as tensors on the device whose kernels dequantize them (the GPU path).
    on_device: DeviceBlocks,
}

type DeviceBlocks = std::sync::Mutex<Option<(candle_core::DeviceLocation, Arc<Vec<Tensor>>)>>;

enum Blocks {
    Nf4(nf4::Nf4),
    /// GGML blocks, rows after rows (each row a whole number of blocks), in a u64 buffer so
    /// that every block type's alignment holds.
    Ggml {
        ty: GgmlDType,
        data: Vec<u64>,
        len: usize,
    },
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantWeight")
            .field("shape", &(self.rows, self.cols))
            .field("format", &self.format())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl QuantWeight {
    /// Quantizes a dense (out, in) weight. `dtype` is the model's dtype (see the module doc).
    pub fn quantize(w: &Tensor, how: Quantize, double_quant: bool, dtype: DType) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let w = w.to_device(&Device::Cpu)?;
        match how {
            Quantize::Nf4 => {
                let v = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                Ok(Self {
                    rows,
                    cols,
                    dtype,
                    blocks: Blocks::Nf4(nf4::Nf4::quantize(&v, double_quant)),
                    on_device: Default::default(),
                })
            }
            Quantize::Q8_0 => {
                let q = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
                Self::from_qtensor(&q, None, dtype)
            }
            Quantize::Gguf | Quantize::None => {
                bail!(
                    "quantize: `{}` does not quantize a dense weight",
                    how.name()
                )
            }
        }
    }

    /// GGML blocks as read from a GGUF file (candle's `QTensor`, shape (out, in)).
    /// `row_order[i]` is the stored row that becomes row `i` (llama.cpp's q/k rows are
    /// un-permuted this way; whole rows of blocks move, nothing is dequantized).
    pub fn from_qtensor(q: &QTensor, row_order: Option<&[usize]>, dtype: DType) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let ty = q.dtype();
        let (bs, ts) = (ty.block_size(), ty.type_size());
        if cols % bs != 0 {
            bail!("{ty:?} rows of {cols} values are not whole blocks of {bs}");
        }
        let row_bytes = cols / bs * ts;
        let raw = q.data()?;
        if raw.len() != rows * row_bytes {
            bail!(
                "{ty:?} data of {} bytes for ({rows}, {cols}), expected {}",
                raw.len(),
                rows * row_bytes
            );
        }
        let mut data = vec![0u64; raw.len().div_ceil(8)];
        let dst = bytes_mut(&mut data, raw.len());
        match row_order {
            None => dst.copy_from_slice(&raw),
            Some(order) => {
                if order.len() != rows {
                    bail!("a row order of {} for {rows} rows", order.len());
                }
                for (i, &r) in order.iter().enumerate() {
                    dst[i * row_bytes..(i + 1) * row_bytes]
                        .copy_from_slice(&raw[r * row_bytes..(r + 1) * row_bytes]);
                }
            }
        }
        let w = Self {
            rows,
            cols,
            dtype,
            blocks: Blocks::Ggml {
                ty,
                data,
                len: raw.len(),
            },
            on_device: Default::default(),
        };
        // Refuse a block type with no dequantizer here, at load, not in the first product.
        let mut probe = vec![0f32; cols];
        if rows > 0 {
            w.dequantize_rows(0, 1, &mut probe)?;
        }
        Ok(w)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The dtype dequantized values are rounded through (the model's).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `nf4`, `nf4+dq`, or the GGML type (`q4_1`, `q8_0`, ...).
    pub fn format(&self) -> String {
        match &self.blocks {
            Blocks::Nf4(n) if n.double_quant() => "nf4+dq".into(),
            Blocks::Nf4(_) => "nf4".into(),
            Blocks::Ggml { ty, .. } => format!("{ty:?}").to_lowercase(),
        }
    }

    /// Bytes held: codes and scales as stored.
    pub fn stored_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Nf4(n) => n.stored_bytes(),
            Blocks::Ggml { len, .. } => *len,
        }
    }

    /// The NF4 blocks, for tests and fixtures.
    /// The GGML blocks as stored, rows after rows (`None` for NF4).
    pub fn ggml(&self) -> Option<(GgmlDType, &[u8])> {
        match &self.blocks {
            Blocks::Ggml { ty, data, len } => Some((*ty, bytes(data, *len))),
            Blocks::Nf4(_) => None,
        }
    }

    /// The blocks on `device` for the GPU's dequantization kernels, uploaded on first use and
    /// kept (a CPU device gets CPU tensors: the emulated GPU copies them in at each launch).
    pub fn device_blocks(&self, device: &Device) -> Result<Arc<Vec<Tensor>>> {
        let mut cache = self
            .on_device
            .lock()
            .map_err(|_| candle_core::Error::Msg("quantized weight: a poisoned lock".into()))?;
        if let Some((loc, parts)) = cache.as_ref() {
            if *loc == device.location() {
                return Ok(parts.clone());
            }
        }
        let parts = match &self.blocks {
            Blocks::Nf4(q) => {
                let mut codes = nf4::NF4.to_vec();
                codes.extend_from_slice(&nf4::DYNAMIC);
                let (q2, absmax2, _) = q.nested().unwrap_or((&[0u8], &[0f32], 0.0));
                let absmax = q.absmax_stored().unwrap_or(&[0f32]);
                vec![
                    Tensor::from_slice(q.packed(), q.packed().len(), device)?,
                    Tensor::from_slice(absmax, absmax.len(), device)?,
                    Tensor::from_slice(q2, q2.len(), device)?,
                    Tensor::from_slice(absmax2, absmax2.len(), device)?,
                    Tensor::from_vec(codes, 16 + 256, device)?,
                ]
            }
            Blocks::Ggml { data, len, .. } => {
                let b = bytes(data, *len);
                vec![Tensor::from_slice(b, b.len(), device)?]
            }
        };
        let parts = Arc::new(parts);
        *cache = Some((device.location(), parts.clone()));
        Ok(parts)
    }

    pub fn nf4(&self) -> Option<&nf4::Nf4> {
        match &self.blocks {
            Blocks::Nf4(n) => Some(n),
            _ => None,
        }
    }

    /// Rows `r0..r1` dequantized into `out` (`(r1 - r0) * cols` values), rounded through the
    /// model's dtype.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
        let n = (r1 - r0) * self.cols;
        if r1 > self.rows || r0 > r1 || out.len() != n {
            bail!(
                "dequantize rows {r0}..{r1} of {} into {} values",
                self.rows,
                out.len()
            );
        }
        match &self.blocks {
            Blocks::Nf4(q) => q.dequantize_to(self.dtype, r0 * self.cols, out),
            Blocks::Ggml { ty, data, len } => {
                let bytes = bytes(data, *len);
                let row_bytes = self.cols / ty.block_size() * ty.type_size();
                let src = &bytes[r0 * row_bytes..r1 * row_bytes];
                ggml_to_float(*ty, src, out)?;
            }
        }
        round_through(self.dtype, out);
        Ok(())
    }

    /// The whole weight dequantized, (out, in) in the model's dtype: for merging an adapter,
    /// the composed reference and tests (never in a product).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut v)?;
        Tensor::from_vec(v, (self.rows, self.cols), device)?.to_dtype(self.dtype)
    }
}

/// A shared quantized weight (layers hold it; the product's op keeps one for its backward).
pub type SharedQuant = Arc<QuantWeight>;

fn bytes(data: &[u64], len: usize) -> &[u8] {
    // SAFETY: u64 storage viewed as bytes; `len` never exceeds it.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, len) }
}

fn bytes_mut(data: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: as in `bytes`.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, len) }
}

/// candle's dequantizer of one block type over a byte run of whole blocks.
fn blocks_to_float<B: GgmlType>(src: &[u8], out: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<B>();
    if !src.len().is_multiple_of(size) || out.len() != src.len() / size * B::BLCK_SIZE {
        bail!(
            "{:?}: {} bytes for {} values",
            B::DTYPE,
            src.len(),
            out.len()
        );
    }
    if !(src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()) {
        bail!("{:?}: misaligned blocks", B::DTYPE);
    }
    // SAFETY: the blocks are `repr(C)` plain data written by GGML's layout (candle reads GGUF
    // files into the same structs); length and alignment are checked above.
    let blocks = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const B, src.len() / size) };
    B::to_float(blocks, out);
    Ok(())
}

fn ggml_to_float(ty: GgmlDType, src: &[u8], out: &mut [f32]) -> Result<()> {
    use k_quants::*;
    match ty {
        GgmlDType::Q4_0 => blocks_to_float::<BlockQ4_0>(src, out),
        GgmlDType::Q4_1 => blocks_to_float::<BlockQ4_1>(src, out),
        GgmlDType::Q5_0 => blocks_to_float::<BlockQ5_0>(src, out),
        GgmlDType::Q5_1 => blocks_to_float::<BlockQ5_1>(src, out),
        GgmlDType::Q8_0 => blocks_to_float::<BlockQ8_0>(src, out),
        GgmlDType::Q2K => blocks_to_float::<BlockQ2K>(src, out),
        GgmlDType::Q3K => blocks_to_float::<BlockQ3K>(src, out),
        GgmlDType::Q4K => blocks_to_float::<BlockQ4K>(src, out),
        GgmlDType::Q5K => blocks_to_float::<BlockQ5K>(src, out),
        GgmlDType::Q6K => blocks_to_float::<BlockQ6K>(src, out),
        other => bail!("GGML type {other:?} is not kept quantized (no block dequantizer)"),
    }
}

/// Rounds f32 values to what the model's dtype holds (the dense checkpoint's values).
fn round_through(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
