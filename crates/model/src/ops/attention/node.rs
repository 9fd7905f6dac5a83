//! The graph nodes of attention and what each keeps for the backward: the training op (q, k, v
//! in; the mask and scale as constants) and its backward. Their kernels are in `full` (CPU)
//! and `cuda`.
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};

use candle_core::{Layout, Result, Tensor};

use super::cpu::AttnDims;
use super::mask::AttnMask;

/// The forward's log-sum-exp (b, nh, t) f32, handed to the backward.
#[cfg(feature = "cuda")]
#[derive(Clone, Default)]
pub(crate) struct LseSlot(pub(super) Arc<Mutex<Option<candle_core::CudaStorage>>>);

/// The training op: q, k, v as its three inputs, the mask and scale as constants.
pub(crate) struct Attention {
    /// Additive masks in the compute dtype, contiguous.
    pub(super) mask: Option<AttnMask>,
    pub(super) scale: f64,
    /// The forward's row log-sum-exp on CUDA, which the backward reads.
    #[cfg(feature = "cuda")]
    pub(super) lse: LseSlot,
}

impl Attention {
    pub(super) fn new(mask: Option<AttnMask>, scale: f64) -> Self {
        Self {
            mask,
            scale,
            #[cfg(feature = "cuda")]
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
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) out: Tensor,
    #[cfg(feature = "cuda")]
    pub(super) lse: LseSlot,
}
