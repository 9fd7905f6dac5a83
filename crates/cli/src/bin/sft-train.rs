//! `sft-train`: the same as `sft train`.
use clap::Parser;
use sft_cli::cmd;

fn main() {
    cmd::init_logging();
    let args = cmd::train::TrainArgs::parse();
    sft_cli::cmd::output::finish(cmd::train::run(args));
}
