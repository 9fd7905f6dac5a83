//! `sft runs` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct RunsArgs {}

pub fn run(_args: RunsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft runs` is not implemented yet")
}
