//! `sft-train`: the same as `sft train`.
use clap::Parser;
use sft_cli::cmd;

fn main() {
    cmd::init_logging();
    let args = cmd::train::TrainArgs::parse();
    if let Err(e) = cmd::train::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
