//! A tensor as a safetensors `View`.
use candle_core::{DType, Device, Tensor};

/// A tensor's little-endian bytes (moved to the CPU), for the safetensors writer: f32, f64,
/// bf16, f16, u32, i64 and u8.
pub struct RawView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawView {
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        fn bytes<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.into_iter().flat_map(f).collect()
        }
        let (dtype, data) = match flat.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes),
            ),
            DType::F64 => (
                safetensors::Dtype::F64,
                bytes(flat.to_vec1::<f64>()?, f64::to_le_bytes),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                bytes(flat.to_vec1::<half::bf16>()?, |v| v.to_bits().to_le_bytes()),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                bytes(flat.to_vec1::<half::f16>()?, |v| v.to_bits().to_le_bytes()),
            ),
            DType::U32 => (
                safetensors::Dtype::U32,
                bytes(flat.to_vec1::<u32>()?, u32::to_le_bytes),
            ),
            DType::I64 => (
                safetensors::Dtype::I64,
                bytes(flat.to_vec1::<i64>()?, i64::to_le_bytes),
            ),
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            dt => candle_core::bail!("cannot write a {dt:?} tensor to safetensors"),
        };
        Ok(Self { dtype, shape, data })
    }
}

impl safetensors::View for RawView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
