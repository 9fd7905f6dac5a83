//! `sft merge-lora` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct MergeLoraArgs {}

pub fn run(_args: MergeLoraArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft merge-lora` is not implemented yet")
}
