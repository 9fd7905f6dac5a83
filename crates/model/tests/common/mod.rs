//! Helpers shared by the model's test files (each file uses some of them).
#![allow(dead_code)]
use candle_core::{DType, Result, Tensor, Var};

// The finite-difference checker and its seeded generator, and the unit tests' helpers: one
// copy each, shared with the integration tests.
#[path = "../gradcheck/mod.rs"]
pub mod gradcheck;
#[path = "../../src/testing.rs"]
pub mod testing;

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

/// [`gradcheck::rand_t`]'s seeded values as an f32 tensor on the CPU.
pub fn seeded(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    gradcheck::rand_t(shape, seed, scale)
        .to_dtype(DType::F32)
        .unwrap()
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
