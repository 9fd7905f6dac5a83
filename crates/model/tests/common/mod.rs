//! Helpers shared by the model's test files (each file uses some of them).
#![allow(dead_code)]
use candle_core::{DType, Tensor};

/// Runs `f` on a thread with a 256 MiB stack (backward recurses over the graph) and waits.
pub fn with_big_stack<F: FnOnce() + Send + 'static>(f: F) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

/// The largest |element| of `a`, in f64.
pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The largest |a - b| over the elements (computed in f64) of two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}
