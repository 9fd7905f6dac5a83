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

/// Logs go to stderr (stdout carries JSON results); `RUST_LOG` overrides the `info` default.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
