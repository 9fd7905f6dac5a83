//! Dropout masks from a counter-based generator (Philox4x32-10, Salmon et al. 2011, as in
//! Random123, cuRAND and PyTorch): element `i` of a mask is a pure function of the key and `i`,
//! so the CPU and the CUDA kernel draw the same mask, a recomputed forward (gradient
//! checkpointing) redraws it exactly, and a resumed run needs no generator state.
//!
//! Element `i` takes word `i % 4` of Philox(counter = (i / 4 low, i / 4 high, stream, 0),
//! key = (seed low, seed high)), keeps the element when its top 24 bits are below
//! `round(keep * 2^24)`, and scales kept elements by `1 / keep` (PyTorch's inverted dropout).
use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::ops::emu::EmuStorage;
use crate::ops::launch::{grid, GpuStorage, Launch, Module};
use crate::ops::route::{route, Op, Route};

/// What a mask is a function of: a 64-bit seed (the trainer mixes the run's seed, the step and
/// the micro-batch into it) and a stream (one per module: each LoRA layer its own mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub stream: u32,
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
#[inline(always)]
pub(crate) fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The keep threshold on the top 24 bits of a word, and the scale of kept elements.
pub(crate) fn threshold(p: f64) -> Result<(u32, f32)> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: probability {p} must be in [0, 1)");
    }
    let keep = 1.0 - p;
    Ok(((keep * 16_777_216.0).round() as u32, (1.0 / keep) as f32))
}

/// Fills `out` with the mask's elements `offset..offset + out.len()` (0 or `1 / keep`).
pub(crate) fn fill_mask(out: &mut [f32], offset: u64, key: DropoutKey, p: f64) -> Result<()> {
    let (thr, inv) = threshold(p)?;
    let k = [key.seed as u32, (key.seed >> 32) as u32];
    let chunk = 4096;
    out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
        let start = offset + (ci * chunk) as u64;
        let mut block = u64::MAX;
        let mut words = [0u32; 4];
        for (j, x) in o.iter_mut().enumerate() {
            let i = start + j as u64;
            if i / 4 != block {
                block = i / 4;
                words = philox4x32_10([block as u32, (block >> 32) as u32, key.stream, 0], k);
            }
            *x = if (words[(i % 4) as usize] >> 8) < thr {
                inv
            } else {
                0.0
            };
        }
    });
    Ok(())
}

/// The dropout mask of a tensor of `shape`: each element `1 / (1 - p)` with probability `1 - p`,
/// else 0, in `dtype` on `dev` (drawn on the device: a CUDA kernel there).
pub fn dropout_mask(
    key: DropoutKey,
    shape: &[usize],
    p: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    threshold(p)?;
    let op = DropoutMask {
        key,
        p,
        shape: shape.to_vec(),
    };
    let mask = if route(Op::Dropout, dev, DType::F32) == Route::Kernel {
        // The op reads nothing of its input: a scalar carries the device.
        Tensor::zeros((), DType::F32, dev)?.apply_op1_no_bwd(&op)?
    } else {
        let mut v = vec![0f32; shape.iter().product()];
        fill_mask(&mut v, 0, key, p)?;
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(dev)?
    };
    if mask.dtype() == dtype {
        Ok(mask)
    } else {
        mask.to_dtype(dtype)
    }
}

/// The mask as an op (f32, of `shape`), so each device draws it itself.
struct DropoutMask {
    key: DropoutKey,
    p: f64,
    shape: Vec<usize>,
}

impl candle_core::CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "sft-dropout-mask"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let n = self.shape.iter().product();
        if crate::ops::emu::active() {
            let dev = EmuStorage::device()?;
            let out = gpu_mask(&dev, self.key, n, self.p)?;
            return Ok((out.to_cpu()?, self.shape.clone().into()));
        }
        let mut v = vec![0f32; n];
        fill_mask(&mut v, 0, self.key, self.p)?;
        Ok((candle_core::CpuStorage::F32(v), self.shape.clone().into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let n = self.shape.iter().product();
        let out = gpu_mask(s, self.key, n, self.p)?;
        Ok((out, self.shape.clone().into()))
    }
}

/// The mask as f32, drawn on the device (`dropout_mask_f32` in `sft-kernels`): a GPU, or the
/// emulated one.
fn gpu_mask<S: GpuStorage>(dev: &S, key: DropoutKey, n: usize, p: f64) -> Result<S> {
    let (thr, inv) = threshold(p)?;
    let out = dev.alloc(DType::F32, n)?;
    dev.launch(
        Launch::new(Module::Elementwise, "dropout_mask_f32", grid(n.div_ceil(4)))
            .arg(out.base()?)
            .arg(n as i64)
            .arg(key.seed)
            .arg(key.stream)
            .arg(thr)
            .arg(inv),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors for philox4x32_10 (kat_vectors).
    #[test]
    fn philox_matches_the_reference_vectors() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn masks_are_a_function_of_key_and_index() {
        let key = DropoutKey {
            seed: 0x1234_5678_9abc_def0,
            stream: 7,
        };
        let whole = dropout_mask(key, &[3, 1000], 0.25, DType::F32, &Device::Cpu).unwrap();
        let whole: Vec<f32> = whole.flatten_all().unwrap().to_vec1().unwrap();
        // Any slice drawn from its offset is the same slice of the whole.
        let mut part = vec![0f32; 1234];
        fill_mask(&mut part, 1001, key, 0.25).unwrap();
        assert_eq!(&whole[1001..2235], &part[..]);
        // The keep rate and the scale.
        let kept = whole.iter().filter(|&&x| x != 0.0).count() as f64 / whole.len() as f64;
        assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
        assert!(whole
            .iter()
            .all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        // Another stream or seed gives another mask.
        let other = |k: DropoutKey| -> Vec<f32> {
            dropout_mask(k, &[3, 1000], 0.25, DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_ne!(whole, other(DropoutKey { stream: 8, ..key }));
        assert_ne!(whole, other(DropoutKey { seed: 1, ..key }));
        assert!(threshold(1.0).is_err());
    }
}
