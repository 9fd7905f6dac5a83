//! GFLOPS of the linear layers' matmuls in bf16 (ours, through `ops::frozen_linear`) and f32
//! (candle's gemm), forward `x W^T` shapes of SmolLM2 at 1024 tokens.
use candle_core::{DType, Device, Tensor};

fn main() {
    sft_model::runtime::tune_cpu_runtime();
    let m = 1024;
    for (n, k) in [
        (576usize, 576usize),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ] {
        for dt in [DType::BF16, DType::F32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let iters = (20_000_000_000 / (2 * m * n * k)).max(2);
            let _ = sft_model::ops::frozen_linear(&x, &w).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..iters {
                let _ = sft_model::ops::frozen_linear(&x, &w).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!(
                "{dt:?} m={m} n={n} k={k}: {:.0} GFLOPS",
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
