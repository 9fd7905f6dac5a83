//! sft-kernels: the CUDA C++ sources of `sft_model::ops` (`src/*.cu`), built two ways:
//! - with the `cuda` feature, PTX for the GPU (one `&str` constant per file: `ATTENTION`,
//!   `NORM`, ...), which the model crate loads into its CUDA device;
//! - always, the same sources compiled as C++ for the CPU against a CUDA compatibility layer
//!   (`emu/`): the emulated GPU of [`emu`], which runs every kernel on host memory with real
//!   barriers, warp-collective shuffles and WMMA, so the CUDA path is tested without a GPU.
//!
//! [`MODULES`] lists every kernel of every module, read off the sources at build time: a launch
//! on either device resolves its kernel's name there. Launch sizes, arguments and buffers are
//! computed by the model crate (`ops/launch.rs`); this crate has no op logic.
#[cfg(feature = "cuda")]
include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

pub mod emu;

mod table {
    use crate::emu::RawKernel;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use table::MODULES;
