//! Differentiable building blocks of the forward pass.
//!
//! candle-nn's fused ops (`rms_norm`, `softmax_last_dim`, `rope`) have no backward: the
//! gradient silently stops at them. Every op here keeps the graph intact.
// Placeholder implementations: candle's composed ops, which do carry a backward. To be replaced
// by fused custom ops with hand-written backward passes (same signatures).
use candle_core::{Result, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::rms_norm_slow(x, weight, eps)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Rotary embedding, non-interleaved (GPT-NeoX / Hugging Face LLaMA layout).
/// `x`: (b, heads, t, head_dim); `cos`, `sin`: (t, head_dim / 2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_slow(x, cos, sin)
}

/// SiLU(gate) * up, the SwiGLU activation.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}
