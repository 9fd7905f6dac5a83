//! Helpers shared by the model's test files (each file uses some of them).
#![allow(dead_code)]
use candle_core::{DType, Device, Result, Tensor, Var};

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

/// Seeded values in [-scale, scale) on the CPU: the same on every run and machine (candle's
/// CPU randn takes no seed).
pub fn seeded(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The output of `f` and the gradients of its inputs `vars`, through a seeded projection of
/// the output (`probe_seed`) summed in f32, on the inputs' device.
pub fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    vars: &[usize],
    probe_seed: u64,
) -> (Tensor, Vec<Tensor>) {
    let held: Vec<Option<Var>> = (0..inputs.len())
        .map(|i| {
            vars.contains(&i)
                .then(|| Var::from_tensor(&inputs[i]).unwrap())
        })
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&held)
        .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
        .collect();
    let y = f(&args).unwrap();
    let probe = seeded(y.dims(), probe_seed, 1.0)
        .to_device(y.device())
        .unwrap();
    let g = (y.to_dtype(DType::F32).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads = held
        .iter()
        .flatten()
        .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    (y, grads)
}

/// |dL/dv|^2 in f32, from the gradient store of a backward pass (panics naming `name` where `v`
/// got no gradient).
pub fn grad_norm_sq(grads: &candle_core::backprop::GradStore, v: &Var, name: &str) -> f32 {
    let g = grads
        .get(v.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"));
    let g = g.to_dtype(DType::F32).unwrap();
    g.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tensor's values as f32, from any device and dtype, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    let t = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}
