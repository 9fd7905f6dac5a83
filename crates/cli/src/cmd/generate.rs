//! `sft generate` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft generate` is not implemented yet")
}
