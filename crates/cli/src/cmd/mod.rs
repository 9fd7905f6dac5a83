//! One module per subcommand; each owns its clap `Args` and a `run` returning `anyhow::Result`.
//! `output` (first, so that its `say!` is in scope in the others) says where output goes.
#[macro_use]
pub mod output;

pub mod classifier;
pub mod data;
pub mod generate;
pub mod ifs;
pub mod import_gguf;
pub mod init_random;
pub mod merge_lora;
pub mod objecqa;
pub mod run_folder;
pub mod runs;
pub mod score;
pub mod train;

/// Process-wide setup, before any tensor is made: logging (coloured only on a terminal), and the CPU runtime settings of
/// `sft_model::runtime::tune_cpu_runtime` (element-wise ops on the calling thread unless the
/// user sets `CANDLE_NUM_THREADS`; large blocks kept in the heap instead of mapped and
/// unmapped per step), the same ones the benchmarks measured.
pub fn init_logging() {
    sft_model::runtime::tune_cpu_runtime();
    use tracing_subscriber::EnvFilter;
    // Ranks other than 0 of a data-parallel run log their warnings and errors only (rank 0
    // logs the run); RUST_LOG applies to every rank.
    let level = if sft_dist::launcher_rank() == 0 {
        "info"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(output::colour_logs())
        .try_init();
}
