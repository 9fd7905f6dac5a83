//! `model.quantize: gguf` on SmolLM2-135M-Instruct's Q4_1 file: every base linear kept in the
//! file's own blocks dequantizes to exactly the tensor the GGUF import wrote (q and k rows
//! un-permuted), and the model's loss over the blocks is the dense model's. Needs the models
//! cached by scripts/fetch-test-models.sh.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sft_model::load::{load_dir, load_dir_with, QuantOptions};
use sft_model::quant::Quantize;

fn smollm2_dir() -> PathBuf {
    let root = match std::env::var_os("SFT_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sft"),
    };
    let d = root.join("models/smollm2-135m-instruct");
    assert!(
        d.join("gguf_source.json").is_file(),
        "{} has no gguf_source.json: run scripts/fetch-test-models.sh",
        d.display()
    );
    d
}

#[test]
fn kept_blocks_dequantize_to_the_import_bit_for_bit() {
    let dir = smollm2_dir();
    let q = QuantOptions {
        how: Quantize::Gguf,
        double_quant: false,
    };
    let kept = load_dir_with(&dir, DType::F32, &Device::Cpu, &q, None).unwrap();
    let dense = load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let quantized = kept.model.quantized_weights();
    // 30 layers x 7 projections.
    assert_eq!(quantized.len(), 210);
    let by_name: std::collections::HashMap<_, _> =
        dense.model.named_weights().iter().cloned().collect();
    let mut formats = std::collections::BTreeSet::new();
    for (name, w) in quantized {
        formats.insert(w.format());
        let got = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = by_name[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} ({}) differs from the import",
            w.format()
        );
    }
    eprintln!("block types kept: {formats:?}");

    // The same loss (the product sums in another order: float rounding apart).
    let ids: Vec<u32> = (0..2 * 24).map(|i| (i * 7919 + 13) % 49152).collect();
    let ids = Tensor::from_vec(ids, (2, 24), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let loss = |m: &sft_model::llama::Llama| {
        m.loss(&ids, None, &labels)
            .unwrap()
            .mean()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (a, b) = (loss(&kept.model), loss(&dense.model));
    assert!(
        (a - b).abs() < 1e-4 * b.abs(),
        "loss over the blocks {a}, dense {b}"
    );
}
