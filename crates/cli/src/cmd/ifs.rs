//! `sft ifs` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct IfsArgs {}

pub fn run(_args: IfsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft ifs` is not implemented yet")
}
