//! LoRA and full fine-tuning on a tiny random LLaMA: gradients against central finite
//! differences in float64, every trainable `Var` reached, merged == unmerged, PEFT files.
//! Backward recurses over the graph, so the training tests run on a thread with a large stack.
mod common;

use common::{grad_norm_sq, gradcheck, with_big_stack};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use sft_model::config::LlamaConfig;
use sft_model::llama::{random_weights, Llama};
use sft_model::lora::{self, LoraConfig, Targets};

fn tiny_config(tied: bool) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{"model_type": "llama", "vocab_size": 23, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": {tied}, "max_position_embeddings": 64, "eos_token_id": 2}}"#
    ))
    .unwrap()
}

fn tiny_model(cfg: &LlamaConfig, dtype: DType, seed: u64) -> Llama {
    Llama::from_weights(cfg, random_weights(cfg, dtype, &Device::Cpu, seed).unwrap()).unwrap()
}

/// A left-padded batch of two with some labels masked.
fn batch() -> (Tensor, Tensor, Tensor) {
    let dev = &Device::Cpu;
    let ids = Tensor::new(&[[0u32, 0, 5, 7, 11, 3], [4, 9, 13, 1, 22, 8]], dev).unwrap();
    let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dev).unwrap();
    let labels = Tensor::new(
        &[[-100i64, -100, -100, 7, 11, 3], [-100, 9, 13, 1, 22, 8]],
        dev,
    )
    .unwrap();
    (ids, mask, labels)
}

fn mean_loss(model: &Llama) -> Tensor {
    let (ids, mask, labels) = batch();
    model
        .loss(&ids, Some(&mask), &labels)
        .unwrap()
        .mean()
        .unwrap()
}

/// Compares the analytic gradient of each Var with central differences on up to `per_var`
/// elements spread over it (all of them for small tensors). Returns the worst relative error
/// (max |a - n| over max |n| of the checked elements, per Var).
fn check_vars(model: &Llama, vars: &[(String, Var)], per_var: usize) -> Vec<(String, f64)> {
    let grads = mean_loss(model).backward().unwrap();
    let h = 1e-6;
    let mut out = vec![];
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let analytic: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        let step = (n / per_var).max(1);
        let idx: Vec<usize> = (0..n).step_by(step).take(per_var).collect();
        let (mut max_d, mut max_n) = (0f64, 0f64);
        for &j in &idx {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[j] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                mean_loss(model).to_scalar::<f64>().unwrap()
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            max_d = max_d.max((num - analytic[j]).abs());
            max_n = max_n.max(num.abs());
        }
        v.set(&Tensor::from_vec(base, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
        assert!(
            max_n > 1e-9,
            "{name}: the checked gradient elements are all zero"
        );
        out.push((name.clone(), max_d / max_n));
    }
    out
}

fn randomize_b(adapter: &lora::LoraAdapter, seed: u64, scale: f64) {
    for (i, m) in adapter.modules.iter().enumerate() {
        let t = (gradcheck::rand_t(m.b.dims(), seed + i as u64, scale))
            .to_dtype(m.b.dtype())
            .unwrap();
        m.b.set(&t).unwrap();
    }
}

#[test]
fn lora_grads_match_finite_differences_f64() {
    with_big_stack(|| {
        let cfg = tiny_config(false);
        let mut model = tiny_model(&cfg, DType::F64, 1);
        let mut lcfg = LoraConfig::new(3, 6.0, 0.0, Targets::AllLinear);
        lcfg.init_seed = 5;
        let adapter = lora::apply_lora(&mut model, &lcfg).unwrap();
        assert_eq!(
            adapter.modules.len(),
            2 * 7,
            "all-linear leaves lm_head out"
        );
        // B = 0 makes dL/dA vanish; random B checks both.
        randomize_b(&adapter, 100, 0.3);
        let errs = check_vars(&model, &adapter.trainable(), 12);
        let worst = errs.iter().cloned().fold(
            ("".into(), 0.0),
            |a: (String, f64), b| {
                if b.1 > a.1 {
                    b
                } else {
                    a
                }
            },
        );
        eprintln!("LoRA: {} Vars, worst relative error {worst:?}", errs.len());
        for (name, e) in &errs {
            assert!(*e < 1e-4, "{name}: relative error {e:e}");
        }
    });
}

#[test]
fn full_finetuning_grads_match_finite_differences_f64() {
    with_big_stack(|| {
        for tied in [true, false] {
            let cfg = tiny_config(tied);
            let mut model = tiny_model(&cfg, DType::F64, 2);
            let vars = lora::make_all_trainable(&mut model).unwrap();
            let expected = if tied { 1 + 2 * 9 + 1 } else { 1 + 2 * 9 + 2 };
            assert_eq!(vars.len(), expected);
            let errs = check_vars(&model, &vars, 10);
            for (name, e) in &errs {
                assert!(*e < 1e-4, "tied {tied}: {name}: relative error {e:e}");
            }
        }
    });
}

#[test]
fn every_trainable_var_receives_a_gradient() {
    with_big_stack(|| {
        let cfg = tiny_config(true);
        for targets in [
            Targets::AllLinear,
            Targets::from_names(&["q_proj", "v_proj"]).unwrap(),
        ] {
            let mut model = tiny_model(&cfg, DType::F32, 3);
            let adapter =
                lora::apply_lora(&mut model, &LoraConfig::new(4, 8.0, 0.1, targets)).unwrap();
            lora::set_training(&mut model, Some(9));
            let grads = mean_loss(&model).backward().unwrap();
            for (name, v) in adapter.trainable() {
                let n = grad_norm_sq(&grads, &v, &name);
                // With B = 0 the gradient of A, scale * B^T dY^T x, is exactly zero
                // (analytically); that of B, scale * dY^T (x A^T), is not.
                if name.ends_with("lora_B.weight") {
                    assert!(n > 0.0 && n.is_finite(), "{name}: |g|^2 = {n}");
                } else {
                    assert!(name.ends_with("lora_A.weight"), "{name}");
                    assert_eq!(n, 0.0, "{name}: B = 0 but |dL/dA|^2 = {n}");
                }
            }
            // The frozen base weights are not Vars and get no gradient entry.
            for (name, t) in model.named_weights() {
                assert!(grads.get(t).is_none(), "{name} got a gradient");
            }
        }
        let mut model = tiny_model(&cfg, DType::F32, 3);
        let vars = lora::make_all_trainable(&mut model).unwrap();
        let grads = mean_loss(&model).backward().unwrap();
        for (name, v) in &vars {
            let n = grad_norm_sq(&grads, v, name);
            assert!(n > 0.0 && n.is_finite(), "{name}: |g|^2 = {n}");
        }
    });
}

#[test]
fn fresh_adapter_is_the_base_model_and_init_follows_peft() {
    let cfg = tiny_config(false);
    let base = tiny_model(&cfg, DType::F32, 4);
    let mut model = tiny_model(&cfg, DType::F32, 4);
    let mut lcfg = LoraConfig::new(4, 16.0, 0.0, Targets::AllLinear);
    lcfg.init_seed = 11;
    let adapter = lora::apply_lora(&mut model, &lcfg).unwrap();
    let (ids, mask, _) = batch();
    let a = base.forward_logits(&ids, Some(&mask)).unwrap();
    let b = model.forward_logits(&ids, Some(&mask)).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    for m in &adapter.modules {
        assert_eq!(m.scale, 4.0);
        let bound = 1.0 / (m.a.dim(1).unwrap() as f32).sqrt();
        let a: Vec<f32> = m.a.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().all(|v| v.abs() <= bound));
        // Spread over the range, not a constant.
        let max = a.iter().fold(0f32, |x, v| x.max(v.abs()));
        assert!(
            max > 0.8 * bound,
            "{}: max |A| {max} of bound {bound}",
            m.name
        );
        let bsum =
            m.b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        assert_eq!(bsum, 0.0);
    }
    // The same seed gives the same A.
    let mut again = tiny_model(&cfg, DType::F32, 4);
    let adapter2 = lora::apply_lora(&mut again, &lcfg).unwrap();
    let x: Vec<f32> = adapter.modules[3]
        .a
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let y: Vec<f32> = adapter2.modules[3]
        .a
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(x, y);
}

#[test]
fn dropout_is_seeded_and_off_in_eval_mode() {
    let cfg = tiny_config(false);
    let mut model = tiny_model(&cfg, DType::F32, 5);
    let adapter = lora::apply_lora(
        &mut model,
        &LoraConfig::new(
            4,
            8.0,
            0.5,
            Targets::from_names(&["q_proj", "down_proj"]).unwrap(),
        ),
    )
    .unwrap();
    randomize_b(&adapter, 7, 0.5);
    let (ids, mask, _) = batch();
    let logits = |m: &Llama| {
        m.forward_logits(&ids, Some(&mask))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let eval1 = logits(&model);
    lora::set_training(&mut model, Some(1));
    let t1 = logits(&model);
    lora::set_training(&mut model, Some(1));
    let t1_again = logits(&model);
    lora::set_training(&mut model, Some(2));
    let t2 = logits(&model);
    lora::set_training(&mut model, None);
    let eval2 = logits(&model);
    assert_eq!(eval1, eval2);
    assert_eq!(t1, t1_again, "same seed, same masks");
    assert_ne!(t1, t2, "another seed, other masks");
    assert_ne!(t1, eval1, "dropout changes the output in training mode");
}

/// Writes a tiny model folder (config.json + model.safetensors) for the merge tests.
fn write_model_folder(dir: &Path, cfg_json: &str, weights: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg_json).unwrap();
    let mut tensors: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    sft_model::save::save_hf_weights(dir, &tensors, 6_000).unwrap();
}

#[test]
fn merged_equals_unmerged_and_adapters_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_json = r#"{"model_type": "llama", "vocab_size": 23, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "max_position_embeddings": 64, "eos_token_id": 2}"#;
    let cfg = LlamaConfig::from_json_str(cfg_json).unwrap();
    let weights = random_weights(&cfg, DType::F32, &Device::Cpu, 6).unwrap();
    let base_dir = dir.path().join("base");
    // A small shard limit: the base is written as several shards with an index.
    write_model_folder(&base_dir, cfg_json, &weights);
    assert!(base_dir.join("model.safetensors.index.json").is_file());

    let mut model = Llama::from_weights(&cfg, weights.clone()).unwrap();
    let mut lcfg = LoraConfig::new(
        4,
        8.0,
        0.05,
        Targets::from_names(&["q_proj", "v_proj", "o_proj", "gate_proj", "lm_head"]).unwrap(),
    );
    lcfg.init_seed = 3;
    let adapter = lora::apply_lora(&mut model, &lcfg).unwrap();
    assert!(adapter.modules.iter().any(|m| m.name == "lm_head"));
    randomize_b(&adapter, 50, 0.5);
    let (ids, mask, _) = batch();
    let unmerged = model.forward_logits(&ids, Some(&mask)).unwrap();

    let adapter_dir = dir.path().join("adapter");
    adapter.save(&adapter_dir, "tiny-base").unwrap();
    let conf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["task_type"], "CAUSAL_LM");
    assert_eq!(conf["r"], 4);
    assert_eq!(conf["lora_alpha"], 8);
    assert_eq!(conf["bias"], "none");
    assert_eq!(conf["base_model_name_or_path"], "tiny-base");
    assert_eq!(
        conf["target_modules"],
        serde_json::json!(["gate_proj", "lm_head", "o_proj", "q_proj", "v_proj"])
    );
    let st =
        candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(st.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"));
    assert!(st.contains_key("base_model.model.lm_head.lora_B.weight"));
    assert_eq!(st.len(), 2 * (2 * 4 + 1));

    // Loading the saved adapter onto a fresh base gives the same logits.
    let mut reloaded = Llama::from_weights(&cfg, weights.clone()).unwrap();
    let loaded = lora::load_adapter(&mut reloaded, &adapter_dir).unwrap();
    assert_eq!(loaded.modules.len(), adapter.modules.len());
    let relogits = reloaded.forward_logits(&ids, Some(&mask)).unwrap();
    let d = (&relogits - &unmerged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);

    // Merged into a folder, then loaded as a plain model: same logits within 1e-4.
    let out = dir.path().join("merged");
    let report = lora::merge_adapter_folder(&base_dir, &adapter_dir, &out, 6_000, None).unwrap();
    assert_eq!(report.merged_modules, adapter.modules.len());
    assert!(out.join("config.json").is_file());
    let files = sft_model::load::weight_files(&out).unwrap();
    assert!(files.len() > 1, "sharded output");
    let merged_w = sft_model::load::load_safetensors(&files, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(merged_w.len(), weights.len());
    let merged = Llama::from_weights(&cfg, merged_w.clone()).unwrap();
    let mlogits = merged.forward_logits(&ids, Some(&mask)).unwrap();
    let base_logits = Llama::from_weights(&cfg, weights.clone())
        .unwrap()
        .forward_logits(&ids, Some(&mask))
        .unwrap();
    let d = (&mlogits - &unmerged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let d = d.to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "merged vs unmerged: {d}");
    let moved = (&base_logits - &unmerged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 1e-2,
        "the adapter must change the output"
    );
    // Untargeted weights are copied bit for bit.
    let k = "model.layers.0.self_attn.k_proj.weight";
    let same = (&merged_w[k] - &weights[k])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);

    // A QLoRA adapter merged over the NF4 base it trained on: the base linears are written as
    // their dequantized NF4 values (in the base's dtype) plus the delta, so the merged model
    // gives the logits of the adapter applied over the quantized base.
    let qout = dir.path().join("merged-nf4");
    let nf4 = sft_model::load::QuantOptions {
        how: sft_model::quant::Quantize::Nf4,
        double_quant: false,
    };
    let trained = lora::TrainedBase {
        quant: nf4,
        dtype: DType::F32,
    };
    let report =
        lora::merge_adapter_folder(&base_dir, &adapter_dir, &qout, 6_000, Some(trained)).unwrap();
    assert_eq!(
        report.dequantized,
        2 * 7,
        "every base linear of both layers"
    );
    let qfiles = sft_model::load::weight_files(&qout).unwrap();
    let qmerged_w = sft_model::load::load_safetensors(&qfiles, DType::F32, &Device::Cpu).unwrap();
    let (mut dense, mut quant) = (HashMap::new(), HashMap::new());
    for (name, w) in &weights {
        if sft_model::quant::is_quantized_linear(name) {
            let q = sft_model::quant::QuantWeight::quantize(w, nf4.how, false, DType::F32);
            quant.insert(name.clone(), std::sync::Arc::new(q.unwrap()));
        } else {
            dense.insert(name.clone(), w.clone());
        }
    }
    let mut qlora = Llama::from_parts(&cfg, dense, quant).unwrap();
    lora::load_adapter(&mut qlora, &adapter_dir).unwrap();
    let qunmerged = qlora.forward_logits(&ids, Some(&mask)).unwrap();
    let qmerged = Llama::from_weights(&cfg, qmerged_w.clone())
        .unwrap()
        .forward_logits(&ids, Some(&mask))
        .unwrap();
    let d = (&qmerged - &qunmerged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "merged over NF4 vs QLoRA unmerged: {d}");
    let d_dense = (&qmerged - &unmerged)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d_dense > 10.0 * d.max(1e-6),
        "the NF4 base must differ from the dense one ({d_dense} vs {d})"
    );
    // An untargeted base linear: its NF4 values exactly.
    let want = sft_model::quant::QuantWeight::quantize(
        &weights[k],
        sft_model::quant::Quantize::Nf4,
        false,
        DType::F32,
    )
    .unwrap()
    .dequantize(&Device::Cpu)
    .unwrap();
    let exact = (&qmerged_w[k] - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(exact.to_scalar::<f32>().unwrap(), 0.0);

    // In-memory merge of one layer agrees with applying its adapter.
    let m = &adapter.modules[0];
    assert_eq!(m.name, "model.layers.0.self_attn.q_proj");
    let mut lin =
        sft_model::linear::Linear::new(weights[&format!("{}.weight", m.name)].clone(), None);
    lin.lora = Some(sft_model::linear::LoraLayer::new(
        m.a.clone(),
        m.b.clone(),
        m.scale,
        0.0,
    ));
    let x = gradcheck::rand_t(&[3, 16], 1, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let y1 = lin.forward(&x).unwrap();
    let y2 = x
        .matmul(&lin.merged_weight().unwrap().t().unwrap())
        .unwrap();
    let d = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn restore_adapter_copies_saved_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true);
    let mut model = tiny_model(&cfg, DType::F32, 8);
    let lcfg = LoraConfig::new(2, 4.0, 0.0, Targets::from_names(&["k_proj"]).unwrap());
    let adapter = lora::apply_lora(&mut model, &lcfg).unwrap();
    randomize_b(&adapter, 9, 0.5);
    adapter.save(dir.path(), "x").unwrap();
    let mut other = tiny_model(&cfg, DType::F32, 8);
    let mut lcfg2 = lcfg.clone();
    lcfg2.init_seed = 99;
    let fresh = lora::apply_lora(&mut other, &lcfg2).unwrap();
    lora::restore_adapter(&fresh, dir.path()).unwrap();
    for (a, b) in adapter.tensors().iter().zip(fresh.tensors()) {
        assert_eq!(a.0, b.0);
        let d = (&a.1 - &b.1).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[test]
fn peft_config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("adapter_config.json");
    let write = |v: serde_json::Value| std::fs::write(&p, v.to_string()).unwrap();
    write(
        serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "use_dora": true}),
    );
    let e = lora::read_peft_config(&p).unwrap_err().to_string();
    assert!(
        e.contains("use_dora") && e.contains("adapter_config.json"),
        "{e}"
    );
    write(serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ".*q_proj"}));
    let e = lora::read_peft_config(&p).unwrap_err().to_string();
    assert!(e.contains("regex"), "{e}");
    write(serde_json::json!({"peft_type": "IA3", "target_modules": ["q_proj"]}));
    let e = lora::read_peft_config(&p).unwrap_err().to_string();
    assert!(e.contains("peft_type"), "{e}");
    write(
        serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": true,
        "target_modules": "all-linear", "alpha_pattern": {"v_proj": 32}}),
    );
    let (c, _) = lora::read_peft_config(&p).unwrap();
    assert_eq!(c.targets, Targets::AllLinear);
    assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 8.0);
    assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 16.0);
}
