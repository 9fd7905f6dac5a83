//! Central finite differences in float64 against candle's backward.
#![allow(dead_code)]
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform values in [-scale, scale] from a seed, as an f64 tensor.
pub fn rand_t(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest `|analytic - numeric|` over the largest `|numeric|`, per checked input.
///
/// `f` maps the inputs to any tensor; the scalar checked is `sum(f(inputs) * R)` for a fixed
/// random `R`, so every output element contributes with a different weight. Inputs in `wrt`
/// become `Var`s; the others stay constants.
pub fn grad_rel_errors(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
) -> Vec<f64> {
    let vars: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if wrt.contains(&i) {
                assert_eq!(t.dtype(), DType::F64, "checked inputs must be f64");
                Var::from_tensor(t).unwrap().as_tensor().clone()
            } else {
                t.clone()
            }
        })
        .collect();
    let out = f(&vars).unwrap();
    let proj = rand_t(out.dims(), 0xfeed, 1.0);
    let scalar = |ins: &[Tensor]| -> f64 {
        let o = f(ins).unwrap();
        (o * &proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = (out * &proj).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let h = 1e-6;
    wrt.iter()
        .map(|&i| {
            let g = grads
                .get(&vars[i])
                .unwrap_or_else(|| panic!("input {i} received no gradient"));
            let analytic: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            let mut numeric = Vec::with_capacity(base.len());
            for j in 0..base.len() {
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut ins = inputs.to_vec();
                    ins[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                    scalar(&ins)
                };
                numeric.push((eval(h) - eval(-h)) / (2.0 * h));
            }
            let max_n = numeric.iter().fold(0f64, |m, v| m.max(v.abs()));
            let max_d = analytic
                .iter()
                .zip(&numeric)
                .fold(0f64, |m, (a, n)| m.max((a - n).abs()));
            assert!(max_n > 1e-8, "input {i}: numeric gradient is all zero");
            max_d / max_n
        })
        .collect()
}

/// Panics unless every checked input's gradient matches within `tol`.
pub fn assert_grads(
    name: &str,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    wrt: &[usize],
    tol: f64,
) {
    let errs = grad_rel_errors(f, inputs, wrt);
    eprintln!("{name}: relative errors {errs:?}");
    for (i, e) in wrt.iter().zip(&errs) {
        assert!(
            *e < tol,
            "{name}: input {i} relative error {e:e} >= {tol:e}"
        );
    }
}
