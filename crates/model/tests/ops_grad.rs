//! The fused ops of `sft_model::ops`: every backward against central finite differences in
//! float64, every forward against candle's composed reference, and the fused backward against
//! the composed backward on tensors large enough to take the parallel path.
mod common;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};
use common::gradcheck::{assert_grads, rand_t};
use common::{max_abs, max_abs_diff};
use sft_model::ops;

const TOL: f64 = 1e-4;

fn cos_sin(b: Option<usize>, t: usize, d2: usize, seed: u64) -> (Tensor, Tensor) {
    let shape: Vec<usize> = match b {
        Some(b) => vec![b, t, d2],
        None => vec![t, d2],
    };
    let angles = (rand_t(&shape, seed, 1.0) * 3.0).unwrap();
    (angles.cos().unwrap(), angles.sin().unwrap())
}

#[test]
fn ops_rms_norm_grad() {
    let x = rand_t(&[2, 3, 8], 1, 1.0);
    let w = (rand_t(&[8], 2, 0.5) + 1.0).unwrap();
    let f = |t: &[Tensor]| ops::rms_norm(&t[0], &t[1], 1e-5);
    assert_grads("rms_norm", &f, &[x, w], &[0, 1], TOL);
}

#[test]
fn ops_softmax_grad() {
    let x = rand_t(&[3, 7], 3, 2.0);
    let f = |t: &[Tensor]| ops::softmax_last_dim(&t[0]);
    assert_grads("softmax", &f, std::slice::from_ref(&x), &[0], TOL);
    // With a causal-style mask of -inf entries added before the softmax.
    let mask: Vec<f64> = (0..21)
        .map(|i| {
            if i % 7 > i / 7 + 3 {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (3, 7), &Device::Cpu).unwrap();
    let f = |t: &[Tensor]| ops::softmax_last_dim(&(&t[0] + &t[1])?);
    assert_grads("softmax masked", &f, &[x, mask], &[0], TOL);
}

#[test]
fn ops_rope_grad() {
    // x as the transpose of a (b, t, h, d) projection: strided, unit last stride.
    let x = rand_t(&[2, 4, 3, 8], 4, 1.0);
    let (cos, sin) = cos_sin(None, 4, 4, 5);
    let f = |t: &[Tensor]| ops::rope(&t[0].transpose(1, 2)?, &t[1], &t[2]);
    assert_grads("rope", &f, &[x.clone(), cos, sin], &[0], TOL);
    let (cos, sin) = cos_sin(Some(2), 4, 4, 6);
    assert_grads("rope per-batch", &f, &[x, cos, sin], &[0], TOL);
}

#[test]
fn ops_silu_mul_grad() {
    let g = rand_t(&[3, 10], 7, 3.0);
    let u = rand_t(&[3, 10], 8, 1.0);
    let f = |t: &[Tensor]| ops::silu_mul(&t[0], &t[1]);
    assert_grads("silu_mul", &f, &[g.clone(), u.clone()], &[0, 1], TOL);
    assert_grads("silu_mul gate only", &f, &[g.clone(), u.clone()], &[0], TOL);
    assert_grads("silu_mul up only", &f, &[g, u], &[1], TOL);
}

#[test]
fn ops_frozen_linear_grad() {
    let x = rand_t(&[2, 3, 5], 9, 1.0);
    let w = rand_t(&[4, 5], 10, 1.0);
    let f = |t: &[Tensor]| ops::frozen_linear(&t[0], &t[1]);
    assert_grads("frozen_linear", &f, &[x, w], &[0], TOL);
}

#[test]
fn ops_frozen_linear_refuses_var_and_computes_no_dw() {
    let w = Var::from_tensor(&rand_t(&[4, 5], 11, 1.0)).unwrap();
    let x = rand_t(&[3, 5], 12, 1.0);
    let e = ops::frozen_linear(&x, w.as_tensor())
        .unwrap_err()
        .to_string();
    assert!(e.contains("frozen_linear: the weight is a Var"), "{e}");
    // A frozen weight gets no entry in the gradient store, unlike a plain matmul.
    let w = rand_t(&[4, 5], 11, 1.0);
    let xv = Var::from_tensor(&x).unwrap();
    let grads = ops::frozen_linear(xv.as_tensor(), &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
    let wt = w.t().unwrap();
    let grads = xv
        .as_tensor()
        .matmul(&wt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&wt).is_some(), "candle's matmul does compute dW");
}

#[test]
fn ops_cross_entropy_grad() {
    let logits = (rand_t(&[5, 7], 13, 1.0) * 3.0).unwrap();
    let labels = Tensor::new(&[3i64, -100, 0, 6, 2], &Device::Cpu).unwrap();
    let f = |t: &[Tensor]| ops::cross_entropy(&t[0], &t[1], -100);
    assert_grads(
        "cross_entropy i64",
        &f,
        &[logits.clone(), labels],
        &[0],
        TOL,
    );
    let labels = Tensor::new(&[3u32, 1, 0, 6, 2], &Device::Cpu).unwrap();
    let f = |t: &[Tensor]| ops::cross_entropy(&t[0], &t[1], 1);
    assert_grads("cross_entropy u32", &f, &[logits, labels], &[0], TOL);
}

#[test]
fn ops_cross_entropy_rejects_bad_labels() {
    let logits = rand_t(&[2, 4], 14, 1.0);
    for (labels, want) in [
        (
            Tensor::new(&[3i64, 4], &Device::Cpu),
            "label 4 at row 1 is outside the vocabulary 0..4",
        ),
        (
            Tensor::new(&[3i64, -1], &Device::Cpu),
            "label -1 at row 1 is outside the vocabulary 0..4",
        ),
        (
            Tensor::new(&[3f32, 1.0], &Device::Cpu),
            "labels must be u32 or i64, got F32",
        ),
    ] {
        let e = ops::cross_entropy(&logits, &labels.unwrap(), -100)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}

// ------------------------------------------------------------------------------------------
// Forward against candle's composed ops
// ------------------------------------------------------------------------------------------

/// Each op and its composed reference, evaluated on the same inputs in `dt`.
/// The reference runs in f32 on the (already rounded) inputs.
fn forward_pairs(dt: DType, big: bool) -> Vec<(&'static str, Tensor, Tensor)> {
    let (rows, d) = if big { (96, 576) } else { (6, 16) };
    let cast = |t: Tensor| t.to_dtype(dt).unwrap();
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let mut out = vec![];

    let x = cast((rand_t(&[2, rows / 2, d], 20, 1.0) * 2.0).unwrap());
    let w = cast((rand_t(&[d], 21, 0.5) + 1.0).unwrap());
    out.push((
        "rms_norm",
        ops::rms_norm(&x, &w, 1e-5).unwrap(),
        candle_nn::ops::rms_norm_slow(&f32_(&x), &f32_(&w), 1e-5).unwrap(),
    ));
    out.push((
        "softmax",
        ops::softmax_last_dim(&x).unwrap(),
        candle_nn::ops::softmax(&f32_(&x), D::Minus1).unwrap(),
    ));
    let up = cast(rand_t(&[2, rows / 2, d], 22, 1.0));
    out.push((
        "silu_mul",
        ops::silu_mul(&x, &up).unwrap(),
        (candle_nn::ops::silu(&f32_(&x)).unwrap() * f32_(&up)).unwrap(),
    ));
    let wl = cast(rand_t(&[d / 2, d], 23, 0.2));
    out.push((
        "frozen_linear",
        ops::frozen_linear(&x, &wl).unwrap(),
        f32_(&x).broadcast_matmul(&f32_(&wl).t().unwrap()).unwrap(),
    ));
    // rope: (b, t, h, hd) transposed to (b, h, t, hd), as the attention does.
    let (t, h, hd) = if big { (64, 9, 64) } else { (4, 3, 8) };
    let q = cast(rand_t(&[2, t, h, hd], 24, 1.0));
    let (cos, sin) = cos_sin(None, t, hd / 2, 25);
    let (cos, sin) = (cast(cos), cast(sin));
    let qt = q.transpose(1, 2).unwrap();
    out.push((
        "rope",
        ops::rope(&qt, &cos, &sin).unwrap(),
        candle_nn::rotary_emb::rope_slow(
            &f32_(&qt).contiguous().unwrap(),
            &f32_(&cos),
            &f32_(&sin),
        )
        .unwrap(),
    ));
    let (cb, sb) = cos_sin(Some(2), t, hd / 2, 26);
    let (cb, sb) = (cast(cb), cast(sb));
    let per_batch_ref: Vec<Tensor> = (0..2)
        .map(|b| {
            candle_nn::rotary_emb::rope_slow(
                &f32_(&qt.i(b..b + 1).unwrap()).contiguous().unwrap(),
                &f32_(&cb.i(b).unwrap()),
                &f32_(&sb.i(b).unwrap()),
            )
            .unwrap()
        })
        .collect();
    out.push((
        "rope per-batch",
        ops::rope(&qt, &cb, &sb).unwrap(),
        Tensor::cat(&per_batch_ref, 0).unwrap(),
    ));
    // cross-entropy against candle-nn's (mean) loss.
    let logits = cast((rand_t(&[rows, 3 * d], 27, 1.0) * 4.0).unwrap());
    let labels: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 37) % (3 * d as u32))
        .collect();
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    out.push((
        "cross_entropy",
        ops::cross_entropy(&logits, &labels, -100)
            .unwrap()
            .mean_all()
            .unwrap(),
        candle_nn::loss::cross_entropy(&f32_(&logits), &labels).unwrap(),
    ));
    out
}

#[test]
fn ops_forward_matches_candle_f32() {
    for big in [false, true] {
        for (name, ours, reference) in forward_pairs(DType::F32, big) {
            assert_eq!(ours.dims(), reference.dims(), "{name}");
            let err = max_abs_diff(&ours, &reference) / max_abs(&reference).max(1.0);
            assert!(err < 1e-5, "{name} (big: {big}): error {err:e}");
        }
    }
}

#[test]
fn ops_forward_matches_candle_half() {
    for dt in [DType::BF16, DType::F16] {
        // bf16 has 8 bits of mantissa: one rounding of the result is about 4e-3 relative.
        let tol = if dt == DType::BF16 { 1e-2 } else { 2e-3 };
        for big in [false, true] {
            for (name, ours, reference) in forward_pairs(dt, big) {
                if name != "cross_entropy" {
                    assert_eq!(ours.dtype(), dt, "{name}");
                }
                let err = max_abs_diff(&ours, &reference) / max_abs(&reference).max(1.0);
                assert!(err < tol, "{name} {dt:?} (big: {big}): error {err:e}");
            }
        }
    }
}

#[test]
fn ops_softmax_fully_masked_row_is_zero() {
    let x = Tensor::new(
        &[[f32::NEG_INFINITY; 4], [0.0, 1.0, 2.0, 3.0]],
        &Device::Cpu,
    )
    .unwrap();
    let y = ops::softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y[0], vec![0.0; 4]);
    assert!((y[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

// ------------------------------------------------------------------------------------------
// Backward against candle's composed backward, large enough for the parallel kernels
// ------------------------------------------------------------------------------------------

fn grads_of(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    proj_seed: u64,
) -> Vec<Tensor> {
    grads_of_with_proj_dtype(f, inputs, proj_seed, None)
}

/// As [`grads_of`], with the random output projection rounded through `proj_dtype` first (so
/// an f32 reference can use the projection a bf16 run sees).
fn grads_of_with_proj_dtype(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    proj_seed: u64,
    proj_dtype: Option<DType>,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let proj = rand_t(out.dims(), proj_seed, 1.0)
        .to_dtype(proj_dtype.unwrap_or(out.dtype()))
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    let g = (out * proj).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter()
        .map(|t| g.get(t).expect("no gradient").clone())
        .collect()
}

fn assert_same_grads(name: &str, a: &[Tensor], b: &[Tensor], tol: f64) {
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let err = max_abs_diff(a, b) / max_abs(b).max(1e-6);
        assert!(err < tol, "{name}: input {i} error {err:e}");
    }
}

#[test]
fn ops_backward_matches_composed_large_f32() {
    let f32_ = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let x = f32_(rand_t(&[4, 64, 576], 30, 1.0));
    let w = f32_((rand_t(&[576], 31, 0.5) + 1.0).unwrap());
    let ours = |t: &[Tensor]| ops::rms_norm(&t[0], &t[1], 1e-5);
    let theirs = |t: &[Tensor]| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5);
    let ins = [x.clone(), w];
    assert_same_grads(
        "rms_norm",
        &grads_of(&ours, &ins, 1),
        &grads_of(&theirs, &ins, 1),
        1e-4,
    );

    let s = f32_(rand_t(&[4, 9, 64, 64], 32, 3.0));
    let ours = |t: &[Tensor]| ops::softmax_last_dim(&t[0]);
    let theirs = |t: &[Tensor]| candle_nn::ops::softmax(&t[0], D::Minus1);
    assert_same_grads(
        "softmax",
        &grads_of(&ours, std::slice::from_ref(&s), 2),
        &grads_of(&theirs, &[s], 2),
        1e-4,
    );

    let up = f32_(rand_t(&[4, 64, 576], 33, 1.0));
    let ours = |t: &[Tensor]| ops::silu_mul(&t[0], &t[1]);
    let theirs = |t: &[Tensor]| candle_nn::ops::silu(&t[0])? * &t[1];
    let ins = [x.clone(), up];
    assert_same_grads(
        "silu_mul",
        &grads_of(&ours, &ins, 3),
        &grads_of(&theirs, &ins, 3),
        1e-4,
    );

    let q = f32_(rand_t(&[4, 64, 9, 64], 34, 1.0));
    let (cos, sin) = cos_sin(None, 64, 32, 35);
    let (cos, sin) = (f32_(cos), f32_(sin));
    let ours = |t: &[Tensor]| ops::rope(&t[0].transpose(1, 2)?, &cos, &sin);
    let theirs = |t: &[Tensor]| {
        candle_nn::rotary_emb::rope_slow(&t[0].transpose(1, 2)?.contiguous()?, &cos, &sin)
    };
    assert_same_grads(
        "rope",
        &grads_of(&ours, std::slice::from_ref(&q), 4),
        &grads_of(&theirs, &[q], 4),
        1e-4,
    );

    let logits = f32_((rand_t(&[64, 2048], 36, 1.0) * 4.0).unwrap());
    let labels: Vec<u32> = (0..64u32).map(|i| (i * 97) % 2048).collect();
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    let ours = |t: &[Tensor]| ops::cross_entropy(&t[0], &labels, -100)?.mean_all();
    let theirs = |t: &[Tensor]| candle_nn::loss::cross_entropy(&t[0], &labels);
    assert_same_grads(
        "cross_entropy",
        &grads_of(&ours, std::slice::from_ref(&logits), 5),
        &grads_of(&theirs, &[logits], 5),
        1e-4,
    );
}

#[test]
fn ops_backward_half_close_to_f32() {
    // bf16 gradients computed by the fused kernels stay close to the f32 ones.
    let x = rand_t(&[8, 128], 40, 1.0);
    let w = (rand_t(&[128], 41, 0.5) + 1.0).unwrap();
    let up = rand_t(&[8, 128], 42, 1.0);
    let f = |t: &[Tensor]| {
        let h = ops::rms_norm(&t[0], &t[1], 1e-5)?;
        let s = ops::softmax_last_dim(&h)?;
        ops::silu_mul(&s.affine(10.0, 0.0)?, &t[2])
    };
    let to = |dt: DType| -> Vec<Tensor> {
        [&x, &w, &up]
            .iter()
            .map(|t| t.to_dtype(dt).unwrap())
            .collect()
    };
    let g32 = grads_of(&f, &to(DType::F32), 7);
    for dt in [DType::BF16, DType::F16] {
        let gh = grads_of(&f, &to(dt), 7);
        for a in &gh {
            assert_eq!(a.dtype(), dt);
        }
        assert_same_grads(&format!("{dt:?}"), &gh, &g32, 5e-2);
    }
}

#[test]
fn ops_lora_linear_grad() {
    let x = rand_t(&[2, 3, 6], 50, 1.0);
    let w = rand_t(&[5, 6], 51, 1.0);
    let a = rand_t(&[2, 6], 52, 1.0);
    let b = rand_t(&[5, 2], 53, 1.0);
    let f = |t: &[Tensor]| ops::lora_linear(&t[0], &t[1], &t[2], &t[3], 1.7, None);
    let ins = [x.clone(), w.clone(), a.clone(), b.clone()];
    assert_grads("lora_linear", &f, &ins, &[0, 2, 3], TOL);
    assert_grads("lora_linear x only", &f, &ins, &[0], TOL);
    assert_grads("lora_linear A only", &f, &ins, &[2], TOL);
    // With a dropout mask on the adapter's input.
    let mask: Vec<f64> = (0..36)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
        .collect();
    let mask = Tensor::from_vec(mask, (2, 3, 6), &Device::Cpu).unwrap();
    let f = |t: &[Tensor]| ops::lora_linear(&t[0], &t[1], &t[2], &t[3], 0.5, Some(&t[4]));
    assert_grads(
        "lora_linear masked",
        &f,
        &[x, w, a, b, mask],
        &[0, 2, 3],
        TOL,
    );
}

#[test]
fn ops_lora_linear_matches_the_composed_form() {
    let f32_ = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let x = f32_(rand_t(&[4, 64, 576], 60, 1.0));
    let w = f32_(rand_t(&[192, 576], 61, 0.05));
    let a = f32_(rand_t(&[8, 576], 62, 0.05));
    let b = f32_(rand_t(&[192, 8], 63, 0.5));
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|i| if i % 7 == 0 { 0.0 } else { 1.25 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu).unwrap();
    for m in [None, Some(&mask)] {
        let ours = |t: &[Tensor]| ops::lora_linear(&t[0], &w, &t[1], &t[2], 2.0, m);
        let theirs = |t: &[Tensor]| {
            let xd = match m {
                Some(m) => (&t[0] * m)?,
                None => t[0].clone(),
            };
            let h = xd.broadcast_matmul(&t[1].t()?)?;
            t[0].broadcast_matmul(&w.t()?)? + (h.broadcast_matmul(&t[2].t()?)? * 2.0)?
        };
        let ins = [x.clone(), a.clone(), b.clone()];
        let (y1, y2) = (ours(&ins).unwrap(), theirs(&ins).unwrap());
        let err = max_abs_diff(&y1, &y2) / max_abs(&y2).max(1.0);
        assert!(err < 1e-5, "forward error {err:e}");
        assert_same_grads(
            "lora_linear",
            &grads_of(&ours, &ins, 9),
            &grads_of(&theirs, &ins, 9),
            1e-4,
        );
    }
}

#[test]
fn ops_lora_linear_bf16_base_with_f32_adapters() {
    // The fused op on a bf16 base against the same computation done in f32 on the bf16 values.
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let x = bf(rand_t(&[2, 40, 96], 70, 1.0));
    let w = bf(rand_t(&[64, 96], 71, 0.1));
    let a = f32_(&rand_t(&[4, 96], 72, 0.1));
    let b = f32_(&rand_t(&[64, 4], 73, 0.5));
    let ours = |t: &[Tensor]| ops::lora_linear(&t[0], &w, &t[1], &t[2], 2.0, None);
    let theirs = |t: &[Tensor]| {
        let xf = t[0].to_dtype(DType::F32)?;
        let y = xf.broadcast_matmul(&f32_(&w).t()?)?;
        let h = xf.broadcast_matmul(&t[1].t()?)?;
        (y + (h.broadcast_matmul(&t[2].t()?)? * 2.0)?)?.to_dtype(DType::BF16)
    };
    let ins = [x.clone(), a.clone(), b.clone()];
    let (y1, y2) = (ours(&ins).unwrap(), theirs(&ins).unwrap());
    assert_eq!(y1.dtype(), DType::BF16);
    let err = max_abs_diff(&y1, &y2) / max_abs(&y2).max(1.0);
    assert!(err < 1e-2, "forward error {err:e}");
    let (g1, g2) = (grads_of(&ours, &ins, 11), grads_of(&theirs, &ins, 11));
    assert_eq!(g1[0].dtype(), DType::BF16);
    assert_eq!(g1[1].dtype(), DType::F32);
    assert_same_grads("lora_linear bf16", &g1, &g2, 2e-2);
}

/// A causal mask over `s` keys for the last `t` queries, with the first `pad` keys of batch
/// row 1 masked as padding (batch row 0 unpadded).
fn attn_mask(t: usize, s: usize, pad: usize) -> Tensor {
    let mut m = vec![0f64; 2 * t * s];
    for bi in 0..2 {
        for i in 0..t {
            let q = s - t + i;
            for j in 0..s {
                let padded = bi == 1 && j < pad && j != q;
                if j > q || padded {
                    m[(bi * t + i) * s + j] = f64::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (2, 1, t, s), &Device::Cpu).unwrap()
}

#[test]
fn ops_attention_grad() {
    // 4 query heads over 2 kv heads; queries the last 3 of 5 positions.
    let q = rand_t(&[2, 4, 3, 6], 80, 1.0);
    let k = rand_t(&[2, 2, 5, 6], 81, 1.0);
    let v = rand_t(&[2, 2, 5, 6], 82, 1.0);
    let mask = attn_mask(3, 5, 2);
    let f = |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], Some(&t[3]), 0.4);
    let ins = [q.clone(), k.clone(), v.clone(), mask];
    assert_grads("attention", &f, &ins, &[0, 1, 2], TOL);
    assert_grads("attention k only", &f, &ins, &[1], TOL);
    let f = |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], None, 0.4);
    assert_grads("attention unmasked", &f, &[q, k, v], &[0, 1, 2], TOL);
}

#[test]
fn ops_attention_matches_the_composed_form() {
    let f32_ = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    // The llama layout: q/k/v as transposes of (b, t, heads, hd) projections.
    let q = f32_(rand_t(&[2, 48, 9, 64], 90, 1.0))
        .transpose(1, 2)
        .unwrap();
    let k = f32_(rand_t(&[2, 48, 3, 64], 91, 1.0))
        .transpose(1, 2)
        .unwrap();
    let v = f32_(rand_t(&[2, 48, 3, 64], 92, 1.0))
        .transpose(1, 2)
        .unwrap();
    let mask = f32_(attn_mask(48, 48, 5));
    let scale = 1.0 / 8.0;
    let theirs = |t: &[Tensor]| {
        let (b, nh, tq, hd) = t[0].dims4()?;
        let nkv = t[1].dim(1)?;
        let rep = nh / nkv;
        let qs = (t[0].contiguous()? * scale)?.reshape((b, nkv, rep * tq, hd))?;
        let sc = qs
            .matmul(&t[1].contiguous()?.t()?)?
            .reshape((b, nh, tq, tq))?;
        let p = candle_nn::ops::softmax(&sc.broadcast_add(&mask)?, D::Minus1)?;
        p.reshape((b, nkv, rep * tq, tq))?
            .matmul(&t[2].contiguous()?)?
            .reshape((b, nh, tq, hd))?
            .transpose(1, 2)?
            .reshape((b, tq, nh * hd))
    };
    let ours = |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], Some(&mask), scale);
    let ins = [q, k, v];
    let (y1, y2) = (ours(&ins).unwrap(), theirs(&ins).unwrap());
    assert_eq!(y1.dims(), &[2, 48, 576]);
    let err = max_abs_diff(&y1, &y2) / max_abs(&y2).max(1.0);
    assert!(err < 1e-5, "forward error {err:e}");
    assert_same_grads(
        "attention",
        &grads_of(&ours, &ins, 12),
        &grads_of(&theirs, &ins, 12),
        1e-4,
    );
    // bf16 inputs: computed in f32, rounded once.
    let bf: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(DType::BF16).unwrap())
        .collect();
    let y3 = ours(&bf).unwrap();
    assert_eq!(y3.dtype(), DType::BF16);
    let y4 = theirs(
        &bf.iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let err = max_abs_diff(&y3, &y4) / max_abs(&y4).max(1.0);
    assert!(err < 1e-2, "bf16 forward error {err:e}");
    let gb = grads_of(&ours, &bf, 13);
    assert!(gb.iter().all(|g| g.dtype() == DType::BF16));
    // By value: the composed form in f32 on the same bf16 inputs (and the same bf16-rounded
    // output projection) is the reference; bf16 rounds each gradient once (8 mantissa bits,
    // 2^-8 = 4e-3 relative), so 2e-2 of the largest gradient leaves room for the f32
    // accumulation order and nothing more.
    let bf_up: Vec<Tensor> = bf.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    let g32 = grads_of_with_proj_dtype(&theirs, &bf_up, 13, Some(DType::BF16));
    let gb32: Vec<Tensor> = gb.iter().map(|g| g.to_dtype(DType::F32).unwrap()).collect();
    assert_same_grads("attention bf16", &gb32, &g32, 2e-2);
}

/// The decoding path reads a KV cache in place (a buffer with room for more positions than
/// are filled); it must give what the fused attention gives on the filled part, for one and
/// for a few new positions, with padding, grouped heads, a fully masked row, in f32 and f64.
#[test]
fn ops_attention_cached_matches_attention_on_the_filled_cache() {
    let (b, nh, nkv, cap) = (2, 6, 2, 40);
    // hd 64: the f32 AVX2 rows; hd 12 (not a multiple of 8): the portable loop.
    for (dt, hd) in [(DType::F64, 64), (DType::F32, 64), (DType::F32, 12)] {
        for (t, s) in [(1, 1), (1, 17), (3, 29), (4, 40)] {
            let kc = rand_t(&[b, nkv, cap, hd], 100 + s as u64, 1.0)
                .to_dtype(dt)
                .unwrap();
            let vc = rand_t(&[b, nkv, cap, hd], 200 + s as u64, 1.0)
                .to_dtype(dt)
                .unwrap();
            // q in the llama layout, a transpose of (b, t, heads, hd).
            let q = rand_t(&[b, t, nh, hd], 300 + s as u64, 1.0)
                .to_dtype(dt)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let mut mask = attn_mask(t, s, s.min(5)).to_dtype(dt).unwrap();
            if s == 17 {
                // Batch row 1 masks every key: zeros, as in `attention`.
                let m = Tensor::full(f64::NEG_INFINITY, (1, 1, t, s), &Device::Cpu).unwrap();
                let row0 = mask.narrow(0, 0, 1).unwrap();
                mask = Tensor::cat(&[&row0, &m.to_dtype(dt).unwrap()], 0).unwrap();
            }
            let scale = 0.125;
            let ours = ops::attention_cached(&q, &kc, &vc, s, Some(&mask), scale).unwrap();
            let (kf, vf) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
            let theirs = ops::attention(&q, &kf, &vf, Some(&mask), scale).unwrap();
            assert_eq!(ours.dims(), &[b, t, nh * hd]);
            assert_eq!(ours.dtype(), dt);
            let err = max_abs_diff(&ours, &theirs) / max_abs(&theirs).max(1.0);
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(err < tol, "{dt:?} hd={hd} t={t} s={s}: error {err:e}");
            if s == 17 {
                assert_eq!(max_abs(&ours.narrow(0, 1, 1).unwrap()), 0.0);
            }
            let unmasked = ops::attention_cached(&q, &kc, &vc, s, None, scale).unwrap();
            let theirs = ops::attention(&q, &kf, &vf, None, scale).unwrap();
            let err = max_abs_diff(&unmasked, &theirs) / max_abs(&theirs).max(1.0);
            assert!(err < tol, "{dt:?} t={t} s={s} unmasked: error {err:e}");
        }
    }
}
