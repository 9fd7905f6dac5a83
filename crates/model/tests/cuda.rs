//! The CUDA kernels against the CPU kernels, and training steps on a GPU against the CPU: run
//! with `--features cuda` on a machine with a GPU (each test says "skipping" and passes where
//! none is). `scripts/gpu-check` builds these executables here and runs them on a GPU machine.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::testing::f32s;
use common::{seeded, value_and_grads, with_big_stack};
use sft_model::config::LlamaConfig;
use sft_model::llama::{Activations, Inputs, Llama};
use sft_model::lora::{self, LoraConfig, Targets};
use sft_model::ops::{self, AttnMask, DropoutKey, KeyRanges, LoraDropout};

fn gpu() -> Option<Device> {
    match sft_model::device::open("cuda") {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no GPU ({e})");
            None
        }
    }
}

/// max |a - b| / max |b| (and both finite).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (f32s(a), f32s(b));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite GPU values");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-20) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// The same op on the CPU and the GPU (inputs rounded to `dt` once, on the CPU): outputs and
/// gradients within `tol`, dtypes equal.
fn same(
    name: &str,
    gpu: &Device,
    dt: DType,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    vars: &[usize],
    tol: f64,
) {
    let cpu_in: Vec<Tensor> = inputs
        .iter()
        .map(|t| {
            if t.dtype().is_float() {
                t.to_dtype(dt).unwrap()
            } else {
                t.clone()
            }
        })
        .collect();
    let gpu_in: Vec<Tensor> = cpu_in.iter().map(|t| t.to_device(gpu).unwrap()).collect();
    let (yc, gc) = value_and_grads(f, &cpu_in, vars, 77);
    let (yg, gg) = value_and_grads(f, &gpu_in, vars, 77);
    assert_eq!(yc.dtype(), yg.dtype(), "{name} {dt:?}: dtype");
    let e = rel(&yg, &yc);
    println!("{name} {dt:?}: output {e:.2e}");
    assert!(e < tol, "{name} {dt:?}: outputs differ by {e}");
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        let e = rel(a, b);
        println!("{name} {dt:?}: gradient {i} {e:.2e}");
        assert!(e < tol, "{name} {dt:?}: gradient {i} differs by {e}");
    }
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 3e-2,
    }
}

#[test]
fn elementwise_and_row_ops_match_the_cpu() {
    let Some(g) = gpu() else { return };
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let t = tol(dt);
        let w = (seeded(&[4096], 2, 0.5) + 1.0).unwrap();
        same(
            "rms_norm",
            &g,
            dt,
            &|x| ops::rms_norm(&x[0], &x[1], 1e-5),
            &[seeded(&[3, 7, 4096], 1, 2.0), w],
            &[0, 1],
            t,
        );
        same(
            "softmax",
            &g,
            dt,
            &|x| ops::softmax_last_dim(&x[0]),
            &[seeded(&[5, 1000], 3, 4.0)],
            &[0],
            t,
        );
        // rope on the transpose of a (b, t, h, d) projection, shared and per-row tables
        let ang = seeded(&[6, 32], 4, 3.0);
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        same(
            "rope",
            &g,
            dt,
            &|x| ops::rope(&x[0].transpose(1, 2)?, &x[1], &x[2]),
            &[seeded(&[2, 6, 3, 64], 5, 1.0), c, s],
            &[0],
            t,
        );
        let ang = seeded(&[2, 6, 32], 6, 3.0);
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        same(
            "rope per row",
            &g,
            dt,
            &|x| ops::rope(&x[0], &x[1], &x[2]),
            &[seeded(&[2, 3, 6, 64], 7, 1.0), c, s],
            &[0],
            t,
        );
        same(
            "silu_mul",
            &g,
            dt,
            &|x| ops::silu_mul(&x[0], &x[1]),
            &[seeded(&[4, 3000], 8, 4.0), seeded(&[4, 3000], 9, 1.0)],
            &[0, 1],
            t,
        );
        same(
            "frozen_linear",
            &g,
            dt,
            &|x| ops::frozen_linear(&x[0], &x[1]),
            &[seeded(&[2, 33, 256], 10, 1.0), seeded(&[96, 256], 11, 0.1)],
            &[0],
            t,
        );
        let labels_u32 = Tensor::new(&[5u32, 0, 999, 17, 400], &Device::Cpu).unwrap();
        let labels_i64 = Tensor::new(&[5i64, -100, 999, 17, -100], &Device::Cpu).unwrap();
        for labels in [labels_u32, labels_i64] {
            let lab = labels.clone();
            same(
                "cross_entropy",
                &g,
                dt,
                &move |x| {
                    let l = lab.to_device(x[0].device())?;
                    ops::cross_entropy(&x[0], &l, -100)
                },
                &[seeded(&[5, 1000], 12, 6.0)],
                &[0],
                t.max(1e-3),
            );
        }
    }
}

#[test]
fn dropout_masks_are_the_same_on_both_devices() {
    let Some(g) = gpu() else { return };
    let key = DropoutKey {
        seed: 0xfeed_beef_1234,
        stream: 3,
    };
    for n in [1usize, 7, 4096, 100_003] {
        let c = ops::dropout_mask(key, &[n], 0.1, DType::F32, &Device::Cpu).unwrap();
        let d = ops::dropout_mask(key, &[n], 0.1, DType::F32, &g).unwrap();
        assert_eq!(f32s(&c), f32s(&d), "mask of {n}");
    }
}

#[test]
fn lora_linear_matches_the_cpu_with_device_drawn_dropout() {
    let Some(g) = gpu() else { return };
    let key = DropoutKey {
        seed: 42,
        stream: 9,
    };
    for dt in [DType::F32, DType::BF16] {
        let x = seeded(&[2, 37, 256], 1, 1.0).to_dtype(dt).unwrap();
        let w = seeded(&[192, 256], 2, 0.1).to_dtype(dt).unwrap();
        let a = seeded(&[8, 256], 3, 0.1);
        let b = seeded(&[192, 8], 4, 0.1);
        let f = |t: &[Tensor]| {
            ops::lora_linear_with(
                &t[0],
                &t[1],
                &t[2],
                &t[3],
                2.0,
                LoraDropout::Key { key, p: 0.1 },
                (None, None),
            )
        };
        let cpu = [x.clone(), w.clone(), a.clone(), b.clone()];
        let dev: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&g).unwrap()).collect();
        let (yc, gc) = value_and_grads(&f, &cpu, &[0, 2, 3], 77);
        let (yg, gg) = value_and_grads(&f, &dev, &[0, 2, 3], 77);
        let e = rel(&yg, &yc);
        println!("lora_linear {dt:?}: output {e:.2e}");
        assert!(e < tol(dt), "lora_linear {dt:?}: {e}");
        for (i, (p, q)) in gg.iter().zip(&gc).enumerate() {
            let e = rel(p, q);
            println!("lora_linear {dt:?}: gradient {i} {e:.2e}");
            assert!(
                e < tol(dt),
                "lora_linear {dt:?}: gradient {i} differs by {e}"
            );
        }
    }
}

/// The flash kernels against the CPU's (f32 arithmetic on the same bf16 or f16 inputs):
/// GQA, several and partial tiles, head widths 64 and 128, padded causal ranges, packed
/// ranges, and a decoding step without a mask.
#[test]
fn attention_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    for dt in [DType::BF16, DType::F16] {
        for hd in [64usize, 128] {
            let (b, nh, nkv, t) = (2, 8, 2, 300);
            let valid = vec![vec![true; t], (0..t).map(|i| i >= 77).collect::<Vec<_>>()];
            let segs: Vec<Vec<u32>> = vec![
                (0..t)
                    .map(|i| 1 + (i >= 100) as u32 + (i >= 230) as u32)
                    .collect(),
                (0..t)
                    .map(|i| if i < 290 { 1 + (i / 64) as u32 } else { 0 })
                    .collect(),
            ];
            for (what, valid_or_segs) in [("padded", Ok(valid)), ("packed", Err(segs))] {
                let mk = |dev: &Device| -> AttnMask {
                    AttnMask::Ranges(match &valid_or_segs {
                        Ok(v) => KeyRanges::causal(v, 0, t, dev).unwrap().unwrap(),
                        Err(s) => KeyRanges::packed(s, dev).unwrap(),
                    })
                };
                let (mc, mg) = (mk(&Device::Cpu), mk(&g));
                let q = seeded(&[b, nh, t, hd], 1, 1.0).to_dtype(dt).unwrap();
                let k = seeded(&[b, nkv, t, hd], 2, 1.0).to_dtype(dt).unwrap();
                let v = seeded(&[b, nkv, t, hd], 3, 1.0).to_dtype(dt).unwrap();
                let scale = 1.0 / (hd as f64).sqrt();
                let fc = |x: &[Tensor]| ops::attention_with(&x[0], &x[1], &x[2], Some(&mc), scale);
                let fg = |x: &[Tensor]| ops::attention_with(&x[0], &x[1], &x[2], Some(&mg), scale);
                let cpu = [q.clone(), k.clone(), v.clone()];
                let dev: Vec<Tensor> = cpu.iter().map(|x| x.to_device(&g).unwrap()).collect();
                let (yc, gc) = value_and_grads(&fc, &cpu, &[0, 1, 2], 77);
                let (yg, gg) = value_and_grads(&fg, &dev, &[0, 1, 2], 77);
                let e = rel(&yg, &yc);
                println!("attention {what} hd {hd} {dt:?}: output {e:.2e}");
                assert!(e < 2e-2, "attention {what} hd {hd} {dt:?}: output {e}");
                for (i, (p, q)) in gg.iter().zip(&gc).enumerate() {
                    let e = rel(p, q);
                    println!("attention {what} hd {hd} {dt:?}: gradient {i} {e:.2e}");
                    assert!(
                        e < 3e-2,
                        "attention {what} hd {hd} {dt:?}: gradient {i}: {e}"
                    );
                }
            }
            // A decoding step: one query over 137 cached keys, no mask.
            let q = seeded(&[3, nh_of(hd), 1, hd], 4, 1.0).to_dtype(dt).unwrap();
            let k = seeded(&[3, 2, 137, hd], 5, 1.0).to_dtype(dt).unwrap();
            let v = seeded(&[3, 2, 137, hd], 6, 1.0).to_dtype(dt).unwrap();
            let yc = ops::attention(&q, &k, &v, None, 0.1).unwrap();
            let yg = ops::attention(
                &q.to_device(&g).unwrap(),
                &k.to_device(&g).unwrap(),
                &v.to_device(&g).unwrap(),
                None,
                0.1,
            )
            .unwrap();
            let e = rel(&yg, &yc);
            println!("attention decode hd {hd} {dt:?}: {e:.2e}");
            assert!(e < 2e-2, "attention decode hd {hd} {dt:?}: {e}");
        }
    }
}

fn nh_of(hd: usize) -> usize {
    if hd == 64 {
        6
    } else {
        4
    }
}

fn tiny_config() -> LlamaConfig {
    // head_dim 64: the flash kernels run.
    LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "max_position_embeddings": 512, "eos_token_id": 2}"#,
    )
    .unwrap()
}

/// Three AdamW steps of LoRA (dropout on) or full fine-tuning on `dev` in `dt`; the losses.
fn three_steps(dev: &Device, dt: DType, full: bool, ckpt: bool) -> Vec<f64> {
    let cfg = tiny_config();
    let w = sft_model::llama::random_weights(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    let w = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dt).unwrap().to_device(dev).unwrap()))
        .collect();
    let mut m = Llama::from_weights(&cfg, w)
        .unwrap()
        .with_activations(Activations::Weights)
        .unwrap();
    m.set_gradient_checkpointing(ckpt);
    let vars = if full {
        lora::make_all_trainable(&mut m).unwrap()
    } else {
        let targets = Targets::from_names(&["all-linear"]).unwrap();
        let adapter = lora::apply_lora(&mut m, &LoraConfig::new(8, 16.0, 0.1, targets)).unwrap();
        // Nonzero B, the same on every device.
        for (i, (n, v)) in adapter.trainable().iter().enumerate() {
            if n.contains("lora_B") {
                let r = seeded(v.dims(), 100 + i as u64, 0.02)
                    .to_device(dev)
                    .unwrap();
                v.set(&r).unwrap();
            }
        }
        adapter.trainable()
    };
    if !full {
        // The A matrices drawn on the host the same way on every device.
        for (i, (n, v)) in vars.iter().enumerate() {
            if n.contains("lora_A") {
                let r = seeded(v.dims(), 200 + i as u64, 0.05)
                    .to_device(dev)
                    .unwrap();
                v.set(&r).unwrap();
            }
        }
    }
    let specs: Vec<sft_optim::ParamSpec> = sft_optim::ParamSpec::all(&vars);
    let mut opt = sft_optim::AdamW::new(specs.clone(), Default::default()).unwrap();
    let (rows, t) = (2, 96);
    let ids: Vec<u32> = (0..rows * t)
        .map(|i| ((i * 37 + 11) % 997) as u32 + 3)
        .collect();
    let mut mask = vec![1u8; rows * t];
    mask[t + 80..].fill(0);
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .map(|(&i, &m)| if m == 1 { i as i64 } else { -100 })
        .collect();
    let mut losses = vec![];
    for step in 0..3u64 {
        if !full {
            lora::set_training(&mut m, Some(1000 + step));
        }
        let inp = Inputs {
            ids: &ids,
            rows,
            seq_len: t,
            attention_mask: Some(&mask),
            segment_ids: None,
        };
        let out = m.loss_inputs(&inp, &labels).unwrap();
        let loss = out.mean().unwrap();
        losses.push(
            loss.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        );
        let store = m.backward(&loss).unwrap();
        let mut acc = sft_optim::GradAccumulator::new();
        acc.add(&specs, &store, 1).unwrap();
        let mut grads = acc.finish().unwrap();
        sft_optim::clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.step(&grads, 1e-3).unwrap();
    }
    losses
}

/// Three LoRA steps and three full steps of a tiny model on the GPU (f32 and bf16, with and
/// without gradient checkpointing) against the CPU in f32: f32 losses within 1e-4 relative,
/// bf16 within 2e-2.
#[test]
fn training_steps_on_the_gpu_match_the_cpu() {
    let Some(g) = gpu() else { return };
    with_big_stack(move || {
        for full in [false, true] {
            let reference = three_steps(&Device::Cpu, DType::F32, full, false);
            for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
                for ckpt in [false, true] {
                    let got = three_steps(&g, dt, full, ckpt);
                    println!("full {full} {dt:?} ckpt {ckpt}: {got:?} (cpu f32 {reference:?})");
                    for (a, b) in got.iter().zip(&reference) {
                        assert!(
                            (a - b).abs() < tol * b.abs(),
                            "full {full} {dt:?} ckpt {ckpt}: losses {got:?} vs {reference:?}"
                        );
                    }
                }
            }
        }
    });
}
