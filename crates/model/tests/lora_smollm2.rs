//! LoRA on the imported SmolLM2-135M-Instruct: PEFT's adapter fixture gives transformers'
//! logits, and 30 LoRA steps memorise a small batch while the base weights stay bit-identical.
//! Needs the models cached by scripts/fetch-test-models.sh.
mod common;

use common::with_big_stack;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use sft_model::load::{load_dir, LoadedModel};
use sft_model::lora::{self, LoraConfig, Targets};
use sft_optim::{clip_grad_norm, AdamW, AdamWConfig, Grads, ParamSpec};

fn cache_root() -> PathBuf {
    match std::env::var_os("SFT_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sft"),
    }
}

fn smollm2_dir() -> PathBuf {
    let d = cache_root().join("models/smollm2-135m-instruct");
    assert!(
        d.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh first",
        d.display()
    );
    d
}

fn fixture_dir() -> PathBuf {
    // Written by scripts/make-fixtures.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft_lora_smollm2")
}

fn load() -> LoadedModel {
    load_dir(&smollm2_dir(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn peft_adapter_fixture_gives_transformers_logits() {
    let mut m = load();
    let fx_path = fixture_dir().join("reference_top5_last_logits.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fx_path).unwrap()).unwrap();
    let adapter = lora::load_adapter(&mut m.model, &fixture_dir()).unwrap();
    assert_eq!(adapter.modules.len(), 30 * 3);
    assert_eq!(adapter.modules[0].scale, 2.0);
    let prompt = fx["prompt"].as_str().unwrap();
    let ids = m
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let input = Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap();
    let logits = m.model.forward_logits(&input, None).unwrap();
    let last: Vec<f32> = logits.i((0, ids.len() - 1)).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let want_ids: Vec<usize> = fx["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let want_vals: Vec<f64> = fx["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(&order[..5], &want_ids[..], "top-5 token ids");
    for (i, (&id, &want)) in want_ids.iter().zip(&want_vals).enumerate() {
        let got = last[id] as f64;
        assert!(
            (got - want).abs() < 2e-3,
            "top {i} (id {id}): {got} vs {want}"
        );
    }
    // Without the adapter the logits differ: the fixture's B is not zero.
    let base = load();
    let base_last: Vec<f32> = base
        .model
        .forward_logits(&input, None)
        .unwrap()
        .i((0, ids.len() - 1))
        .unwrap()
        .to_vec1()
        .unwrap();
    let moved = want_ids
        .iter()
        .map(|&i| (base_last[i] - last[i]).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-2,
        "the adapter should move the logits (moved {moved})"
    );
}

#[test]
fn thirty_lora_steps_memorise_a_batch_and_leave_the_base_untouched() {
    with_big_stack(|| {
        let mut m = load();
        let texts = [
            "The secret code of the blue door is 7141, and the green door opens with 2203.",
            "Zorblat the comet visits every 93 years; its tail smells faintly of cinnamon.",
        ];
        let enc: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| m.tokenizer.encode(*t, false).unwrap().get_ids().to_vec())
            .collect();
        let t = enc.iter().map(Vec::len).max().unwrap();
        let pad = 2u32;
        let mut ids = vec![];
        let mut mask = vec![];
        let mut labels = vec![];
        for e in &enc {
            for j in 0..t {
                let real = j < e.len();
                ids.push(if real { e[j] } else { pad });
                mask.push(real as u32);
                labels.push(if real { e[j] as i64 } else { -100 });
            }
        }
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, (2, t), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (2, t), &dev).unwrap();
        let labels = Tensor::from_vec(labels, (2, t), &dev).unwrap();

        let before: Vec<(String, Vec<u32>)> = m
            .model
            .named_weights()
            .iter()
            .map(|(n, w)| (n.clone(), bits(w)))
            .collect();
        let mut cfg = LoraConfig::new(
            8,
            16.0,
            0.0,
            Targets::from_names(&["q_proj", "k_proj", "v_proj", "o_proj"]).unwrap(),
        );
        cfg.init_seed = 1;
        let adapter = lora::apply_lora(&mut m.model, &cfg).unwrap();
        let params: Vec<ParamSpec> = ParamSpec::all(&adapter.trainable());
        let mut opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let mut losses = vec![];
        let start = std::time::Instant::now();
        for _ in 0..30 {
            let out = m.model.loss(&ids, Some(&mask), &labels).unwrap();
            let loss = out.mean().unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let store = loss.backward().unwrap();
            let mut grads = Grads::from_store(&params, &store).unwrap();
            clip_grad_norm(&mut grads, 1.0).unwrap();
            opt.step(&grads, 3e-3).unwrap();
        }
        let final_loss = m
            .model
            .loss(&ids, Some(&mask), &labels)
            .unwrap()
            .mean()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "30 steps in {:.1}s; loss {:.3} -> {:.3} ({losses:?})",
            start.elapsed().as_secs_f32(),
            losses[0],
            final_loss
        );
        assert!(
            final_loss < losses[0] / 4.0,
            "loss {} -> {final_loss}: not below a quarter",
            losses[0]
        );
        for ((n, w), (n0, b0)) in m.model.named_weights().iter().zip(&before) {
            assert_eq!(n, n0);
            assert!(bits(w) == *b0, "base weight {n} changed");
        }
    });
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}
