//! `sft import-gguf` (not yet implemented).
use clap::Args;

#[derive(Args, Debug)]
pub struct ImportGgufArgs {}

pub fn run(_args: ImportGgufArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sft import-gguf` is not implemented yet")
}
