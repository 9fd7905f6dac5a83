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
