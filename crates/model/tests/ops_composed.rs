//! The composed references of `sft_model::ops` (what runs where no kernel exists: the CUDA
//! fallbacks), run on the CPU through `ops::with_composed`: each gives the kernel's values and
//! gradients, keeps the input's dtype (a bf16 activation stays bf16, so the layer after it sees
//! the dtype it expects), and stays finite where a naive formula overflows.
mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{max_abs_diff, seeded, value_and_grads};
use sft_model::ops;

/// Kernel and composed reference agree (values and gradients) and keep the dtype.
fn check(
    name: &str,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    vars: &[usize],
    tol: f64,
) {
    let (yk, gk) = value_and_grads(f, inputs, vars, 99);
    let (yc, gc) = ops::with_composed(|| value_and_grads(f, inputs, vars, 99));
    assert_eq!(
        yk.dtype(),
        yc.dtype(),
        "{name}: the composed form changed the dtype"
    );
    assert_eq!(yk.dtype(), inputs[0].dtype(), "{name}: output dtype");
    let d = max_abs_diff(&yk, &yc);
    assert!(d < tol, "{name}: outputs differ by {d}");
    for (i, (a, b)) in gk.iter().zip(&gc).enumerate() {
        assert_eq!(a.dtype(), b.dtype(), "{name}: gradient {i} dtype");
        let d = max_abs_diff(a, b);
        assert!(d < tol, "{name}: gradient {i} differs by {d}");
    }
}

#[test]
fn composed_references_match_the_kernels_in_f32_and_bf16() {
    for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 6e-2)] {
        let c = |t: Tensor| t.to_dtype(dt).unwrap();
        let x = c(seeded(&[2, 5, 16], 1, 1.0));
        let w = c((seeded(&[16], 2, 0.5) + 1.0).unwrap());
        check(
            &format!("rms_norm {dt:?}"),
            &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
            &[x.clone(), w],
            &[0, 1],
            tol,
        );
        check(
            &format!("softmax {dt:?}"),
            &|t| ops::softmax_last_dim(&t[0]),
            &[c(seeded(&[4, 9], 3, 3.0))],
            &[0],
            tol,
        );
        let q = c(seeded(&[2, 3, 5, 8], 4, 1.0));
        let ang = seeded(&[5, 4], 5, 3.0);
        let (cos, sin) = (c(ang.cos().unwrap()), c(ang.sin().unwrap()));
        check(
            &format!("rope {dt:?}"),
            &|t| ops::rope(&t[0], &t[1], &t[2]),
            &[q, cos, sin],
            &[0],
            tol,
        );
        check(
            &format!("silu_mul {dt:?}"),
            &|t| ops::silu_mul(&t[0], &t[1]),
            &[c(seeded(&[3, 10], 6, 2.0)), c(seeded(&[3, 10], 7, 1.0))],
            &[0, 1],
            tol,
        );
        let wl = c(seeded(&[12, 16], 8, 0.3));
        check(
            &format!("frozen_linear {dt:?}"),
            &|t| ops::frozen_linear(&t[0], &t[1]),
            &[x.clone(), wl.clone()],
            &[0],
            tol,
        );
        // LoRA: f32 adapters on a base of the activations' dtype.
        let a = seeded(&[4, 16], 9, 0.3);
        let b = seeded(&[12, 4], 10, 0.3);
        let mask = Tensor::from_vec(
            (0..160)
                .map(|i| [0f32, 1.25][(i % 5 != 0) as usize])
                .collect::<Vec<_>>(),
            (2, 5, 16),
            &Device::Cpu,
        )
        .unwrap();
        check(
            &format!("lora_linear {dt:?}"),
            &|t| ops::lora_linear(&t[0], &t[1], &t[2], &t[3], 2.0, Some(&t[4])),
            &[x.clone(), wl, a, b, mask],
            &[0, 2, 3],
            tol,
        );
        // Attention, GQA with a padded causal pattern, additive and as key ranges.
        let (bsz, nh, nkv, t, hd) = (2, 4, 2, 7, 8);
        let q = c(seeded(&[bsz, nh, t, hd], 11, 1.0));
        let k = c(seeded(&[bsz, nkv, t, hd], 12, 1.0));
        let v = c(seeded(&[bsz, nkv, t, hd], 13, 1.0));
        let valid = vec![vec![true; t], (0..t).map(|i| i >= 3).collect()];
        let ranges = ops::KeyRanges::causal(&valid, 0, t, &Device::Cpu)
            .unwrap()
            .unwrap();
        let additive =
            ops::AttnMask::Additive(ranges.to_additive(DType::F32, &Device::Cpu).unwrap());
        for (what, mask) in [
            ("ranges", ops::AttnMask::Ranges(ranges.clone())),
            ("additive", additive),
        ] {
            check(
                &format!("attention {what} {dt:?}"),
                &|t| ops::attention_with(&t[0], &t[1], &t[2], Some(&mask), 0.35),
                &[q.clone(), k.clone(), v.clone()],
                &[0, 1, 2],
                tol,
            );
        }
        let labels = Tensor::new(&[3u32, 0, 7, 2], &Device::Cpu).unwrap();
        let logits = c(seeded(&[4, 9], 14, 4.0));
        let (yk, _) = value_and_grads(
            &|t| ops::cross_entropy(&t[0], &labels, -100),
            std::slice::from_ref(&logits),
            &[0],
            99,
        );
        assert_eq!(yk.dtype(), DType::F32, "cross-entropy losses are f32");
        let f = |t: &[Tensor]| -> Result<Tensor> {
            ops::cross_entropy(&t[0], &labels, -100)?.to_dtype(t[0].dtype())
        };
        check(&format!("cross_entropy {dt:?}"), &f, &[logits], &[0], tol);
    }
}

/// Logits above 88 overflow `exp` in f32: the composed cross-entropy must shift by the row's
/// maximum, as the kernel does.
#[test]
fn composed_cross_entropy_is_max_shifted() {
    let logits = (seeded(&[3, 50], 21, 5.0) + 120.0).unwrap();
    let labels = Tensor::new(&[4u32, 49, 0], &Device::Cpu).unwrap();
    let kernel = ops::cross_entropy(&logits, &labels, -100).unwrap();
    let composed = ops::with_composed(|| ops::cross_entropy(&logits, &labels, -100)).unwrap();
    let k: Vec<f32> = kernel.to_vec1().unwrap();
    let c: Vec<f32> = composed.to_vec1().unwrap();
    for (a, b) in k.iter().zip(&c) {
        assert!(
            b.is_finite() && (a - b).abs() < 1e-4,
            "kernel {a}, composed {b}"
        );
    }
}

/// A fully masked row gives zeros in the composed softmax too (candle's softmax gives NaN).
#[test]
fn composed_softmax_gives_zeros_on_a_fully_masked_row() {
    let x = Tensor::new(
        &[
            [f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
            [0.0, 1.0, 2.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let y: Vec<Vec<f32>> = ops::with_composed(|| ops::softmax_last_dim(&x))
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(y[0], vec![0.0; 3]);
    assert!((y[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
}
