//! sft-kernels: the CUDA C++ sources of `sft_model::ops`, compiled to PTX at build time (one
//! `&str` constant per `.cu` file: `ATTENTION`, `NORM`, ...). The model crate loads them into its
//! CUDA device and launches them from each op's `cuda_fwd`; this crate has no Rust logic.
//! Built only with the model's `cuda` feature (it needs nvcc).
include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
