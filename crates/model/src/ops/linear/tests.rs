use candle_core::{DType, Tensor};

use super::*;

/// The f32 backward of the LoRA linear (its element-wise steps run in parallel, off
/// candle) agrees with the f64 one (candle's ops), dropout mask included.
#[test]
fn lora_backward_in_f32_matches_f64() {
    let dev = candle_core::Device::Cpu;
    let (m, k, n, r) = (6, 48, 40, 4);
    let x = Tensor::randn(0f64, 1.0, (2, m / 2, k), &dev).unwrap();
    let w = Tensor::randn(0f64, 0.1, (n, k), &dev).unwrap();
    let a = Tensor::randn(0f64, 0.1, (r, k), &dev).unwrap();
    let b = Tensor::randn(0f64, 0.1, (n, r), &dev).unwrap();
    let keep: Vec<f64> = (0..m * k)
        .map(|i| [0.0, 1.25][(i * 7 % 5 != 0) as usize])
        .collect();
    let mask = Tensor::from_vec(keep, (2, m / 2, k), &dev).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (2, m / 2, n), &dev).unwrap();
    let grads = |dt: DType| -> Vec<Vec<f64>> {
        let v = |t: &Tensor| candle_core::Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap();
        let (xv, av, bv) = (v(&x), v(&a), v(&b));
        let y = lora_linear(
            xv.as_tensor(),
            &w.to_dtype(dt).unwrap(),
            av.as_tensor(),
            bv.as_tensor(),
            2.0,
            Some(&mask.to_dtype(dt).unwrap()),
        )
        .unwrap();
        let g = (y * probe.to_dtype(dt).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [xv, av, bv]
            .iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    for (g32, g64) in grads(DType::F32).iter().zip(grads(DType::F64)) {
        for (p, q) in g32.iter().zip(&g64) {
            assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}

/// A kept f32 pack serves f32 products of up to PACKED_F32_MAX_ROWS rows (frozen and LoRA
/// linears, forward and input gradient) with candle's results to rounding; longer products
/// go to candle unchanged (bit-identical).
#[test]
fn f32_packs_serve_short_products() {
    let dev = candle_core::Device::Cpu;
    let w = Tensor::randn(0f32, 0.1, (40, 64), &dev).unwrap();
    let a = Tensor::randn(0f32, 0.1, (4, 64), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, (40, 4), &dev).unwrap();
    let pack = WeightPack::new(&w).unwrap();
    assert_eq!(pack.is_some(), WeightPack::supported(DType::F32));
    assert!(WeightPack::new_for_grad(&w).unwrap().is_none());
    let vals = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let close = |x: &[f32], y: &[f32], what: &str| {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() < 1e-5 * (1.0 + q.abs()), "{what}: {p} vs {q}");
        }
    };
    for rows in [3, PACKED_F32_MAX_ROWS + 1] {
        let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
        let plain = vals(frozen_linear(&x, &w).unwrap());
        let packed = vals(frozen_linear_packed(&x, &w, (pack.as_ref(), None)).unwrap());
        let lora = vals(lora_linear(&x, &w, &a, &b, 2.0, None).unwrap());
        let lora_packed =
            vals(lora_linear_packed(&x, &w, &a, &b, 2.0, None, (pack.as_ref(), None)).unwrap());
        if rows > PACKED_F32_MAX_ROWS {
            assert_eq!(plain, packed, "long products stay with candle");
            assert_eq!(lora, lora_packed);
        } else {
            close(&packed, &plain, "frozen_linear");
            close(&lora_packed, &lora, "lora_linear");
        }
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let r = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
        let dx = |packs: Packs<'_>| {
            let y = frozen_linear_packed(xv.as_tensor(), &w, packs).unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            vals(g.get(xv.as_tensor()).unwrap().clone())
        };
        close(
            &dx((pack.as_ref(), None)),
            &dx((None, None)),
            "input gradient",
        );
    }
}

/// A packed weight gives bit-identical results to packing per call, for bf16 and for f32
/// activations (the CPU's mixed mode), in the frozen and the LoRA linear.
#[test]
fn packed_weights_give_the_same_products() {
    let dev = candle_core::Device::Cpu;
    let w = Tensor::randn(0f32, 0.1, (40, 64), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let a = Tensor::randn(0f32, 0.1, (4, 64), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, (40, 4), &dev).unwrap();
    let pack = WeightPack::new(&w).unwrap();
    assert_eq!(pack.is_some(), WeightPack::supported(DType::BF16));
    for dt in [DType::F32, DType::BF16] {
        let x = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let bits = |t: Tensor| crate::testing::f32s(&t);
        let plain = bits(frozen_linear(&x, &w).unwrap());
        let packed = bits(frozen_linear_packed(&x, &w, (pack.as_ref(), None)).unwrap());
        assert_eq!(plain, packed, "frozen_linear {dt:?}");
        // The backward's pack: dx through a Var input.
        let grad_pack = WeightPack::new_for_grad(&w).unwrap();
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 5, 40), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let dx = |packs: Packs<'_>| {
            let y = frozen_linear_packed(xv.as_tensor(), &w, packs).unwrap();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            bits(g.get(xv.as_tensor()).unwrap().clone())
        };
        assert_eq!(
            dx((None, None)),
            dx((pack.as_ref(), grad_pack.as_ref())),
            "frozen_linear backward {dt:?}"
        );
        let plain = bits(lora_linear(&x, &w, &a, &b, 2.0, None).unwrap());
        let packed =
            bits(lora_linear_packed(&x, &w, &a, &b, 2.0, None, (pack.as_ref(), None)).unwrap());
        assert_eq!(plain, packed, "lora_linear {dt:?}");
    }
}

/// Every CPU kernel path this machine has (what `SFT_CPU_KERNELS` chooses, set per thread
/// through `with_kernels`) runs the frozen and the LoRA linear, forward and backward, in f32,
/// bf16 and mixed (f32 x, bf16 W), within rounding of an f64 reference, with the weight packed
/// once and per call.
#[test]
fn every_cpu_kernel_path_runs_the_linears_forward_and_backward() {
    use crate::cpu_features::{features, with_kernels, Kernels};
    let dev = candle_core::Device::Cpu;
    // Odd sizes: row, column and k tails for every kernel.
    let (m, k, n, r) = (2 * 13, 70, 45, 4);
    let x = Tensor::randn(0f64, 1.0, (2, m / 2, k), &dev).unwrap();
    let w = Tensor::randn(0f64, 0.1, (n, k), &dev).unwrap();
    let a = Tensor::randn(0f64, 0.1, (r, k), &dev).unwrap();
    let b = Tensor::randn(0f64, 0.1, (n, r), &dev).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (2, m / 2, n), &dev).unwrap();
    let f64s = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // y, then the gradients of sum(y * probe) for x (frozen: only x), A and B.
    let run = |x: &Tensor, w: &Tensor, lora: bool, packs: Packs<'_>| -> Vec<Vec<f64>> {
        let xv = candle_core::Var::from_tensor(x).unwrap();
        // f32 adapters, f64 for the f64 reference.
        let adt = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let av = candle_core::Var::from_tensor(&a.to_dtype(adt).unwrap()).unwrap();
        let bv = candle_core::Var::from_tensor(&b.to_dtype(adt).unwrap()).unwrap();
        let (xt, at, bt) = (xv.as_tensor(), av.as_tensor(), bv.as_tensor());
        let y = if lora {
            lora_linear_packed(xt, w, at, bt, 2.0, None, packs).unwrap()
        } else {
            frozen_linear_packed(xt, w, packs).unwrap()
        };
        let loss = (y.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let mut out = vec![f64s(&y), f64s(g.get(xt).unwrap())];
        if lora {
            out.push(f64s(g.get(at).unwrap()));
            out.push(f64s(g.get(bt).unwrap()));
        }
        out
    };
    let paths = Kernels::all_on(&features());
    assert!(paths.len() >= 2 || !features().avx2_fma);
    for kernels in paths {
        for (xdt, wdt) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F32, DType::BF16),
        ] {
            let (xd, wd) = (x.to_dtype(xdt).unwrap(), w.to_dtype(wdt).unwrap());
            // The reference sees the inputs as rounded to their dtypes (and x to bf16 where
            // the weight is bf16: the products round it).
            let xr = xd.to_dtype(wdt).unwrap().to_dtype(DType::F64).unwrap();
            let wr = wd.to_dtype(DType::F64).unwrap();
            let want = {
                let want_run = |lora| run(&xr, &wr, lora, (None, None));
                [want_run(false), want_run(true)]
            };
            let tol = if xdt == DType::F32 && wdt == DType::F32 {
                1e-4
            } else {
                2e-2
            };
            for packed in [false, true] {
                let got = with_kernels(kernels, || {
                    let fwd = WeightPack::new(&wd).unwrap();
                    let bwd = WeightPack::new_for_grad(&wd).unwrap();
                    // The forced kernels are the ones that run: a pack exactly where they have
                    // a kernel for the weight's dtype.
                    let has = match wdt {
                        DType::F32 => kernels.f32 != crate::cpu_features::F32Kernel::Portable,
                        _ => kernels.bf16 != crate::cpu_features::Bf16Kernel::Portable,
                    };
                    assert_eq!(fwd.is_some(), has, "{kernels:?} {wdt:?}");
                    let packs = if packed {
                        (fwd.as_ref(), bwd.as_ref())
                    } else {
                        (None, None)
                    };
                    [run(&xd, &wd, false, packs), run(&xd, &wd, true, packs)]
                });
                for (lora, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (what, (gv, wv)) in g.iter().zip(w).enumerate() {
                        let scale = wv.iter().fold(1f64, |s, v| s.max(v.abs()));
                        for (p, q) in gv.iter().zip(wv) {
                            assert!(
                                (p - q).abs() < tol * scale,
                                "{kernels:?} x {xdt:?} W {wdt:?} packed {packed} lora {lora} \
                                 output {what}: {p} vs {q}"
                            );
                        }
                    }
                }
            }
        }
    }
}
