//! `sft classifier` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct ClassifierArgs {}

pub fn run(_args: ClassifierArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft classifier` is not implemented yet")
}
