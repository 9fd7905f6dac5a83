//! One LoRA training step, timed: forward (summed loss), backward, clipping and AdamW, on a
//! fixed batch of token ids. Used by `scripts/bench/train-step`; prints one JSON line.
//!
//!   cargo run --release -p sft-model --example train_step -- MODEL_DIR f32 4 256 5
//!
//! Arguments: model folder, dtype (f32|bf16|f16), batch, sequence length, measured steps.
//! `TRAIN_STEP_TARGETS` (default `q_proj,k_proj,v_proj,o_proj`), `TRAIN_STEP_RANK` (8) and
//! `TRAIN_STEP_ALPHA` (16) choose the adapter. Token ids are `(i * 7919 + 13) % vocab`, the
//! same formula as the PyTorch side of the benchmark, every position labelled.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sft_model::load::{load_dir_with, QuantOptions};
use sft_model::lora::{self, LoraConfig, Targets};
use sft_optim::{clip_grad_norm, AdamW, AdamWConfig, Grads, ParamSpec};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The process's anonymous resident memory now (VmHWM also counts the memory-mapped
/// checkpoint's pages, which the kernel can drop).
fn rss_anon_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    // One element-wise thread and allocator thresholds for reuse (see sft_model::runtime).
    sft_model::runtime::tune_cpu_runtime();
    let kernels = match sft_model::cpu_features::describe() {
        Ok(line) => line,
        Err(e) => {
            eprintln!("train_step: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("{kernels}");
    let path = sft_model::cpu_features::selected()
        .map(|(p, _)| p.name())
        .unwrap_or("refused");
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let dtype = match args.get(2).map(String::as_str).unwrap_or("f32") {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => panic!("unknown dtype {d}"),
    };
    let arg = |i: usize, d: usize| args.get(i).map(|s| s.parse().unwrap()).unwrap_or(d);
    let (b, t, steps) = (arg(3, 4), arg(4, 256), arg(5, 5));
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let targets: Vec<String> = env("TRAIN_STEP_TARGETS", "q_proj,k_proj,v_proj,o_proj")
        .split(',')
        .map(String::from)
        .collect();
    let r: usize = env("TRAIN_STEP_RANK", "8").parse().unwrap();
    let alpha: f64 = env("TRAIN_STEP_ALPHA", "16").parse().unwrap();
    // QLoRA: TRAIN_STEP_QUANTIZE=nf4|nf4-dq|q8_0|gguf keeps the base linears quantized.
    let qname = env("TRAIN_STEP_QUANTIZE", "none");
    let quant = QuantOptions {
        how: serde_json::from_value(serde_json::json!(qname.trim_end_matches("-dq"))).unwrap(),
        double_quant: qname.ends_with("-dq"),
    };

    // Backward recurses over the graph: a 30-layer model needs a large stack.
    let child = std::thread::Builder::new()
        .stack_size(512 << 20)
        .spawn(move || {
            let dev = Device::Cpu;
            let mut m = load_dir_with(&dir, dtype, &dev, &quant, None).unwrap();
            // TRAIN_STEP_CHECKPOINTING=1: recompute each layer in the backward.
            m.model.set_gradient_checkpointing(env("TRAIN_STEP_CHECKPOINTING", "0") == "1");
            let vocab = m.config.vocab_size;
            let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, t), &dev).unwrap();
            let labels = ids.to_dtype(DType::I64).unwrap();
            let mut cfg = LoraConfig::new(r, alpha, 0.0, Targets::from_names(&targets).unwrap());
            cfg.init_seed = 0;
            let adapter = lora::apply_lora(&mut m.model, &cfg).unwrap();
            let params: Vec<ParamSpec> = ParamSpec::all(&adapter.trainable());
            let mut opt = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
            let mut rows = vec![];
            for step in 0..steps + 1 {
                let t0 = Instant::now();
                let out = m.model.loss(&ids, None, &labels).unwrap();
                let loss = out.mean().unwrap();
                let loss_v = loss.to_scalar::<f32>().unwrap();
                let t1 = Instant::now();
                // The model's backward: with checkpointing it adds the recomputed layers' gradients.
                let store = m.model.backward(&loss).unwrap();
                let t2 = Instant::now();
                let mut grads = Grads::from_store(&params, &store).unwrap();
                drop(store);
                clip_grad_norm(&mut grads, 1.0).unwrap();
                opt.step(&grads, 1e-4).unwrap();
                let t3 = Instant::now();
                let (f, bw, o) = (
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64(),
                    (t3 - t2).as_secs_f64(),
                );
                eprintln!(
                    "step {step}: loss {loss_v:.4} forward {f:.3}s backward {bw:.3}s optimizer {o:.3}s"
                );
                if step > 0 {
                    rows.push((f + bw + o, f, bw, o));
                }
            }
            let mut total: Vec<f64> = rows.iter().map(|r| r.0).collect();
            total.sort_by(f64::total_cmp);
            let median = total[total.len() / 2];
            let med = |k: usize| {
                let mut v: Vec<f64> = rows
                    .iter()
                    .map(|r| [r.0, r.1, r.2, r.3][k])
                    .collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "{}",
                serde_json::json!({
                    "impl": "sft (candle)",
                    "quantize": qname,
                    "dtype": format!("{dtype:?}").to_lowercase(),
                    "batch": b, "seq_len": t, "steps": steps,
                    "median_step_s": median,
                    "tokens_per_s": (b * t) as f64 / median,
                    "median_forward_s": med(1), "median_backward_s": med(2),
                    "median_optimizer_s": med(3),
                    "trainable_params": adapter.num_params(),
                    "peak_rss_mib": peak_rss_mib(),
                    "rss_anon_mib_after": rss_anon_mib(),
                    "candle_threads": std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
                    "threads": candle_core::utils::get_num_threads(),
                    "cpu_kernels": path,
                })
            );
        })
        .unwrap();
    child.join().unwrap();
}
