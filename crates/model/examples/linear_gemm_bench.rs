//! GFLOP/s of the linear layers' products `x W^T` on the CPU, SmolLM2's shapes, one JSON line
//! per (rows, shape, path): bf16 through the packed bf16 kernel, f32 through candle's
//! gemm (what an unpacked f32 weight gets) and through the packed f32 kernel (what a kept f32
//! pack serves). `scripts/bench/generate` runs it for the machine's GEMM rate beside PyTorch's `F.linear`.
//!
//!   cargo run --release -p sft-model --example linear_gemm_bench [ROWS ...]   (default 32 1024)
//!   GEMM_SHAPES="576:576,192:576" (n:k of W, default SmolLM2's) SFT_CPU_KERNELS=avx2 (a path)
//!
//! Prints the CPU-kernels line (`sft_model::cpu_features::describe`) on stderr.
use candle_core::{DType, Device, Tensor};
use sft_model::ops;

fn main() {
    sft_model::runtime::tune_cpu_runtime();
    match sft_model::cpu_features::describe() {
        Ok(line) => eprintln!("{line}"),
        Err(e) => {
            eprintln!("linear_gemm_bench: {e}");
            std::process::exit(2);
        }
    }
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![32, 1024]
    } else {
        rows
    };
    // GEMM_SHAPES="n:k,n:k" replaces SmolLM2's forward shapes.
    let shapes: Vec<(usize, usize)> = match std::env::var("GEMM_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| {
                let (n, k) = p.split_once(':').expect("GEMM_SHAPES: n:k,n:k");
                (
                    n.trim().parse().expect("GEMM_SHAPES: n"),
                    k.trim().parse().expect("GEMM_SHAPES: k"),
                )
            })
            .collect(),
        Err(_) => vec![
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ],
    };
    for m in rows {
        for &(n, k) in &shapes {
            for (path, dt, packed) in [
                ("bf16 packed", DType::BF16, true),
                ("f32 candle", DType::F32, false),
                ("f32 packed", DType::F32, true),
            ] {
                if path == "f32 packed" && m > ops::PACKED_F32_MAX_ROWS {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dt))
                    .expect("x");
                let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dt))
                    .expect("w");
                let pack = if packed {
                    match ops::WeightPack::new(&w).expect("pack") {
                        Some(p) => Some(p),
                        None => {
                            eprintln!("{path}: this CPU does not run the kernel");
                            continue;
                        }
                    }
                } else {
                    None
                };
                let run =
                    || ops::frozen_linear_packed(&x, &w, (pack.as_ref(), None)).expect("product");
                let flops = 2.0 * (m * n * k) as f64;
                let iters = (20e9 / flops).max(3.0) as usize;
                run();
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    run();
                }
                let s = t.elapsed().as_secs_f64() / iters as f64;
                println!(
                    "{{\"path\": \"{path}\", \"m\": {m}, \"n\": {n}, \"k\": {k}, \"gflops\": {:.1}}}",
                    flops / s / 1e9
                );
            }
        }
    }
}
