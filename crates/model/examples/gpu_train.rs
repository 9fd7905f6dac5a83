//! Training-step speed and memory of a LLaMA-shaped model with random weights on a GPU: the
//! `sft` side of `scripts/bench/gpu` (PyTorch + PEFT is the other, in the same run). Weights
//! are drawn on the device (no files), bf16 by default; LoRA (r 16, alpha 32, dropout 0.05 on
//! all seven linears), QLoRA (the same LoRA over base linears quantized to NF4 on the host as
//! they are drawn, then kept as blocks) or full fine-tuning (bf16 weights, f32 AdamW moments,
//! no f32 master copy); AdamW, global-norm clipping at 1.0, one micro-batch of `batch x seq`
//! random tokens.
//! Prints one JSON line: the median step after the warm-up, tokens/s, the CUDA memory pool's
//! peak (bytes in use by tensors, as torch.cuda.max_memory_allocated) and the model FLOPs
//! utilisation (LoRA ~4 N, full ~6 N FLOPs per token, against 989 TFLOP/s dense bf16).
//!
//!   gpu_train [--shape 7b|13b|small] [--kind lora|qlora|full] [--ckpt] [--batch 4] [--seq 1024]
//!             [--steps 6] [--warmup 2] [--vocab 32000] [--dtype bf16|f32] [--dropout 0.05]
//!   gpu_train --generate PROMPTS [--new-tokens 64] [--shape 7b]
//!       batched greedy generation with the KV cache: PROMPTS random prompts of 16-48 tokens in
//!       one left-padded batch, the best of two runs (what IFS evaluation does in a run)
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use sft_model::config::LlamaConfig;
use sft_model::llama::{weight_shapes, Activations, Inputs, Llama};
use sft_model::lora::{self, LoraConfig, Targets};

struct Args {
    shape: String,
    kind: String,
    ckpt: bool,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    vocab: Option<usize>,
    dtype: DType,
    dropout: f64,
    generate: Option<usize>,
    new_tokens: usize,
}

fn args() -> Args {
    let mut a = Args {
        shape: "7b".into(),
        kind: "lora".into(),
        ckpt: false,
        batch: 4,
        seq: 1024,
        steps: 6,
        warmup: 2,
        vocab: None,
        dtype: DType::BF16,
        dropout: 0.05,
        generate: None,
        new_tokens: 64,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--shape" => a.shape = val(),
            "--kind" => a.kind = val(),
            "--ckpt" => {
                a.ckpt = true;
                i += 1;
                continue;
            }
            "--batch" => a.batch = val().parse().expect("--batch N"),
            "--seq" => a.seq = val().parse().expect("--seq N"),
            "--steps" => a.steps = val().parse().expect("--steps N"),
            "--warmup" => a.warmup = val().parse().expect("--warmup N"),
            "--vocab" => a.vocab = Some(val().parse().expect("--vocab N")),
            "--dropout" => a.dropout = val().parse().expect("--dropout P"),
            "--generate" => a.generate = Some(val().parse().expect("--generate N")),
            "--new-tokens" => a.new_tokens = val().parse().expect("--new-tokens N"),
            "--dtype" => {
                a.dtype = match val().as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => panic!("--dtype {other}: expected bf16 or f32"),
                }
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn config(shape: &str, vocab: Option<usize>) -> LlamaConfig {
    let (h, i, l, nh, nkv, v) = match shape {
        "7b" => (4096, 11008, 32, 32, 32, 32000),
        "13b" => (5120, 13824, 40, 40, 40, 32000),
        // SmolLM2-135M's shape
        "small" => (576, 1536, 30, 9, 3, 49152),
        other => panic!("--shape {other}: expected 7b, 13b or small"),
    };
    let v = vocab.unwrap_or(v);
    LlamaConfig::from_json_str(&format!(
        r#"{{"model_type": "llama", "vocab_size": {v}, "hidden_size": {h},
            "intermediate_size": {i}, "num_hidden_layers": {l}, "num_attention_heads": {nh},
            "num_key_value_heads": {nkv}, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "max_position_embeddings": 4096, "eos_token_id": 2}}"#
    ))
    .expect("config")
}

/// N(0, 0.02) matrices and unit norms, drawn on the device.
fn weights(cfg: &LlamaConfig, dt: DType, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, dt, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?.to_dtype(dt)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// As [`weights`], with the base linears quantized to NF4 one at a time as they are drawn
/// (the dense copy dropped before the next), as `model.quantize: nf4` loads a checkpoint.
#[allow(clippy::type_complexity)]
fn quantized_weights(
    cfg: &LlamaConfig,
    dt: DType,
    dev: &Device,
) -> Result<(
    HashMap<String, Tensor>,
    HashMap<String, sft_model::quant::SharedQuant>,
)> {
    use sft_model::quant::{is_quantized_linear, QuantWeight, Quantize};
    let (mut dense, mut quant) = (HashMap::new(), HashMap::new());
    for (name, shape) in weight_shapes(cfg) {
        if is_quantized_linear(&name) {
            let w = Tensor::randn(0f32, 0.02, shape, dev)?.to_dtype(dt)?;
            let q = QuantWeight::quantize(&w, Quantize::Nf4, false, dt)?;
            quant.insert(name, std::sync::Arc::new(q));
        } else if name.ends_with("norm.weight") {
            dense.insert(name, Tensor::ones(shape, dt, dev)?);
        } else {
            dense.insert(name, Tensor::randn(0f32, 0.02, shape, dev)?.to_dtype(dt)?);
        }
    }
    Ok((dense, quant))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let dev = sft_model::device::open("cuda")?;
    let cfg = config(&a.shape, a.vocab);
    let t0 = Instant::now();
    let qlora = a.kind == "qlora";
    let mut model = if qlora {
        let (dense, quant) = quantized_weights(&cfg, a.dtype, &dev)?;
        Llama::from_parts(&cfg, dense, quant)?
    } else {
        Llama::from_weights(&cfg, weights(&cfg, a.dtype, &dev)?)?
    }
    .with_activations(Activations::Weights)?;
    model.set_gradient_checkpointing(a.ckpt);
    if let Some(n) = a.generate {
        return Ok(generate(&model, &dev, n, a.new_tokens, &a.shape)?);
    }
    let n_params: usize = model
        .named_weights()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum::<usize>()
        + model
            .quantized_weights()
            .iter()
            .map(|(_, q)| q.rows() * q.cols())
            .sum::<usize>();
    let full = a.kind == "full";
    let vars = if full {
        lora::make_all_trainable(&mut model)?
    } else {
        let targets = Targets::from_names(&["all-linear"])?;
        lora::apply_lora(&mut model, &LoraConfig::new(16, 32.0, a.dropout, targets))?.trainable()
    };
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let specs: Vec<sft_optim::ParamSpec> = sft_optim::ParamSpec::all(&vars);
    let mut opt = sft_optim::AdamW::new(specs.clone(), Default::default())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if full {
        opt = opt.without_master_weights();
    }
    dev.synchronize()?;
    eprintln!(
        "built in {:.1}s: {n_params} parameters, {trainable} trainable",
        t0.elapsed().as_secs_f64()
    );
    let n = a.batch * a.seq;
    let ids: Vec<u32> = (0..n)
        .map(|i| ((i * 7919 + 13) % (cfg.vocab_size - 3)) as u32 + 3)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let inputs = Inputs {
        ids: &ids,
        rows: a.batch,
        seq_len: a.seq,
        attention_mask: None,
        segment_ids: None,
    };
    sft_model::device::reset_peak_memory(&dev)?;
    let mut times = vec![];
    for step in 0..a.warmup + a.steps {
        let s = Instant::now();
        if !full {
            lora::set_training(&mut model, Some(step as u64));
        }
        let out = model.loss_inputs(&inputs, &labels)?;
        let loss = out.mean()?;
        let store = model.backward(&loss)?;
        let mut acc = sft_optim::GradAccumulator::new();
        acc.add(&specs, &store, 1)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        drop(store);
        let mut grads = acc
            .finish()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        sft_optim::clip_grad_norm(&mut grads, 1.0)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        opt.step(&grads, 2e-5)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let l = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        dev.synchronize()?;
        let dt = s.elapsed().as_secs_f64();
        eprintln!("sft step {step}: loss {l:.4} {dt:.3}s");
        if step >= a.warmup {
            times.push(dt);
        }
    }
    times.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let med = times[times.len() / 2];
    let (used, reserved) = sft_model::device::peak_memory(&dev)?.unwrap_or((0, 0));
    let est = sft_model::memory::estimate(
        &cfg,
        &sft_model::memory::Setup {
            weight_bytes: a.dtype.size_in_bytes() as u64,
            linear_bits: qlora.then_some(4.5),
            activation_bytes: a.dtype.size_in_bytes() as u64,
            lora_params: (!full).then_some(trainable as u64),
            master_weights: false,
            gradient_checkpointing: a.ckpt,
            batch: a.batch as u64,
            seq: a.seq as u64,
            loss_chunk: 1 << 27,
        },
    );
    let flops = if full { 6.0 } else { 4.0 } * n_params as f64 * n as f64 / med;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "sft",
            "shape": a.shape,
            "kind": a.kind,
            "grad_ckpt": a.ckpt,
            "dtype": format!("{:?}", a.dtype),
            "batch": a.batch,
            "seq": a.seq,
            "median_step_s": med,
            "tokens_per_s": n as f64 / med,
            "peak_allocated_gib": gib(used),
            "peak_reserved_gib": gib(reserved),
            "estimate_gib": gib(est.total()),
            "params": n_params,
            "trainable": trainable,
            "mfu": flops / 989e12,
        })
    );
    Ok(())
}

/// Batched greedy generation of `n` random prompts, `new` tokens each (no EOS: all run).
fn generate(model: &Llama, dev: &Device, n: usize, new: usize, shape: &str) -> Result<()> {
    use sft_model::generate::{generate_ids, GenerateConfig};
    let vocab = model.config().vocab_size as u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            let len = 16 + (next() % 33) as usize;
            (0..len)
                .map(|_| (3 + next() % (vocab - 3)) as u32)
                .collect()
        })
        .collect();
    let cfg = GenerateConfig {
        max_new_tokens: new,
        batch_size: n,
        ..Default::default()
    };
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let s = Instant::now();
        let out = generate_ids(model, None, &prompts, &cfg)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        dev.synchronize()?;
        best = best.min(s.elapsed().as_secs_f64());
        assert!(out.iter().all(|g| g.output_ids.len() == new));
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "sft generate (bf16)",
            "shape": shape,
            "prompts": n,
            "new_tokens": new,
            "seconds": best,
            "tokens_per_s": (n * new) as f64 / best,
        })
    );
    Ok(())
}
