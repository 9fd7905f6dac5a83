//! `sft data` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct DataArgs {}

pub fn run(_args: DataArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft data` is not implemented yet")
}
