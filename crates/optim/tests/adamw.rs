//! AdamW against a hand-computed reference, parameter groups, clipping, bf16 master weights,
//! gradient accumulation and bit-identical resumption.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use sft_optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, Grads, ParamSpec};

fn var(v: &[f32], dt: DType) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap().to_dtype(dt).unwrap()).unwrap()
}

fn grads(pairs: &[(&str, &[f32])]) -> Grads {
    Grads::new(
        pairs
            .iter()
            .map(|(n, g)| (n.to_string(), Tensor::new(*g, &Device::Cpu).unwrap()))
            .collect::<HashMap<_, _>>(),
    )
}

fn values(v: &Var) -> Vec<f64> {
    v.as_tensor()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// PyTorch's AdamW on one scalar, in f64, written out step by step.
fn reference(p0: f64, gs: &[f64], lr: f64, cfg: AdamWConfig, decay: bool) -> f64 {
    let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
    for (i, &g) in gs.iter().enumerate() {
        let t = (i + 1) as i32;
        if decay {
            p -= lr * cfg.weight_decay * p;
        }
        m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
        let mhat = m / (1.0 - cfg.beta1.powi(t));
        let vhat = v / (1.0 - cfg.beta2.powi(t));
        p -= lr * mhat / (vhat.sqrt() + cfg.eps);
    }
    p
}

const CFG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
};

#[test]
fn adamw_matches_hand_computed_steps() {
    let p0 = [0.5f32, -1.0, 2.0, 0.0];
    let steps: [[f32; 4]; 3] = [
        [0.1, -0.2, 0.3, 1e-3],
        [0.05, 0.4, -0.1, -2.0],
        [-0.3, 0.1, 0.2, 0.5],
    ];
    let lr = 1e-2;
    for dt in [DType::F32, DType::F64] {
        let w = var(&p0, dt);
        let mut opt = AdamW::new(
            vec![ParamSpec {
                name: "w".into(),
                var: w.clone(),
                weight_decay: true,
            }],
            CFG,
        )
        .unwrap();
        for g in &steps {
            let g = Tensor::new(g, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            opt.step(&Grads::new(HashMap::from([("w".to_string(), g)])), lr)
                .unwrap();
        }
        assert_eq!(opt.step_count(), 3);
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
        for (i, got) in values(&w).into_iter().enumerate() {
            let gs: Vec<f64> = steps.iter().map(|s| s[i] as f64).collect();
            let want = reference(p0[i] as f64, &gs, lr, CFG, true);
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{dt:?} element {i}: {got} vs {want}"
            );
            assert!(
                (got - p0[i] as f64).abs() > 1e-3,
                "element {i} did not move"
            );
        }
    }
}

#[test]
fn adamw_no_decay_group() {
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        ..CFG
    };
    let decayed = var(&[1.0, -2.0], DType::F32);
    let plain = var(&[1.0, -2.0], DType::F32);
    let mut opt = AdamW::new(
        vec![
            ParamSpec {
                name: "layers.0.mlp.weight".into(),
                var: decayed.clone(),
                weight_decay: true,
            },
            ParamSpec::new("layers.0.input_layernorm.weight", plain.clone()),
        ],
        cfg,
    )
    .unwrap();
    assert!(
        !opt.params().nth(1).unwrap().weight_decay,
        "norm weights are not decayed"
    );
    let g: &[f32] = &[0.3, 0.3];
    for _ in 0..2 {
        opt.step(
            &grads(&[
                ("layers.0.mlp.weight", g),
                ("layers.0.input_layernorm.weight", g),
            ]),
            0.1,
        )
        .unwrap();
    }
    for (i, p0) in [1.0, -2.0].into_iter().enumerate() {
        let gs = [0.3, 0.3];
        let want_plain = reference(p0, &gs, 0.1, cfg, false);
        let want_decayed = reference(p0, &gs, 0.1, cfg, true);
        assert!((values(&plain)[i] - want_plain).abs() < 1e-6);
        assert!((values(&decayed)[i] - want_decayed).abs() < 1e-6);
        assert!((want_plain - want_decayed).abs() > 1e-2);
    }
    assert!(sft_optim::decays_by_name(
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    ));
    assert!(!sft_optim::decays_by_name("model.norm.weight"));
    assert!(!sft_optim::decays_by_name(
        "model.layers.3.post_attention_layernorm.weight"
    ));
    assert!(!sft_optim::decays_by_name("classifier.bias"));
}

#[test]
fn clip_grad_norm_scales_to_max_and_returns_pre_clip_norm() {
    let mut g = grads(&[("a", &[3.0]), ("b", &[0.0, 4.0])]);
    let norm = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let a = g.get("a").unwrap().to_vec1::<f32>().unwrap();
    let b = g.get("b").unwrap().to_vec1::<f32>().unwrap();
    assert!(
        (a[0] - 0.6).abs() < 1e-5 && (b[1] - 0.8).abs() < 1e-5,
        "{a:?} {b:?}"
    );
    assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-5);
    // Under the limit: untouched.
    let mut g = grads(&[("a", &[0.3]), ("b", &[0.0, 0.4])]);
    let norm = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((norm - 0.5).abs() < 1e-6);
    assert_eq!(g.get("a").unwrap().to_vec1::<f32>().unwrap(), vec![0.3]);
}

#[test]
fn non_finite_gradients_are_reported() {
    let mut g = grads(&[
        ("ok", &[1.0, 2.0]),
        ("nan", &[f32::NAN, 1.0]),
        ("inf", &[f32::INFINITY]),
    ]);
    assert_eq!(
        g.non_finite().unwrap(),
        vec!["inf".to_string(), "nan".to_string()]
    );
    let norm = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!(!norm.is_finite());
    assert!(grads(&[("ok", &[1e30, -1e30])])
        .non_finite()
        .unwrap()
        .is_empty());
}

#[test]
fn bf16_weights_move_through_f32_master() {
    let n = 1024;
    let w = var(&vec![1.0; n], DType::BF16);
    let mut opt = AdamW::new(
        vec![ParamSpec {
            name: "w".into(),
            var: w.clone(),
            weight_decay: false,
        }],
        AdamWConfig::default(),
    )
    .unwrap();
    let g = Tensor::ones(n, DType::BF16, &Device::Cpu).unwrap();
    let g = Grads::new(HashMap::from([("w".to_string(), g)]));
    opt.step(&g, 1e-4).unwrap();
    // One step of 1e-4 is below bf16's resolution at 1.0, but the master copy moved.
    let master = opt.state_dict()["w.master"].to_vec1::<f32>().unwrap();
    assert!(master.iter().all(|&m| (m - (1.0 - 1e-4)).abs() < 1e-6));
    for _ in 0..39 {
        opt.step(&g, 1e-4).unwrap();
    }
    let got = values(&w);
    assert_eq!(w.dtype(), DType::BF16);
    let changed = got.iter().filter(|&&v| v != 1.0).count();
    assert_eq!(
        changed, n,
        "all {n} bf16 weights must have moved after 40 steps"
    );
    assert!(
        got.iter().all(|&v| (v - 0.996).abs() < 4e-3),
        "{:?}",
        &got[..4]
    );
}

#[test]
fn accumulated_grads_equal_the_mean_over_all_tokens() {
    // loss_i = (w . x_i)^2 over 5 "tokens", split 2 + 3 into micro-batches.
    let x = Tensor::new(
        &[
            [1.0f32, 2.0],
            [0.5, -1.0],
            [3.0, 0.0],
            [-1.0, 1.0],
            [0.2, 0.3],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let w = var(&[0.7, -0.4], DType::F32);
    let params = vec![ParamSpec::new("w", w.clone())];
    let loss_sum = |xs: &Tensor| {
        xs.matmul(&w.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let mut acc = GradAccumulator::new();
    for (start, len) in [(0, 2), (2, 3)] {
        let store = loss_sum(&x.narrow(0, start, len).unwrap())
            .backward()
            .unwrap();
        acc.add(&params, &store, len).unwrap();
    }
    assert_eq!((acc.tokens(), acc.micro_batches()), (5, 2));
    let got = acc.finish().unwrap();
    let full = (loss_sum(&x) / 5.0).unwrap().backward().unwrap();
    let want = Grads::from_store(&params, &full).unwrap();
    let (a, b) = (
        got.get("w").unwrap().to_vec1::<f32>().unwrap(),
        want.get("w").unwrap().to_vec1::<f32>().unwrap(),
    );
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // A parameter the loss does not reach is an error, not a silent zero.
    let other = var(&[1.0], DType::F32);
    let store = loss_sum(&x).backward().unwrap();
    let err = acc_err(&[ParamSpec::new("unreached", other)], &store);
    assert!(err.contains("unreached"), "{err}");
}

fn acc_err(params: &[ParamSpec], store: &candle_core::backprop::GradStore) -> String {
    GradAccumulator::new()
        .add(params, store, 1)
        .unwrap_err()
        .to_string()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn saved_state_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let make = |a: &Tensor, b: &Tensor| {
        let va = Var::from_tensor(a).unwrap();
        let vb = Var::from_tensor(b).unwrap();
        let params = vec![
            ParamSpec::new("layers.0.w", va.clone()),
            ParamSpec::new("layers.0.norm.weight", vb.clone()),
        ];
        (va, vb, AdamW::new(params, CFG).unwrap())
    };
    let a0 = Tensor::new(&[[0.3f32, -0.7], [1.5, 0.01]], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b0 = Tensor::new(&[1.0f32, 0.5, -0.25], &Device::Cpu).unwrap();
    let grad_at = |k: usize| {
        let s = k as f32;
        Grads::new(HashMap::from([
            (
                "layers.0.w".to_string(),
                Tensor::new(&[[0.1 * s, -0.3], [0.2, 0.05 * s]], &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
            (
                "layers.0.norm.weight".to_string(),
                Tensor::new(&[0.4f32, -0.1 * s, 0.3], &Device::Cpu).unwrap(),
            ),
        ]))
    };
    let (va, vb, mut opt) = make(&a0, &b0);
    for k in 0..3 {
        opt.step(&grad_at(k), 1e-2).unwrap();
    }
    let path = dir.path().join("optimizer.safetensors");
    opt.save(&path).unwrap();
    // A fresh optimizer over weights restored from "the checkpoint" (the current values).
    let (saved_a, saved_b) = (
        va.as_tensor().copy().unwrap(),
        vb.as_tensor().copy().unwrap(),
    );
    let (ra, rb, mut resumed) = make(&saved_a, &saved_b);
    resumed.load(&path).unwrap();
    assert_eq!(resumed.step_count(), 3);
    assert_eq!(resumed.header(), opt.header());
    for k in 3..5 {
        opt.step(&grad_at(k), 1e-2).unwrap();
        resumed.step(&grad_at(k), 1e-2).unwrap();
    }
    assert_eq!(bits(va.as_tensor()), bits(ra.as_tensor()));
    assert_eq!(bits(vb.as_tensor()), bits(rb.as_tensor()));
    let (s1, s2) = (opt.state_dict(), resumed.state_dict());
    assert_eq!(s1.keys().collect::<Vec<_>>(), s2.keys().collect::<Vec<_>>());
    for (k, t) in &s1 {
        assert_eq!(bits(t), bits(&s2[k]), "{k}");
    }
    // And the loaded state is what made the difference: a fresh optimizer (no moments, step 0)
    // over the same restored weights, given the same two gradients, ends elsewhere.
    let (fa, fb, mut fresh) = make(&saved_a, &saved_b);
    assert_eq!(bits(fa.as_tensor()), bits(&saved_a));
    for k in 3..5 {
        fresh.step(&grad_at(k), 1e-2).unwrap();
    }
    assert_eq!(fresh.step_count(), 2);
    assert_ne!(bits(fa.as_tensor()), bits(ra.as_tensor()), "bf16 weight");
    assert_ne!(bits(fb.as_tensor()), bits(rb.as_tensor()), "f32 weight");
}

#[test]
fn load_rejects_mismatched_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let opt = AdamW::new(vec![ParamSpec::new("w", var(&[1.0, 2.0], DType::F32))], CFG).unwrap();
    opt.save(&path).unwrap();
    let mut other = AdamW::new(
        vec![ParamSpec::new("w", var(&[1.0, 2.0, 3.0], DType::F32))],
        CFG,
    )
    .unwrap();
    let err = other.load(&path).unwrap_err().to_string();
    assert!(
        err.contains("shape") && err.contains("opt.safetensors"),
        "{err}"
    );
    let mut other =
        AdamW::new(vec![ParamSpec::new("v", var(&[1.0, 2.0], DType::F32))], CFG).unwrap();
    let err = other.load(&path).unwrap_err().to_string();
    assert!(err.contains("`v`"), "{err}");
}

#[test]
fn step_requires_every_gradient() {
    let w = var(&[1.0], DType::F32);
    let mut opt = AdamW::new(vec![ParamSpec::new("w", w.clone())], CFG).unwrap();
    let err = opt.step(&Grads::default(), 1e-3).unwrap_err().to_string();
    assert!(err.contains("`w`"), "{err}");
    assert_eq!(opt.step_count(), 0);
    assert_eq!(values(&w), vec![1.0]);
}
