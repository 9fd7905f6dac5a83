//! The quantized linear (QLoRA's base product) against its composed reference, the dense
//! product over the whole dequantized weight: forward and input gradient, in f32, bf16 and f16,
//! for NF4 (plain and double-quantized) and GGML blocks, over several tiles of rows. They
//! compute the same sums in another order, so the bounds are float rounding: 1e-5 of the
//! output's scale in f32; in half precision, two roundings of the output (ours and the
//! reference's, 2^-8 each in bf16, 2^-11 in f16) plus the reference's own half-precision sums.
mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use sft_model::ops::{quant_linear, quant_linear_composed};
use sft_model::quant::{QuantWeight, Quantize, SharedQuant};

fn weights(dtype: DType) -> Vec<(String, SharedQuant)> {
    // 4096 inputs: 64 rows per 1 MiB tile, so 160 rows are three tiles (64, 64, 32).
    let w = Tensor::randn(0f32, 0.02, (160, 4096), &Device::Cpu).unwrap();
    let mut out: Vec<(String, SharedQuant)> = Vec::new();
    for (name, how, dq) in [
        ("nf4", Quantize::Nf4, false),
        ("nf4+dq", Quantize::Nf4, true),
        ("q8_0", Quantize::Q8_0, false),
    ] {
        out.push((
            name.into(),
            Arc::new(QuantWeight::quantize(&w, how, dq, dtype).unwrap()),
        ));
    }
    for ty in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let q = QTensor::quantize(&w, ty).unwrap();
        out.push((
            format!("{ty:?}"),
            Arc::new(QuantWeight::from_qtensor(&q, None, dtype).unwrap()),
        ));
    }
    out
}

#[test]
fn forward_and_input_gradient_match_the_dense_product() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = match dtype {
            DType::F32 => 1e-5,
            DType::BF16 => 1.6e-2,
            _ => 2e-3,
        };
        for (name, w) in weights(dtype) {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 3, 4096), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, 3, 160), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Tensor| {
                let y = f(x.as_tensor());
                let loss = (y.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = loss.backward().unwrap();
                (y, g.get(x.as_tensor()).unwrap().clone())
            };
            let (y, dx) = run(&|x| quant_linear(x, &w).unwrap());
            let (y_ref, dx_ref) = run(&|x| quant_linear_composed(x, &w).unwrap());
            assert_eq!(y.dtype(), dtype);
            let scale = common::max_abs(&y_ref).max(1e-3);
            let e = max_abs_diff(&y, &y_ref) / scale;
            assert!(
                e < tol,
                "{name} {dtype:?}: forward off by {e:.2e} of its scale"
            );
            let scale = common::max_abs(&dx_ref).max(1e-3);
            let e = max_abs_diff(&dx, &dx_ref) / scale;
            assert!(e < tol, "{name} {dtype:?}: dx off by {e:.2e} of its scale");
        }
    }
}

/// A product of no rows, and an input whose width is not the weight's, are handled.
#[test]
fn empty_and_misshaped_inputs() {
    let w = &weights(DType::F32)[0].1;
    let x = Tensor::zeros((0, 4096), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(quant_linear(&x, w).unwrap().dims(), &[0, 160]);
    let bad = Tensor::zeros((2, 100), DType::F32, &Device::Cpu).unwrap();
    let e = quant_linear(&bad, w).unwrap_err().to_string();
    assert!(e.contains("in_features 4096"), "{e}");
}

/// QLoRA's fused node (the quantized base plus the adapter, with dropout) against the composed
/// form over the dequantized weight: output and the gradients of x, A and B.
#[test]
fn fused_lora_over_quantized_base_matches_the_composed_form() {
    use sft_model::ops::{lora_linear_quant, with_composed, DropoutKey, LoraDropout};
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1.6e-2 };
        let w = &weights(dtype)[1].1;
        let stand_in = Tensor::zeros((), dtype, &Device::Cpu)
            .unwrap()
            .broadcast_as((160, 4096))
            .unwrap();
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (2, 3, 4096), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let a =
            Var::from_tensor(&Tensor::randn(0f32, 0.02, (8, 4096), &Device::Cpu).unwrap()).unwrap();
        let b =
            Var::from_tensor(&Tensor::randn(0f32, 0.02, (160, 8), &Device::Cpu).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 160), &Device::Cpu).unwrap();
        let drop = LoraDropout::Key {
            key: DropoutKey { seed: 5, stream: 0 },
            p: 0.1,
        };
        let run = || {
            let y = lora_linear_quant(
                x.as_tensor(),
                &stand_in,
                w,
                a.as_tensor(),
                b.as_tensor(),
                2.0,
                drop,
            )
            .unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (y, get(&x), get(&a), get(&b))
        };
        let fused = run();
        let composed = with_composed(run);
        for (what, got, want) in [
            ("y", &fused.0, &composed.0),
            ("dx", &fused.1, &composed.1),
            ("dA", &fused.2, &composed.2),
            ("dB", &fused.3, &composed.3),
        ] {
            let e = max_abs_diff(got, want) / common::max_abs(want).max(1e-3);
            assert!(e < tol, "{dtype:?} {what}: off by {e:.2e} of its scale");
        }
    }
}
