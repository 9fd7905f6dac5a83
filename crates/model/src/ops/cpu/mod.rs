//! CPU helpers shared by the kernels: contiguous views of storages, row-parallel loops
//! (`par`) and the vectorized exponentials (`simd`).
use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

pub(crate) mod par;
pub(crate) mod simd;

/// A kernel's input: a storage and its layout.
pub(crate) type In<'a> = (&'a CpuStorage, &'a Layout);
/// A kernel's output: a storage and its shape.
pub(crate) type Out = Result<(CpuStorage, candle_core::Shape)>;

/// The contiguous slice a layout describes.
pub(crate) fn cont<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            l.stride()
        ),
    }
}
