//! The subcommands of the `sft` binary, shared with `sft-train` (which runs `train` alone).
pub mod cmd;
