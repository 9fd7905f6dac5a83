use super::*;

#[test]
fn names_map_to_the_hub() {
    assert_eq!(
        hub_tensor_name("blk.12.attn_output.weight").as_deref(),
        Some("model.layers.12.self_attn.o_proj.weight")
    );
    assert_eq!(
        hub_tensor_name("blk.0.ffn_norm.weight").as_deref(),
        Some("model.layers.0.post_attention_layernorm.weight")
    );
    assert_eq!(
        hub_tensor_name("blk.3.attn_q.bias").as_deref(),
        Some("model.layers.3.self_attn.q_proj.bias")
    );
    assert_eq!(
        hub_tensor_name("output.weight").as_deref(),
        Some("lm_head.weight")
    );
    assert_eq!(hub_tensor_name("blk.x.attn_q.weight"), None);
    assert_eq!(hub_tensor_name("blk.1.ssm_in.weight"), None);
    assert_eq!(hub_tensor_name("rope_freqs.weight"), None);
}

#[test]
fn unpermute_follows_the_index_formula_and_inverts_permute() {
    let (heads, d, cols) = (3usize, 8usize, 5usize);
    let rows = heads * d;
    let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
    let gguf = Tensor::from_vec(data.clone(), (rows, cols), &Device::Cpu).unwrap();
    let hub = unpermute_rope_rows(&gguf, heads)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for h in 0..heads {
        for a in 0..d / 2 {
            for b in 0..2 {
                let src = h * d + 2 * a + b;
                let dst = h * d + b * d / 2 + a;
                assert_eq!(hub[dst], data[src * cols..(src + 1) * cols].to_vec());
            }
        }
    }
    let back = permute_rope_rows(&unpermute_rope_rows(&gguf, heads).unwrap(), heads).unwrap();
    assert_eq!(
        back.to_vec2::<f32>().unwrap(),
        gguf.to_vec2::<f32>().unwrap()
    );
    // A bias (one dimension) takes the same row permutation.
    let bias = Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap();
    let ub = unpermute_rope_rows(&bias, heads)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(ub[1], 2.0);
    assert_eq!(ub[d / 2], 1.0);
    assert!(unpermute_rope_rows(&bias, 5).is_err());
}

#[test]
fn byte_spelling_is_gpt2s() {
    let s = byte_spelling();
    assert_eq!(s[b' ' as usize], 'Ġ');
    assert_eq!(s[b'\n' as usize], 'Ċ');
    assert_eq!(s[b'A' as usize], 'A');
    assert_eq!(s[0], 'Ā');
    let distinct: HashSet<char> = s.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
    let ours: HashSet<char> = distinct;
    let theirs: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    assert_eq!(ours, theirs);
}

#[test]
fn pre_tokenizers_by_name() {
    assert!(matches!(
        pre_tokenizer_for(Some("smollm")).unwrap(),
        PreTokenizerWrapper::ByteLevel(_)
    ));
    assert!(matches!(
        pre_tokenizer_for(Some("llama-bpe")).unwrap(),
        PreTokenizerWrapper::Sequence(_)
    ));
    assert!(pre_tokenizer_for(Some("no-such-pre")).is_err());
}

/// A tiny LLaMA written as llama.cpp would: untied output, q/k biases, rows permuted for
/// its rope, a byte-level vocabulary with one merge, a control and a user-defined token.
struct Tiny {
    hf: Vec<(&'static str, Tensor)>,
    metadata: Vec<(String, Value)>,
    extra_tensors: Vec<(String, Tensor)>,
}

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV: usize = 1;
const HEAD_DIM: usize = 4;
const FFN: usize = 12;

impl Tiny {
    fn new() -> Self {
        let dev = Device::Cpu;
        let spelling = byte_spelling();
        let mut tokens: Vec<String> = spelling.iter().map(|c| c.to_string()).collect();
        tokens.push("\u{120}t".into()); // "Ġt", from the one merge
        tokens.push("<|end|>".into());
        tokens.push("<think>".into());
        let mut types = vec![1i32; 257];
        types.push(3);
        types.push(4);
        let vocab = tokens.len();
        let arr_s = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".into(), Value::U32(1)),
            ("llama.context_length".into(), Value::U32(64)),
            ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
            ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
            (
                "llama.attention.head_count".into(),
                Value::U32(HEADS as u32),
            ),
            (
                "llama.attention.head_count_kv".into(),
                Value::U32(KV as u32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-6),
            ),
            ("llama.rope.freq_base".into(), Value::F32(10000.0)),
            (
                "llama.rope.dimension_count".into(),
                Value::U32(HEAD_DIM as u32),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), arr_s(tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                arr_s(vec!["\u{120} t".into()]),
            ),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
            (
                "tokenizer.chat_template".into(),
                Value::String("{{ x }}".into()),
            ),
        ];
        let r = |shape: &[usize], seed: f64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (i as f64 * 0.37 + seed).sin() as f32)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let hf = vec![
            ("token_embd.weight", r(&[vocab, HIDDEN], 0.1)),
            ("output.weight", r(&[vocab, HIDDEN], 0.2)),
            ("output_norm.weight", r(&[HIDDEN], 0.3)),
            ("blk.0.attn_norm.weight", r(&[HIDDEN], 0.4)),
            ("blk.0.ffn_norm.weight", r(&[HIDDEN], 0.5)),
            ("blk.0.attn_q.weight", r(&[HEADS * HEAD_DIM, HIDDEN], 0.6)),
            ("blk.0.attn_q.bias", r(&[HEADS * HEAD_DIM], 0.7)),
            ("blk.0.attn_k.weight", r(&[KV * HEAD_DIM, HIDDEN], 0.8)),
            ("blk.0.attn_k.bias", r(&[KV * HEAD_DIM], 0.9)),
            ("blk.0.attn_v.weight", r(&[KV * HEAD_DIM, HIDDEN], 1.0)),
            ("blk.0.attn_v.bias", r(&[KV * HEAD_DIM], 1.1)),
            (
                "blk.0.attn_output.weight",
                r(&[HIDDEN, HEADS * HEAD_DIM], 1.2),
            ),
            ("blk.0.ffn_gate.weight", r(&[FFN, HIDDEN], 1.3)),
            ("blk.0.ffn_up.weight", r(&[FFN, HIDDEN], 1.4)),
            ("blk.0.ffn_down.weight", r(&[HIDDEN, FFN], 1.5)),
        ];
        Self {
            hf,
            metadata,
            extra_tensors: vec![],
        }
    }

    fn set(mut self, key: &str, value: Value) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Writes the GGUF, with q/k rows permuted as llama.cpp's converter does.
    fn write(&self, path: &Path) {
        use candle_core::quantized::{GgmlDType, QTensor};
        let mut tensors = vec![];
        for (name, t) in &self.hf {
            let t = if name.contains(".attn_q.") {
                permute_rope_rows(t, HEADS).unwrap()
            } else if name.contains(".attn_k.") {
                permute_rope_rows(t, KV).unwrap()
            } else {
                t.clone()
            };
            let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
            tensors.push((name.to_string(), q));
        }
        for (name, t) in &self.extra_tensors {
            tensors.push((name.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()));
        }
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = File::create(path).unwrap();
        candle_core::quantized::gguf_file::write(&mut f, &md, &ts).unwrap();
    }
}

fn spelling_id(c: char) -> u32 {
    byte_spelling().iter().position(|&x| x == c).unwrap() as u32
}

#[test]
fn tiny_untied_model_round_trips_through_llama_cpp_layout() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Tiny::new();
    let path = dir.path().join("tiny.gguf");
    tiny.write(&path);
    let out = dir.path().join("out");
    let summary = import_gguf(&path, &out, DType::F32).unwrap();
    let cfg = &summary.config;
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["attention_bias"], true);
    assert_eq!(cfg["head_dim"], 4);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["vocab_size"], 259);
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(cfg["eos_token_id"], 257);
    assert!(cfg.get("bos_token_id").is_none());
    assert_eq!(summary.tensor_names.len(), 15);

    // Every weight comes back exactly as it was before llama.cpp's layout.
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (gguf_name, want) in &tiny.hf {
        let hub = hub_tensor_name(gguf_name).unwrap();
        let got = weights.get(&hub).unwrap_or_else(|| panic!("{hub} missing"));
        assert_eq!(got.dims(), want.dims(), "{hub}");
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{hub}");
    }

    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("a t<|end|><think>", false).unwrap();
    assert_eq!(ids.get_ids(), &[spelling_id('a'), 256, 257, 258]);
    // The control token is special (skipped on request), the user-defined one is not.
    assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), "a t<think>");
    let text = std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap();
    let tcfg: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(tcfg["eos_token"], "<|end|>");
    assert_eq!(tcfg["chat_template"], "{{ x }}");
    assert_eq!(tcfg["added_tokens_decoder"]["258"]["special"], false);
}

#[test]
fn unsupported_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let out = dir.path().join("out");
    let err_of = |tiny: Tiny| {
        tiny.write(&path);
        import_gguf(&path, &out, DType::F32)
            .unwrap_err()
            .to_string()
    };
    let e = err_of(Tiny::new().set("general.architecture", Value::String("gpt2".into())));
    assert!(
        e.contains("general.architecture") && e.contains("gpt2"),
        "{e}"
    );
    let e = err_of(Tiny::new().set("tokenizer.ggml.model", Value::String("llama".into())));
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
    let e = err_of(Tiny::new().set("tokenizer.ggml.pre", Value::String("mystery".into())));
    assert!(e.contains("mystery"), "{e}");
    let e = err_of(Tiny::new().set("llama.rope.dimension_count", Value::U32(2)));
    assert!(e.contains("partial rotary"), "{e}");
    let e = err_of(Tiny::new().set("llama.rope.scaling.type", Value::String("yarn".into())));
    assert!(e.contains("yarn"), "{e}");
    let mut t = Tiny::new();
    t.metadata
        .retain(|(k, _)| k != "llama.attention.head_count");
    let e = err_of(t);
    assert!(
        e.contains("llama.attention.head_count") && e.contains("missing"),
        "{e}"
    );
    let mut t = Tiny::new();
    let zeros = Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap();
    t.extra_tensors
        .push(("blk.0.ssm_in.weight".into(), zeros.clone()));
    let e = err_of(t);
    assert!(e.contains("blk.0.ssm_in.weight"), "{e}");
    let mut t = Tiny::new();
    t.extra_tensors.push(("rope_freqs.weight".into(), zeros));
    let e = err_of(t);
    assert!(e.contains("rope_freqs"), "{e}");
    assert!(!out.join("config.json").exists());
}
