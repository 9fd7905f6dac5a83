use super::*;
use candle_core::{IndexOp, Var};
use std::collections::HashMap;

/// 2 layers, 4 query heads over 2 kv heads (GQA), untied unless asked.
pub(crate) fn tiny_config(tied: bool, llama3: bool) -> LlamaConfig {
    let rope = if llama3 {
        r#""rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},"#
    } else {
        r#""rope_theta": 10000.0,"#
    };
    LlamaConfig::from_json_str(&format!(
        r#"{{"model_type": "llama", "vocab_size": 61, "hidden_size": 32,
                "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, {rope} "rms_norm_eps": 1e-5,
                "tie_word_embeddings": {tied}, "max_position_embeddings": 128,
                "eos_token_id": 2}}"#
    ))
    .unwrap()
}

/// The RoPE inverse frequencies, not from the code under test: the plain formula
/// 1 / theta^(2i / head_dim) in f32 (as transformers computes it), and for Llama 3 rope
/// scaling transformers' own values (tests/fixtures/llama3_rope.json, the "tiny" config).
fn reference_inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    use crate::config::RopeScaling;
    let inv = match cfg.rope_scaling {
        RopeScaling::None => (0..cfg.head_dim / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect(),
        RopeScaling::Llama3 { .. } => {
            let (fx, inv) = crate::config::tests::transformers_llama3_inv_freq("tiny");
            let same = (fx.rope_theta, &fx.rope_scaling, fx.head_dim);
            assert_eq!(same, (cfg.rope_theta, &cfg.rope_scaling, cfg.head_dim));
            inv
        }
    };
    inv.into_iter().map(f64::from).collect()
}

fn tiny_model(cfg: &LlamaConfig, dtype: DType) -> Llama {
    Llama::from_weights(cfg, random_weights(cfg, dtype, &Device::Cpu, 7).unwrap()).unwrap()
}

fn vecs(w: &HashMap<String, Tensor>, name: &str) -> Vec<Vec<f64>> {
    let t = w[name].to_dtype(DType::F64).unwrap();
    if t.rank() == 1 {
        vec![t.to_vec1().unwrap()]
    } else {
        t.to_vec2().unwrap()
    }
}

fn matvec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// The LLaMA forward written out token by token, head by head, in f64: the reference the
/// tensor code is held against (GQA by explicit head mapping, RoPE by its formula).
fn naive_logits(cfg: &LlamaConfig, w: &HashMap<String, Tensor>, ids: &[u32]) -> Vec<Vec<f64>> {
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let eps = cfg.rms_norm_eps;
    let inv = reference_inv_freq(cfg);
    let rot = |v: &mut [f64], pos: usize| {
        for i in 0..hd / 2 {
            let a = pos as f64 * inv[i];
            let (x1, x2) = (v[i], v[i + hd / 2]);
            v[i] = x1 * a.cos() - x2 * a.sin();
            v[i + hd / 2] = x2 * a.cos() + x1 * a.sin();
        }
    };
    let emb = vecs(w, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&i| emb[i as usize].clone()).collect();
    for l in 0..cfg.num_hidden_layers {
        let g = |n: &str| vecs(w, &format!("model.layers.{l}.{n}"));
        let (wq, wk, wv, wo) = (
            g("self_attn.q_proj.weight"),
            g("self_attn.k_proj.weight"),
            g("self_attn.v_proj.weight"),
            g("self_attn.o_proj.weight"),
        );
        let hs: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| rms(x, &g("input_layernorm.weight")[0], eps))
            .collect();
        let mut q: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&wq, h)).collect();
        let mut k: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&wk, h)).collect();
        let v: Vec<Vec<f64>> = hs.iter().map(|h| matvec(&wv, h)).collect();
        for (pos, (qt, kt)) in q.iter_mut().zip(k.iter_mut()).enumerate() {
            for h in 0..nh {
                rot(&mut qt[h * hd..(h + 1) * hd], pos);
            }
            for h in 0..nkv {
                rot(&mut kt[h * hd..(h + 1) * hd], pos);
            }
        }
        for i in 0..ids.len() {
            let mut att_out = vec![0.0; nh * hd];
            for h in 0..nh {
                let kh = h / (nh / nkv);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[i][h * hd + d] * k[j][kh * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att_out[h * hd + d] += ej / z * v[j][kh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &att_out);
            for (x, o) in xs[i].iter_mut().zip(o) {
                *x += o;
            }
            let h = rms(&xs[i], &g("post_attention_layernorm.weight")[0], eps);
            let gate = matvec(&g("mlp.gate_proj.weight"), &h);
            let up = matvec(&g("mlp.up_proj.weight"), &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&g("mlp.down_proj.weight"), &act);
            for (x, d) in xs[i].iter_mut().zip(d) {
                *x += d;
            }
        }
    }
    let head = if cfg.tie_word_embeddings {
        emb.clone()
    } else {
        vecs(w, "lm_head.weight")
    };
    let norm = vecs(w, "model.norm.weight");
    xs.iter()
        .map(|x| matvec(&head, &rms(x, &norm[0], eps)))
        .collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(r, s)| r.iter().zip(s).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f64::max)
}

fn ids_tensor(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn forward_matches_the_written_out_formula() {
    for (tied, llama3) in [(false, false), (true, false), (false, true)] {
        let cfg = tiny_config(tied, llama3);
        let w = random_weights(&cfg, DType::F64, &Device::Cpu, 3).unwrap();
        let model = Llama::from_weights(&cfg, w.clone()).unwrap();
        let ids = vec![5u32, 17, 2, 60, 33, 9, 41];
        let logits = model
            .forward_logits(&ids_tensor(std::slice::from_ref(&ids)), None)
            .unwrap();
        assert_eq!(logits.dims(), &[1, ids.len(), cfg.vocab_size]);
        let got: Vec<Vec<f64>> = logits.i(0).unwrap().to_vec2().unwrap();
        let want = naive_logits(&cfg, &w, &ids);
        let d = max_diff(&got, &want);
        // Not 1e-12: the rotary tables are computed in f32, as transformers does.
        assert!(d < 1e-6, "tied={tied} llama3={llama3}: max diff {d}");
    }
}

#[test]
fn rope_tables_follow_the_formula_per_example() {
    // Left padding gives each example its own positions; check the rotated values.
    let cfg = tiny_config(false, false);
    let model = tiny_model(&cfg, DType::F64);
    let positions = vec![vec![0u32, 0, 1, 2], vec![0, 1, 2, 3]];
    let rope = model.rope(&positions, 2, 4).unwrap();
    assert!(!rope.shared);
    let hd = cfg.head_dim;
    let x = Tensor::arange(0f64, (2 * 3 * 4 * hd) as f64, &Device::Cpu)
        .unwrap()
        .affine(0.01, -1.0)
        .unwrap()
        .reshape((2, 3, 4, hd))
        .unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let yv = apply_rope(&x, &rope)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let inv = reference_inv_freq(&cfg);
    for (b, row) in positions.iter().enumerate() {
        for h in 0..3 {
            for (t, &p) in row.iter().enumerate() {
                let base = ((b * 3 + h) * 4 + t) * hd;
                for i in 0..hd / 2 {
                    let a = (p as f32 * inv[i] as f32) as f64;
                    let (x1, x2) = (xv[base + i], xv[base + i + hd / 2]);
                    let want1 = x1 * a.cos() - x2 * a.sin();
                    let want2 = x2 * a.cos() + x1 * a.sin();
                    assert!((yv[base + i] - want1).abs() < 1e-6, "b{b} h{h} t{t} i{i}");
                    assert!((yv[base + i + hd / 2] - want2).abs() < 1e-6);
                }
            }
        }
    }
}

/// Hidden states of real tokens do not depend on padding, on either side.
#[test]
fn left_and_right_padding_give_the_same_tokens() {
    let cfg = tiny_config(false, false);
    let model = tiny_model(&cfg, DType::F32);
    let a = vec![3u32, 14, 15, 9, 26];
    let b = vec![5u32, 35, 8];
    let alone = |s: &Vec<u32>| -> Vec<Vec<f32>> {
        model
            .forward_hidden(&ids_tensor(std::slice::from_ref(s)), None)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let (ha, hb) = (alone(&a), alone(&b));
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    // Right padding.
    let ids = ids_tensor(&[a.clone(), vec![5, 35, 8, 0, 0]]);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let h = model.forward_hidden(&ids, Some(&mask)).unwrap();
    let h: Vec<Vec<Vec<f32>>> = h.to_vec3().unwrap();
    for t in 0..5 {
        assert!(close(&h[0][t], &ha[t]));
    }
    for t in 0..3 {
        assert!(close(&h[1][t], &hb[t]), "right pad, t={t}");
    }
    // Left padding (the pad id is arbitrary).
    let ids = ids_tensor(&[a.clone(), vec![7, 7, 5, 35, 8]]);
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
    let h: Vec<Vec<Vec<f32>>> = model
        .forward_hidden(&ids, Some(&mask))
        .unwrap()
        .to_vec3()
        .unwrap();
    for t in 0..3 {
        assert!(close(&h[1][t + 2], &hb[t]), "left pad, t={t}");
        assert!(h[1][t].iter().all(|v| v.is_finite()));
    }
    // Without the mask the padded row differs: the mask is what makes it work.
    let h: Vec<Vec<Vec<f32>>> = model.forward_hidden(&ids, None).unwrap().to_vec3().unwrap();
    assert!(!close(&h[1][4], &hb[2]));
}

#[test]
fn loss_is_the_shifted_cross_entropy_over_labelled_positions() {
    let cfg = tiny_config(true, false);
    let model = tiny_model(&cfg, DType::F64);
    let ids = vec![vec![4u32, 8, 15, 16, 23, 42], vec![1u32, 2, 3, 0, 0, 0]];
    let mask = Tensor::new(&[[1u32; 6], [1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    // Only the answer part of row 0 is labelled; row 1 is an ordinary LM row.
    let labels = Tensor::new(
        &[
            [-100i64, -100, -100, 16, 23, 42],
            [1, 2, 3, -100, -100, -100],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let out = model.loss(&ids_tensor(&ids), Some(&mask), &labels).unwrap();
    assert_eq!(out.n_tokens, 5);
    let logits: Vec<Vec<Vec<f64>>> = model
        .forward_logits(&ids_tensor(&ids), Some(&mask))
        .unwrap()
        .to_vec3()
        .unwrap();
    let nll = |row: &[f64], target: usize| {
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        m + z.ln() - row[target]
    };
    let want = nll(&logits[0][2], 16)
        + nll(&logits[0][3], 23)
        + nll(&logits[0][4], 42)
        + nll(&logits[1][0], 2)
        + nll(&logits[1][1], 3);
    let got = out.sum.to_scalar::<f64>().unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    let mean = out.mean().unwrap().to_scalar::<f64>().unwrap();
    assert!((mean - want / 5.0).abs() < 1e-9);
    // A label outside the vocabulary is an error, not a silent skip.
    let bad = Tensor::new(
        &[[-100i64, 99, -100, -100, -100, -100], [-100; 6]],
        &Device::Cpu,
    )
    .unwrap();
    assert!(model.loss(&ids_tensor(&ids), Some(&mask), &bad).is_err());
    // No labels: zero tokens.
    let none = Tensor::new(&[[-100i64; 6], [-100; 6]], &Device::Cpu).unwrap();
    assert_eq!(
        model
            .loss(&ids_tensor(&ids), Some(&mask), &none)
            .unwrap()
            .n_tokens,
        0
    );
}

/// Every weight gets a gradient through the loss when all of them are Vars (full
/// fine-tuning), and the tied embedding stays one tensor.
#[test]
fn every_weight_gets_a_gradient() {
    for dt in [DType::F32, DType::BF16] {
        every_weight_gets_a_gradient_in(dt);
    }
}

/// bf16 covers the CPU's mixed mode: bf16 weights (Vars), f32 activations.
fn every_weight_gets_a_gradient_in(dt: DType) {
    let cfg = tiny_config(true, false);
    let w = random_weights(&cfg, dt, &Device::Cpu, 1).unwrap();
    let vars: HashMap<String, Var> = w
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let model = Llama::from_weights(
        &cfg,
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect(),
    )
    .unwrap();
    assert_eq!(model.named_weights().len(), vars.len());
    assert_eq!(model.dtype(), dt);
    assert_eq!(model.activation_dtype(), DType::F32);
    assert!(model
        .named_weights()
        .iter()
        .all(|(n, _)| n != "lm_head.weight"));
    let ids = ids_tensor(&[vec![1, 2, 3, 4, 5]]);
    let labels = Tensor::new(&[[1i64, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let loss = model.loss(&ids, None, &labels).unwrap().mean().unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), dt, "{name}");
        let n = g
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: |g|^2 = {n}");
    }
}

/// Prefill + one token at a time through the cache gives the full forward's logits, for a
/// left-padded batch.
#[test]
fn cached_decoding_matches_the_full_forward() {
    let cfg = tiny_config(false, true);
    let model = tiny_model(&cfg, DType::F32);
    let seqs = [
        vec![9u32, 8, 7, 6, 5, 4, 3, 2],
        vec![11u32, 12, 13, 14, 15, 16, 17],
    ];
    let prompt_len = [5usize, 3];
    let width = 5;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (s, &p) in seqs.iter().zip(&prompt_len) {
        let pad = width - p;
        ids.push([vec![0u32; pad], s[..p].to_vec()].concat());
        mask.push([vec![0u32; pad], vec![1; p]].concat());
    }
    // Capacity 4 forces the cache to grow.
    let mut cache = model.new_cache(2, 4).unwrap();
    let mut step_logits = vec![model
        .forward_cached(
            &ids_tensor(&ids),
            Some(&Tensor::new(mask.clone(), &Device::Cpu).unwrap()),
            &mut cache,
        )
        .unwrap()];
    for k in 0..3 {
        let next: Vec<Vec<u32>> = seqs
            .iter()
            .zip(&prompt_len)
            .map(|(s, &p)| vec![s[p + k]])
            .collect();
        step_logits.push(
            model
                .forward_cached(&ids_tensor(&next), None, &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), width + 3);
    for (bi, (s, &p)) in seqs.iter().zip(&prompt_len).enumerate() {
        let full: Vec<Vec<f32>> = model
            .forward_logits(&ids_tensor(&[s[..p + 3].to_vec()]), None)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (k, l) in step_logits.iter().enumerate() {
            let got: Vec<f32> = l.i(bi).unwrap().to_vec1().unwrap();
            let want = &full[p - 1 + k];
            let d = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-5, "row {bi} step {k}: {d}");
        }
    }
    // Dropping a finished row keeps the other one's state.
    cache.select_rows(&[1]).unwrap();
    let got: Vec<f32> = model
        .forward_cached(&ids_tensor(&[vec![seqs[1][6]]]), None, &mut cache)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let full: Vec<Vec<f32>> = model
        .forward_logits(&ids_tensor(&[seqs[1].clone()]), None)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let d = got
        .iter()
        .zip(&full[6])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "after select_rows: {d}");
}

#[test]
fn half_precision_runs_close_to_f32() {
    // The reference is the f32 model on the same half-precision weights (rounded, then widened):
    // what is measured is the forward's own rounding, not the weights'.
    let cfg = tiny_config(false, false);
    let w = random_weights(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let ids = ids_tensor(&[vec![1, 5, 9, 13, 17, 21]]);
    let logits = |m: &Llama| crate::testing::f32s(&m.forward_logits(&ids, None).unwrap());
    // Relative to the largest logit; bf16 keeps 8 significant bits, f16 11.
    for (dt, tol) in [(DType::BF16, TOL_BF16), (DType::F16, TOL_F16)] {
        let rounded: HashMap<String, Tensor> = w
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dt).unwrap()))
            .collect();
        let widened = rounded
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap()))
            .collect();
        let reference = logits(&Llama::from_weights(&cfg, widened).unwrap());
        let m = Llama::from_weights(&cfg, rounded).unwrap();
        assert_eq!(m.dtype(), dt);
        let l = logits(&m);
        let scale = reference.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        let d = l
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!(
            "{dt:?}: max error {d} on logits up to {scale} ({})",
            d / scale
        );
        assert!(d / scale < tol, "{dt:?}: {d} on logits up to {scale}");
    }
}

// Measured 2026-12-07 on this tiny model: 1.6e-3 (bf16) and 4.7e-4 (f16); about 3x that room.
const TOL_BF16: f32 = 5e-3;
const TOL_F16: f32 = 1.5e-3;

#[test]
fn weights_are_checked_by_name_and_shape() {
    let cfg = tiny_config(false, false);
    let w = random_weights(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
    let mut missing = w.clone();
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let e = Llama::from_weights(&cfg, missing)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    let mut wrong = w.clone();
    wrong.insert(
        "model.norm.weight".into(),
        Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Llama::from_weights(&cfg, wrong).err().unwrap().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("[32]"), "{e}");
    let mut extra = w.clone();
    extra.insert(
        "model.layers.0.self_attn.q_norm.weight".into(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = Llama::from_weights(&cfg, extra).err().unwrap().to_string();
    assert!(e.contains("q_norm"), "{e}");
    let mut m = Llama::from_weights(&cfg, w).unwrap();
    let names: Vec<String> = m.linears_mut().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 7 + 1);
    assert!(names.contains(&"model.layers.1.self_attn.k_proj".to_string()));
    assert!(names.contains(&"lm_head".to_string()));
}
