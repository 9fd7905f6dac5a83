//! `sft train` / `sft-train` (not yet implemented).
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "sft-train", about = "Fine-tune a LLaMA-family model from a YAML config")]
pub struct TrainArgs {
    /// The YAML config.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft train` is not implemented yet")
}
