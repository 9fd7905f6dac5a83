//! `sft merge-lora` on the imported SmolLM2 with PEFT's fixture adapter (whose B is random):
//! the merged folder loads as a plain model whose logits equal the unmerged adapter's.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sft_model::load::load_dir;

mod common;

#[test]
fn merge_lora_matches_the_unmerged_adapter() {
    let base = common::smollm2();
    let adapter = common::repo().join("tests/fixtures/peft_lora_smollm2");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("merge-lora-smollm2");
    let _ = std::fs::remove_dir_all(&out);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("merge-lora")
        .arg("--base")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        // Small shards so the sharded layout (with its index) is what gets loaded back.
        .args(["--max-shard-bytes", "200000000"])
        .status()
        .unwrap();
    assert!(status.success(), "sft merge-lora failed");
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the merged folder");
    }

    let ids = Tensor::new(&[[504u32, 198, 57, 4590, 788, 29, 1123, 42]], &Device::Cpu).unwrap();
    let merged = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
    let merged_logits = merged.model.forward_logits(&ids, None).unwrap();
    let mut unmerged = load_dir(&base, DType::F32, &Device::Cpu).unwrap();
    sft_model::lora::load_adapter(&mut unmerged.model, &adapter).unwrap();
    let unmerged_logits = unmerged.model.forward_logits(&ids, None).unwrap();
    let base_logits = load_dir(&base, DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .forward_logits(&ids, None)
        .unwrap();
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let d = max((&merged_logits - &unmerged_logits).unwrap());
    assert!(d < 1e-4, "merged vs unmerged logits differ by {d}");
    let moved = max((&base_logits - &unmerged_logits).unwrap());
    assert!(
        moved > 1e-2,
        "the adapter should change the logits (moved {moved})"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

fn max_abs(t: Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A QLoRA adapter: `merge-lora --quantize nf4` folds it into the NF4 base it was trained over
/// (dequantized, in the base's dtype), so the merged model's logits are the adapter's over the
/// NF4 base, not over the dense one; `sft score --quantize nf4` scores over that same base.
#[test]
fn qlora_merge_and_score_use_the_quantized_base() {
    let base = common::smollm2();
    let adapter = common::repo().join("tests/fixtures/peft_lora_smollm2");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("merge-lora-smollm2-nf4");
    let _ = std::fs::remove_dir_all(&out);
    let merge = std::process::Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("merge-lora")
        .arg("--base")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .args(["--quantize", "nf4"])
        .output()
        .unwrap();
    assert!(
        merge.status.success(),
        "sft merge-lora --quantize nf4 failed"
    );
    let report: serde_json::Value = serde_json::from_slice(&merge.stdout).unwrap();
    assert_eq!(report["quantize"], "nf4");
    assert_eq!(
        report["dequantized_linears"],
        30 * 7,
        "every base linear of SmolLM2"
    );

    let ids = Tensor::new(&[[504u32, 198, 57, 4590, 788, 29, 1123, 42]], &Device::Cpu).unwrap();
    let nf4 = sft_model::load::QuantOptions {
        how: sft_model::quant::Quantize::Nf4,
        double_quant: false,
    };
    let mut qlora =
        sft_model::load::load_dir_with(&base, DType::F32, &Device::Cpu, &nf4, None).unwrap();
    sft_model::lora::load_adapter(&mut qlora.model, &adapter).unwrap();
    let qlora_logits = qlora.model.forward_logits(&ids, None).unwrap();
    let merged = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
    let merged_logits = merged.model.forward_logits(&ids, None).unwrap();
    let mut dense = load_dir(&base, DType::F32, &Device::Cpu).unwrap();
    sft_model::lora::load_adapter(&mut dense.model, &adapter).unwrap();
    let dense_logits = dense.model.forward_logits(&ids, None).unwrap();
    let d = max_abs((&merged_logits - &qlora_logits).unwrap());
    assert!(d < 1e-3, "merged vs the adapter over NF4: {d}");
    let d_dense = max_abs((&merged_logits - &dense_logits).unwrap());
    assert!(
        d_dense > 10.0 * d,
        "the NF4 base should differ from the dense one ({d_dense} against {d})"
    );
    std::fs::remove_dir_all(&out).unwrap();

    // `sft score --quantize nf4`: the loss of the adapter over the NF4 base.
    let prompts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qlora-score.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"The capital of France is Paris.\"}\n",
    )
    .unwrap();
    let score = |quantize: &str| -> f64 {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sft"))
            .arg("score")
            .arg("--model")
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .args(["--device", "cpu", "--quantize", quantize, "--input"])
            .arg(&prompts)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        line["mean_next_token_loss"].as_f64().unwrap()
    };
    let (q, n) = (score("nf4"), score("none"));
    let enc = qlora
        .tokenizer
        .encode("The capital of France is Paris.", false)
        .unwrap();
    let ids: Vec<u32> = enc.get_ids().to_vec();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = qlora
        .model
        .forward_logits(&t, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    // The mean next-token cross-entropy, in f64.
    let loss = (0..ids.len() - 1)
        .map(|i| {
            let row = &logits[i];
            let max = row.iter().fold(f32::MIN, |m, v| m.max(*v)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|v| (*v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lse - row[ids[i + 1] as usize] as f64
        })
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    assert!(
        (q - loss).abs() < 1e-4,
        "score --quantize nf4 {q}, in-process {loss}"
    );
    assert!((q - n).abs() > 1e-4, "nf4 {q} and dense {n} should differ");

    // --double-quant is NF4's only.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("score")
        .arg("--model")
        .arg(&base)
        .args(["--quantize", "q8_0", "--double-quant", "--input"])
        .arg(&prompts)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--double-quant applies to --quantize nf4 only"),
        "{err}"
    );
}
