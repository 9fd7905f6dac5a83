//! The model beyond the CPU's default path, on a tiny random LLaMA:
//! - CUDA's dtype plan (`Activations::Weights`: bf16 activations on bf16 weights) run on the
//!   CPU, through the kernels and through the composed fallbacks (what CUDA runs where it has no
//!   kernel): a LoRA step, a full step, scoring and generation, close to f32;
//! - gradient checkpointing: the same loss and gradients as the plain run;
//! - packed rows: each example's loss and gradients as when it is alone, and no attention
//!   across examples.
//!
//! Backward recurses over the graph: the training tests run on a thread with a large stack.
mod common;

use common::testing::f32s;
use common::with_big_stack;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use sft_model::config::LlamaConfig;
use sft_model::generate::{generate_ids, GenerateConfig};
use sft_model::llama::{random_weights, Activations, Inputs, Llama};
use sft_model::lora::{self, LoraConfig, Targets};
use sft_model::ops;

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 41, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "max_position_embeddings": 128, "eos_token_id": 2}"#,
    )
    .unwrap()
}

fn model(dtype: DType, plan: Activations) -> Llama {
    let cfg = tiny_config();
    let w = random_weights(&cfg, dtype, &Device::Cpu, 7).unwrap();
    Llama::from_weights(&cfg, w)
        .unwrap()
        .with_activations(plan)
        .unwrap()
}

const ROWS: usize = 2;
const T: usize = 9;

/// A right-padded batch of two, labels on the second half of each row.
fn batch() -> (Vec<u32>, Vec<u8>, Vec<i64>) {
    let ids: Vec<u32> = vec![3, 17, 5, 9, 30, 11, 4, 0, 0, 8, 21, 13, 1, 35, 6, 27, 19, 2];
    let mask: Vec<u8> = vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .enumerate()
        .map(|(i, (&id, &m))| {
            if m == 1 && i % T >= 4 {
                id as i64
            } else {
                -100
            }
        })
        .collect();
    (ids, mask, labels)
}

fn inputs<'a>(ids: &'a [u32], mask: &'a [u8]) -> Inputs<'a> {
    Inputs {
        ids,
        rows: ROWS,
        seq_len: T,
        attention_mask: Some(mask),
        segment_ids: None,
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// Mean loss and the gradients of `vars` for one LoRA or full step of `m`.
fn step(m: &Llama, vars: &[(String, Var)]) -> (f64, HashMap<String, Vec<f32>>) {
    let (ids, mask, labels) = batch();
    let out = m.loss_inputs(&inputs(&ids, &mask), &labels).unwrap();
    let loss = out.mean().unwrap();
    let grads = m.backward(&loss).unwrap();
    let g = vars
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n} received no gradient"));
            assert_eq!(g.dtype(), v.dtype(), "{n}: gradient dtype");
            (n.clone(), f32s(g))
        })
        .collect();
    (scalar(&loss), g)
}

fn lora_vars(m: &mut Llama, dropout: f64) -> Vec<(String, Var)> {
    let targets = Targets::from_names(&["all-linear"]).unwrap();
    let cfg = LoraConfig::new(4, 8.0, dropout, targets);
    let adapter = lora::apply_lora(m, &cfg).unwrap();
    // B starts at zero in PEFT's init: give it values so the adapter path matters.
    for (i, (name, v)) in adapter.trainable().iter().enumerate() {
        if name.contains("lora_B") {
            let r = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
            let r = (r + i as f64 * 1e-3).unwrap();
            v.set(&r.to_dtype(v.dtype()).unwrap()).unwrap();
        }
    }
    adapter.trainable()
}

/// The same adapter weights in two models.
fn copy_vars(from: &[(String, Var)], to: &[(String, Var)]) {
    for ((n1, a), (n2, b)) in from.iter().zip(to) {
        assert_eq!(n1, n2);
        b.set(&a.as_tensor().to_dtype(b.dtype()).unwrap()).unwrap();
    }
}

/// CUDA's plan on the CPU: bf16 activations end to end, a LoRA step (dropout on) and a full
/// step, through the kernels and through the composed fallbacks, with losses and gradients
/// close to the f32 model's.
#[test]
fn cuda_plan_trains_on_the_cpu() {
    with_big_stack(|| {
        let mut reference = model(DType::F32, Activations::Weights);
        let ref_vars = lora_vars(&mut reference, 0.1);
        lora::set_training(&mut reference, Some(5));
        let (ref_loss, ref_grads) = step(&reference, &ref_vars);
        for composed in [false, true] {
            let run = || {
                let mut m = model(DType::BF16, Activations::Weights);
                assert_eq!(m.activation_dtype(), DType::BF16);
                let vars = lora_vars(&mut m, 0.1);
                copy_vars(&ref_vars, &vars);
                lora::set_training(&mut m, Some(5));
                let (ids, mask, _) = batch();
                let h = m.forward_hidden_inputs(&inputs(&ids, &mask)).unwrap();
                assert_eq!(h.dtype(), DType::BF16, "hidden states");
                step(&m, &vars)
            };
            let (loss, grads) = if composed {
                ops::with_composed(run)
            } else {
                run()
            };
            assert!(
                (loss - ref_loss).abs() < 0.02 * ref_loss.abs(),
                "composed {composed}: bf16 loss {loss} vs f32 {ref_loss}"
            );
            for (n, g) in &grads {
                let e = max_rel(g, &ref_grads[n]);
                assert!(e < 0.08, "composed {composed}: {n} differs from f32 by {e}");
            }
        }
        // Full fine-tuning: every weight a bf16 Var.
        for composed in [false, true] {
            let run = || {
                let mut m = model(DType::BF16, Activations::Weights);
                let vars = lora::make_all_trainable(&mut m).unwrap();
                assert!(vars.iter().all(|(_, v)| v.dtype() == DType::BF16));
                step(&m, &vars)
            };
            let (loss, grads) = if composed {
                ops::with_composed(run)
            } else {
                run()
            };
            let mut f = model(DType::F32, Activations::Weights);
            let fvars = lora::make_all_trainable(&mut f).unwrap();
            let (floss, fgrads) = step(&f, &fvars);
            assert!(
                (loss - floss).abs() < 0.02 * floss.abs(),
                "{loss} vs {floss}"
            );
            assert_eq!(grads.len(), fgrads.len());
            for (n, g) in &grads {
                let e = max_rel(g, &fgrads[n]);
                assert!(e < 0.1, "full, composed {composed}: {n} differs by {e}");
            }
        }
    });
}

/// Scoring and greedy generation under CUDA's plan on the CPU: bf16 logits close to f32's,
/// and generation runs with a bf16 KV cache.
#[test]
fn cuda_plan_scores_and_generates_on_the_cpu() {
    let f32m = model(DType::F32, Activations::Weights);
    let bf = model(DType::BF16, Activations::Weights);
    let ids = Tensor::new(&[[3u32, 17, 5, 9, 30, 11]], &Device::Cpu).unwrap();
    let want = f32s(&f32m.forward_logits(&ids, None).unwrap());
    for composed in [false, true] {
        let logits = if composed {
            ops::with_composed(|| bf.forward_logits(&ids, None))
        } else {
            bf.forward_logits(&ids, None)
        }
        .unwrap();
        assert_eq!(logits.dtype(), DType::BF16);
        let e = max_rel(&f32s(&logits), &want);
        assert!(e < 0.03, "composed {composed}: logits differ by {e}");
        let opts = GenerateConfig {
            max_new_tokens: 5,
            ..Default::default()
        };
        let prompts = vec![vec![3u32, 17, 5], vec![9u32, 30, 11, 4, 8]];
        let out = if composed {
            ops::with_composed(|| generate_ids(&bf, None, &prompts, &opts))
        } else {
            generate_ids(&bf, None, &prompts, &opts)
        }
        .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| o.output_ids.len() == 5));
    }
}

/// With gradient checkpointing the loss and every gradient equal the plain run's (dropout
/// on: the recomputed forward redraws the same masks), for LoRA and full fine-tuning.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    with_big_stack(|| {
        for full in [false, true] {
            let build = |ckpt: bool| {
                let mut m = model(DType::F32, Activations::Auto);
                let vars = if full {
                    lora::make_all_trainable(&mut m).unwrap()
                } else {
                    let v = lora_vars(&mut m, 0.2);
                    lora::set_training(&mut m, Some(11));
                    v
                };
                m.set_gradient_checkpointing(ckpt);
                (m, vars)
            };
            let (plain, pv) = build(false);
            let (ckpt, cv) = build(true);
            copy_vars(&pv, &cv);
            let (l1, g1) = step(&plain, &pv);
            let (l2, g2) = step(&ckpt, &cv);
            assert_eq!(l1, l2, "full {full}: loss");
            assert_eq!(g1.len(), g2.len());
            for (n, g) in &g1 {
                let e = max_rel(&g2[n], g);
                assert!(e < 1e-6, "full {full}: {n} differs by {e}");
            }
        }
    });
}

/// Packed rows: each example's summed loss and its gradients equal those of the example
/// alone (within 1e-5 in f32), and changing one example's tokens leaves the others' logits
/// exactly as they were.
#[test]
fn packed_examples_train_as_if_alone() {
    with_big_stack(|| {
        let examples: Vec<Vec<u32>> = vec![
            vec![3, 17, 5, 9, 30],
            vec![11, 4, 8, 21],
            vec![13, 1, 35, 6, 27, 19],
        ];
        // Prompt tokens (-100) first in each example, as the data crate builds them.
        let labels_of = |e: &[u32]| -> Vec<i64> {
            e.iter()
                .enumerate()
                .map(|(i, &t)| if i < 2 { -100 } else { t as i64 })
                .collect()
        };
        let mut m = model(DType::F32, Activations::Auto);
        let vars = lora_vars(&mut m, 0.0);
        let run = |ids: &[u32], segs: Option<&[u32]>, labels: &[i64]| {
            let inp = Inputs {
                ids,
                rows: 1,
                seq_len: ids.len(),
                attention_mask: None,
                segment_ids: segs,
            };
            let out = m.loss_inputs(&inp, labels).unwrap();
            let grads = m.backward(&out.sum).unwrap();
            let g: Vec<Vec<f32>> = vars
                .iter()
                .map(|(_, v)| f32s(grads.get(v.as_tensor()).unwrap()))
                .collect();
            (scalar(&out.sum), g)
        };
        // Alone: the sums of the three examples' losses and gradients.
        let mut alone_loss = 0.0;
        let mut alone_g: Vec<Vec<f32>> = vec![];
        for e in &examples {
            let (l, g) = run(e, None, &labels_of(e));
            alone_loss += l;
            if alone_g.is_empty() {
                alone_g = g;
            } else {
                for (a, b) in alone_g.iter_mut().zip(g) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        // Packed into one row with two padding positions at the end.
        let mut ids = vec![];
        let mut segs = vec![];
        let mut labels = vec![];
        for (i, e) in examples.iter().enumerate() {
            ids.extend(e);
            segs.extend(std::iter::repeat_n(i as u32 + 1, e.len()));
            labels.extend(labels_of(e));
        }
        ids.extend([0, 0]);
        segs.extend([0, 0]);
        labels.extend([-100, -100]);
        let (packed_loss, packed_g) = run(&ids, Some(&segs), &labels);
        assert!(
            (packed_loss - alone_loss).abs() < 1e-5 * alone_loss.abs().max(1.0),
            "packed {packed_loss} vs alone {alone_loss}"
        );
        for ((n, _), (a, b)) in vars.iter().zip(packed_g.iter().zip(&alone_g)) {
            let e = max_rel(a, b);
            assert!(e < 1e-5, "{n}: packed gradient differs by {e}");
        }
        // No attention across examples: change the middle example's tokens.
        let logits = |ids: &[u32]| -> Vec<Vec<f32>> {
            let inp = Inputs {
                ids,
                rows: 1,
                seq_len: ids.len(),
                attention_mask: None,
                segment_ids: Some(&segs),
            };
            let h = m.forward_hidden_inputs(&inp).unwrap();
            let l = m.lm_head(&h).unwrap().squeeze(0).unwrap();
            l.to_vec2().unwrap()
        };
        let before = logits(&ids);
        let mut changed = ids.clone();
        for t in changed.iter_mut().skip(5).take(4) {
            *t = (*t + 7) % 41;
        }
        let after = logits(&changed);
        for i in (0..5).chain(9..15) {
            assert_eq!(before[i], after[i], "position {i} saw another example");
        }
        assert_ne!(before[6], after[6]);
    });
}
