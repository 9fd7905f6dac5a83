//! Helpers of this crate's unit tests.
use candle_core::{DType, Device, Tensor};

/// A tensor's values as f32, from any device and dtype, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    let t = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}
