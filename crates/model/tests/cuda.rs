//! The CUDA kernels against the CPU kernels, and training steps through the CUDA path against
//! the CPU: on a GPU where there is one (`--features cuda`; `scripts/gpu-check` builds these
//! tests here and runs them on a GPU machine), else on the emulated GPU, which runs the same
//! `.cu` sources and the same launch code on the CPU (`SFT_KERNELS=emu`). Every kernel and
//! every launch of `ops` runs here in the default suite.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::testing::f32s;
use common::{seeded, value_and_grads, with_big_stack};
use sft_model::config::LlamaConfig;
use sft_model::llama::{Activations, Inputs, Llama};
use sft_model::lora::{self, LoraConfig, Targets};
use sft_model::ops::{self, AttnMask, DropoutKey, KeyRanges, LoraDropout};

/// Where the CUDA path runs: a GPU, or the emulated GPU on CPU tensors.
#[derive(Clone)]
enum Target {
    Gpu(Device),
    Emu,
}

impl Target {
    /// The GPU when this build has CUDA and a GPU opens, else the emulated GPU.
    fn get() -> Target {
        if cfg!(feature = "cuda") {
            match sft_model::device::open("cuda") {
                Ok(d) => return Target::Gpu(d),
                Err(e) => eprintln!("no GPU ({e}): the emulated GPU runs the kernels"),
            }
        }
        Target::Emu
    }

    fn device(&self) -> Device {
        match self {
            Target::Gpu(d) => d.clone(),
            Target::Emu => Device::Cpu,
        }
    }

    /// Runs `f` with this thread's ops on the target.
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Target::Gpu(_) => f(),
            Target::Emu => ops::with_emulated(f),
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
    target: &Target,
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
    let gpu_in: Vec<Tensor> = cpu_in
        .iter()
        .map(|t| t.to_device(&target.device()).unwrap())
        .collect();
    let (yc, gc) = value_and_grads(f, &cpu_in, vars, 77);
    let (yg, gg) = target.run(|| value_and_grads(f, &gpu_in, vars, 77));
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
    let g = Target::get();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let t = tol(dt);
        // Rows of 4096 and 3000: longer than one block's threads (1024), so each thread loops.
        // 130 rows: the weight gradient sums three chunks of 64 rows.
        for (rows, d) in [(21usize, 4096usize), (5, 3000), (130, 40)] {
            let w = (seeded(&[d], 2, 0.5) + 1.0).unwrap();
            same(
                &format!("rms_norm ({rows} x {d})"),
                &g,
                dt,
                &|x| ops::rms_norm(&x[0], &x[1], 1e-5),
                &[seeded(&[rows, d], 1, 2.0), w],
                &[0, 1],
                t,
            );
            same(
                &format!("softmax ({rows} x {d})"),
                &g,
                dt,
                &|x| ops::softmax_last_dim(&x[0]),
                &[seeded(&[rows, d], 3, 4.0)],
                &[0],
                t,
            );
        }
        // rope on the transpose of a (b, t, h, d) projection, shared and per-row tables, for
        // both head widths the models use
        for hd in [64usize, 128] {
            let ang = seeded(&[6, hd / 2], 4, 3.0);
            let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
            same(
                &format!("rope hd {hd}"),
                &g,
                dt,
                &|x| ops::rope(&x[0].transpose(1, 2)?, &x[1], &x[2]),
                &[seeded(&[2, 6, 3, hd], 5, 1.0), c, s],
                &[0],
                t,
            );
        }
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
            &[seeded(&[4, 3001], 8, 4.0), seeded(&[4, 3001], 9, 1.0)],
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
        // A small vocabulary, and one of SmolLM2's size (49152: 48 elements per thread).
        for v in [1000usize, 49_152] {
            let labels_u32 = Tensor::new(&[5u32, 0, 999, 17, 400], &Device::Cpu).unwrap();
            let labels_i64 = Tensor::new(&[5i64, -100, 999, 17, -100], &Device::Cpu).unwrap();
            for labels in [labels_u32, labels_i64] {
                let lab = labels.clone();
                same(
                    &format!(
                        "cross_entropy (vocabulary {v}, {:?} labels)",
                        labels.dtype()
                    ),
                    &g,
                    dt,
                    &move |x| {
                        let l = lab.to_device(x[0].device())?;
                        ops::cross_entropy(&x[0], &l, -100)
                    },
                    &[seeded(&[5, v], 12, 6.0)],
                    &[0],
                    t.max(1e-3),
                );
            }
        }
    }
}

#[test]
fn dropout_masks_are_the_same_on_both_devices() {
    let g = Target::get();
    let key = DropoutKey {
        seed: 0xfeed_beef_1234,
        stream: 3,
    };
    for n in [1usize, 7, 4096, 100_003] {
        let c = ops::dropout_mask(key, &[n], 0.1, DType::F32, &Device::Cpu).unwrap();
        let d = g
            .run(|| ops::dropout_mask(key, &[n], 0.1, DType::F32, &g.device()))
            .unwrap();
        assert_eq!(f32s(&c), f32s(&d), "mask of {n}");
    }
}

/// The LoRA linear with each dropout mode (none, a mask drawn inside the kernels from its key,
/// a given mask), f32 and half activations, rows that are and are not multiples of 4.
#[test]
fn lora_linear_matches_the_cpu_with_each_dropout() {
    let g = Target::get();
    let key = DropoutKey {
        seed: 42,
        stream: 9,
    };
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for rows in [37usize, 40] {
            let given =
                ops::dropout_mask(key, &[2, rows, 256], 0.2, DType::F32, &Device::Cpu).unwrap();
            let modes = [
                ("off", LoraDropout::Off),
                ("key", LoraDropout::Key { key, p: 0.1 }),
                ("mask", LoraDropout::Mask(&given)),
            ];
            for (mode, dropout) in modes {
                let x = seeded(&[2, rows, 256], 1, 1.0).to_dtype(dt).unwrap();
                let w = seeded(&[192, 256], 2, 0.1).to_dtype(dt).unwrap();
                let a = seeded(&[8, 256], 3, 0.1);
                let b = seeded(&[192, 8], 4, 0.1);
                let f = |t: &[Tensor]| {
                    let moved;
                    let dropout = match &dropout {
                        LoraDropout::Mask(m) => {
                            moved = m.to_device(t[0].device())?;
                            LoraDropout::Mask(&moved)
                        }
                        d => *d,
                    };
                    ops::lora_linear_with(&t[0], &t[1], &t[2], &t[3], 2.0, dropout, (None, None))
                };
                let cpu = [x.clone(), w.clone(), a.clone(), b.clone()];
                let dev: Vec<Tensor> = cpu
                    .iter()
                    .map(|t| t.to_device(&g.device()).unwrap())
                    .collect();
                let (yc, gc) = value_and_grads(&f, &cpu, &[0, 2, 3], 77);
                let (yg, gg) = g.run(|| value_and_grads(&f, &dev, &[0, 2, 3], 77));
                let what = format!("lora_linear {dt:?} rows {rows} dropout {mode}");
                let e = rel(&yg, &yc);
                println!("{what}: output {e:.2e}");
                assert!(e < tol(dt), "{what}: {e}");
                for (i, (p, q)) in gg.iter().zip(&gc).enumerate() {
                    let e = rel(p, q);
                    println!("{what}: gradient {i} {e:.2e}");
                    assert!(e < tol(dt), "{what}: gradient {i} differs by {e}");
                }
            }
        }
    }
}

/// Attention forward and backward on `g` against the CPU kernels (f32 arithmetic on the same
/// bf16 or f16 inputs).
#[allow(clippy::too_many_arguments)]
fn attention_case(
    g: &Target,
    what: &str,
    dt: DType,
    (b, nh, nkv, t, s, hd): (usize, usize, usize, usize, usize, usize),
    mk: &dyn Fn(&Device) -> Option<AttnMask>,
) {
    let (mc, mg) = (mk(&Device::Cpu), mk(&g.device()));
    let q = seeded(&[b, nh, t, hd], 1, 1.0).to_dtype(dt).unwrap();
    let k = seeded(&[b, nkv, s, hd], 2, 1.0).to_dtype(dt).unwrap();
    let v = seeded(&[b, nkv, s, hd], 3, 1.0).to_dtype(dt).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    let fc = |x: &[Tensor]| ops::attention_with(&x[0], &x[1], &x[2], mc.as_ref(), scale);
    let fg = |x: &[Tensor]| ops::attention_with(&x[0], &x[1], &x[2], mg.as_ref(), scale);
    let cpu = [q, k, v];
    let dev: Vec<Tensor> = cpu
        .iter()
        .map(|x| x.to_device(&g.device()).unwrap())
        .collect();
    let (yc, gc) = value_and_grads(&fc, &cpu, &[0, 1, 2], 77);
    let (yg, gg) = g.run(|| value_and_grads(&fg, &dev, &[0, 1, 2], 77));
    let what = format!("attention {what} hd {hd} {dt:?} (b {b}, heads {nh}/{nkv}, t {t}, s {s})");
    let e = rel(&yg, &yc);
    println!("{what}: output {e:.2e}");
    assert!(e < 2e-2, "{what}: output {e}");
    for (i, (p, q)) in gg.iter().zip(&gc).enumerate() {
        let e = rel(p, q);
        println!("{what}: gradient {i} {e:.2e}");
        assert!(e < 3e-2, "{what}: gradient {i}: {e}");
    }
}

/// Causal ranges over `t` positions, the second row padded at its start.
fn padded_ranges(t: usize) -> impl Fn(&Device) -> Option<AttnMask> {
    move |dev: &Device| {
        let valid = vec![(0..t).map(|i| i >= 7).collect::<Vec<_>>()];
        Some(AttnMask::Ranges(
            KeyRanges::causal(&valid, 0, t, dev).unwrap().unwrap(),
        ))
    }
}

/// The flash kernels: GQA, several and partial tiles (t a multiple of 64 and not), head widths
/// 64 and 128, padded causal ranges (padding rows), packed ranges, keys longer than queries
/// (a chunk after a cached past, with and without ranges), and a decoding step.
#[test]
fn attention_kernels_match_the_cpu() {
    let g = Target::get();
    for dt in [DType::BF16, DType::F16] {
        for hd in [64usize, 128] {
            for t in [128usize, 300] {
                let (b, nh, nkv) = (2, 8, 2);
                let padded = |dev: &Device| {
                    let valid = vec![vec![true; t], (0..t).map(|i| i >= 77).collect::<Vec<_>>()];
                    Some(AttnMask::Ranges(
                        KeyRanges::causal(&valid, 0, t, dev).unwrap().unwrap(),
                    ))
                };
                attention_case(&g, "padded", dt, (b, nh, nkv, t, t, hd), &padded);
                let packed = |dev: &Device| {
                    let segs: Vec<Vec<u32>> = vec![
                        (0..t)
                            .map(|i| 1 + (i >= 100) as u32 + (i >= 230) as u32)
                            .collect(),
                        (0..t)
                            .map(|i| if i + 10 < t { 1 + (i / 64) as u32 } else { 0 })
                            .collect(),
                    ];
                    Some(AttnMask::Ranges(KeyRanges::packed(&segs, dev).unwrap()))
                };
                attention_case(&g, "packed", dt, (b, nh, nkv, t, t, hd), &packed);
            }
            // 70 queries after 60 cached positions: keys longer than queries, causal ranges
            // with a past, and without a mask (every query sees every key).
            let (b, nh, nkv, t, past) = (2, 4, 2, 70, 60);
            let chunk = |dev: &Device| {
                let valid = vec![
                    vec![true; past + t],
                    (0..past + t).map(|i| i >= 9).collect(),
                ];
                Some(AttnMask::Ranges(
                    KeyRanges::causal(&valid, past, t, dev).unwrap().unwrap(),
                ))
            };
            attention_case(
                &g,
                "after a past",
                dt,
                (b, nh, nkv, t, past + t, hd),
                &chunk,
            );
            attention_case(&g, "unmasked", dt, (b, nh, nkv, t, past + t, hd), &|_| None);
            // As many K/V heads as query heads (no grouping).
            attention_case(
                &g,
                "ungrouped",
                dt,
                (1, 3, 3, 65, 65, hd),
                &padded_ranges(65),
            );
            // A decoding step: one query over 137 cached keys, no mask.
            let q = seeded(&[3, nh_of(hd), 1, hd], 4, 1.0).to_dtype(dt).unwrap();
            let k = seeded(&[3, 2, 137, hd], 5, 1.0).to_dtype(dt).unwrap();
            let v = seeded(&[3, 2, 137, hd], 6, 1.0).to_dtype(dt).unwrap();
            let yc = ops::attention(&q, &k, &v, None, 0.1).unwrap();
            let dev = g.device();
            let yg = g
                .run(|| {
                    ops::attention(
                        &q.to_device(&dev)?,
                        &k.to_device(&dev)?,
                        &v.to_device(&dev)?,
                        None,
                        0.1,
                    )
                })
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

/// Three AdamW steps of LoRA (dropout on) or full fine-tuning on `dev` in `dt`: the losses and
/// the trained parameters (in f32, by name).
fn three_steps(
    dev: &Device,
    dt: DType,
    full: bool,
    ckpt: bool,
) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
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
    let params = vars
        .iter()
        .map(|(n, v)| (n.clone(), f32s(v.as_tensor())))
        .collect();
    (losses, params)
}

/// The largest difference between two runs' parameters.
fn params_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let mut worst = 0f64;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(va.iter().all(|x| x.is_finite()), "{na}: non-finite");
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        worst = worst.max(d);
    }
    worst
}

/// Three LoRA steps and three full steps of a tiny model through the CUDA path (f32 and bf16,
/// with and without gradient checkpointing).
/// - On a GPU, against the CPU in f32: f32 losses within 1e-4 relative, bf16 within 2e-2.
/// - On the emulated GPU, against the CPU kernels in the same dtype and dtype plan, which
///   differ from the CUDA kernels only in summation order and where they round: losses within
///   LOSS_TOL, parameters within PARAM_TOL (see the constants).
#[test]
fn training_steps_through_the_cuda_path_match_the_cpu() {
    let g = Target::get();
    with_big_stack(move || {
        for full in [false, true] {
            let reference = three_steps(&Device::Cpu, DType::F32, full, false);
            for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
                let same_dtype = three_steps(&Device::Cpu, dt, full, false);
                for ckpt in [false, true] {
                    let got = g.run(|| three_steps(&g.device(), dt, full, ckpt));
                    let what = format!("full {full} {dt:?} ckpt {ckpt}");
                    println!(
                        "{what}: {:?} (cpu {dt:?} {:?}, cpu f32 {:?})",
                        got.0, same_dtype.0, reference.0
                    );
                    let (want, tol, ptol) = match g {
                        Target::Gpu(_) => (&reference, tol, f64::INFINITY),
                        Target::Emu => (&same_dtype, loss_tol(dt), param_tol(dt)),
                    };
                    for (a, b) in got.0.iter().zip(&want.0) {
                        assert!(
                            (a - b).abs() < tol * b.abs(),
                            "{what}: losses {:?} vs {:?}",
                            got.0,
                            want.0
                        );
                    }
                    let e = params_diff(&got.1, &want.1);
                    println!("{what}: parameters differ by {e:.2e} at most");
                    assert!(e < ptol, "{what}: parameters differ by {e}");
                }
            }
        }
    });
}

/// The emulated GPU's losses against the CPU kernels' in the same dtype, relative.
fn loss_tol(dt: DType) -> f64 {
    if dt == DType::F32 {
        LOSS_TOL.0
    } else {
        LOSS_TOL.1
    }
}

/// (f32, bf16) bounds on the losses, relative, from the measured differences (the test prints
/// them). In f32 both sides round every operation to f32 and differ only in summation order:
/// measured 2.5e-7. In bf16 the kernels round to bf16 at the same points as the CPU's, but a
/// value one ulp apart (2^-8, 4e-3 relative) propagates through the layers: measured 7e-5.
const LOSS_TOL: (f64, f64) = (1e-5, 1e-3);
/// (f32, bf16) bounds on the trained parameters after three AdamW steps at lr 1e-3, absolute.
/// f32: measured 3.4e-5. Adam divides each gradient by its own running scale, so an element
/// whose gradient is near zero moves by about lr whatever its size, and a rounding difference
/// that flips such a gradient's sign moves it up to 2 lr a step: the bound leaves room for a
/// few of those, and a kernel defect moves the losses as well. bf16 (full fine-tuning stores
/// the weights in bf16): measured 3.9e-3, one bf16 ulp of a weight in [0.5, 1); the bound is
/// two.
const PARAM_TOL: (f64, f64) = (1e-3, 8e-3);

fn param_tol(dt: DType) -> f64 {
    if dt == DType::F32 {
        PARAM_TOL.0
    } else {
        PARAM_TOL.1
    }
}

/// Greedy generation of a tiny bf16 model through the CUDA path gives the CPU's tokens.
#[test]
fn greedy_generation_through_the_cuda_path_gives_the_cpu_tokens() {
    let g = Target::get();
    with_big_stack(move || {
        let cfg = tiny_config();
        let w = sft_model::llama::random_weights(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
        let build = |dev: &Device| {
            let w = w
                .iter()
                .map(|(k, v)| {
                    let v = v.to_dtype(DType::BF16).unwrap().to_device(dev).unwrap();
                    (k.clone(), v)
                })
                .collect();
            Llama::from_weights(&cfg, w)
                .unwrap()
                .with_activations(Activations::Weights)
                .unwrap()
        };
        let opts = sft_model::generate::GenerateConfig {
            max_new_tokens: 12,
            batch_size: 3,
            ..Default::default()
        };
        let prompts: Vec<Vec<u32>> = vec![
            vec![3, 17, 5],
            vec![9, 30, 11, 4, 8, 100, 7],
            (0..70).map(|i| (i * 13 % 900) as u32 + 3).collect(),
            vec![42],
        ];
        let cpu =
            sft_model::generate::generate_ids(&build(&Device::Cpu), None, &prompts, &opts).unwrap();
        let dev = g.device();
        let got = g
            .run(|| sft_model::generate::generate_ids(&build(&dev), None, &prompts, &opts))
            .unwrap();
        for (i, (a, b)) in got.iter().zip(&cpu).enumerate() {
            assert_eq!(a.output_ids, b.output_ids, "prompt {i}");
        }
    });
}

/// On the emulated GPU, the order in which a block's threads run between barriers is a
/// setting: a kernel that is missing a barrier (or reads what another thread has not written
/// yet) gives other numbers under another order. Every kernel with shared memory or warp
/// calls gives the same bits under forward, reverse and shuffled orders.
#[test]
fn emulated_kernels_give_the_same_bits_under_every_thread_order() {
    let Target::Emu = Target::get() else {
        return;
    };
    use ops::emu::{set_schedule, Schedule};
    let causal = |dev: &Device| {
        let valid = vec![
            vec![true; 150],
            (0..150).map(|i| i >= 20).collect::<Vec<_>>(),
        ];
        Some(AttnMask::Ranges(
            KeyRanges::causal(&valid, 0, 150, dev).unwrap().unwrap(),
        ))
    };
    let labels = Tensor::new(&[5u32, 0, 999, 17], &Device::Cpu).unwrap();
    let run = || -> Vec<Vec<f32>> {
        ops::with_emulated(|| {
            let mut out = vec![];
            let mut keep = |(y, g): (Tensor, Vec<Tensor>)| {
                out.push(f32s(&y));
                out.extend(g.iter().map(f32s));
            };
            let dt = DType::BF16;
            let x = seeded(&[4, 1500], 1, 2.0).to_dtype(dt).unwrap();
            let w = (seeded(&[1500], 2, 0.5) + 1.0)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            keep(value_and_grads(
                &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
                &[x.clone(), w],
                &[0, 1],
                7,
            ));
            keep(value_and_grads(
                &|t| ops::softmax_last_dim(&t[0]),
                std::slice::from_ref(&x),
                &[0],
                7,
            ));
            let lab = labels.clone();
            keep(value_and_grads(
                &move |t| ops::cross_entropy(&t[0], &lab, -100),
                &[seeded(&[4, 1000], 3, 6.0).to_dtype(dt).unwrap()],
                &[0],
                7,
            ));
            let mask = causal(&Device::Cpu);
            let qkv = [
                seeded(&[2, 4, 150, 64], 4, 1.0).to_dtype(dt).unwrap(),
                seeded(&[2, 2, 150, 64], 5, 1.0).to_dtype(dt).unwrap(),
                seeded(&[2, 2, 150, 64], 6, 1.0).to_dtype(dt).unwrap(),
            ];
            keep(value_and_grads(
                &|t| ops::attention_with(&t[0], &t[1], &t[2], mask.as_ref(), 0.125),
                &qkv,
                &[0, 1, 2],
                7,
            ));
            out
        })
    };
    let forward = run();
    for s in [
        Schedule::Reverse,
        Schedule::Shuffle(1),
        Schedule::Shuffle(2),
    ] {
        set_schedule(s);
        let other = run();
        set_schedule(Schedule::Forward);
        for (i, (a, b)) in other.iter().zip(&forward).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{s:?}: result {i} differs from the forward order's");
        }
    }
}

/// QLoRA's base product through the CUDA path: `quant.cu` dequantizes NF4 (plain and
/// double-quantized), Q4_0, Q4_1, Q8_0 and the K-quants on the device, then the device's product. The
/// identity times `W^T` gives the dequantized weight itself, which must equal the CPU's
/// dequantization bit for bit (one nonzero term per sum); a random product and its input
/// gradient match the CPU kernel within float rounding. So do Q4_K, Q5_K and Q6_K; Q5_0 has no
/// GPU kernel and runs composed there (checked the same way).
#[test]
fn quantized_linear_dequantizes_on_the_gpu_as_the_cpu_does() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use sft_model::quant::{QuantWeight, Quantize, SharedQuant};
    use std::sync::Arc;
    let target = Target::get();
    let dev = target.device();
    let (n, k) = (96, 512);
    let w = seeded(&[n, k], 31, 0.05);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let mut weights: Vec<(String, SharedQuant)> = vec![];
        for (name, how, dq) in [
            ("nf4", Quantize::Nf4, false),
            ("nf4+dq", Quantize::Nf4, true),
            ("q8_0", Quantize::Q8_0, false),
        ] {
            let q = QuantWeight::quantize(&w, how, dq, dt).unwrap();
            weights.push((name.into(), Arc::new(q)));
        }
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
        ];
        for ty in types {
            let q = QTensor::quantize(&w, ty).unwrap();
            let q = QuantWeight::from_qtensor(&q, None, dt).unwrap();
            weights.push((format!("{ty:?}"), Arc::new(q)));
        }
        // QLoRA's LoRA node over the NF4 base: the CUDA path's quantized product plus the
        // adapter (with Philox dropout), against the CPU's fused kernel.
        let stand_in = Tensor::zeros((), dt, &dev)
            .unwrap()
            .broadcast_as((n, k))
            .unwrap();
        let key = DropoutKey { seed: 5, stream: 2 };
        let f = |v: &[Tensor]| {
            let w = stand_in.to_device(v[0].device())?;
            let dropout = LoraDropout::Key { key, p: 0.1 };
            ops::lora_linear_quant(&v[0], &w, &weights[0].1, &v[1], &v[2], 2.0, dropout)
        };
        let cpu = [
            seeded(&[2, 7, k], 33, 1.0).to_dtype(dt).unwrap(),
            seeded(&[8, k], 34, 0.1),
            seeded(&[n, 8], 35, 0.1),
        ];
        let on: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&dev).unwrap()).collect();
        let (yc, gc) = value_and_grads(&f, &cpu, &[0, 1, 2], 77);
        let (yg, gg) = target.run(|| value_and_grads(&f, &on, &[0, 1, 2], 77));
        let e = rel(&yg, &yc);
        println!("lora_linear_quant nf4 {dt:?}: output {e:.2e}");
        assert!(e < tol(dt), "lora_linear_quant nf4 {dt:?}: {e}");
        for (i, (p, q)) in gg.iter().zip(&gc).enumerate() {
            let e = rel(p, q);
            println!("lora_linear_quant nf4 {dt:?}: gradient {i} {e:.2e}");
            assert!(
                e < tol(dt),
                "lora_linear_quant nf4 {dt:?}: gradient {i} {e}"
            );
        }
        for (name, q) in &weights {
            let gpu_kernel = ops::quant_has_gpu_kernel(q);
            assert_eq!(
                gpu_kernel,
                name != "Q5_0",
                "{name}: which formats have a kernel"
            );
            let eye = Tensor::eye(k, dt, &dev).unwrap();
            let wt = target.run(|| ops::quant_linear(&eye, q).unwrap());
            let got = f32s(&wt.t().unwrap());
            let want = f32s(&q.dequantize(&Device::Cpu).unwrap());
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{name} {dt:?}: {diff} dequantized values differ");
            let x = seeded(&[3, 5, k], 32, 1.0);
            same(
                &format!("quant_linear {name}"),
                &target,
                dt,
                &|v| ops::quant_linear(&v[0], q),
                &[x],
                &[0],
                tol(dt),
            );
        }
    }
}
