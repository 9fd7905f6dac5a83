//! A linear layer `y = x W^T (+ b)` whose base weight may be frozen or trainable, with an
//! optional LoRA adapter (to come).
use candle_core::{Module, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out_features, in_features), as stored on the hub.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
