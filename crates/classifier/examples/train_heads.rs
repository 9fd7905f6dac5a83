//! Trains heads from configs, as `sft classifier train` does, without the CLI:
//! `cargo run --release -p sft-classifier --example train_heads -- configs/classifier/tone.yaml ...`
use candle_core::Device;
use sft_classifier::{train, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for path in std::env::args().skip(1) {
        let cfg = TrainConfig::from_yaml_file(&path)?;
        let report = train::run(&cfg, &Device::Cpu)?;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
