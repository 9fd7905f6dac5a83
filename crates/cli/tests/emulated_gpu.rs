//! `sft-train` under `SFT_KERNELS=emu`: every op with a CUDA kernel runs its CUDA launch on the
//! emulated GPU (bf16 activations, as on a GPU), through training steps, gradient
//! checkpointing, the held-out loss and IFS evaluations (generation), to the run's end; and an
//! unknown `SFT_KERNELS` is refused before anything runs.
mod common;
use common::*;
use std::path::Path;

/// A tiny random LLaMA with 64-wide heads (2 query heads over 1 K/V head) and SmolLM2's
/// tokenizer, under `dir`.
fn tiny_model_hd64(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("config-hd64.json");
    std::fs::write(
        &cfg,
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
            "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": true, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float32"}"#,
    )
    .unwrap();
    random_model(&cfg, &dir.join("tiny-hd64"))
}

#[test]
fn a_short_run_with_ifs_runs_to_its_end_on_the_emulated_gpu() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model_hd64(t.path());
    let cfg = config_file("emulated_gpu.yaml", t.path(), &model, &[]);
    let out = train(&cfg, &[], &[("SFT_KERNELS", "emu"), ("RUST_LOG", "info")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = t.path().join("ck/emu");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{metrics}");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // IFS at the start and after every 4 examples, each over 6 answered prompts.
    let ifs: Vec<&serde_json::Value> = recs.iter().filter(|r| r["eval"] == "ifs").collect();
    assert!(ifs.len() >= 3, "{metrics}");
    assert!(
        recs.iter()
            .any(|r| r.get("eval_loss").is_some_and(|v| v.is_f64())),
        "{metrics}"
    );
    // The summary says the run finished.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "finished", "{summary}");
}

#[test]
fn an_unknown_kernels_setting_is_refused_with_the_known_ones() {
    let (_t, cfg) = tiny_run("train_resume.yaml", &[("kind", "lora")]);
    let out = train(&cfg, &[], &[("SFT_KERNELS", "gpu")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SFT_KERNELS=gpu") && stderr.contains("`auto`") && stderr.contains("`emu`"),
        "{stderr}"
    );
}
