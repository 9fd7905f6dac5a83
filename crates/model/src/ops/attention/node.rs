//! The graph nodes of attention and what each keeps for the backward: the training op (q, k, v
//! in; the mask and scale as constants) and its backward. Their kernels are in `full` (CPU)
//! and `cuda`.
use std::sync::{Arc, Mutex};

use candle_core::{Layout, Result, Tensor};

use super::cpu::AttnDims;
use super::mask::AttnMask;

/// The forward's log-sum-exp (b, nh, t) f32 on the device that ran the CUDA kernels (a GPU or
/// the emulated one), handed to the backward.
#[derive(Clone, Default)]
pub(crate) struct LseSlot(pub(super) Arc<Mutex<Option<SavedLse>>>);

/// A saved log-sum-exp on its device.
pub(crate) enum SavedLse {
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
    Emu(crate::ops::emu::EmuStorage),
}

/// The training op: q, k, v as its three inputs, the mask and scale as constants.
pub(crate) struct Attention {
    /// Additive masks in the compute dtype, contiguous.
    pub(super) mask: Option<AttnMask>,
    pub(super) scale: f64,
    /// The forward's row log-sum-exp on CUDA, which the backward reads.
    pub(super) lse: LseSlot,
}

impl Attention {
    pub(super) fn new(mask: Option<AttnMask>, scale: f64) -> Self {
        Self {
            mask,
            scale,
            lse: Default::default(),
        }
    }

    pub(super) fn dims(lq: &Layout, lk: &Layout) -> Result<AttnDims> {
        let (b, nh, t, hd) = lq.shape().dims4()?;
        let (_, nkv, s, _) = lk.shape().dims4()?;
        Ok(AttnDims {
            b,
            nh,
            nkv,
            t,
            s,
            hd,
        })
    }
}

/// The backward of [`Attention`] as one op: dq, dk and dv concatenated into one flat tensor
/// (each in its input's layout made contiguous: q (b, nh, t, hd), k and v (b, nkv, s, hd)).
pub(crate) struct AttentionBwd {
    pub(super) mask: Option<AttnMask>,
    pub(super) scale: f64,
    /// d out, (b, t, heads * head_dim), contiguous.
    pub(super) grad: Tensor,
    /// The forward's output (the CUDA backward's `rowsum(dO * O)`).
    pub(super) out: Tensor,
    pub(super) lse: LseSlot,
}
