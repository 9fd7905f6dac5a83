//! `sft score` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct ScoreArgs {}

pub fn run(_args: ScoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft score` is not implemented yet")
}
