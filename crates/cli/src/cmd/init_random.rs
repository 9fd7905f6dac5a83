//! `sft init-random` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct InitRandomArgs {}

pub fn run(_args: InitRandomArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft init-random` is not implemented yet")
}
