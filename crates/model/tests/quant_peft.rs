//! A QLoRA step against PyTorch + PEFT + bitsandbytes (tests/fixtures/qlora/, written by
//! scripts/make-qlora-fixtures): SmolLM2-135M with its base linears in NF4, the PEFT adapter of
//! tests/fixtures/peft_lora_smollm2 on it, one batch of 2 x 24 tokens; the loss and the gradient
//! of every lora_A and lora_B. The fixture also holds the same step in float64 over the same
//! NF4 weights (stored rounded to float32, 6e-8 relative): the exact function both float32 implementations round. The bound: ours is no
//! farther from it than twice PEFT's own float32 error (loss, and all adapter gradients as one
//! vector). The same adapter over the dense base lands far from PEFT's loss: the comparison
//! sees the quantization.
mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::with_big_stack;
use sft_model::load::{load_dir_with, QuantOptions};
use sft_model::lora;
use sft_model::quant::Quantize;

fn smollm2_dir() -> PathBuf {
    let root = match std::env::var_os("SFT_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sft"),
    };
    root.join("models/smollm2-135m-instruct")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn qlora_step_matches_peft_with_bitsandbytes() {
    with_big_stack(|| {
        let q = QuantOptions {
            how: Quantize::Nf4,
            double_quant: false,
        };
        let mut m = load_dir_with(&smollm2_dir(), DType::F32, &Device::Cpu, &q, None).unwrap();
        assert_eq!(m.model.quantized_weights().len(), 210);
        let adapter =
            lora::load_adapter(&mut m.model, &fixtures().join("peft_lora_smollm2")).unwrap();
        let want = candle_core::safetensors::load(
            fixtures().join("qlora/peft_qlora_step.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let exact = candle_core::safetensors::load(
            fixtures().join("qlora/peft_qlora_step_f64.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let vocab = m.config.vocab_size as u32;
        let ids: Vec<u32> = (0..2 * 24u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let ids = Tensor::from_vec(ids, (2, 24), &Device::Cpu).unwrap();
        // transformers' causal-LM loss: position t predicts token t + 1.
        let labels = ids.to_dtype(DType::I64).unwrap();
        let loss = m.model.loss(&ids, None, &labels).unwrap().mean().unwrap();
        let ours = loss.to_scalar::<f32>().unwrap() as f64;
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
        let (peft, exact_loss) = (scalar(&want["loss"]), scalar(&exact["loss"]));
        let (e_ours, e_peft) = ((ours - exact_loss).abs(), (peft - exact_loss).abs());
        let dense_loss = {
            let mut d =
                sft_model::load::load_dir(&smollm2_dir(), DType::F32, &Device::Cpu).unwrap();
            lora::load_adapter(&mut d.model, &fixtures().join("peft_lora_smollm2")).unwrap();
            let l = d.model.loss(&ids, None, &labels).unwrap().mean().unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        };
        eprintln!(
            "loss: exact {exact_loss:.7}, ours {ours:.7} ({e_ours:.1e}), PEFT + bitsandbytes \
             {peft:.7} ({e_peft:.1e}); the dense base {dense_loss:.5}"
        );
        assert!(
            e_ours <= 2.0 * e_peft + 1e-6,
            "loss off the exact one by {e_ours:.1e}"
        );
        assert!(
            (dense_loss - exact_loss).abs() > 100.0 * e_ours,
            "the dense base is as close"
        );

        let grads = loss.backward().unwrap();
        let trainable = adapter.trainable();
        assert_eq!(trainable.len(), want.len() - 1);
        // The adapter gradients as one vector: |ours - exact| and |PEFT - exact| over |exact|.
        let (mut d_ours, mut d_peft, mut norm) = (0f64, 0f64, 0f64);
        let sq = |t: Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (name, var) in &trainable {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let p = want[name].to_dtype(DType::F64).unwrap();
            let x = &exact[name].to_dtype(DType::F64).unwrap();
            d_ours += sq((&g - x).unwrap());
            d_peft += sq((&p - x).unwrap());
            norm += sq(x.clone());
        }
        let (r_ours, r_peft) = ((d_ours / norm).sqrt(), (d_peft / norm).sqrt());
        eprintln!("adapter gradients off the exact ones: ours {r_ours:.2e}, PEFT {r_peft:.2e}");
        assert!(
            r_ours <= 2.0 * r_peft,
            "adapter gradients off by {r_ours:.2e} (PEFT {r_peft:.2e})"
        );
    });
}
