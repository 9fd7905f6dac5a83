//! One module per subcommand; each owns its clap `Args` and a `run` returning `anyhow::Result`.
#![allow(dead_code)]
pub mod classifier;
pub mod data;
pub mod generate;
pub mod ifs;
pub mod import_gguf;
pub mod init_random;
pub mod merge_lora;
pub mod objecqa;
pub mod runs;
pub mod score;
pub mod train;

/// Process-wide setup, before any tensor is made: logging, and candle's CPU thread pool.
///
/// candle 0.11 runs element-wise ops on a spin-waiting "barrier pool" beside the rayon pool
/// that its matmuls use; on small machines the two fight for the cores and the main thread
/// spins while the pool's worker is descheduled (38% of a LoRA step's profile on 2 cores,
/// 2-3x slower steps). Element-wise ops are memory-bound, so they run on the calling thread
/// unless the user sets `CANDLE_NUM_THREADS` (matmuls keep every core through rayon).
pub fn init_logging() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
