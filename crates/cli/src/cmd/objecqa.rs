//! `sft objecqa` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct ObjecqaArgs {}

pub fn run(_args: ObjecqaArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft objecqa` is not implemented yet")
}
