//! GFLOP/s of the small f32 products that `SFT_CPU_KERNELS` now steers besides the linears'
//! `x W^T`: attention's per-block products (64 query rows, head size 64, up to 256 keys; one
//! thread, as each kv group's task runs them) and the LoRA adapter's rank-8 products (all
//! threads), on SmolLM2-135M's LoRA-step shapes (4 x 256 tokens). Each shape runs through the
//! `gemm` crate (what they ran before, and what `portable` runs) and through our f32 kernel
//! (`ops::gemm_f32_slices`, B packed per call), same process, interleaved, best of 5. Thin
//! products (under 16 rows or columns), which go to the `gemm` crate on every path, are listed
//! as such.
//!
//!   cargo run --release -p sft-model --example small_gemm_bench
//!   SFT_CPU_KERNELS=avx2 cargo run --release -p sft-model --example small_gemm_bench
//!
//! Prints the CPU-kernels line on stderr and one JSON line per (shape, path) on stdout.
use sft_model::cpu_features;

/// (name, m, n, k, A strides, B strides, all threads).
type Shape = (
    &'static str,
    usize,
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    bool,
);

fn main() {
    sft_model::runtime::tune_cpu_runtime();
    let kernels = match cpu_features::describe().and_then(|l| {
        eprintln!("{l}");
        cpu_features::kernels()
    }) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("small_gemm_bench: {e}");
            std::process::exit(2);
        }
    };
    let (hd, nhd, keys, m, d, r) = (64, 9 * 64, 256, 1024, 576, 8);
    let shapes: Vec<Shape> = vec![
        // Q K^T: (64 x hd) · K^T, K rows hd apart.
        ("attn q.k^T", 64, keys, hd, (nhd, 1), (1, hd), false),
        ("attn q.k^T 64 keys", 64, 64, hd, (nhd, 1), (1, hd), false),
        // P V: P rows 256 apart, V rows hd apart.
        ("attn p.v", 64, hd, keys, (keys, 1), (hd, 1), false),
        ("attn p.v 64 keys", 64, hd, 64, (keys, 1), (hd, 1), false),
        // dP = dO V^T; dV = P^T dO; dQ = dS K; dK = dS^T Q.
        ("attn dO.v^T", 64, keys, hd, (nhd, 1), (1, hd), false),
        ("attn p^T.dO", keys, hd, 64, (1, keys), (nhd, 1), false),
        ("attn dS.k", 64, hd, keys, (keys, 1), (hd, 1), false),
        ("attn dS^T.q", keys, hd, 64, (1, keys), (hd, 1), false),
        // LoRA: h = x A^T, delta = h B^T; backward g B, gB A, gB^T x, h^T g.
        ("lora x.A^T", m, r, d, (d, 1), (1, d), true),
        ("lora h.B^T", m, d, r, (r, 1), (1, r), true),
        ("lora g.B", m, r, d, (d, 1), (r, 1), true),
        ("lora gB.A", m, d, r, (r, 1), (d, 1), true),
        ("lora gB^T.x", r, d, m, (1, r), (d, 1), true),
        ("lora h^T.g", r, d, m, (1, r), (d, 1), true),
    ];
    let mut seed = 1u32;
    let mut rand = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    for (name, m, n, k, a_st, b_st, par) in shapes {
        let span = |(rs, cs): (usize, usize), r: usize, c: usize| (r - 1) * rs + (c - 1) * cs + 1;
        let a = rand(span(a_st, m, k).max(m * k));
        let b = rand(span(b_st, k, n).max(k * n));
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let iters = ((2e9 / flops) as usize).clamp(3, 20000);
        let ours = |c: &mut [f32]| {
            sft_model::ops::gemm_f32_slices(kernels, c, n, (m, n, k), &a, a_st, &b, b_st, par)
        };
        if !ours(&mut c) {
            println!(
                "{{\"product\": \"{name}\", \"m\": {m}, \"n\": {n}, \"k\": {k}, \"ours\": \"thin: the gemm crate on every path\"}}"
            );
            continue;
        }
        let ours = |c: &mut [f32]| {
            ours(c);
        };
        let crate_gemm = |c: &mut [f32]| {
            let threads = if par {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the vectors hold the matrices their strides describe.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    a_st.1 as isize,
                    a_st.0 as isize,
                    b.as_ptr(),
                    b_st.1 as isize,
                    b_st.0 as isize,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    threads,
                )
            }
        };
        let mut best = [f64::MAX; 2];
        for _ in 0..5 {
            for (i, f) in [&crate_gemm as &dyn Fn(&mut [f32]), &ours]
                .iter()
                .enumerate()
            {
                f(&mut c);
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    f(&mut c);
                }
                best[i] = best[i].min(t.elapsed().as_secs_f64() / iters as f64);
            }
        }
        let [g, o] = best.map(|s| flops / s / 1e9);
        println!(
            "{{\"product\": \"{name}\", \"m\": {m}, \"n\": {n}, \"k\": {k}, \"gemm_crate_gflops\": {g:.1}, \"ours_gflops\": {o:.1}, \"ratio\": {:.2}}}",
            o / g
        );
    }
}
