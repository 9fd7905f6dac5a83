//! bitsandbytes' NF4, as its `quantize_4bit`/`dequantize_4bit` define it (blocksize 64,
//! `quant_type="nf4"`), and its double quantization of the absmax (`compress_statistics=True`:
//! the absmax minus its mean, quantized blockwise in blocks of 256 with the signed 8-bit dynamic
//! map).
//!
//! Both quantizations follow bitsandbytes' reference kernels (its `default` backend: the exact
//! nearest code); its CUDA kernel's midpoint search agrees with them. Its native CPU kernel of
//! the 8-bit step picks the other neighbour for values within about 1e-3 of a midpoint (51 of
//! 16,384 random values), which would change an absmax code, never a 4-bit code.
//!
//! - Quantize: per block of 64 values of the flattened weight, `absmax = max |x|`,
//!   `s = clamp(x * (1 / absmax), -1, 1)` in f32, the code is the index of the nearest of the 16
//!   NF4 values (the first on a tie); two codes per byte, the first element in the high nibble.
//! - Dequantize to a dtype: `NF4[code] * absmax` in f32, rounded once to the dtype (what the
//!   CPU backend's `dequantize_4bit` computes; its pure-PyTorch fallback rounds the code to the
//!   dtype first, which differs in the last bit).
use half::{bf16, f16};

use candle_core::DType;

/// Values per block of the 4-bit codes.
pub const BLOCK: usize = 64;
/// Values per block of the double-quantized absmax.
pub const BLOCK2: usize = 256;

/// The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`, as float32 bits).
pub const NF4: [f32; 16] = [
    f32::from_bits(0xbf800000), // -1.0
    f32::from_bits(0xbf3239b1), // -0.6961928009986877
    f32::from_bits(0xbf066b30), // -0.5250730514526367
    f32::from_bits(0xbeca32a0), // -0.39491748809814453
    f32::from_bits(0xbe91a24d), // -0.28444138169288635
    f32::from_bits(0xbe3d353f), // -0.18477343022823334
    f32::from_bits(0xbdba7871), // -0.09105003625154495
    f32::from_bits(0x00000000), // 0.0
    f32::from_bits(0x3da2faff), // 0.07958029955625534
    f32::from_bits(0x3e24cae3), // 0.16093020141124725
    f32::from_bits(0x3e7c04dd), // 0.24611230194568634
    f32::from_bits(0x3ead033a), // 0.33791524171829224
    f32::from_bits(0x3ee1a4b8), // 0.44070982933044434
    f32::from_bits(0x3f1007ab), // 0.5626170039176941
    f32::from_bits(0x3f3913b3), // 0.7229568362236023
    f32::from_bits(0x3f800000), // 1.0
];

/// NF4 blocks of a flattened tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4 {
    n: usize,
    /// Two codes per byte, the first element in the high nibble.
    packed: Vec<u8>,
    absmax: Absmax,
}

#[derive(Clone, Debug, PartialEq)]
enum Absmax {
    F32(Vec<f32>),
    /// `absmax[b] = DYNAMIC[q[b]] * absmax2[b / 256] + offset`.
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

impl Nf4 {
    /// Quantizes `x` (the flattened weight, in f32).
    pub fn quantize(x: &[f32], double_quant: bool) -> Self {
        let (codes, absmax) = blockwise(x, BLOCK, &NF4);
        let mut packed = vec![0u8; x.len().div_ceil(2)];
        for (i, c) in codes.iter().enumerate() {
            packed[i / 2] |= if i % 2 == 0 { c << 4 } else { *c };
        }
        let absmax = if double_quant {
            // bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, 256).
            let offset = torch_mean(&absmax);
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (q, absmax2) = blockwise(&centred, BLOCK2, &DYNAMIC);
            Absmax::Double { q, absmax2, offset }
        } else {
            Absmax::F32(absmax)
        };
        Self {
            n: x.len(),
            packed,
            absmax,
        }
    }

    /// Builds from stored parts (a bitsandbytes checkpoint's `weight`, `absmax`, and for double
    /// quantization `nested_absmax` and `nested_quant_map`'s offset).
    pub fn from_parts(
        n: usize,
        packed: Vec<u8>,
        absmax: Vec<f32>,
        nested: Option<(Vec<u8>, Vec<f32>, f32)>,
    ) -> Option<Self> {
        let blocks = n.div_ceil(BLOCK);
        if packed.len() != n.div_ceil(2) {
            return None;
        }
        let absmax = match nested {
            None if absmax.len() == blocks => Absmax::F32(absmax),
            Some((q, absmax2, offset))
                if q.len() == blocks && absmax2.len() == blocks.div_ceil(BLOCK2) =>
            {
                Absmax::Double { q, absmax2, offset }
            }
            _ => return None,
        };
        Some(Self { n, packed, absmax })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The f32 absmax per block as stored (`None` when double-quantized: see [`Nf4::nested`]).
    pub fn absmax_stored(&self) -> Option<&[f32]> {
        match &self.absmax {
            Absmax::F32(a) => Some(a),
            Absmax::Double { .. } => None,
        }
    }

    /// The f32 absmax per block (dequantized when double-quantized).
    pub fn absmax(&self) -> Vec<f32> {
        (0..self.n.div_ceil(BLOCK))
            .map(|b| self.block_absmax(b))
            .collect()
    }

    /// The double quantization's parts: 8-bit codes, the absmax of their blocks, the offset.
    pub fn nested(&self) -> Option<(&[u8], &[f32], f32)> {
        match &self.absmax {
            Absmax::Double { q, absmax2, offset } => Some((q, absmax2, *offset)),
            Absmax::F32(_) => None,
        }
    }

    /// Bytes held: the codes and the absmax as stored.
    pub fn stored_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::Double { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
            }
    }

    fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(a) => a[b],
            Absmax::Double { q, absmax2, offset } => {
                DYNAMIC[q[b] as usize] * absmax2[b / BLOCK2] + offset
            }
        }
    }

    /// Values `start..start + out.len()` dequantized as bitsandbytes does to `dtype` (f32,
    /// bf16 or f16; the result is left in f32, holding values of that dtype).
    pub fn dequantize_to(&self, dtype: DType, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let mut i = start;
        let mut o = 0;
        while i < end {
            let b = i / BLOCK;
            let a = self.block_absmax(b);
            // The block's 16 values, each computed once (the same f32 product and rounding).
            let table: [f32; 16] = NF4.map(|c| round(dtype, c * a));
            let stop = ((b + 1) * BLOCK).min(end);
            // An odd start takes its low nibble alone; then whole bytes, two values each.
            if i % 2 == 1 {
                out[o] = table[(self.packed[i / 2] & 15) as usize];
                i += 1;
                o += 1;
            }
            let pairs = (stop - i) / 2;
            for (byte, dst) in self.packed[i / 2..i / 2 + pairs]
                .iter()
                .zip(out[o..o + 2 * pairs].chunks_exact_mut(2))
            {
                dst[0] = table[(byte >> 4) as usize];
                dst[1] = table[(byte & 15) as usize];
            }
            i += 2 * pairs;
            o += 2 * pairs;
            if i < stop {
                out[o] = table[(self.packed[i / 2] >> 4) as usize];
                i += 1;
                o += 1;
            }
        }
    }

    /// [`Nf4::dequantize_to`] in f32.
    pub fn dequantize(&self, start: usize, out: &mut [f32]) {
        self.dequantize_to(DType::F32, start, out)
    }
}

fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// bitsandbytes' blockwise quantization: per block the absmax, values scaled by its f32
/// reciprocal and clamped to [-1, 1], each mapped to the nearest code (the first on a tie). An
/// all-zero block (0 times an infinite reciprocal) gets the code of 0.0, as bitsandbytes gives.
fn blockwise(x: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let a = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / a;
        absmax.push(a);
        for v in chunk {
            let s = (v * inv).clamp(-1.0, 1.0);
            q.push(nearest(s, code));
        }
    }
    (q, absmax)
}

/// The mean as PyTorch's CPU `mean()` of a float32 vector gives it (bitsandbytes' offset): eight
/// running f32 lane sums, added pairwise, then the tail, then the division. This reproduces
/// torch 2.11's result on the recorded weights; the order of its summation is not a documented
/// contract, so a difference would show in the fixture test as an offset one ulp off.
fn torch_mean(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let whole = x.len() / 8 * 8;
    for c in x[..whole].chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut width = 8;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    let s = x[whole..].iter().fold(acc[0], |s, v| s + v);
    s / x.len() as f32
}

fn nearest(s: f32, code: &[f32]) -> u8 {
    if s.is_nan() {
        return code.iter().position(|&c| c == 0.0).unwrap_or(0) as u8;
    }
    let mut best = 0;
    let mut d = f32::INFINITY;
    for (i, c) in code.iter().enumerate() {
        let e = (s - c).abs();
        if e < d {
            d = e;
            best = i;
        }
    }
    best as u8
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), as float32.
pub const DYNAMIC: [f32; 256] = include!("dynamic_map.in");
