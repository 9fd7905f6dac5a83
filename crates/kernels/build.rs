//! Compiles every `src/*.cu` to PTX with nvcc (found through CUDA_ROOT, CUDA_PATH or the
//! PATH; `scripts/build-cuda.sh` provides one), for compute capability `CUDA_COMPUTE_CAP`
//! (90 when unset: H100, H200), and writes `ptx.rs` with one `&str` constant per file.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(90);
    let ptx = cudaforge::KernelBuilder::new()
        .source_dir("src")
        .watch(["src/common.cuh"])
        .compute_cap(cap)
        .no_incremental()
        .arg("-std=c++17")
        .arg("-O3")
        .arg("--expt-relaxed-constexpr")
        .arg("-Isrc")
        .build_ptx()?;
    ptx.write(out.join("ptx.rs"))?;
    Ok(())
}
